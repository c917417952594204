//! The `cryptvol` command line: clap commands, a thin client of the control API.
//! The only part that uses `anyhow` and decides process exit codes.

use std::process::ExitCode;

pub fn main() -> ExitCode {
    eprintln!("cryptvol: not yet: the daemon is being built");
    ExitCode::from(2)
}
