//! SIGINT / SIGTERM -> graceful stop.

use std::io;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::runtime::{spawn_helper, StopHandle};

/// Starts a helper thread that turns the first SIGINT or SIGTERM into a
/// graceful stop of the runtime. A second signal exits at once (status 130),
/// for an operator whose shutdown is stuck.
pub fn install_stop_on_signals(stop: StopHandle, cpu: Option<usize>) -> io::Result<()> {
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    spawn_helper("tessera-signals", cpu, move || {
        let mut seen = 0;
        for signal in signals.forever() {
            seen += 1;
            if seen == 1 {
                tracing::info!(signal, "signal received: stopping gracefully");
                stop.stop();
            } else {
                tracing::warn!(signal, "second signal: exiting now");
                std::process::exit(130);
            }
        }
    })?;
    Ok(())
}
