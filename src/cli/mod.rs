//! The `netsel` command line. `main.rs` only calls [`main`].
//!
//! Output for people goes to stdout; logs go to stderr through `tracing`: text (coloured
//! only on a terminal, and never with `NO_COLOR` set) or JSON lines (`--log-format json`),
//! filtered by `--log-level`, else `RUST_LOG`, else `info`. Registrations,
//! deregistrations, expiries and health changes are logged at `info` under the target
//! `netsel::audit` (`RUST_LOG=info,netsel::audit=warn` silences them).

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
    /// Log format on stderr: `text` (coloured only on a terminal) or `json` (one object a
    /// line, for log pipelines).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "NETSEL_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Log filter: a level (`error`, `warn`, `info`, `debug`, `trace`) or `RUST_LOG`
    /// directives such as `info,netsel::audit=warn`. Default: `RUST_LOG`, else `info`.
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
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
    /// Print a shell completion script: `netsel completions bash > /etc/bash_completion.d/netsel`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `netsel man | man -l -`.
    Man,
}

/// Parses the command line, runs it, and maps failures to exit codes:
/// 0 success, 1 runtime failure (API unreachable), 2 bad usage, configuration or input,
/// 3 not found, 4 refused (secret or ACL token), 5 conflict, 6 rate-limited,
/// 7 `resolve` found no healthy instance; `run` passes on its command's code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logging(cli.log_format, cli.log_level.as_deref()) {
        eprintln!("netsel: {e}");
        return ExitCode::from(2);
    }
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
            Command::Completions { shell } => {
                let mut cmd = <Cli as clap::CommandFactory>::command();
                clap_complete::generate(shell, &mut cmd, "netsel", &mut std::io::stdout());
                ExitCode::SUCCESS
            }
            Command::Man => man_page(),
        }
    })
}

/// Writes `netsel(1)` to stdout: the top-level page, then each subcommand's as a section.
fn man_page() -> ExitCode {
    use std::io::Write;
    let cmd = <Cli as clap::CommandFactory>::command();
    let mut out = Vec::new();
    let render = |out: &mut Vec<u8>| -> std::io::Result<()> {
        let man = clap_mangen::Man::new(cmd.clone());
        man.render_title(out)?;
        man.render_name_section(out)?;
        man.render_synopsis_section(out)?;
        man.render_description_section(out)?;
        man.render_options_section(out)?;
        man.render_subcommands_section(out)?;
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            writeln!(out, ".SH \"NETSEL {}\"", sub.get_name().to_uppercase())?;
            let page =
                clap_mangen::Man::new(sub.clone().bin_name(format!("netsel {}", sub.get_name())));
            page.render_synopsis_section(out)?;
            page.render_description_section(out)?;
            page.render_options_section(out)?;
        }
        man.render_version_section(out)?;
        man.render_authors_section(out)
    };
    match render(&mut out).and_then(|()| std::io::stdout().write_all(&out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netsel: cannot write the manual page: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Sets up logging to stderr. An invalid `--log-level` is an error (exit 2); an invalid
/// `RUST_LOG` is reported and `info` used, as a typo in the environment should not stop a
/// server from starting.
fn init_logging(format: LogFormat, level: Option<&str>) -> Result<(), String> {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let mut note = None;
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).map_err(|e| format!("--log-level '{l}': {e}"))?,
        None => match std::env::var("RUST_LOG") {
            Ok(v) if !v.trim().is_empty() => EnvFilter::try_new(&v).unwrap_or_else(|e| {
                note = Some(format!("ignoring RUST_LOG '{v}' ({e}); logging at info"));
                EnvFilter::new("info")
            }),
            _ => EnvFilter::new("info"),
        },
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => {
            let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            builder.with_ansi(colour).try_init()
        }
    };
    if let Some(note) = note {
        tracing::warn!("{note}");
    }
    Ok(())
}
