//! `netsel serve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use ipnet::IpNet;

use crate::config::Settings;
use crate::server::NetSelServer;

/// Where `netsel serve` keeps its store when neither `--data-dir`, the config file's
/// `data_dir`, nor `--in-memory` says otherwise: relative to the working directory, like
/// etcd's `./<name>.etcd`.
pub const DEFAULT_DATA_DIR: &str = "netsel-data";

/// Flags of `netsel serve`. Flags override the config file, which overrides defaults.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML configuration file (unknown keys are rejected).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Check the configuration and exit.
    #[arg(long)]
    validate: bool,
    /// Registry (line protocol) address [default: 0.0.0.0:9000].
    #[arg(long, value_name = "ADDR")]
    registry_addr: Option<SocketAddr>,
    /// HTTP API, UI and metrics address [default: 127.0.0.1:9001].
    #[arg(long, value_name = "ADDR")]
    api_addr: Option<SocketAddr>,
    /// Serve a Consul-compatible API at this address (off by default; Consul's usual
    /// address is 127.0.0.1:8500). See docs/consul.md.
    #[arg(long, value_name = "ADDR")]
    consul_addr: Option<SocketAddr>,
    /// DNS address, UDP and TCP [default: 127.0.0.1:5353].
    #[arg(long, value_name = "ADDR")]
    dns_addr: Option<SocketAddr>,
    /// TCP proxy gateway address [default: 0.0.0.0:8080].
    #[arg(long, value_name = "ADDR")]
    tcp_proxy_addr: Option<SocketAddr>,
    /// HTTP proxy address [default: 0.0.0.0:8081].
    #[arg(long, value_name = "ADDR")]
    http_proxy_addr: Option<SocketAddr>,
    /// Seconds between health sweeps and active checks [default: 30].
    #[arg(long, value_name = "SECS")]
    health_check_interval: Option<u64>,
    /// Seconds without a heartbeat before an instance is removed [default: 60].
    #[arg(long, value_name = "SECS")]
    max_heartbeat_age: Option<u64>,
    /// Directory of the durable embedded store [default: ./netsel-data, or the config
    /// file's data_dir].
    #[arg(long, value_name = "DIR", conflicts_with = "in_memory")]
    data_dir: Option<PathBuf>,
    /// Keep state in memory only: a restart forgets every registration.
    #[arg(long)]
    in_memory: bool,
    /// Share one catalog with other nodes through etcd:
    /// etcd://HOST:PORT[,HOST:PORT…][/PREFIX] (needs the `etcd` cargo feature).
    #[arg(long, value_name = "URL", conflicts_with_all = ["data_dir", "in_memory"])]
    store: Option<String>,
    /// VIP pool [default: 127.77.0.0/16].
    #[arg(long, value_name = "CIDR")]
    vip_cidr: Option<IpNet>,
}

impl ServeArgs {
    fn settings(&self) -> Result<Settings, crate::config::ConfigError> {
        let mut s = match &self.config {
            Some(path) => Settings::from_file(path)?,
            None => Settings::default(),
        };
        let c = &mut s.config;
        macro_rules! set {
            ($($dst:expr => $src:expr),* $(,)?) => {$( if let Some(v) = $src { $dst = v; } )*};
        }
        set!(
            c.registry_addr => self.registry_addr,
            c.dns_addr => self.dns_addr,
            c.tcp_proxy_addr => self.tcp_proxy_addr,
            c.http_proxy_addr => self.http_proxy_addr,
            c.health_check_interval => self.health_check_interval,
            c.max_heartbeat_age => self.max_heartbeat_age,
            s.api_addr => self.api_addr,
            s.network.vip_cidr => self.vip_cidr,
        );
        if self.data_dir.is_some() {
            s.data_dir = self.data_dir.clone();
        }
        if self.consul_addr.is_some() {
            s.consul_addr = self.consul_addr;
        }
        if let Some(url) = &self.store {
            s.store
                .set_url(url)
                .map_err(|reason| crate::config::ConfigError::Invalid {
                    key: "--store",
                    reason,
                })?;
        }
        if s.store.is_cluster() {
            // The catalog lives in etcd; nothing is kept in a data dir.
            s.data_dir = None;
        } else if self.in_memory {
            s.data_dir = None;
        } else if s.data_dir.is_none() {
            // `netsel serve` is durable by default (see docs/store.md); the library's
            // `NetSelServer::new()` stays in memory.
            s.data_dir = Some(PathBuf::from(DEFAULT_DATA_DIR));
        }
        s.validate()?;
        Ok(s)
    }
}

/// Runs the server until SIGINT or SIGTERM, then drains and exits 0.
pub async fn run(args: ServeArgs) -> ExitCode {
    let settings = match args.settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("netsel: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(reason) = crate::network::check_pool_usable(settings.network.vip_cidr) {
        eprintln!("netsel: invalid network.vip_cidr: {reason}");
        return ExitCode::from(2);
    }
    if args.validate {
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }
    let mut signals = Signals::install();
    let server = NetSelServer::with_settings(settings);
    if let Err(e) = server.start().await {
        eprintln!("netsel: {e}");
        return ExitCode::FAILURE;
    }
    if let Some(bound) = server.bound() {
        for (name, addr) in bound.listing() {
            println!("{name}: {addr}");
        }
    }
    println!("ready");
    // Under systemd (`Type=notify`): ready once every listener is bound. Outside it
    // (no NOTIFY_SOCKET) this does nothing.
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot tell systemd the server is ready");
    }
    let signal = loop {
        match signals.recv().await {
            "SIGHUP" => tracing::warn!(
                "SIGHUP ignored: netsel serve does not reload its configuration; restart it \
                 to apply changes (SIGINT or SIGTERM drain and stop it)"
            ),
            stop => break stop,
        }
    };
    tracing::info!(signal, "shutting down");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    let drained = server.shutdown().await;
    tracing::info!(drained, "NetSel stopped");
    ExitCode::SUCCESS
}

/// SIGINT, SIGTERM and SIGHUP, watched from creation: build it before announcing `ready`, so a
/// signal sent right after never meets the default (killing) disposition.
struct Signals {
    int: Option<tokio::signal::unix::Signal>,
    term: Option<tokio::signal::unix::Signal>,
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        let watch = |kind, name| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, signal = name, "cannot watch signal");
                None
            }
        };
        Signals {
            int: watch(SignalKind::interrupt(), "SIGINT"),
            term: watch(SignalKind::terminate(), "SIGTERM"),
            hup: watch(SignalKind::hangup(), "SIGHUP"),
        }
    }

    async fn recv(&mut self) -> &'static str {
        async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = next(&mut self.int) => "SIGINT",
            _ = next(&mut self.term) => "SIGTERM",
            _ = next(&mut self.hup) => "SIGHUP",
        }
    }
}
