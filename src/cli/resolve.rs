//! `netsel resolve NAME`: a service's VIP and its instances.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use super::api_client::{Api, ApiArgs, Failure, human_duration, print_json, print_table};
use crate::client::http::encode_component;

/// Flags of `netsel resolve`.
#[derive(Debug, Args)]
pub struct ResolveArgs {
    /// Service name.
    name: String,
    /// Only the instances carrying this tag (repeat: every one of them; exact match).
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    #[command(flatten)]
    api: ApiArgs,
}

/// Prints the service. Exit 0; 3 if no such service; 7 if it has no healthy instance
/// (with `--tag`: none carrying the tags).
pub async fn run(args: ResolveArgs) -> ExitCode {
    match resolve(&args).await {
        Ok(code) => code,
        Err(f) => f.report(),
    }
}

async fn resolve(args: &ResolveArgs) -> Result<ExitCode, Failure> {
    let api = Api::new(&args.api).await?;
    let mut path = format!("/v1/services/{}", encode_component(&args.name));
    if !args.tags.is_empty() {
        path.push_str("?tag=");
        path.push_str(&encode_component(&args.tags.join(",")));
    }
    let a = api.get(&path).await?;
    let s = &a.body;
    let healthy = s["healthy_count"].as_u64().unwrap_or(0);
    if args.api.json {
        print_json(s);
    } else {
        let tagged = if args.tags.is_empty() {
            String::new()
        } else {
            format!(" tagged {}", args.tags.join(","))
        };
        println!(
            "{} {}:{} ({} of {} instances{tagged} healthy)",
            s["name"].as_str().unwrap_or(""),
            s["vip"].as_str().unwrap_or(""),
            s["port"],
            healthy,
            s["instance_count"]
        );
        let rows: Vec<Vec<String>> = s["instances"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|i| {
                let tags: Vec<&str> = i["tags"]
                    .as_array()
                    .map(|t| t.iter().filter_map(|t| t.as_str()).collect())
                    .unwrap_or_default();
                vec![
                    i["id"].as_str().unwrap_or("").to_string(),
                    i["endpoint"].as_str().unwrap_or("").to_string(),
                    i["health"].as_str().unwrap_or("").to_string(),
                    i["weight"].to_string(),
                    human_duration(Duration::from_millis(
                        i["lease_remaining_ms"].as_u64().unwrap_or(0),
                    )),
                    tags.join(","),
                    i["check_result"]["output"]
                        .as_str()
                        .unwrap_or("-")
                        .to_string(),
                ]
            })
            .collect();
        print_table(
            &[
                "ID", "ENDPOINT", "HEALTH", "WEIGHT", "LEASE", "TAGS", "CHECK",
            ],
            &rows,
        );
    }
    Ok(if healthy == 0 {
        ExitCode::from(7)
    } else {
        ExitCode::SUCCESS
    })
}
