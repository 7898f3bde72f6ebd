//! `netsel services`: every registered service with its VIP, counts and health.

use std::process::ExitCode;

use clap::Args;

use super::api_client::{Api, ApiArgs, Failure, print_json, print_table};

/// Flags of `netsel services`.
#[derive(Debug, Args)]
pub struct ServicesArgs {
    #[command(flatten)]
    api: ApiArgs,
}

/// Lists services. Exit 0, or the API failure's code.
pub async fn run(args: ServicesArgs) -> ExitCode {
    match list(&args.api).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => f.report(),
    }
}

async fn list(args: &ApiArgs) -> Result<(), Failure> {
    let api = Api::new(args).await?;
    let a = api.get("/v1/services").await?;
    if args.json {
        print_json(&a.body);
        return Ok(());
    }
    let services = a.body["services"].as_array().cloned().unwrap_or_default();
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
    Ok(())
}
