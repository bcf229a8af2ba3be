pub fn run(_a: SimArgs) -> Result<(), String> {
    Err("not yet".into())
}
#[derive(clap::Args, Debug)]
pub struct SimArgs {}
