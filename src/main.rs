//! The `keygate` binary: parse the command line, start logging, run the command.
#![forbid(unsafe_code)]

use clap::Parser;

/// jemalloc hands freed memory back to the OS after a reload drops a million-key table, where
/// glibc's per-thread arenas kept it; it is also quick with many small, short-lived allocations.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    let cli = keygate::cli::Cli::parse();
    keygate::telemetry::init();
    keygate::cli::run(cli)
}
