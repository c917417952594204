//! `cryptvol bench`: an NBD client load generator (SPEC §7), built on the client side of the
//! `nbd` codec. CONTRACT: `BenchArgs` (clap::Args) and `run(args, json) -> Result<(), BenchError>`.

/// Arguments of `cryptvol bench` (filled in by the benchmark issue).
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// `nbd+unix:///NAME?socket=PATH` or `nbd://HOST:PORT/NAME`
    pub uri: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("not yet implemented")]
    NotYet,
}

/// Runs the workload and prints the result table (or one JSON document with `json`).
pub fn run(_args: BenchArgs, _json: bool) -> Result<(), BenchError> {
    Err(BenchError::NotYet)
}
