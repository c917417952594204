//! `cryptvol bench` without the daemon's CLI: `cargo bench --bench nbd_load -- URI [options]`.
//! The same code as the `cryptvol bench` subcommand (`cryptvol::bench::run`); kept so the peer
//! benchmark and fio comparisons run from a branch where the CLI is not wired yet.

use clap::Parser;

#[derive(Parser)]
struct Cmd {
    #[command(flatten)]
    bench: cryptvol::bench::BenchArgs,
    /// One JSON document on stdout.
    #[arg(long)]
    json: bool,
}

fn main() -> std::process::ExitCode {
    // `cargo bench` appends `--bench`; it means nothing here.
    let cmd = Cmd::parse_from(std::env::args().filter(|a| a != "--bench"));
    match cryptvol::bench::run(cmd.bench, cmd.json) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cryptvol bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
