//! `netsel services`: every registered service with its VIP, counts and health, then the
//! instances whose check is not passing, with what their check saw.

use std::process::ExitCode;

use clap::Args;

use super::api_client::{Api, ApiArgs, Failure, print_json, print_table};
use crate::client::http::encode_component;

/// Flags of `netsel services`.
#[derive(Debug, Args)]
pub struct ServicesArgs {
    /// Only services with instances carrying this tag, and only those instances (repeat:
    /// every tag; exact match).
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    #[command(flatten)]
    api: ApiArgs,
}

/// Lists services. Exit 0, or the API failure's code.
pub async fn run(args: ServicesArgs) -> ExitCode {
    match list(&args.api, &args.tags).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => f.report(),
    }
}

async fn list(args: &ApiArgs, tags: &[String]) -> Result<(), Failure> {
    let api = Api::new(args).await?;
    let mut path = "/v1/services?detail=true".to_string();
    if !tags.is_empty() {
        path.push_str("&tag=");
        path.push_str(&encode_component(&tags.join(",")));
    }
    let a = api.get(&path).await?;
    if args.json {
        print_json(&a.body);
        return Ok(());
    }
    let services = a.body["services"].as_array().cloned().unwrap_or_default();
    if services.is_empty() && !tags.is_empty() {
        println!("no service has instances tagged {}", tags.join(","));
        return Ok(());
    }
    if services.is_empty() {
        println!("no services registered");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = services
        .iter()
        .map(|s| {
            let tags: Vec<&str> = s["tags"]
                .as_array()
                .map(|t| t.iter().filter_map(|t| t.as_str()).collect())
                .unwrap_or_default();
            vec![
                s["name"].as_str().unwrap_or("").to_string(),
                format!("{}:{}", s["vip"].as_str().unwrap_or(""), s["port"]),
                format!("{}/{}", s["healthy_count"], s["instance_count"]),
                s["health"].as_str().unwrap_or("").to_string(),
                tags.join(","),
            ]
        })
        .collect();
    print_table(&["NAME", "VIP", "HEALTHY", "HEALTH", "TAGS"], &rows);
    // Why an instance is not passing: `web 1a24… 127.0.0.1:8000 critical: connect …`.
    let unwell: Vec<String> = services
        .iter()
        .flat_map(|s| s["instances"].as_array().cloned().unwrap_or_default())
        .filter_map(|i| {
            let r = i.get("check_result")?;
            let status = r["status"].as_str()?;
            (status != "passing" || i["health"] != "passing").then(|| {
                format!(
                    "  {} {} {} {}: {}",
                    i["service"].as_str().unwrap_or(""),
                    i["id"].as_str().unwrap_or(""),
                    i["endpoint"].as_str().unwrap_or(""),
                    i["health"].as_str().unwrap_or(""),
                    r["output"].as_str().unwrap_or("")
                )
            })
        })
        .collect();
    if !unwell.is_empty() {
        println!("\ninstances not passing their checks:");
        for line in unwell {
            println!("{line}");
        }
    }
    Ok(())
}
