//! fleet-agent: serves Fleet's wire format (`/health`, `/api/v1/metrics/current`) from a plain
//! Linux host's own figures, so that Fleet watches it without any code of the operator's.
//!
//! It samples in the background and answers from the last sample; it requires the bearer
//! token Fleet was given, compared in constant time. `fleet-agent register` makes that token,
//! writes it to `FLEET_AGENT_TOKEN_FILE` (mode 0600) and registers the host with Fleet.

mod sample;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, bail};
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use clap::{Args, Parser, Subcommand};
use fleet_wire::host::Thresholds;
use rand::RngCore;
use subtle::ConstantTimeEq;

use crate::sample::{Sample, Sampler, Settings};

#[derive(Debug, Parser)]
#[command(
    name = "fleet-agent",
    version,
    about = "Serves Fleet's wire format from this host's figures"
)]
struct Cli {
    #[command(flatten)]
    agent: AgentArgs,
    /// Print the effective settings (never the token) and exit.
    #[arg(long)]
    print_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Args)]
struct AgentArgs {
    /// Where to listen. Outside Prometheus's exporter ports (9100–9999).
    #[arg(long, env = "FLEET_AGENT_LISTEN", default_value = "127.0.0.1:8950")]
    listen: SocketAddr,
    /// A file holding the token Fleet sends (mode 0600); `FLEET_AGENT_TOKEN` may give it
    /// instead. `register` writes it.
    #[arg(long, env = "FLEET_AGENT_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Mount points whose fullness counts, comma-separated; every real file system when empty.
    #[arg(long, env = "FLEET_AGENT_MOUNTS", value_delimiter = ',')]
    mounts: Vec<PathBuf>,
    /// systemd units (comma-separated) whose failure makes the host critical.
    #[arg(long, env = "FLEET_AGENT_WATCH_UNITS", value_delimiter = ',')]
    watch_units: Vec<String>,
    /// Seconds between samples.
    #[arg(long, env = "FLEET_AGENT_SAMPLE_INTERVAL", default_value_t = 5.0)]
    sample_interval: f64,
    /// Percent of memory or disk used at which the host is degraded.
    #[arg(long, env = "FLEET_AGENT_DEGRADED_AT", default_value_t = 90.0)]
    degraded_at: f64,
    /// Percent of memory or disk used at which the host is critical.
    #[arg(long, env = "FLEET_AGENT_CRITICAL_AT", default_value_t = 98.0)]
    critical_at: f64,
    /// A PEM certificate chain: with FLEET_AGENT_TLS_KEY, the agent serves HTTPS only.
    #[arg(long, env = "FLEET_AGENT_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's PEM private key.
    #[arg(long, env = "FLEET_AGENT_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make a fresh token, write it to FLEET_AGENT_TOKEN_FILE and register this host with
    /// Fleet. The admin token comes from FLEET_ADMIN_TOKEN or --admin-token-file.
    Register {
        /// Fleet's base URL, e.g. http://fleet.internal:8080.
        #[arg(long)]
        server: String,
        /// The URL Fleet must call this agent at (not its listen address).
        #[arg(long)]
        url: String,
        /// The server's name in Fleet; this host's name by default.
        #[arg(long)]
        name: Option<String>,
        /// A file holding the admin token.
        #[arg(long)]
        admin_token_file: Option<PathBuf>,
    },
}

impl AgentArgs {
    fn check(&self) -> anyhow::Result<()> {
        if !(self.sample_interval.is_finite() && (1.0..=3600.0).contains(&self.sample_interval)) {
            bail!(
                "invalid FLEET_AGENT_SAMPLE_INTERVAL (--sample-interval) = {}: must be 1 to 3600 seconds",
                self.sample_interval
            );
        }
        let ok = |v: f64| v.is_finite() && (0.0..=100.0).contains(&v);
        if !ok(self.degraded_at) || !ok(self.critical_at) || self.degraded_at > self.critical_at {
            bail!(
                "invalid FLEET_AGENT_DEGRADED_AT / FLEET_AGENT_CRITICAL_AT = {} / {}: percentages with degraded at most critical",
                self.degraded_at,
                self.critical_at
            );
        }
        Ok(())
    }

    fn settings(&self) -> Settings {
        Settings {
            mounts: self.mounts.clone(),
            watch_units: self.watch_units.clone(),
            thresholds: Thresholds {
                degraded_at: self.degraded_at,
                critical_at: self.critical_at,
            },
        }
    }
}

/// Reads a secret file, refusing one others may read.
fn read_secret(path: &Path, setting: &str) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .with_context(|| format!("invalid {setting} = {}: cannot read it", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "invalid {setting} = {}: its mode is {:o}; make it 0600",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("invalid {setting} = {}: cannot read it", path.display()))?;
    let text = text.trim().to_owned();
    if text.is_empty() {
        bail!("invalid {setting} = {}: the file is empty", path.display());
    }
    Ok(text)
}

fn agent_token(args: &AgentArgs) -> anyhow::Result<String> {
    match (&args.token_file, std::env::var("FLEET_AGENT_TOKEN").ok()) {
        (Some(path), _) => read_secret(path, "FLEET_AGENT_TOKEN_FILE"),
        (None, Some(t)) if !t.trim().is_empty() => Ok(t.trim().to_owned()),
        _ => bail!(
            "missing FLEET_AGENT_TOKEN_FILE (or FLEET_AGENT_TOKEN): the agent answers only with the token Fleet sends; `fleet-agent register` makes one"
        ),
    }
}

#[derive(Clone)]
struct AppState {
    token: Arc<[u8; 32]>,
    last: Arc<RwLock<Option<Sample>>>,
}

/// Tokens are compared as SHA-256 digests in constant time, so that neither the token's
/// bytes nor its length show in timing.
fn digest(s: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes()).into()
}

async fn require(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if bool::from(digest(given).ct_eq(&*app.token)) {
        next.run(req).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            "unknown or missing bearer token\n",
        )
            .into_response()
    }
}

fn last(app: &AppState) -> Option<Sample> {
    app.last.read().unwrap_or_else(|e| e.into_inner()).clone()
}

fn json(v: serde_json::Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

async fn health(State(app): State<AppState>) -> Response {
    match last(&app) {
        Some(s) => json(s.report.to_json()),
        None => (StatusCode::SERVICE_UNAVAILABLE, "no sample yet\n").into_response(),
    }
}

async fn metrics(State(app): State<AppState>) -> Response {
    match last(&app) {
        Some(s) => json(s.values.to_json()),
        None => (StatusCode::SERVICE_UNAVAILABLE, "no sample yet\n").into_response(),
    }
}

/// The TLS settings from the certificate and key files, with a message naming the setting
/// that is wrong.
fn tls_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| anyhow::anyhow!("invalid FLEET_AGENT_TLS_CERT = {}: {e}", cert.display()))?;
    if certs.is_empty() {
        bail!(
            "invalid FLEET_AGENT_TLS_CERT = {}: no certificate in it",
            cert.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("invalid FLEET_AGENT_TLS_KEY = {}: {e}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context(
        "invalid FLEET_AGENT_TLS_CERT / FLEET_AGENT_TLS_KEY: the key does not fit the certificate",
    )?;
    Ok(Arc::new(config))
}

/// Serves `router` over TLS: each connection's handshake and requests on a task of its own,
/// with a deadline on the handshake so that a silent client holds nothing.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Arc<rustls::ServerConfig>,
) -> anyhow::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let slots = Arc::new(tokio::sync::Semaphore::new(256));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(target: "fleet::agent", error = %e, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let (acceptor, router) = (acceptor.clone(), router.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                .await
            {
                Ok(Ok(s)) => s,
                _ => {
                    tracing::debug!(target: "fleet::agent", "TLS handshake with {peer} failed");
                    return;
                }
            };
            let service = hyper_util::service::TowerToHyperService::new(router);
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service);
            let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
        });
    }
}

async fn run(args: AgentArgs) -> anyhow::Result<()> {
    args.check()?;
    let token = agent_token(&args)?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tls_config(cert, key)?),
        _ => None,
    };
    let app = AppState {
        token: Arc::new(digest(&token)),
        last: Arc::default(),
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| {
            format!(
                "invalid FLEET_AGENT_LISTEN = {}: cannot listen",
                args.listen
            )
        })?;
    let every = Duration::from_secs_f64(args.sample_interval);
    let sampler_state = app.last.clone();
    let settings = args.settings();
    tokio::spawn(async move {
        let mut sampler = Sampler::new(settings);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let units = sample::systemd_units(every.min(Duration::from_secs(5))).await;
            let s = tokio::task::block_in_place(|| sampler.sample(units));
            *sampler_state.write().unwrap_or_else(|e| e.into_inner()) = Some(s);
        }
    });
    let router = Router::new()
        .route(fleet_wire::HEALTH_PATH, get(health))
        .route(fleet_wire::METRICS_PATH, get(metrics))
        .layer(middleware::from_fn_with_state(app.clone(), require))
        .with_state(app);
    if let Some(tls) = tls {
        tracing::info!(target: "fleet::agent", "fleet-agent listening on https://{}", args.listen);
        return serve_tls(listener, router, tls).await;
    }
    tracing::info!(target: "fleet::agent", "fleet-agent listening on http://{}", args.listen);
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving")?;
    Ok(())
}

fn register(
    args: &AgentArgs,
    server: &str,
    url: &str,
    name: Option<String>,
    admin_token_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let Some(token_file) = &args.token_file else {
        bail!("missing FLEET_AGENT_TOKEN_FILE: register writes the agent's token there");
    };
    let admin = match admin_token_file {
        Some(p) => read_secret(&p, "--admin-token-file")?,
        None => std::env::var("FLEET_ADMIN_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty())
            .context("missing FLEET_ADMIN_TOKEN (or --admin-token-file): registering needs an admin token")?,
    };
    let name = match name {
        Some(n) => n,
        None => sysinfo::System::host_name().context("this host has no name: give --name")?,
    };
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = format!(
        "agent_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::remove_file(token_file);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(token_file)
            .with_context(|| {
                format!(
                    "cannot write FLEET_AGENT_TOKEN_FILE = {}",
                    token_file.display()
                )
            })?;
        writeln!(f, "{token}")?;
    }
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .new_agent();
    let mut response = agent
        .post(&format!(
            "{}/api/v1/fleet/servers",
            server.trim_end_matches('/')
        ))
        .header("Authorization", &format!("Bearer {admin}"))
        .send_json(serde_json::json!({
            "name": name,
            "api_url": url,
            "api_token": token,
            "kind": "agent",
        }))
        .with_context(|| format!("cannot reach Fleet at {server}"))?;
    let status = response.status();
    let body: serde_json::Value = response.body_mut().read_json().unwrap_or_default();
    if status.as_u16() != 201 {
        let _ = std::fs::remove_file(token_file);
        bail!(
            "Fleet refused the registration ({status}): {}",
            body["error"]["message"]
                .as_str()
                .unwrap_or("no reason given")
        );
    }
    println!(
        "registered {name} as {}; the token is in {}",
        body["id"].as_str().unwrap_or("?"),
        token_file.display()
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLEET_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = if cli.print_config {
        println!("{:#?}", cli.agent);
        println!(
            "token: {}",
            if cli.agent.token_file.is_some() {
                "from FLEET_AGENT_TOKEN_FILE"
            } else if std::env::var("FLEET_AGENT_TOKEN").is_ok() {
                "from FLEET_AGENT_TOKEN"
            } else {
                "missing"
            }
        );
        cli.agent.check()
    } else {
        match cli.command {
            Some(Command::Register {
                server,
                url,
                name,
                admin_token_file,
            }) => register(&cli.agent, &server, &url, name, admin_token_file),
            None => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .context("start the runtime")
                .and_then(|rt| rt.block_on(run(cli.agent))),
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleet-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
