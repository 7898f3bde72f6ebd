//! `netsel register NAME --addr HOST:PORT`: registers an instance and keeps it alive in
//! the foreground; Ctrl-C or SIGTERM deregisters it.

use std::process::ExitCode;

use clap::Args;

use super::api_client::{
    Api, ApiArgs, Failure, InstanceArgs, Registrar, Signals, print_json, resolve_addr,
};

/// Flags of `netsel register`.
#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// Service name.
    name: String,
    /// Where the instance listens.
    #[arg(long, value_name = "HOST:PORT")]
    addr: String,
    #[command(flatten)]
    instance: InstanceArgs,
    #[command(flatten)]
    api: ApiArgs,
}

/// Registers, heartbeats until SIGINT, SIGTERM, SIGHUP or SIGQUIT, deregisters. Exit 0 after a clean
/// deregistration; the API failure's code if the first registration is refused.
pub async fn run(args: RegisterArgs) -> ExitCode {
    match register(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => f.report(),
    }
}

async fn register(args: &RegisterArgs) -> Result<(), Failure> {
    let endpoint = resolve_addr("--addr", &args.addr).await?;
    let api = Api::new(&args.api).await?;
    let body = args.instance.body(&args.name, endpoint)?;
    let mut signals = Signals::new()?;
    let mut reg = Registrar::new(api, body);
    let answer = reg.register().await?;
    if args.api.json {
        print_json(&answer);
    } else {
        println!(
            "registered {} instance {} at {} (VIP {}:{}, TTL {}s); Ctrl-C deregisters",
            answer["service"].as_str().unwrap_or(""),
            answer["id"].as_str().unwrap_or(""),
            answer["endpoint"].as_str().unwrap_or(""),
            answer["vip"].as_str().unwrap_or(""),
            answer["service_port"],
            answer["ttl_secs"]
        );
    }
    loop {
        tokio::select! {
            sig = signals.recv() => {
                tracing::info!(signal = sig, "deregistering");
                reg.deregister().await?;
                if !args.api.json {
                    println!("deregistered");
                }
                return Ok(());
            }
            _ = tokio::time::sleep(reg.interval()) => {
                if let Err(f) = reg.keep_alive().await {
                    // Keep trying: the registry may be restarting.
                    tracing::warn!(error = ?f, "heartbeat failed");
                }
            }
        }
    }
}
