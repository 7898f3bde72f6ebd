//! The seed's service example: registers `test-service-3` with the seed protocol, keeps it
//! alive with heartbeats, and serves an echo server on the port it was assigned.
//!
//! ```text
//! cargo run --example service_b                          # registry 127.0.0.1:9000
//! cargo run --example service_b -- 127.0.0.1:9000 2      # registry, heartbeat seconds
//! ```
#![allow(clippy::print_stdout)]

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use netsel::client::ServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::Duration;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let service_a_addr = SocketAddr::from_str(args.next().as_deref().unwrap_or("127.0.0.1:9000"))?;
    let heartbeat_secs: u64 = args.next().as_deref().unwrap_or("10").parse()?;
    let hostname = "test-service-3";

    let mut client = ServiceClient::new(service_a_addr, hostname.to_string());
    println!("Registering service '{hostname}' with Service A at {service_a_addr}");
    let (assigned_ip, assigned_port) = client.register().await?;
    let assigned_addr = SocketAddr::new(assigned_ip, assigned_port);
    println!("Successfully registered! Assigned address: {assigned_addr}");

    let heartbeat_client = client.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(heartbeat_secs)).await;
            if let Err(e) = heartbeat_client.send_heartbeat().await {
                eprintln!("Heartbeat failed: {e}");
            }
        }
    });

    // The registry expects the instance on the assigned port of the address it registered
    // from; its VIP forwards there through NetSel's proxies.
    let local_addr = SocketAddr::new(IpAddr::from([127, 0, 0, 1]), assigned_port);
    let listener = TcpListener::bind(local_addr).await?;
    println!("Starting echo server on {local_addr}");
    loop {
        let (mut stream, peer_addr) = listener.accept().await?;
        tokio::spawn(async move {
            let mut buffer = [0u8; 1024];
            loop {
                let n = match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if stream.write_all(&buffer[..n]).await.is_err() {
                    eprintln!("Error writing to {peer_addr}");
                    return;
                }
            }
        });
    }
}
