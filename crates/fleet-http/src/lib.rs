//! Fleet's HTTP adapters: a [`HealthProbe`] and a [`MetricsCollector`] on one reqwest client.
//!
//! Both send `GET` with the server's bearer token and a `User-Agent` naming Fleet, follow no
//! redirect, read at most [`HttpConfig::body_limit`] bytes of body (after decompression) and
//! finish by the engine's deadline, which covers the whole exchange including the body. Every
//! failure becomes a typed [`ProbeFailure`] whose message is the short `error_message` stored
//! with the result; no token ever appears in one.
//!
//! The wire format itself (paths, the report, the metrics object) is `fleet-wire`'s.

pub mod node_exporter;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fleet_core::{
    CollectError, HealthProbe, HealthReport, MetricValues, MetricsCollector, NotChecked,
    ProbeFailure, ProbeOutcome, ProbeTarget, ServerKind,
};
use reqwest::dns::Resolve;
use tokio::time::{Instant, timeout_at};

mod guard;
mod notify;

pub use guard::{AddressGuard, DnsError, Refused};
pub use ipnet::IpNet;
pub use notify::{AlertNotifier, NOTIFY_BODY_LIMIT};
pub use reqwest::Certificate;

/// The `User-Agent` sent with every request.
pub const USER_AGENT: &str = concat!("fleet/", env!("CARGO_PKG_VERSION"));

/// Client settings. Plain data with documented defaults.
#[derive(Clone)]
pub struct HttpConfig {
    /// Most body bytes read, after decompression. Default 1 MiB.
    pub body_limit: u64,
    /// Longest wait for a TCP (and TLS) connection. Default 5 s; the check's deadline still
    /// bounds it.
    pub connect_timeout: Duration,
    /// Idle connections kept per server for reuse. Default 1; 0 closes each after use.
    pub idle_per_host: usize,
    /// How long an idle connection is kept. Default 90 s.
    pub idle_timeout: Duration,
    /// Extra CA certificates to trust beside the built-in roots.
    pub extra_roots: Vec<Certificate>,
    /// A resolver to use instead of the system's (tests use one that never leaves the machine).
    pub resolver: Option<Arc<dyn Resolve>>,
    /// The addresses never connected to.
    pub guard: AddressGuard,
}

impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("body_limit", &self.body_limit)
            .field("connect_timeout", &self.connect_timeout)
            .field("idle_per_host", &self.idle_per_host)
            .field("idle_timeout", &self.idle_timeout)
            .field("extra_roots", &self.extra_roots.len())
            .field("resolver", &self.resolver.is_some())
            .field("guard", &self.guard)
            .finish()
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            body_limit: 1 << 20,
            connect_timeout: Duration::from_secs(5),
            idle_per_host: 1,
            idle_timeout: Duration::from_secs(90),
            extra_roots: Vec::new(),
            resolver: None,
            guard: AddressGuard::default(),
        }
    }
}

/// The client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the HTTP client: {0}")]
pub struct BuildError(#[from] reqwest::Error);

/// One HTTP client: its connection pool, body cap and settings. Cheap to clone (clones share
/// the pool), so the probe and the collector can share one and keep one idle connection per
/// server between them instead of two.
#[derive(Clone, Debug)]
pub struct HttpClient {
    http: reqwest::Client,
    body_limit: u64,
    guard: Arc<AddressGuard>,
    config: Arc<HttpConfig>,
    /// A client per distinct server CA certificate (`ca_cert`), built once; at most
    /// [`HttpClient::MAX_CA_CLIENTS`], past which a new CA gets a client for its request only.
    by_ca: Arc<std::sync::Mutex<std::collections::HashMap<String, reqwest::Client>>>,
}

/// Why an exchange gave no answer.
enum Failure {
    /// The server's failure, with the time to its head when one came.
    Server(ProbeFailure, Option<Duration>),
    /// Fleet's own.
    Local(NotChecked),
}

/// A complete 2xx (or other) answer: its status, body and the time from the request's start to
/// the end of the body.
struct Exchange {
    status: u16,
    body: Vec<u8>,
    elapsed: Duration,
}

impl HttpClient {
    /// The most per-CA clients kept.
    pub const MAX_CA_CLIENTS: usize = 256;

    /// A client with `config`.
    pub fn new(config: &HttpConfig) -> Result<Self, BuildError> {
        let (http, guard) = Self::build(config)?;
        Ok(Self {
            http,
            body_limit: config.body_limit,
            guard,
            config: Arc::new(config.clone()),
            by_ca: Arc::default(),
        })
    }

    /// The client for a server with its own CA certificate; a certificate that does not
    /// parse is that server's failure.
    fn for_ca(&self, pem: &str) -> Result<reqwest::Client, ProbeFailure> {
        if let Some(c) = self
            .by_ca
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(pem)
        {
            return Ok(c.clone());
        }
        let bad =
            |e: String| ProbeFailure::Tls(format!("ca_cert: {}", fleet_wire::truncate(&e, 150)));
        let roots = Certificate::from_pem_bundle(pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
        if roots.is_empty() {
            return Err(bad("no certificate in it".into()));
        }
        let mut config = (*self.config).clone();
        config.extra_roots.extend(roots);
        let (client, _) = Self::build(&config).map_err(|e| bad(e.to_string()))?;
        let mut cache = self.by_ca.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() < Self::MAX_CA_CLIENTS {
            cache.insert(pem.to_owned(), client.clone());
        }
        Ok(client)
    }

    fn build(config: &HttpConfig) -> Result<(reqwest::Client, Arc<AddressGuard>), BuildError> {
        let mut b = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(config.connect_timeout)
            .pool_max_idle_per_host(config.idle_per_host)
            .pool_idle_timeout(config.idle_timeout)
            .tcp_nodelay(true)
            .https_only(false)
            .no_proxy();
        for root in &config.extra_roots {
            b = b.add_root_certificate(root.clone());
        }
        let guard = Arc::new(config.guard.clone());
        b = b.dns_resolver(Arc::new(guard::GuardedResolver {
            inner: config.resolver.clone(),
            guard: guard.clone(),
        }));
        Ok((b.build()?, guard))
    }

    /// GETs `path` under the target's URL, by `deadline`.
    async fn get(
        &self,
        target: &ProbeTarget,
        path: &str,
        deadline: Instant,
    ) -> Result<Exchange, Failure> {
        let started = Instant::now();
        let timeout = || ProbeFailure::Timeout {
            after: round_ms(deadline.saturating_duration_since(started)),
        };
        let url = format!("{}{path}", target.api_url.trim_end_matches('/'));
        let url = reqwest::Url::parse(&url).map_err(|e| {
            Failure::Server(ProbeFailure::Connect(format!("invalid api_url: {e}")), None)
        })?;
        // An address given as such is never resolved, so it is checked here.
        let literal = match url.host() {
            Some(url::Host::Ipv4(v4)) => Some(std::net::IpAddr::V4(v4)),
            Some(url::Host::Ipv6(v6)) => Some(std::net::IpAddr::V6(v6)),
            _ => None,
        };
        if let Some(addr) = literal
            && let Some(why) = self.guard.refuses(addr)
        {
            return Err(Failure::Server(
                ProbeFailure::Refused(Refused { addr, why }.to_string()),
                None,
            ));
        }
        let http = match &target.ca_cert {
            None => self.http.clone(),
            Some(pem) => self.for_ca(pem).map_err(|f| Failure::Server(f, None))?,
        };
        let mut request = http
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(token) = &target.token {
            request = request.bearer_auth(token.expose());
        }
        let mut response = match timeout_at(deadline, request.send()).await {
            Err(_) => return Err(Failure::Server(timeout(), None)),
            Ok(Err(e)) => {
                return Err(match send_failure(&e) {
                    Ok(failure) => Failure::Server(failure, None),
                    Err(local) => Failure::Local(local),
                });
            }
            Ok(Ok(r)) => r,
        };
        let status = response.status().as_u16();
        // A head arrived, so this is a body that stalled: `body read failed: timeout after 10s`.
        let body_timeout = || ProbeFailure::Body(timeout().to_string());
        let mut body = Vec::new();
        loop {
            match timeout_at(deadline, response.chunk()).await {
                Err(_) => return Err(Failure::Server(body_timeout(), Some(started.elapsed()))),
                Ok(Err(e)) => {
                    if let Some(local) = local_failure(&e) {
                        return Err(Failure::Local(local));
                    }
                    return Err(Failure::Server(
                        ProbeFailure::Body(body_error(&e)),
                        Some(started.elapsed()),
                    ));
                }
                Ok(Ok(None)) => break,
                Ok(Ok(Some(chunk))) => {
                    if body.len() as u64 + chunk.len() as u64 > self.body_limit {
                        return Err(Failure::Server(
                            ProbeFailure::BodyTooLarge {
                                limit: self.body_limit,
                            },
                            Some(started.elapsed()),
                        ));
                    }
                    body.extend_from_slice(&chunk);
                }
            }
        }
        Ok(Exchange {
            status,
            body,
            elapsed: started.elapsed(),
        })
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis((d.as_secs_f64() * 1000.0).round() as u64)
}

/// Walks an error's sources for an I/O error kind or a telling message.
fn causes<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |e| e.source())
}

/// Fleet's own resource failures: out of file descriptors (EMFILE, ENFILE) or memory.
fn local_failure(e: &reqwest::Error) -> Option<NotChecked> {
    const ENOMEM: i32 = 12;
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    causes(e)
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .find(|io| {
            matches!(io.raw_os_error(), Some(ENOMEM | ENFILE | EMFILE))
                || io.kind() == std::io::ErrorKind::OutOfMemory
        })
        .map(|io| NotChecked::LocalResource(io.to_string()))
}

/// Classifies a failed send by the types in its error chain, never by message text. `Err`
/// when the failure is Fleet's own.
fn send_failure(e: &reqwest::Error) -> Result<ProbeFailure, NotChecked> {
    if let Some(local) = local_failure(e) {
        return Err(local);
    }
    for cause in causes(e) {
        if let Some(r) = cause.downcast_ref::<Refused>() {
            return Ok(ProbeFailure::Refused(r.to_string()));
        }
        if let Some(d) = cause.downcast_ref::<DnsError>() {
            return Ok(ProbeFailure::Dns(fleet_wire::truncate(&d.0, 200)));
        }
        if cause.downcast_ref::<rustls::Error>().is_some() {
            return Ok(ProbeFailure::Tls(last_cause(e)));
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    return Ok(ProbeFailure::ConnectionRefused);
                }
                std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof => return Ok(ProbeFailure::ConnectionReset),
                _ => {}
            }
        }
        if let Some(h) = cause.downcast_ref::<hyper::Error>()
            && (h.is_incomplete_message() || h.is_closed() || h.is_canceled())
        {
            return Ok(ProbeFailure::ConnectionReset);
        }
    }
    Ok(ProbeFailure::Connect(last_cause(e)))
}

fn last_cause(e: &reqwest::Error) -> String {
    let last = causes(e).last().map(|c| c.to_string()).unwrap_or_default();
    fleet_wire::truncate(&last, 200)
}

fn body_error(e: &reqwest::Error) -> String {
    let mut text = last_cause(e);
    if text.is_empty() {
        text = "connection closed".into();
    }
    text
}

/// The failure for a non-2xx status.
fn status_failure(status: u16) -> Option<ProbeFailure> {
    match status {
        200..=299 => None,
        300..=399 => Some(ProbeFailure::Redirect { code: status }),
        401 | 403 => Some(ProbeFailure::TokenRejected { code: status }),
        _ => Some(ProbeFailure::Http { code: status }),
    }
}

/// The HTTP health probe: `GET {api_url}/health`.
#[derive(Clone, Debug)]
pub struct HttpProbe {
    client: HttpClient,
}

impl HttpProbe {
    /// A probe with its own client.
    pub fn new(config: &HttpConfig) -> Result<Self, BuildError> {
        Ok(Self {
            client: HttpClient::new(config)?,
        })
    }

    /// A probe on a shared client.
    pub fn with_client(client: HttpClient) -> Self {
        Self { client }
    }
}

/// Reads a health report from a 2xx body.
pub fn parse_health(body: &[u8]) -> Result<HealthReport, ProbeFailure> {
    HealthReport::parse(body)
        .map_err(|e| ProbeFailure::Invalid(fleet_wire::truncate(&e.to_string(), 200)))
}

/// The page a node_exporter server is read from.
fn exposition_path(target: &ProbeTarget) -> &str {
    target.metrics_path.as_deref().unwrap_or("/metrics")
}

/// A node_exporter page read into a health report: the scrape itself, then the thresholds.
fn node_health(body: &[u8]) -> Result<HealthReport, ProbeFailure> {
    node_exporter::parse(body)
        .map(|f| f.health())
        .map_err(|e| ProbeFailure::Invalid(e.to_string()))
}

#[async_trait]
impl HealthProbe for HttpProbe {
    async fn probe(&self, target: &ProbeTarget, deadline: Instant) -> ProbeOutcome {
        let node = target.kind == ServerKind::NodeExporter;
        let path = if node {
            exposition_path(target)
        } else {
            fleet_wire::HEALTH_PATH
        };
        match self.client.get(target, path, deadline).await {
            Err(Failure::Local(why)) => ProbeOutcome::NotChecked(why),
            Err(Failure::Server(failure, response_time)) => ProbeOutcome::Failed {
                failure,
                response_time,
            },
            Ok(x) => {
                let parsed = match status_failure(x.status) {
                    Some(f) => Err(f),
                    None if node => node_health(&x.body),
                    None => parse_health(&x.body),
                };
                match parsed {
                    Ok(answer) => ProbeOutcome::Report {
                        answer,
                        response_time: x.elapsed,
                    },
                    Err(failure) => ProbeOutcome::Failed {
                        failure,
                        response_time: Some(x.elapsed),
                    },
                }
            }
        }
    }
}

/// The HTTP metrics collector: `GET {api_url}/api/v1/metrics/current`, or a node_exporter
/// server's page.
#[derive(Clone, Debug)]
pub struct HttpCollector {
    client: HttpClient,
    /// The CPU counters of each node_exporter server's last page: CPU use is their change
    /// between two pages. One entry per such server, dropped with the server's next failure.
    cpu: Arc<
        std::sync::Mutex<std::collections::HashMap<fleet_core::ServerId, node_exporter::CpuTimes>>,
    >,
}

impl HttpCollector {
    /// A collector with its own client.
    pub fn new(config: &HttpConfig) -> Result<Self, BuildError> {
        Ok(Self::with_client(HttpClient::new(config)?))
    }

    /// A collector on a shared client.
    pub fn with_client(client: HttpClient) -> Self {
        Self {
            client,
            cpu: Arc::default(),
        }
    }

    fn node_values(&self, target: &ProbeTarget, body: &[u8]) -> Result<MetricValues, CollectError> {
        let figures =
            node_exporter::parse(body).map_err(|e| CollectError::Transport(e.to_string()))?;
        let mut cpu = self.cpu.lock().unwrap_or_else(|e| e.into_inner());
        let previous = match figures.cpu {
            Some(now) => cpu.insert(target.id, now),
            None => cpu.remove(&target.id),
        };
        Ok(figures.values(previous))
    }
}

#[async_trait]
impl MetricsCollector for HttpCollector {
    async fn collect(
        &self,
        target: &ProbeTarget,
        deadline: Instant,
    ) -> Result<MetricValues, CollectError> {
        let node = target.kind == ServerKind::NodeExporter;
        let path = if node {
            exposition_path(target)
        } else {
            fleet_wire::METRICS_PATH
        };
        let x = self
            .client
            .get(target, path, deadline)
            .await
            .map_err(|f| match f {
                Failure::Local(why) => CollectError::NotChecked(why),
                Failure::Server(ProbeFailure::Timeout { after }, _) => {
                    CollectError::Timeout { after }
                }
                Failure::Server(other, _) => CollectError::Transport(other.to_string()),
            })?;
        if let Some(f) = status_failure(x.status) {
            return Err(CollectError::Transport(f.to_string()));
        }
        if node {
            return self.node_values(target, &x.body);
        }
        fleet_wire::parse_metrics(&x.body).map_err(CollectError::from)
    }
}

/// A resolver that answers from a fixed table and fails every other name, so tests never ask
/// the system's resolver (which would send a query off the machine).
#[derive(Clone, Debug, Default)]
pub struct StaticResolver {
    names: Arc<std::collections::HashMap<String, SocketAddr>>,
}

impl StaticResolver {
    /// A resolver knowing `names`.
    pub fn new(names: impl IntoIterator<Item = (String, SocketAddr)>) -> Self {
        Self {
            names: Arc::new(names.into_iter().collect()),
        }
    }
}

/// The name is not in a [`StaticResolver`]'s table.
#[derive(Debug, thiserror::Error)]
#[error("no such host {0}")]
pub struct NoSuchHost(String);

impl Resolve for StaticResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let found = self.names.get(name.as_str()).copied();
        let name = name.as_str().to_owned();
        Box::pin(async move {
            match found {
                Some(addr) => Ok(Box::new(std::iter::once(addr)) as reqwest::dns::Addrs),
                None => Err(Box::new(NoSuchHost(name)) as Box<dyn std::error::Error + Send + Sync>),
            }
        })
    }
}
