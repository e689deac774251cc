//! The command line: flags parsed by clap, then each command run to an exit code.

mod admin;
mod keys;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::SystemTime;

use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

use crate::config;
use crate::proxy::Gateway;
use crate::{reload, server};

#[derive(Debug, Parser)]
#[command(name = "keygate", version, about = "API-key authentication gateway in front of an HTTP API")]
pub struct Cli {
    /// The gateway config file [default: $KEYGATE_CONFIG, else ./keygate.toml]
    #[arg(short, long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway
    Serve,
    /// Validate keygate.toml and the key file, print a summary
    Check,
    /// Manage keys in the key file (a running gateway picks changes up within a second)
    Keys {
        #[command(subcommand)]
        command: keys::KeysCommand,
    },
    /// Admin tokens for the key API and the console
    Admin {
        #[command(subcommand)]
        command: admin::AdminCommand,
    },
    /// Start an echo upstream and a gateway with a fresh key, for a first try
    Demo {
        /// Where the demo gateway listens
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
}

impl Cli {
    fn config_path(&self) -> PathBuf {
        self.config.clone().unwrap_or_else(config::default_path)
    }
}

/// Runs a parsed command; errors are printed here, so `main` only turns them into an exit code.
pub fn run(cli: Cli) -> ExitCode {
    let config_path = cli.config_path();
    match cli.command {
        Command::Check => check(&config_path),
        Command::Serve => serve(&config_path),
        Command::Keys { command } => match keys::run(&config_path, command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("keygate: {error}");
                ExitCode::FAILURE
            }
        },
        Command::Admin { command } => match admin::run(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("keygate: {error}");
                ExitCode::FAILURE
            }
        },
        Command::Demo { listen } => {
            block_on(async move { crate::demo::run(listen).await.map_err(|e| e.to_string()) })
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match config::load(path) {
        Ok(snapshot) => {
            if let Some(warning) = snapshot.store_warning() {
                eprintln!("warning: {warning}");
            }
            if let config::KeySource::Cluster(_) = snapshot.key_source {
                eprintln!(
                    "note: [auth] store = \"cluster\": the keys live in Redis and are not counted here"
                );
            }
            println!("ok: {}", snapshot.summary(SystemTime::now()));
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            ExitCode::FAILURE
        }
    }
}

fn serve(path: &std::path::Path) -> ExitCode {
    let snapshot = match config::load(path) {
        Ok(snapshot) => snapshot,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    // Default: one worker per core the process may run on.
    let workers = snapshot
        .server
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get));
    let listen = snapshot.server.listen;
    let admin = snapshot.admin.as_ref().map(|a| a.listen);
    block_on(async move {
        let summary = snapshot.summary(SystemTime::now());
        tracing::info!(config = %snapshot.config_path.display(), "loaded {summary}");
        if let Some(warning) = snapshot.store_warning() {
            tracing::warn!("{warning}");
        }
        let counters = crate::counters::open(&snapshot.store).await?;
        let key_source = snapshot.key_source.clone();
        let gateway = Arc::new(Gateway::with_counters(snapshot, counters));
        if let config::KeySource::Cluster(settings) = key_source {
            // Not ready until every key is in memory: a load balancer sends nothing before.
            gateway.await_keys();
            crate::keys::cluster::follow::spawn(Arc::clone(&gateway), *settings)
                .map_err(|e| format!("cannot start following the key store: {e}"))?;
        }
        // Signal handlers first: once "listening on" is logged, SIGHUP and SIGTERM must already
        // mean reload and drain, never the default of killing the process.
        let shutdown = server::shutdown_signal();
        let _reloader =
            reload::spawn(Arc::clone(&gateway)).map_err(|e| format!("cannot watch the config files: {e}"))?;
        let listener = server::bind(listen).await.map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let admin = match admin {
            Some(addr) => {
                let admin_listener = TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("cannot listen on {addr} (admin): {e}"))?;
                let bound = admin_listener.local_addr().map_err(|e| e.to_string())?;
                tracing::info!(addr = %bound, "admin listening on {bound}");
                Some(tokio::spawn(crate::admin::serve(admin_listener, Arc::clone(&gateway))))
            }
            None => None,
        };
        let served = server::serve_workers(workers, listener, Arc::clone(&gateway), shutdown)
            .await
            .map_err(|e| e.to_string());
        // What is still batched (usage, quota counts) is written before the process ends.
        gateway.counters().flush().await;
        // The admin listener outlives the drain so `/readyz` can say 503 meanwhile.
        if let Some(admin) = admin {
            admin.abort();
        }
        served
    })
}

/// Runs `task` on a current-thread runtime: the first worker. `serve` starts the others itself,
/// each with a runtime of its own (`server::serve_workers`); spawn_blocking gets its own threads.
fn block_on(task: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("keygate: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("keygate: {error}");
            ExitCode::FAILURE
        }
    }
}
