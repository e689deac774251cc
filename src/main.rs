//! The `keygate` binary: parse the command line, start logging, run the command.
#![forbid(unsafe_code)]

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = keygate::cli::Cli::parse();
    keygate::telemetry::init();
    keygate::cli::run(cli)
}
