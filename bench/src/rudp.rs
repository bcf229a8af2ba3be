//! RUDP suite (filled by the RUDP transport work).

/// Options of the `rudp` suite.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A short run, for CI.
    #[arg(long)]
    pub quick: bool,
}

/// Runs the suite.
pub fn run(_args: Args) -> Result<(), Box<dyn std::error::Error>> {
    Err("the rudp suite is not written yet".into())
}
