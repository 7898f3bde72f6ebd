//! The seed's server example: NetSel with its default configuration, until Ctrl-C.
//!
//! ```text
//! cargo run --example netsel_server              # registry on 0.0.0.0:9000, as in the seed
//! cargo run --example netsel_server -- 127.0.0.1:0   # registry there, the rest on any port
//! ```
#![allow(clippy::print_stdout)]

use netsel::{NetSelServer, Settings};
use tokio::signal;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("Starting NetSel Service...");
    let server = match std::env::args().nth(1) {
        // The seed's defaults.
        None => NetSelServer::new(),
        // A chosen registry address, every other listener on an ephemeral loopback port.
        Some(addr) => {
            let mut settings = Settings::ephemeral();
            settings.config.registry_addr = addr.parse()?;
            NetSelServer::with_settings(settings)
        }
    };
    server.start().await?;
    let bound = server.bound().expect("started");
    println!("NetSel Service started successfully!");
    println!("- Registration server: {}", bound.registry);
    for (name, addr) in bound.listing().into_iter().skip(1) {
        println!("- {name}: {addr}");
    }

    signal::ctrl_c().await?;
    println!("Shutting down NetSel Service...");
    server.shutdown().await;
    Ok(())
}
