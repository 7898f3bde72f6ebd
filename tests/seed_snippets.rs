//! Every Rust snippet of the seed README, verbatim, so they keep compiling.
//!
//! They bind the seed's fixed ports (0.0.0.0:9000 and friends), so they are compiled but
//! not run here; `tests/cli_serve.rs` runs the same workflow on ephemeral ports, and
//! `examples/` runs it for real.
#![allow(dead_code, unused_imports, clippy::print_stdout)]

/// "Starting the NetSel Server"
mod starting_the_server {
    use netsel::NetSelServer;
    use tokio::signal;

    #[tokio::main]
    async fn main() -> Result<(), Box<dyn std::error::Error>> {
        // Create and start NetSel server with default configuration
        let server = NetSelServer::new();
        server.start().await?;

        // Wait for shutdown signal
        signal::ctrl_c().await?;
        println!("Shutting down NetSel Service...");

        Ok(())
    }
}

/// "Registering a Service"
mod registering_a_service {
    use netsel::client::ServiceClient;
    use std::net::{IpAddr, SocketAddr};
    use std::str::FromStr;
    use tokio::time::Duration;

    #[tokio::main]
    async fn main() -> Result<(), Box<dyn std::error::Error>> {
        let service_a_addr = SocketAddr::from_str("127.0.0.1:9000")?;
        let hostname = "my-service";

        // Create service client
        let mut client = ServiceClient::new(service_a_addr, hostname.to_string());

        // Register with Service A
        let (assigned_ip, assigned_port) = client.register().await?;
        let assigned_addr = SocketAddr::new(assigned_ip, assigned_port);

        println!(
            "Successfully registered! Assigned address: {}",
            assigned_addr
        );

        // Start heartbeats
        let heartbeat_client = client.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = heartbeat_client.send_heartbeat().await {
                    eprintln!("Heartbeat failed: {}", e);
                }
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        });

        // ... start your service logic

        Ok(())
    }
}

/// "Example 1: Basic Server Setup"
mod example_1_basic_server_setup {
    use netsel::NetSelServer;

    #[tokio::main]
    async fn main() -> Result<(), Box<dyn std::error::Error>> {
        let server = NetSelServer::new();
        server.start().await?;

        Ok(())
    }
}

/// "Example 2: Custom Configuration"
mod example_2_custom_configuration {
    use netsel::{NetSelConfig, NetSelServer};
    use std::net::{IpAddr, SocketAddr};

    #[tokio::main]
    async fn main() -> Result<(), Box<dyn std::error::Error>> {
        let config = NetSelConfig {
            registry_addr: SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 9000),
            tcp_proxy_addr: SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 8080),
            http_proxy_addr: SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 8081),
            dns_addr: SocketAddr::new(IpAddr::from([127, 0, 0, 1]), 5353),
            health_check_interval: 30,
            max_heartbeat_age: 60,
        };

        let server = NetSelServer::with_config(config);
        server.start().await?;

        Ok(())
    }
}

/// The seed's configuration table, checked value by value.
#[test]
fn configuration_table_defaults() {
    let c = netsel::NetSelConfig::default();
    assert_eq!(c.registry_addr.to_string(), "0.0.0.0:9000");
    assert_eq!(c.tcp_proxy_addr.to_string(), "0.0.0.0:8080");
    assert_eq!(c.http_proxy_addr.to_string(), "0.0.0.0:8081");
    assert_eq!(c.dns_addr.to_string(), "127.0.0.1:5353");
    assert_eq!(c.health_check_interval, 30);
    assert_eq!(c.max_heartbeat_age, 60);
    assert_eq!(
        netsel::client::DEFAULT_HEARTBEAT_INTERVAL,
        std::time::Duration::from_secs(10)
    );
}

/// The snippets' futures must be `Send` where the seed spawns them.
#[test]
fn seed_client_is_clone_send_and_sync() {
    fn check<T: Clone + Send + Sync + 'static>() {}
    check::<netsel::client::ServiceClient>();
}
