//! `netsel run --name NAME --port P -- CMD ARGS...`: runs CMD and keeps it registered
//! while it lives.
//!
//! CMD starts at once; once its port accepts connections it is registered, and it
//! heartbeats from then on. SIGINT, SIGTERM, SIGHUP and SIGQUIT are passed on to CMD (not
//! acted on), so CMD decides how to stop; when it exits, the instance is deregistered and
//! `netsel run` exits with CMD's code (128 + N if a signal N killed it). Works for any
//! language.

use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitCode, ExitStatus};
use std::time::Duration;

use clap::Args;
use tokio::process::Command;
use tokio::time::Instant;

use super::api_client::{
    Api, ApiArgs, Failure, InstanceArgs, Registrar, Signals, print_json, resolve_addr,
};

/// Flags of `netsel run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Service name to register CMD under.
    #[arg(long)]
    name: String,
    /// The port CMD listens on.
    #[arg(long)]
    port: u16,
    /// The address CMD listens on.
    #[arg(long, default_value = "127.0.0.1", value_name = "HOST")]
    host: String,
    /// Register at once instead of waiting for the port to accept connections.
    #[arg(long)]
    no_wait: bool,
    #[command(flatten)]
    instance: InstanceArgs,
    #[command(flatten)]
    api: ApiArgs,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

/// Runs CMD registered; exits with its code. Exit 127 if CMD cannot start; if the first
/// registration is refused (bad name, ACL), CMD is stopped and the API failure's code
/// returned.
pub async fn run(args: RunArgs) -> ExitCode {
    match supervise(&args).await {
        Ok(code) => code,
        Err(f) => f.report(),
    }
}

fn exit_code(status: ExitStatus) -> ExitCode {
    match (status.code(), status.signal()) {
        (Some(c), _) => ExitCode::from(c as u8),
        (None, Some(sig)) => ExitCode::from((128 + sig) as u8),
        _ => ExitCode::FAILURE,
    }
}

/// Sends `signal` to process `pid`.
fn send_signal(pid: u32, signal: i32) {
    if !crate::sys::kill(pid, signal) {
        tracing::debug!(pid, signal, "forwarding the signal failed (child gone?)");
    }
}

async fn port_open(endpoint: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(endpoint)
        )
        .await,
        Ok(Ok(_))
    )
}

async fn supervise(args: &RunArgs) -> Result<ExitCode, Failure> {
    let endpoint = resolve_addr("--host/--port", &format!("{}:{}", args.host, args.port)).await?;
    let api = Api::new(&args.api).await?;
    let body = args.instance.body(&args.name, endpoint)?;
    let mut signals = Signals::new()?;
    let mut child = match Command::new(&args.command[0])
        .args(&args.command[1..])
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("netsel: cannot start '{}': {e}", args.command[0]);
            return Ok(ExitCode::from(127));
        }
    };
    let pid = child.id().unwrap_or(0);
    let mut reg = Registrar::new(api, body);
    let mut ready = args.no_wait;
    let mut announced = false;
    let mut said_waiting = false;
    // The last failure reported, so a registry that stays away is reported once, not
    // every heartbeat interval.
    let mut last_failure: Option<String> = None;
    let mut next = Instant::now();
    loop {
        tokio::select! {
            status = child.wait() => {
                let status = status.map_err(|e| Failure::Unreachable(format!("waiting for the command: {e}")))?;
                if let Err(f) = reg.deregister().await {
                    tracing::warn!(error = %f, "deregistration failed; the lease will expire");
                } else if announced {
                    eprintln!("netsel: {} exited ({status}); deregistered", args.command[0]);
                }
                return Ok(exit_code(status));
            }
            sig = signals.recv() => {
                tracing::info!(signal = sig, pid, "forwarding signal");
                send_signal(pid, sig);
            }
            _ = tokio::time::sleep_until(next) => {
                if !ready {
                    ready = port_open(endpoint).await;
                    next = Instant::now() + Duration::from_millis(100);
                    if !ready {
                        if !said_waiting && !args.api.json {
                            said_waiting = true;
                            eprintln!("netsel: waiting for '{}' to accept connections on {endpoint} before registering {}", args.command[0], args.name);
                        }
                        continue;
                    }
                }
                let first = !reg.is_registered();
                match reg.keep_alive().await {
                    Ok(()) if first && !announced => {
                        announced = true;
                        if args.api.json {
                            print_json(&serde_json::json!({ "registered": args.name, "endpoint": endpoint.to_string() }));
                        } else {
                            eprintln!("netsel: registered {} at {endpoint} while '{}' runs", args.name, args.command[0]);
                        }
                    }
                    Ok(()) => {
                        if last_failure.take().is_some() {
                            tracing::info!(service = %args.name, "registry reachable again; {} is registered", args.name);
                        }
                    }
                    Err(f @ Failure::Api { status: 400 | 401 | 403 | 409 | 413 | 415, .. }) if first => {
                        // The registration itself is wrong: retrying cannot help.
                        send_signal(pid, libc::SIGTERM);
                        let _ = child.wait().await;
                        return Err(f);
                    }
                    Err(f) => {
                        let text = f.to_string();
                        if last_failure.as_deref() != Some(text.as_str()) {
                            tracing::warn!(error = %text, retry_every_ms = reg.interval().as_millis() as u64,
                                "registration or heartbeat failed; retrying until it works");
                            last_failure = Some(text);
                        }
                    }
                }
                next = Instant::now() + reg.interval();
            }
        }
    }
}
