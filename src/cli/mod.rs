//! The `netsel` command line. `main.rs` only calls [`main`].
//!
//! Output for people goes to stdout; logs go to stderr through `tracing`
//! (`RUST_LOG=debug` for more).

#![allow(clippy::print_stdout)]

mod api_client;
mod deregister;
mod nodes;
mod register;
mod resolve;
mod run;
mod serve;
mod services;
mod watch;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// NetSel: service registration and discovery with stable virtual IPs, DNS, and TCP and
/// HTTP proxies.
#[derive(Debug, Parser)]
#[command(name = "netsel", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the NetSel server (registry, DNS, proxies, API).
    Serve(serve::ServeArgs),
    /// List registered services.
    Services(services::ServicesArgs),
    /// Show one service: its VIP and instances.
    Resolve(resolve::ResolveArgs),
    /// List the nodes serving the catalog (a cluster's nodes, or this one), marking the
    /// one that answered with `*`.
    Nodes(nodes::NodesArgs),
    /// Print catalog changes as they happen.
    Watch(watch::WatchArgs),
    /// Register an instance and keep it alive until interrupted.
    Register(register::RegisterArgs),
    /// Remove an instance (with its secret, or an operator token).
    Deregister(deregister::DeregisterArgs),
    /// Run a command and keep it registered while it lives.
    Run(run::RunArgs),
}

/// Parses the command line, runs it, and maps failures to exit codes:
/// 0 success, 1 runtime failure (API unreachable), 2 bad usage, configuration or input,
/// 3 not found, 4 refused (secret or ACL token), 5 conflict, 6 rate-limited,
/// 7 `resolve` found no healthy instance; `run` passes on its command's code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("netsel: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve::run(args).await,
            Command::Services(args) => services::run(args).await,
            Command::Resolve(args) => resolve::run(args).await,
            Command::Nodes(args) => nodes::run(args).await,
            Command::Watch(args) => watch::run(args).await,
            Command::Register(args) => register::run(args).await,
            Command::Deregister(args) => deregister::run(args).await,
            Command::Run(args) => run::run(args).await,
        }
    })
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
