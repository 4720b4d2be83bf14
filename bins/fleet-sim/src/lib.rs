//! A simulated fleet on loopback: many small HTTP servers speaking the managed servers' wire
//! format, each with its own port, token and behaviour, for Fleet's tests, demo and load.
//!
//! The HTTP side is written by hand on tokio sockets on purpose: a fault injector must be able
//! to hang after a head, cut a body, reset a connection or drip bytes, which a full server
//! framework hides.

mod behavior;
mod control;
mod server;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use behavior::{Behavior, Mix, MixError};
pub use server::{ServerStats, SimServer};

/// How to build a fleet. Plain data with defaults.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// How many servers.
    pub count: usize,
    /// Their behaviours, by share.
    pub mix: Mix,
    /// Seed for the mix, tokens and metrics walks.
    pub seed: u64,
    /// Server names are `{prefix}-{index:05}`.
    pub prefix: String,
    /// The first index (for a fleet spread over several processes).
    pub first_index: usize,
    /// The latency range of `slow` servers. Default 200 ms to 2 s.
    pub slow: (Duration, Duration),
    /// The share of `flaky` answers that fail. Default 0.3.
    pub flaky_share: f64,
    /// Addresses to listen on, in turn (spreading over 127.0.0.0/8 when ports run short).
    pub addresses: Vec<IpAddr>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            count: 10,
            mix: Mix::all(Behavior::Healthy),
            seed: 1,
            prefix: "sim".into(),
            first_index: 0,
            slow: (Duration::from_millis(200), Duration::from_secs(2)),
            flaky_share: 0.3,
            addresses: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        }
    }
}

/// One server in a manifest: what Fleet needs to watch it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Unique name.
    pub name: String,
    /// Base URL.
    pub api_url: String,
    /// The token the server expects.
    pub api_token: String,
    /// The behaviour it started with (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub behavior: Option<String>,
}

/// The servers of a fleet, as fleet-server imports them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The servers.
    pub servers: Vec<ManifestEntry>,
}

/// A running simulated fleet. Dropping it does not stop it: call [`SimFleet::shutdown`].
#[derive(Debug)]
pub struct SimFleet {
    servers: Vec<Arc<SimServer>>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl SimFleet {
    /// Starts `config.count` servers.
    pub async fn start(config: SimConfig) -> std::io::Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed);
        let behaviors = config.mix.assign(config.count, &mut rng);
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let mut servers = Vec::with_capacity(config.count);
        for (i, behavior) in behaviors.into_iter().enumerate() {
            let index = config.first_index + i;
            let token: String = (0..32)
                .map(|_| char::from(b"0123456789abcdef"[rng.random_range(0..16)]))
                .collect();
            let ip = config.addresses[i % config.addresses.len()];
            let (server, listener) = SimServer::bind(
                format!("{}-{index:05}", config.prefix),
                token,
                SocketAddr::new(ip, 0),
                behavior,
                server::Settings {
                    slow: config.slow,
                    flaky_share: config.flaky_share,
                    seed: config.seed ^ (index as u64),
                },
            )
            .await?;
            tasks.spawn(
                server
                    .clone()
                    .serve(listener, cancel.clone(), tasks.clone()),
            );
            servers.push(server);
        }
        Ok(Self {
            servers,
            cancel,
            tasks,
        })
    }

    /// The servers.
    pub fn servers(&self) -> &[Arc<SimServer>] {
        &self.servers
    }

    /// A server by name.
    pub fn server(&self, name: &str) -> Option<&Arc<SimServer>> {
        self.servers.iter().find(|s| s.name() == name)
    }

    /// The manifest of every server.
    pub fn manifest(&self) -> Manifest {
        Manifest {
            servers: self.servers.iter().map(|s| s.manifest_entry()).collect(),
        }
    }

    /// Changes a server's behaviour; false when no server has that name.
    pub fn set_behavior(&self, name: &str, behavior: Behavior) -> bool {
        match self.server(name) {
            Some(s) => {
                s.set_behavior(behavior);
                true
            }
            None => false,
        }
    }

    /// Serves the control API on `addr`: `GET /servers` (stats), `GET /manifest`,
    /// `PUT /servers/{name}/behavior` with the behaviour's name as the body.
    pub async fn serve_control(self: &Arc<Self>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        self.tasks
            .spawn(control::serve(self.clone(), listener, self.cancel.clone()));
        Ok(local)
    }

    /// Stops every server and waits for their tasks.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// The resident memory of this process in bytes, from /proc (Linux), if known.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
