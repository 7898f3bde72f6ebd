//! `netsel nodes`: the nodes serving the catalog (one, unless in a cluster), their state,
//! how many instances each holds, and their addresses.

use std::process::ExitCode;

use clap::Args;

use super::api_client::{Api, ApiArgs, Failure, print_json, print_table};

/// Flags of `netsel nodes`.
#[derive(Debug, Args)]
pub struct NodesArgs {
    #[command(flatten)]
    api: ApiArgs,
}

/// Lists nodes. Exit 0, or the API failure's code.
pub async fn run(args: NodesArgs) -> ExitCode {
    match list(&args.api).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => f.report(),
    }
}

async fn list(args: &ApiArgs) -> Result<(), Failure> {
    let api = Api::new(args).await?;
    let a = api.get("/v1/nodes").await?;
    if args.json {
        print_json(&a.body);
        return Ok(());
    }
    let nodes = a.body["nodes"].as_array().cloned().unwrap_or_default();
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let addr = |part: &str| n["addrs"][part].as_str().unwrap_or("-").to_string();
            let me = if n["self"].as_bool() == Some(true) {
                " *"
            } else {
                ""
            };
            vec![
                format!("{}{me}", n["id"].as_str().unwrap_or("")),
                n["state"].as_str().unwrap_or("").to_string(),
                n["instances"].to_string(),
                addr("registry"),
                addr("api"),
                addr("dns"),
            ]
        })
        .collect();
    print_table(
        &["NODE", "STATE", "INSTANCES", "REGISTRY", "API", "DNS"],
        &rows,
    );
    Ok(())
}
