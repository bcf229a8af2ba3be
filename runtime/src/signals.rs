//! SIGINT / SIGTERM -> graceful stop (or, on a cluster node, a drain).

use std::io;
use std::sync::Arc;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::node::shared::NodeShared;
use crate::runtime::{spawn_helper, StopHandle};

/// Starts a helper thread that turns the first SIGINT or SIGTERM into a
/// graceful stop of the runtime. A second signal exits at once (status 130),
/// for an operator whose shutdown is stuck.
pub fn install_stop_on_signals(stop: StopHandle, cpu: Option<usize>) -> io::Result<()> {
    install(stop, None, cpu)
}

/// As [`install_stop_on_signals`], for a node: on a cluster node the first
/// signal drains it instead (Kubernetes' SIGTERM before a pod goes: its
/// cells move to other nodes by live handover, then it stops by itself);
/// a second signal stops it at once, gracefully; a third exits (130).
pub fn install_drain_on_signals(
    stop: StopHandle,
    shared: Arc<NodeShared>,
    cpu: Option<usize>,
) -> io::Result<()> {
    install(stop, Some(shared), cpu)
}

fn install(
    stop: StopHandle,
    shared: Option<Arc<NodeShared>>,
    cpu: Option<usize>,
) -> io::Result<()> {
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    let drains = shared.as_ref().is_some_and(|s| s.clustered);
    spawn_helper("tessera-signals", cpu, move || {
        let mut seen = 0;
        for signal in signals.forever() {
            seen += 1;
            match (seen, drains) {
                (1, true) => {
                    tracing::warn!(signal, "signal received: draining (cells move to other nodes, then the node stops; a second signal stops it now)");
                    if let Some(s) = &shared {
                        s.start_draining();
                    }
                }
                (1, false) | (2, true) => {
                    tracing::info!(signal, "signal received: stopping gracefully");
                    stop.stop();
                }
                _ => {
                    tracing::warn!(signal, "signal again: exiting now");
                    std::process::exit(130);
                }
            }
        }
    })?;
    Ok(())
}
