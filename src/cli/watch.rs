//! `netsel watch [NAME]`: prints catalog changes as they happen (the API's event stream).

use std::process::ExitCode;

use clap::Args;
use serde_json::Value;

use super::api_client::{Api, ApiArgs, Failure};
use crate::client::http::{self, encode_component};

/// Flags of `netsel watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Only this service's changes.
    name: Option<String>,
    /// Exit after this many changes (default: until interrupted).
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    #[command(flatten)]
    api: ApiArgs,
}

/// Streams changes until interrupted (or `--count` changes). Exit 0; 1 when the stream
/// ends because the server went away.
pub async fn run(args: WatchArgs) -> ExitCode {
    match watch(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => f.report(),
    }
}

async fn watch(args: &WatchArgs) -> Result<(), Failure> {
    let api = Api::new(&args.api).await?;
    let path = match &args.name {
        Some(n) => format!("/v1/events?service={}", encode_component(n)),
        None => "/v1/events".to_string(),
    };
    let unreachable = |e: http::HttpError| {
        Failure::Unreachable(format!(
            "cannot reach the NetSel API at {}: {e}",
            api.addr()
        ))
    };
    let mut stream = http::open(api.addr(), &api.request("GET", &path))
        .await
        .map_err(unreachable)?;
    if stream.status != 200 {
        let mut body = Vec::new();
        while let Ok(Some(p)) = stream.read_piece().await {
            body.extend_from_slice(&p);
            if body.len() > 64 * 1024 {
                break;
            }
        }
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        return Err(Failure::Api {
            status: stream.status,
            message: v["error"].as_str().unwrap_or("refused").to_string(),
        });
    }
    let mut seen = 0u64;
    while let Some(event) = stream.next_event().await.map_err(unreachable)? {
        let data: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
        if args.api.json {
            let mut line = serde_json::json!({ "event": event.event });
            if let (Some(o), Some(d)) = (line.as_object_mut(), data.as_object()) {
                o.extend(d.clone());
            }
            println!("{line}");
        } else {
            match event.event.as_str() {
                // Status lines go to stderr, so stdout holds only the changes.
                "hello" => eprintln!("watching from index {}", data["index"]),
                "change" => {
                    // A health change says to what, and why: `critical (HTTP 503 from /healthz)`.
                    let health = match (data["health"].as_str(), data["output"].as_str()) {
                        (Some(h), Some(o)) => format!(" {h} ({o})"),
                        (Some(h), None) => format!(" {h}"),
                        _ => String::new(),
                    };
                    println!(
                        "{:>6} {:<22} {} {}{health}",
                        data["index"],
                        data["kind"].as_str().unwrap_or(""),
                        data["service"].as_str().unwrap_or(""),
                        data["instance"].as_str().unwrap_or("")
                    )
                }
                "resync" => eprintln!(
                    "fell behind ({} changes missed); now at index {}",
                    data["missed"], data["index"]
                ),
                other => println!("{other} {}", event.data),
            }
        }
        if event.event == "change" {
            seen += 1;
            if args.count.is_some_and(|n| seen >= n) {
                return Ok(());
            }
        }
    }
    Err(Failure::Unreachable(
        "the event stream ended (server shut down?)".into(),
    ))
}
