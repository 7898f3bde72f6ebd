//! `netsel deregister ID`: removes an instance, with its secret or an operator's ACL token.

use std::process::ExitCode;

use clap::Args;

use super::api_client::{Api, ApiArgs, CALL_TIMEOUT, Failure, print_json};
use crate::client::http::encode_component;

/// Flags of `netsel deregister`.
#[derive(Debug, Args)]
pub struct DeregisterArgs {
    /// Instance id.
    id: String,
    /// The instance secret returned at registration. Without it, `--token` must name an
    /// ACL token that may write the service.
    #[arg(
        long,
        env = "NETSEL_SECRET",
        hide_env_values = true,
        value_name = "SECRET"
    )]
    secret: Option<String>,
    #[command(flatten)]
    api: ApiArgs,
}

/// Deregisters. Exit 0; 3 unknown id; 4 wrong secret or token; 2 neither given.
pub async fn run(args: DeregisterArgs) -> ExitCode {
    match deregister(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => f.report(),
    }
}

async fn deregister(args: &DeregisterArgs) -> Result<(), Failure> {
    if args.secret.is_none() && args.api.token.is_none() {
        return Err(Failure::Usage(
            "give the instance's --secret (or NETSEL_SECRET), or an operator --token".into(),
        ));
    }
    let api = Api::new(&args.api).await?;
    let path = format!("/v1/instances/{}", encode_component(&args.id));
    let mut req = api.request("DELETE", &path);
    if let Some(s) = &args.secret {
        req = req.header("X-Netsel-Secret", s.clone());
    }
    let a = api.send(req, CALL_TIMEOUT).await?.ok()?;
    if args.api.json {
        print_json(&a.body);
    } else {
        println!("deregistered {}", args.id);
    }
    Ok(())
}
