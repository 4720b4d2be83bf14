//! One simulated server: a listener, its behaviour, its metrics and its counters.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use fleet_wire::{ComponentHealth, Declared, HealthReport, MetricValues};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::{Behavior, ManifestEntry};

#[derive(Clone, Copy, Debug)]
pub(crate) struct Settings {
    pub(crate) slow: (Duration, Duration),
    pub(crate) flaky_share: f64,
    pub(crate) seed: u64,
}

/// What a server has seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ServerStats {
    /// Requests read (health, metrics and the rest).
    pub requests: u64,
    /// Health requests read.
    pub health_requests: u64,
    /// Requests open now: read and neither answered nor dropped.
    pub open: u64,
    /// The most requests open at once.
    pub max_open: u64,
}

/// Metrics that move: gauges walk, counters only grow.
#[derive(Debug)]
struct Walk {
    rng: StdRng,
    v: MetricValues,
}

impl Walk {
    fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let total = rng.random_range(3..12);
        let v = MetricValues {
            cpu_percent: Some(rng.random_range(5.0..60.0)),
            memory_percent: Some(rng.random_range(20.0..80.0)),
            disk_percent: Some(rng.random_range(10.0..90.0)),
            network_rx_bytes: Some(0),
            network_tx_bytes: Some(0),
            active_services: Some(total),
            failed_services: Some(0),
            total_services: Some(total),
            llm_requests: Some(0),
            llm_cost_usd: Some(0.0),
            active_users: Some(rng.random_range(0..50)),
            total_users: Some(rng.random_range(50..500)),
        };
        Self { rng, v }
    }

    fn step(&mut self) -> MetricValues {
        let r = &mut self.rng;
        let walk = |x: Option<f64>, r: &mut StdRng| {
            Some((x.unwrap_or(50.0) + r.random_range(-5.0..5.0)).clamp(0.0, 100.0))
        };
        self.v.cpu_percent = walk(self.v.cpu_percent, r);
        self.v.memory_percent = walk(self.v.memory_percent, r);
        self.v.disk_percent =
            Some((self.v.disk_percent.unwrap_or(50.0) + r.random_range(0.0..0.05)).min(100.0));
        self.v.network_rx_bytes = self
            .v
            .network_rx_bytes
            .map(|b| b + r.random_range(0..5_000_000));
        self.v.network_tx_bytes = self
            .v
            .network_tx_bytes
            .map(|b| b + r.random_range(0..2_000_000));
        let calls = r.random_range(0..20);
        self.v.llm_requests = self.v.llm_requests.map(|n| n + calls);
        self.v.llm_cost_usd = self
            .v
            .llm_cost_usd
            .map(|c| ((c + calls as f64 * r.random_range(0.001..0.01)) * 1e6).round() / 1e6);
        self.v.active_users = Some(r.random_range(0..self.v.total_users.unwrap_or(10).max(1)));
        self.v.clone()
    }
}

/// A simulated server.
#[derive(Debug)]
pub struct SimServer {
    name: String,
    token: String,
    addr: SocketAddr,
    behavior: AtomicU8,
    changed: Notify,
    settings: Settings,
    requests: AtomicU64,
    health_requests: AtomicU64,
    open: AtomicU64,
    max_open: AtomicU64,
    walk: Mutex<Walk>,
    rng: Mutex<StdRng>,
}

/// A server's port: listening, or only bound while the server is unreachable, so that a
/// connection is refused and no other server can take the port meanwhile (an unreachable
/// server's URL once led to whichever server the system gave its freed port next).
pub(crate) enum Port {
    Listening(TcpListener),
    Reserved(TcpSocket),
}

/// Binds `addr` without listening. Without `SO_REUSEADDR` first, so that no other socket may
/// bind the port at all; with it when connections the port just served still linger in
/// TIME_WAIT (the system then still gives the port to nobody who asks for any port).
fn reserve(addr: SocketAddr) -> std::io::Result<TcpSocket> {
    let socket = |reuse: bool| -> std::io::Result<TcpSocket> {
        let s = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        s.set_reuseaddr(reuse)?;
        s.bind(addr)?;
        Ok(s)
    };
    socket(false).or_else(|_| socket(true))
}

impl Port {
    fn listen(self, addr: SocketAddr) -> std::io::Result<TcpListener> {
        match self {
            Port::Listening(l) => Ok(l),
            Port::Reserved(s) => s.listen(1024).or_else(|_| reserve(addr)?.listen(1024)),
        }
    }

    fn reserved(self, addr: SocketAddr) -> std::io::Result<Port> {
        match self {
            Port::Reserved(s) => Ok(Port::Reserved(s)),
            Port::Listening(l) => {
                drop(l);
                Ok(Port::Reserved(reserve(addr)?))
            }
        }
    }
}

impl SimServer {
    pub(crate) async fn bind(
        name: String,
        token: String,
        addr: SocketAddr,
        behavior: Behavior,
        settings: Settings,
    ) -> std::io::Result<(Arc<Self>, Option<Port>)> {
        // Take the port now, even for an unreachable server, so its URL is stable; a
        // reachable one keeps listening from here on, so it answers as soon as this returns.
        let socket = reserve(addr)?;
        let addr = socket.local_addr()?;
        let listener = Some(if behavior == Behavior::Unreachable {
            Port::Reserved(socket)
        } else {
            Port::Listening(socket.listen(1024)?)
        });
        let server = Arc::new(Self {
            name,
            token,
            addr,
            behavior: AtomicU8::new(behavior as u8),
            changed: Notify::new(),
            walk: Mutex::new(Walk::new(settings.seed)),
            rng: Mutex::new(StdRng::seed_from_u64(settings.seed.wrapping_mul(31))),
            settings,
            requests: AtomicU64::new(0),
            health_requests: AtomicU64::new(0),
            open: AtomicU64::new(0),
            max_open: AtomicU64::new(0),
        });
        Ok((server, listener))
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its base URL.
    pub fn api_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The token it expects.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Its current behaviour.
    pub fn behavior(&self) -> Behavior {
        Behavior::from_u8(self.behavior.load(Ordering::SeqCst))
    }

    /// Changes its behaviour.
    pub fn set_behavior(&self, b: Behavior) {
        self.behavior.store(b as u8, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// What it has seen.
    pub fn stats(&self) -> ServerStats {
        ServerStats {
            requests: self.requests.load(Ordering::SeqCst),
            health_requests: self.health_requests.load(Ordering::SeqCst),
            open: self.open.load(Ordering::SeqCst),
            max_open: self.max_open.load(Ordering::SeqCst),
        }
    }

    pub(crate) fn manifest_entry(&self) -> ManifestEntry {
        ManifestEntry {
            name: self.name.clone(),
            api_url: self.api_url(),
            api_token: self.token.clone(),
            behavior: Some(self.behavior().as_str().to_owned()),
        }
    }

    /// Listens while reachable; while `unreachable`, keeps the port bound without listening.
    pub(crate) async fn serve(
        self: Arc<Self>,
        first: Option<Port>,
        cancel: CancellationToken,
        tasks: TaskTracker,
    ) {
        let mut port = first;
        loop {
            if self.behavior() == Behavior::Unreachable {
                port = match port.take() {
                    Some(p) => p.reserved(self.addr).ok(),
                    None => reserve(self.addr).ok().map(Port::Reserved),
                };
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = self.changed.notified() => continue,
                }
            }
            let bound = match port.take() {
                Some(p) => p.listen(self.addr),
                None => TcpListener::bind(self.addr).await,
            };
            let listener = match bound {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!("{}: cannot listen on {}: {e}", self.name, self.addr);
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(200)) => continue,
                    }
                }
            };
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = self.changed.notified() => {
                        if self.behavior() == Behavior::Unreachable { break; }
                    }
                    accepted = listener.accept() => {
                        if let Ok((stream, _)) = accepted {
                            let _ = stream.set_nodelay(true);
                            tasks.spawn(self.clone().connection(stream, cancel.clone()));
                        }
                    }
                }
            }
        }
    }

    async fn connection(self: Arc<Self>, mut stream: TcpStream, cancel: CancellationToken) {
        let mut buf = Vec::with_capacity(1024);
        loop {
            let request = tokio::select! {
                () = cancel.cancelled() => return,
                r = read_request(&mut stream, &mut buf) => r,
            };
            let Some(request) = request else { return };
            let _open = Open::new(&self);
            let keep = tokio::select! {
                () = cancel.cancelled() => return,
                keep = self.answer(&mut stream, &request) => keep,
            };
            if !keep {
                return;
            }
        }
    }

    /// Answers one request; false when the connection must close.
    async fn answer(&self, stream: &mut TcpStream, req: &Request) -> bool {
        self.requests.fetch_add(1, Ordering::SeqCst);
        if req.path == "/metrics" {
            return respond(
                stream,
                200,
                "text/plain; version=0.0.4",
                self.prometheus().as_bytes(),
                &[],
            )
            .await;
        }
        let health = req.path == fleet_wire::HEALTH_PATH;
        if health {
            self.health_requests.fetch_add(1, Ordering::SeqCst);
        }
        if !health && req.path != fleet_wire::METRICS_PATH {
            return respond(
                stream,
                404,
                "application/json",
                br#"{"error":"not found"}"#,
                &[],
            )
            .await;
        }
        let behavior = self.behavior();
        let expected = format!("Bearer {}", self.token);
        if behavior == Behavior::Auth || req.authorization.as_deref() != Some(expected.as_str()) {
            return respond(
                stream,
                401,
                "application/json",
                br#"{"error":"unauthorized"}"#,
                &[],
            )
            .await;
        }
        match behavior {
            Behavior::Hang => {
                // Never answer; wait for the client to give up and close.
                let mut sink = [0u8; 64];
                let _ = tokio::time::timeout(Duration::from_secs(600), async {
                    while stream.read(&mut sink).await.is_ok_and(|n| n > 0) {}
                })
                .await;
                false
            }
            Behavior::Reset => {
                let _ = stream.set_zero_linger();
                false
            }
            Behavior::Cut => {
                let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{\"database\": {\"sta";
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.flush().await;
                let _ = stream.set_zero_linger();
                false
            }
            Behavior::HttpError => {
                let code = if self
                    .rng
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .random_bool(0.5)
                {
                    500
                } else {
                    503
                };
                respond(
                    stream,
                    code,
                    "application/json",
                    br#"{"error":"internal"}"#,
                    &[],
                )
                .await
            }
            Behavior::Flaky
                if self
                    .rng
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .random_bool(self.settings.flaky_share) =>
            {
                respond(
                    stream,
                    503,
                    "application/json",
                    br#"{"error":"try later"}"#,
                    &[],
                )
                .await
            }
            Behavior::RateLimited => {
                let body: &[u8] = br#"{"error":"slow down"}"#;
                respond(
                    stream,
                    429,
                    "application/json",
                    body,
                    &[("Retry-After", "30")],
                )
                .await
            }
            Behavior::Garbage => {
                respond(
                    stream,
                    200,
                    "application/json",
                    b"{\"database\": ok, oops",
                    &[],
                )
                .await
            }
            Behavior::Huge => {
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    10 << 20
                );
                if stream.write_all(head.as_bytes()).await.is_err() {
                    return false;
                }
                let chunk = [b' '; 64 * 1024];
                for _ in 0..160 {
                    if stream.write_all(&chunk).await.is_err() {
                        return false;
                    }
                }
                true
            }
            Behavior::Redirect => {
                respond(
                    stream,
                    302,
                    "text/plain",
                    b"moved",
                    &[("Location", "http://127.0.0.1:9/health")],
                )
                .await
            }
            Behavior::Drip => {
                let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n";
                if stream.write_all(head.as_bytes()).await.is_err() {
                    return false;
                }
                for _ in 0..3000 {
                    if stream.write_all(b" ").await.is_err() {
                        return false;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                false
            }
            Behavior::GzipBomb => {
                respond(
                    stream,
                    200,
                    "application/json",
                    gzip_bomb(),
                    &[("Content-Encoding", "gzip")],
                )
                .await
            }
            Behavior::Nested => {
                let depth = 100_000;
                let mut body = Vec::with_capacity(depth * 2);
                body.extend(std::iter::repeat_n(b'[', depth));
                body.extend(std::iter::repeat_n(b']', depth));
                respond(stream, 200, "application/json", &body, &[]).await
            }
            Behavior::Slow => {
                let (lo, hi) = self.settings.slow;
                let wait = self
                    .rng
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .random_range(lo..=hi);
                tokio::time::sleep(wait).await;
                self.json_answer(stream, health, Behavior::Healthy).await
            }
            other => self.json_answer(stream, health, other).await,
        }
    }

    async fn json_answer(&self, stream: &mut TcpStream, health: bool, behavior: Behavior) -> bool {
        let body = if health {
            health_body(behavior).to_string()
        } else {
            let values = self.walk.lock().unwrap_or_else(|e| e.into_inner()).step();
            values.to_json().to_string()
        };
        respond(stream, 200, "application/json", body.as_bytes(), &[]).await
    }

    fn prometheus(&self) -> String {
        let v = self
            .walk
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .v
            .clone();
        let up = u8::from(matches!(
            self.behavior(),
            Behavior::Healthy | Behavior::Degraded | Behavior::Slow | Behavior::Flaky
        ));
        let mut out = String::new();
        let labels = format!("{{server=\"{}\"}}", self.name);
        out.push_str(&format!("# TYPE sim_up gauge\nsim_up{labels} {up}\n"));
        let gauges = [
            ("cpu_percent", v.cpu_percent),
            ("memory_percent", v.memory_percent),
            ("disk_percent", v.disk_percent),
        ];
        for (name, value) in gauges {
            if let Some(x) = value {
                out.push_str(&format!(
                    "# TYPE sim_{name} gauge\nsim_{name}{labels} {x}\n"
                ));
            }
        }
        let counters = [
            ("network_rx_bytes", v.network_rx_bytes),
            ("network_tx_bytes", v.network_tx_bytes),
            ("llm_requests", v.llm_requests),
        ];
        for (name, value) in counters {
            if let Some(x) = value {
                out.push_str(&format!(
                    "# TYPE sim_{name}_total counter\nsim_{name}_total{labels} {x}\n"
                ));
            }
        }
        if let Some(c) = v.llm_cost_usd {
            out.push_str(&format!(
                "# TYPE sim_llm_cost_usd_total counter\nsim_llm_cost_usd_total{labels} {c}\n"
            ));
        }
        out
    }
}

/// Counts a request as open until it is answered or its connection drops.
struct Open<'a>(&'a SimServer);

impl<'a> Open<'a> {
    fn new(s: &'a SimServer) -> Self {
        let now = s.open.fetch_add(1, Ordering::SeqCst) + 1;
        s.max_open.fetch_max(now, Ordering::SeqCst);
        Self(s)
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The health report of a behaving server.
pub(crate) fn health_body(b: Behavior) -> serde_json::Value {
    use ComponentHealth::{Healthy, Unhealthy};
    if b == Behavior::HostCritical {
        return HealthReport {
            declared: Some(Declared::Critical),
            components: vec![("disk".to_owned(), Unhealthy("99% full".into()))],
            ..Default::default()
        }
        .to_json();
    }
    let (database, services, worker) = match b {
        Behavior::Degraded => (Healthy, false, Some(Unhealthy("degraded".into()))),
        Behavior::Critical => (Unhealthy("down".into()), true, None),
        _ => (Healthy, true, Some(Healthy)),
    };
    HealthReport {
        declared: None,
        database,
        redis: Healthy,
        services_healthy: Some(services),
        components: worker
            .map(|w| ("worker".to_owned(), w))
            .into_iter()
            .collect(),
    }
    .to_json()
}

fn gzip_bomb() -> &'static [u8] {
    static BOMB: OnceLock<Vec<u8>> = OnceLock::new();
    BOMB.get_or_init(|| {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![b' '; 1 << 20];
        for _ in 0..10 {
            enc.write_all(&zeros).expect("in memory");
        }
        enc.finish().expect("in memory")
    })
}

/// A request head, as much of it as the simulation needs.
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) authorization: Option<String>,
    pub(crate) body: Vec<u8>,
}

/// Reads one request (head and a `Content-Length` body); `None` on EOF or a bad request.
pub(crate) async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Request> {
    const MAX_HEAD: usize = 16 * 1024;
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split_whitespace();
    let method = first.next()?.to_owned();
    let path = first.next()?.to_owned();
    let mut authorization = None;
    let mut length = 0usize;
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            let v = v.trim();
            if k.eq_ignore_ascii_case("authorization") {
                authorization = Some(v.to_owned());
            } else if k.eq_ignore_ascii_case("content-length") {
                length = v.parse().ok()?;
            }
        }
    }
    if length > 1 << 20 {
        return None;
    }
    while buf.len() < head_end + length {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[head_end..head_end + length].to_vec();
    buf.drain(..head_end + length);
    Some(Request {
        method,
        path,
        authorization,
        body,
    })
}

/// Writes a complete answer; false when the connection failed.
pub(crate) async fn respond(
    stream: &mut TcpStream,
    code: u16,
    content_type: &str,
    body: &[u8],
    extra: &[(&str, &str)],
) -> bool {
    let reason = match code {
        200 => "OK",
        204 => "No Content",
        302 => "Found",
        400 => "Bad Request",
        401 => "Unauthorized",
        429 => "Too Many Requests",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let mut head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut out = Vec::with_capacity(head.len() + body.len());
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(body);
    stream.write_all(&out).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unreachable_server_refuses_connections_and_keeps_its_port() {
        let settings = Settings {
            slow: (Duration::from_millis(1), Duration::from_millis(2)),
            flaky_share: 0.5,
            seed: 1,
        };
        let (server, port) = SimServer::bind(
            "u".into(),
            "t".into(),
            "127.0.0.1:0".parse().unwrap(),
            Behavior::Unreachable,
            settings,
        )
        .await
        .unwrap();
        let addr = server.addr;
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "nothing accepts while unreachable"
        );
        // No other server can take the port meanwhile.
        assert!(TcpListener::bind(addr).await.is_err());
        // Reachable again: the same port listens.
        let listener = port.unwrap().listen(addr).unwrap();
        assert_eq!(listener.local_addr().unwrap(), addr);
        assert!(TcpStream::connect(addr).await.is_ok());
    }
}
