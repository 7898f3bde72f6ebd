//! `netsel register NAME --addr HOST:PORT`: registers an instance and keeps it alive in
//! the foreground; Ctrl-C or SIGTERM deregisters it.

use std::process::ExitCode;

use clap::Args;

use super::api_client::{
    Api, ApiArgs, CALL_TIMEOUT, Failure, InstanceArgs, Registrar, Signals, human_duration,
    print_json, resolve_addr,
};

/// Flags of `netsel register`.
#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// Service name.
    name: String,
    /// Where the instance listens.
    #[arg(long, value_name = "HOST:PORT")]
    addr: String,
    /// Take over an instance already registered at this address (same id, new secret; its
    /// holder's heartbeats then fail). Without it, `netsel register` refuses and says which
    /// instance it would replace.
    #[arg(long)]
    replace: bool,
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

/// Registering an endpoint already registered under the name takes that instance over.
/// Unless asked to (`--replace`), refuse, naming the instance (exit 5, a conflict). When
/// the caller may not read the service (ACLs), the check cannot be made and is skipped.
async fn refuse_takeover(
    api: &Api,
    name: &str,
    endpoint: std::net::SocketAddr,
) -> Result<(), Failure> {
    let path = format!("/v1/services/{name}");
    let answer = api.send(api.request("GET", &path), CALL_TIMEOUT).await?;
    if answer.status != 200 {
        return Ok(());
    }
    let existing = answer.body["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["endpoint"].as_str() == Some(endpoint.to_string().as_str()));
    let Some(i) = existing else {
        return Ok(());
    };
    let tags: Vec<&str> = i["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t.as_str())
        .collect();
    Err(Failure::Api {
        status: 409,
        message: format!(
            "{name} already has instance {} at {endpoint} (tags: {}); registering again \
             would take it over: pass --replace to do so",
            i["id"].as_str().unwrap_or("?"),
            if tags.is_empty() {
                "none".to_string()
            } else {
                tags.join(",")
            }
        ),
    })
}

async fn register(args: &RegisterArgs) -> Result<(), Failure> {
    let endpoint = resolve_addr("--addr", &args.addr).await?;
    let api = Api::new(&args.api).await?;
    let body = args.instance.body(&args.name, endpoint)?;
    if !args.replace {
        refuse_takeover(&api, &args.name, endpoint).await?;
    }
    let mut signals = Signals::new()?;
    let mut reg = Registrar::new(api, body);
    let answer = reg.register().await?;
    if args.api.json {
        print_json(&answer);
    } else {
        println!(
            "registered {} instance {} at {} (VIP {}:{}, TTL {}); Ctrl-C deregisters",
            answer["service"].as_str().unwrap_or(""),
            answer["id"].as_str().unwrap_or(""),
            answer["endpoint"].as_str().unwrap_or(""),
            answer["vip"].as_str().unwrap_or(""),
            answer["service_port"],
            human_duration(std::time::Duration::from_secs(
                answer["ttl_secs"].as_u64().unwrap_or(0)
            ))
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
                    tracing::warn!(error = %f, "heartbeat failed");
                }
            }
        }
    }
}
