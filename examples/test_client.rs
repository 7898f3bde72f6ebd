//! The seed's test client, checking for real: asks the registry for `test-service-3`,
//! talks to its echo server, and verifies that its lease is being renewed by heartbeats.
//! Exits non-zero if any check fails.
//!
//! ```text
//! cargo run --example test_client                        # registry 127.0.0.1:9000
//! cargo run --example test_client -- 127.0.0.1:9000 12   # registry, seconds to watch
//! ```
#![allow(clippy::print_stdout)]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use netsel::client::{Resolution, ServiceClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const NAME: &str = "test-service-3";

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let registry: SocketAddr = match args.next().as_deref().unwrap_or("127.0.0.1:9000").parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bad registry address: {e}");
            return ExitCode::from(2);
        }
    };
    let watch_secs: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(12);
    match run(registry, Duration::from_secs(watch_secs)).await {
        Ok(()) => {
            println!("\nAll tests passed! NetSel system is working correctly.");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("\nFAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

/// When the lease of the first instance ends, as seen from here.
fn deadline(r: &Resolution) -> Option<Instant> {
    Some(Instant::now() + r.instances.first()?.lease_remaining?)
}

async fn run(registry: SocketAddr, watch: Duration) -> Result<(), Box<dyn std::error::Error>> {
    println!("Testing NetSel system...");
    let client = ServiceClient::builder("test-client")
        .registry(registry)
        .build();

    println!("\nTest 1: Checking service registration...");
    let first = client.resolve(NAME).await?;
    let instance = first
        .instances
        .first()
        .ok_or("registered, but with no healthy instance")?;
    println!(
        "Service '{NAME}' is registered: VIP {}:{}, instance {} at {}",
        first.vip, first.service_port, instance.id, instance.endpoint
    );
    println!("Service registration test passed!");

    println!(
        "\nTest 2: Testing Service B's echo server at {}...",
        instance.endpoint
    );
    let mut echo = TcpStream::connect(instance.endpoint).await?;
    let test_data = "Hello, NetSel Service B!";
    echo.write_all(test_data.as_bytes()).await?;
    let mut buf = vec![0u8; test_data.len()];
    tokio::time::timeout(Duration::from_secs(5), echo.read_exact(&mut buf)).await??;
    let response = String::from_utf8_lossy(&buf);
    println!("Sent: {test_data}\nReceived: {response}");
    if response != test_data {
        return Err("echo answered something else".into());
    }
    println!("Echo server test passed!");

    println!("\nTest 3: Checking that heartbeats renew the lease (watching {watch:?})...");
    let before = deadline(&first).ok_or("registry reports no lease")?;
    let started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = client.resolve(NAME).await?;
        let after = deadline(&now).ok_or("instance disappeared")?;
        // A renewal moves the deadline forward (allow for rounding).
        if after > before + Duration::from_millis(500) {
            println!(
                "Lease renewed: {:?} left (was {:?})",
                now.instances[0].lease_remaining.unwrap_or_default(),
                first.instances[0].lease_remaining.unwrap_or_default()
            );
            break;
        }
        if started.elapsed() > watch {
            return Err(format!("no heartbeat renewed the lease within {watch:?}").into());
        }
    }
    println!("Heartbeat mechanism test passed!");
    Ok(())
}
