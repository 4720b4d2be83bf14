//! Composition: build the parts from the crates, wire them, run, stop.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context;
use fleet_api::listener::{self, ListenerConfig, ListenerStats};
use fleet_api::{ApiParts, AppState, FullStore, Workers, auth};
use fleet_core::cluster::{InstanceMeta, Membership};
use fleet_core::{
    AdminTokens, ApiToken, CancellationToken, Clock, Events, HealthProbe, HealthWork,
    MetricsCollector, MetricsWork, NewServer, Registry, Role, ServerFilter, Store, StoreError,
    SystemClock, WorkerConfig, WorkerHandle,
};
use fleet_http::{HttpClient, HttpCollector, HttpConfig, HttpProbe};
use fleet_pg::PgStore;
use fleet_pg::supervise::Readiness;
use fleet_sim::{Behavior, SimConfig, SimFleet};
use rand::Rng;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use crate::config::{
    ApiArgs, DbArgs, DemoArgs, KeyArgs, KeysCommand, LogArgs, LogFormat, ServeArgs, ServersCommand,
    TokenCommand, WorkerArgs,
};

/// Sets up logging from `FLEET_LOG` and `FLEET_LOG_FORMAT`.
pub fn init_logging(log: &LogArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&log.log)
        .map_err(|e| anyhow::anyhow!("invalid FLEET_LOG (--log) = {:?}: {e}", log.log))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match log.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let sigterm = async {
        match term.as_mut() {
            Some(t) => {
                t.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = sigterm => {}
    }
    tracing::info!(target: "fleet::server", "shutdown requested");
}

/// The extra roots of `FLEET_PROBE_CA_FILE`, refused with a message naming it when unreadable.
fn probe_roots(workers: &WorkerArgs) -> anyhow::Result<Vec<fleet_http::Certificate>> {
    let Some(path) = &workers.probe_ca_file else {
        return Ok(Vec::new());
    };
    let bad = |why: String| {
        anyhow::anyhow!(
            "invalid FLEET_PROBE_CA_FILE (--probe-ca-file) = {}: {why}",
            path.display()
        )
    };
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let roots = fleet_http::Certificate::from_pem_bundle(&pem).map_err(|e| bad(e.to_string()))?;
    if roots.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    Ok(roots)
}

fn http_clients(workers: &WorkerArgs) -> anyhow::Result<(Arc<HttpProbe>, Arc<HttpCollector>)> {
    let config = HttpConfig {
        extra_roots: probe_roots(workers)?,
        idle_per_host: workers.http_idle_per_host,
        guard: fleet_http::AddressGuard {
            deny: workers.probe_deny_nets.clone(),
        },
        ..Default::default()
    };
    // One client for both workers: at most one idle connection per server, not two.
    let client = HttpClient::new(&config)?;
    Ok((
        Arc::new(HttpProbe::with_client(client.clone())),
        Arc::new(HttpCollector::with_client(client)),
    ))
}

async fn bind(api: &ApiArgs) -> anyhow::Result<TcpListener> {
    TcpListener::bind(api.listen)
        .await
        .with_context(|| format!("cannot listen on FLEET_LISTEN (--listen) = {}", api.listen))
}

/// What serve and demo each bring: a store and how to reach servers.
struct Parts {
    store: Arc<dyn FullStore>,
    /// The PostgreSQL store behind `store`, when there is one: it is migrated before the
    /// workers start, and its partitions are kept up while they run.
    pg: Option<Arc<PgStore>>,
    clock: Arc<dyn Clock>,
    probe: Arc<dyn HealthProbe>,
    collector: Arc<dyn MetricsCollector>,
    configs: (WorkerConfig, WorkerConfig),
    /// Start the metrics worker after the first health cycle, so a fresh registry has healthy
    /// servers to collect from.
    metrics_after_health: bool,
    /// Names, regions and groups of servers, for the alert pipeline.
    servers: Arc<dyn fleet_alerts::ServerSource>,
    /// Where alert state lives; `None` when alerts are off.
    alert_store: Option<Arc<dyn fleet_alerts::AlertStore>>,
    /// The rules' settings.
    alert_config: fleet_alerts::AlertConfig,
    /// Networks never connected to (probes and notifications alike).
    deny_nets: Vec<fleet_http::IpNet>,
    /// `FLEET_PUBLIC_URL` when given: the dashboard's origin, and whether its cookie is Secure.
    public_url: Option<url::Url>,
    /// This instance's membership of a shared fleet (PostgreSQL), and the lease TTL.
    membership: Option<(Membership, Duration)>,
    /// How long each history tier holds, for the API's choice of source.
    tiers: fleet_core::Tiers,
}

/// The running parts, and how to stop them.
struct Running {
    cancel: CancellationToken,
    /// Every background task: the API, the workers' supervisor, upkeep, the demo's changes.
    tasks: TaskTracker,
    handles: Arc<Mutex<Vec<WorkerHandle>>>,
    /// The heartbeat task, stopped (and its leases released) only after the workers have
    /// flushed: their last writes still need the leases' fences.
    membership: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
    leave: CancellationToken,
    listen: SocketAddr,
    grace: Duration,
    /// Set when running on would be blind (keys that open nothing): the process exits with it.
    fatal: tokio::sync::watch::Receiver<Option<String>>,
    /// Kept until the end: the API serves from it.
    _api_runtime: ApiRuntime,
}

/// Files kept for everything but probes and API connections: the database pool, logs,
/// the listener, the runtime.
const FILE_RESERVE: u64 = 128;

/// The most files one process holds, whatever its limit allows.
const MAX_FILES: u64 = 20_000;

/// Raises the soft open-file limit to the hard one (Fleet holds at most [`MAX_FILES`]), logs
/// both, and shares the files out: the cap on API connections that leaves the probes at least
/// both workers' `max_in_flight` and the reserve; then what is left goes to the workers'
/// file budgets (two thirds health, a third metrics), into which their `max_in_flight` grows
/// with the fleet.
fn file_budget(
    api: &ApiArgs,
    (health, metrics): &(WorkerConfig, WorkerConfig),
) -> (usize, (usize, usize)) {
    let before = rlimit::getrlimit(rlimit::Resource::NOFILE).ok();
    let soft = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(soft) => soft,
        Err(e) => {
            tracing::warn!(target: "fleet::server", error = %e, "cannot raise the open-file limit: {e}");
            before.map_or(1024, |(soft, _)| soft)
        }
    };
    if let Some((old, hard)) = before {
        tracing::info!(target: "fleet::server", soft = soft, hard, "open-file limit: soft {old} raised to {soft} (hard {hard})");
    }
    let limit = soft.min(MAX_FILES);
    let probes = (health.max_in_flight + metrics.max_in_flight) as u64;
    let room = limit.saturating_sub(probes + FILE_RESERVE).max(16);
    let cap = (api.api_max_connections as u64).min(room) as usize;
    if cap < api.api_max_connections {
        tracing::warn!(
            target: "fleet::server",
            "API connections capped at {cap} (FLEET_API_MAX_CONNECTIONS is {}): the open-file limit {limit} must also hold {probes} probes in flight and {FILE_RESERVE} more",
            api.api_max_connections
        );
    }
    let for_probes = limit.saturating_sub(cap as u64 + FILE_RESERVE) as usize;
    let budgets = (
        (for_probes * 2 / 3).max(health.max_in_flight),
        (for_probes / 3).max(metrics.max_in_flight),
    );
    tracing::info!(target: "fleet::server", health = budgets.0, metrics = budgets.1, "files for checks in flight: the workers' max_in_flight grows into these with the fleet");
    (cap, budgets)
}

/// The one composition path of serve and demo: the API at once, then (once the store is
/// ready) both workers on one event bus, and the store's upkeep.
async fn start(parts: Parts, api: &ApiArgs, grace: Duration) -> anyhow::Result<Running> {
    if let Some(token) = &api.admin_token {
        fleet_api::auth::check_bootstrap(token).map_err(|e| anyhow::anyhow!("invalid {e}"))?;
    }
    if api.bulk_check_max == 0 {
        anyhow::bail!("invalid FLEET_BULK_CHECK_MAX (--bulk-check-max) = 0: must be at least 1");
    }
    if api.sse_max_rate == 0 {
        anyhow::bail!("invalid FLEET_SSE_MAX_RATE (--sse-max-rate) = 0: must be at least 1");
    }
    if api.sse_max_streams == 0 {
        anyhow::bail!("invalid FLEET_SSE_MAX_STREAMS (--sse-max-streams) = 0: must be at least 1");
    }
    let (max_connections, (health_files, metrics_files)) = file_budget(api, &parts.configs);
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    let events = Events::new();
    let (mut health_cfg, mut metrics_cfg) = parts.configs.clone();
    health_cfg.file_budget = health_cfg.file_budget.or(Some(health_files));
    metrics_cfg.file_budget = metrics_cfg.file_budget.or(Some(metrics_files));
    // The metrics cycles run a third of the health interval behind the health cycles: by then
    // a health cycle has started all its checks (a quarter of its interval), so the two
    // workers' bursts of checks do not share the box, and never do while the metrics interval
    // is a multiple of the health interval.
    let third = health_cfg.interval / 3;
    if third < metrics_cfg.interval {
        metrics_cfg.phase = third;
    }
    let workers = Arc::new(RwLock::new(Workers {
        intervals: (
            health_cfg.interval.as_secs_f64(),
            metrics_cfg.interval.as_secs_f64(),
        ),
        ..Default::default()
    }));
    let as_store: Arc<dyn Store> = parts.store.clone();
    let health = HealthWork::new(as_store.clone(), parts.probe.clone());
    let cluster = match (&parts.membership, &parts.pg) {
        (Some((m, ttl)), Some(pg)) => Some(fleet_api::ClusterView {
            leases: pg.clone(),
            stats: m.stats(),
            ttl: *ttl,
        }),
        _ => None,
    };
    let leader = cluster.as_ref().map(|c| c.stats.clone());

    let listener = bind(api).await?;
    let listen = listener.local_addr()?;
    let listener_stats = Arc::new(ListenerStats::default());
    // The alert pipeline subscribes before the workers start, so it sees every result; it
    // loads its state from the store once the store answers.
    let alerts = match &parts.alert_store {
        None => None,
        Some(store) => {
            let notifier = fleet_http::AlertNotifier::new(
                fleet_http::AddressGuard {
                    deny: parts.deny_nets.clone(),
                },
                None,
            )?;
            Some(fleet_alerts::AlertService::spawn(
                fleet_alerts::AlertParts {
                    leads: leader.clone(),
                    store: store.clone(),
                    servers: parts.servers.clone(),
                    notifier: Arc::new(notifier),
                    config: parts.alert_config.clone(),
                    clock: parts.clock.clone(),
                    events: events.clone(),
                    health_interval: health_cfg.interval,
                },
                cancel.clone(),
                &tasks,
            ))
        }
    };
    let state = AppState::new(ApiParts {
        store: parts.store.clone(),
        health: health.clone(),
        probe_timeout: health_cfg.timeout,
        clock: parts.clock.clone(),
        events: events.clone(),
        workers: workers.clone(),
        admin_token: api.admin_token.clone(),
        auth_failure_limit: api.auth_failure_limit,
        trusted_proxies: api.trusted_proxies.clone(),
        listener: listener_stats.clone(),
        alerts,
        bulk_check_max: api.bulk_check_max,
        dashboard: fleet_api::DashboardConfig {
            sse_max_rate: api.sse_max_rate,
            sse_max_streams: api.sse_max_streams,
            ..Default::default()
        }
        .with_public_url(parts.public_url.as_ref()),
        shutdown: cancel.clone(),
        cluster,
        tiers: parts.tiers,
    });
    let config = ListenerConfig {
        header_timeout: api.api_header_timeout,
        body_timeout: api.api_body_timeout,
        max_connections,
        shutdown_grace: Duration::from_secs(2),
    };
    // The API answers on a runtime of its own, so that a request never queues behind the
    // thousands of checks a cycle runs on the main one.
    let api_runtime = ApiRuntime::start()?;
    let listener = listener.into_std()?;
    let serving = api_runtime.spawn(listener::serve_std(
        listener,
        fleet_api::router(state),
        config,
        listener_stats,
        cancel.clone(),
    ));
    tasks.spawn(async move {
        let _ = serving.await;
    });
    tracing::info!(target: "fleet::server", "API listening on http://{listen}");

    let handles = Arc::new(Mutex::new(Vec::new()));
    let membership_task = Arc::new(Mutex::new(None));
    let leave = CancellationToken::new();
    let (fatal, fatal_rx) = tokio::sync::watch::channel(None);
    let supervisor = {
        let (cancel, handles, workers) = (cancel.clone(), handles.clone(), workers.clone());
        let (membership_task, leave) = (membership_task.clone(), leave.clone());
        async move {
            if let Some(pg) = &parts.pg {
                let ready = fleet_pg::supervise::until_ready(pg, &cancel, |e| {
                    workers.write().unwrap_or_else(|p| p.into_inner()).error =
                        Some(format!("workers not started: {e}"));
                })
                .await;
                match ready {
                    Readiness::Ready => {}
                    Readiness::Cancelled => return,
                    Readiness::Refused(why) => {
                        tracing::error!(target: "fleet::server", "refusing to run blind: {why}");
                        let _ = fatal.send(Some(why));
                        return;
                    }
                }
            }
            let interval = health_cfg.interval;
            let health = health
                .worker(health_cfg, parts.clock.clone())
                .with_events(events.clone());
            let mut metrics = MetricsWork::new(as_store, parts.collector);
            if let Some(pg) = &parts.pg {
                metrics = metrics.with_storage_check(pg.clone());
            }
            let metrics = metrics.worker(metrics_cfg, parts.clock).with_events(events);
            if let Some((mut membership, _)) = parts.membership {
                // Take buckets (a restarted instance: its own, at once) before the first
                // selection; a failure here is retried by the heartbeat loop. Buckets taken
                // later are caught up at once, not at the next tick.
                let _ = membership.round().await;
                membership.on_takeover(health.catch_up());
                membership.on_takeover(metrics.catch_up());
                *membership_task.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(tokio::spawn(membership.run(leave)));
            }
            let h = health.spawn(cancel.clone());
            workers.write().unwrap_or_else(|p| p.into_inner()).health = Some(h.stats().clone());
            if parts.metrics_after_health {
                let stats = h.stats().clone();
                let first_cycle = async {
                    while stats.snapshot().cycles == 0 {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                };
                let _ = tokio::time::timeout(interval, first_cycle).await;
            }
            let m = metrics.spawn(cancel.clone());
            {
                let mut w = workers.write().unwrap_or_else(|p| p.into_inner());
                w.metrics = Some(m.stats().clone());
                w.error = None;
            }
            handles
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend([h, m]);
            tracing::info!(target: "fleet::server", "workers started");
            if let Some(pg) = &parts.pg {
                // Retention runs on the leader only, under its fence (see PgStore).
                let leads = || {
                    leader
                        .as_ref()
                        .is_none_or(|s| s.snapshot().leader_epoch.is_some())
                };
                // So do the history rollups.
                tokio::join!(
                    fleet_pg::supervise::maintain_every(
                        pg,
                        Duration::from_secs(3600),
                        &cancel,
                        leads
                    ),
                    fleet_pg::supervise::roll_up_every(pg, &cancel, leads),
                );
            }
        }
    };
    tasks.spawn(supervisor);
    Ok(Running {
        cancel,
        tasks,
        handles,
        membership: membership_task,
        leave,
        listen,
        grace,
        fatal: fatal_rx,
        _api_runtime: api_runtime,
    })
}

/// The API's own runtime, shut down without blocking when dropped (a runtime must not be
/// dropped, blocking, inside another's async context). The `Option` is only for that drop.
struct ApiRuntime {
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl ApiRuntime {
    fn start() -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fleet-api")
            .enable_all()
            .build()
            .context("cannot start the API's runtime")?;
        Ok(Self {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
        })
    }

    fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(future)
    }
}

impl Drop for ApiRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Running {
    /// Runs until Ctrl-C or SIGTERM, or until a part refuses to go on, then stops everything
    /// within the grace period.
    async fn until_signalled(self) -> anyhow::Result<()> {
        let mut fatal = self.fatal.clone();
        let refused = async {
            match fatal.wait_for(Option::is_some).await {
                Ok(why) => why.clone(),
                // The supervisor finished without refusing: nothing more can come.
                Err(_) => std::future::pending().await,
            }
        };
        let error = tokio::select! {
            () = shutdown_signal() => None,
            why = refused => why,
        };
        self.stop().await;
        match error {
            Some(why) => Err(anyhow::anyhow!("{why}")),
            None => Ok(()),
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.tasks.close();
        let handles: Vec<WorkerHandle> =
            std::mem::take(&mut *self.handles.lock().unwrap_or_else(|e| e.into_inner()));
        let stop_workers = async {
            for h in handles {
                let report = h.stopped().await;
                tracing::info!(target: "fleet::server", cancelled = report.cancelled_checks, lost = report.lost_results, "worker stopped");
            }
        };
        // Each worker bounds its own drain and flush by the grace period; this is the backstop.
        if tokio::time::timeout(self.grace + Duration::from_secs(2), stop_workers)
            .await
            .is_err()
        {
            tracing::error!(target: "fleet::server", "workers did not stop within the grace period");
        }
        // Now that the workers' last results are written under their fences, give the leases
        // up, so that other instances take the buckets at once.
        self.leave.cancel();
        let membership = self
            .membership
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = membership
            && tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .is_err()
        {
            tracing::warn!(target: "fleet::server", "leaving the shared fleet timed out; the leases expire by themselves");
        }
        if tokio::time::timeout(Duration::from_secs(2), self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(target: "fleet::server", "API connections still open at exit");
        }
    }
}

/// `fleet-server serve`.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let configs = args.workers.configs()?;
    let vault = args.keys.vault()?;
    let settings = args.db.settings()?;
    let pool = settings.pool()?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let pg = Arc::new(
        PgStore::new(
            pool.clone(),
            vault,
            clock.clone(),
            args.partitions.policy()?,
        )
        .with_target(settings.target()),
    );
    let times = args.cluster.times()?;
    let me = args.cluster.instance_id(args.api.listen)?;
    let membership = Membership::new(
        pg.clone(),
        InstanceMeta {
            id: me.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        },
        times,
    );
    // The workers, the API and upkeep select and write as this instance.
    let pg = Arc::new((*pg).clone().shared_as(&me, membership.stats()));
    tracing::info!(target: "fleet::server", instance = %me, "instance {me}: heartbeat every {:?}, leases of {:?}", times.heartbeat, times.ttl);
    let (probe, collector) = http_clients(&args.workers)?;
    let alert_config = args
        .alerts
        .config(fleet_alerts::AlertConfig::default(), args.api.listen)?;
    // The alert senders' own small pool: a hung receiver never holds the writer's connections.
    let alert_store: Option<Arc<dyn fleet_alerts::AlertStore>> = if args.alerts.alerts {
        let mut alert_settings = settings.clone();
        alert_settings.pool_size = args.alerts.alert_db_pool_size;
        Some(Arc::new(pg.with_pool(alert_settings.pool()?)))
    } else {
        None
    };
    let parts = Parts {
        store: pg.clone(),
        servers: pg.clone(),
        pg: Some(pg),
        clock,
        probe,
        collector,
        configs,
        metrics_after_health: false,
        alert_store,
        alert_config,
        deny_nets: args.workers.probe_deny_nets.clone(),
        public_url: args.alerts.public_url()?,
        membership: Some((membership, times.ttl)),
        tiers: args.partitions.tiers(),
    };
    let run = start(parts, &args.api, args.workers.shutdown_grace)
        .await?
        .until_signalled()
        .await;
    pool.close();
    run?;
    tracing::info!(target: "fleet::server", "stopped");
    Ok(())
}

/// The demo fleet's mix: mostly healthy, some of everything an operator meets.
const DEMO_MIX: &str = "healthy=40,degraded=4,slow=5,flaky=1";

/// The demo's alert timings: an incident opens, is announced and resolves within two
/// minutes of a fault, with a 5 s health interval.
fn demo_alerts() -> fleet_alerts::AlertConfig {
    fleet_alerts::AlertConfig {
        critical_after: 2,
        unreachable_for: Duration::from_secs(20),
        degraded_for: Duration::from_secs(60),
        resolve_after: 2,
        group_wait: Duration::from_secs(5),
        group_interval: Duration::from_secs(30),
        repeat_interval: Duration::from_secs(600),
        ..fleet_alerts::AlertConfig::default()
    }
}

/// A webhook receiver of the demo's own on loopback: it prints each notice's headline.
async fn demo_receiver(
    cancel: CancellationToken,
    tasks: &TaskTracker,
) -> anyhow::Result<SocketAddr> {
    use axum::routing::post;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("starting the demo's webhook receiver")?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/hook",
        post(|body: axum::Json<serde_json::Value>| async move {
            let notice = body.0;
            println!(
                "  webhook received: {}  {}",
                fleet_alerts::payload::headline(&notice),
                notice["incident"]["url"].as_str().unwrap_or_default()
            );
            axum::http::StatusCode::OK
        }),
    );
    tasks.spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await;
    });
    Ok(addr)
}

/// `fleet-server demo`.
pub async fn demo(mut args: DemoArgs) -> anyhow::Result<()> {
    if !args.health_interval_given {
        args.workers.health_interval = Duration::from_secs(5);
    }
    if !args.health_timeout_given {
        args.workers.health_timeout = Duration::from_secs(2);
    }
    let configs = args.workers.configs()?;
    if args.servers == 0 || args.servers > 5000 {
        anyhow::bail!(
            "invalid FLEET_DEMO_SERVERS (--servers) = {}: must be 1 to 5000",
            args.servers
        );
    }
    let alert_config = args.alerts.config(demo_alerts(), args.api.listen)?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let memory = Arc::new(fleet_core::InMemoryStore::new());
    let store: Arc<dyn FullStore> = memory.clone();
    let sim = SimConfig {
        count: args.servers,
        mix: DEMO_MIX.parse().expect("the demo mix parses"),
        seed: rand::rng().random(),
        prefix: "demo".into(),
        slow: (Duration::from_millis(300), Duration::from_millis(1500)),
        ..Default::default()
    };
    let fleet = Arc::new(
        SimFleet::start(sim)
            .await
            .context("starting the simulated fleet")?,
    );
    let regions = ["eu-west", "us-east", "ap-south"];
    let environments = ["production", "staging"];
    for (i, s) in fleet.servers().iter().enumerate() {
        let mut new = NewServer::new(s.name(), s.api_url()).with_token(ApiToken::new(s.token()));
        new.region = Some(regions[i % regions.len()].into());
        new.environment = Some(environments[usize::from(i % 5 == 0)].into());
        new.hostname = Some(format!("{}.demo.internal", s.name()));
        memory.create_server(new).await?;
    }
    let token = auth::generate();
    memory
        .insert_token("demo-admin", Role::Admin, auth::hash(&token))
        .await?;

    // Alerts go to a webhook receiver of the demo's own, which prints what it gets.
    let alert_store = Arc::new(fleet_alerts::MemoryAlertStore::new());
    let receiver_stop = CancellationToken::new();
    let receiver_tasks = TaskTracker::new();
    let receiver = if args.alerts.alerts {
        let addr = demo_receiver(receiver_stop.clone(), &receiver_tasks).await?;
        fleet_alerts::AlertStore::create_channel(
            &*alert_store,
            "demo-webhook",
            fleet_alerts::ChannelConfig::Webhook {
                url: format!("http://{addr}/hook"),
                send_resolved: true,
            },
            clock.now(),
        )
        .await?;
        Some(addr)
    } else {
        None
    };

    let (probe, collector) = http_clients(&args.workers)?;
    let health_interval = configs.0.interval;
    let parts = Parts {
        store,
        servers: memory.clone(),
        pg: None,
        clock,
        probe,
        collector,
        configs,
        metrics_after_health: true,
        alert_store: args
            .alerts
            .alerts
            .then(|| alert_store.clone() as Arc<dyn fleet_alerts::AlertStore>),
        alert_config,
        deny_nets: args.workers.probe_deny_nets.clone(),
        public_url: args.alerts.public_url()?,
        membership: None,
        // The demo's store keeps every row it holds (within its cap): raw unless asked.
        tiers: fleet_core::Tiers {
            raw: None,
            ..Default::default()
        },
    };
    let running = start(parts, &args.api, args.workers.shutdown_grace).await?;
    let listen = running.listen;

    println!();
    println!(
        "Fleet demo: {} simulated servers on 127.0.0.1, checked every {} s.",
        args.servers,
        health_interval.as_secs_f64()
    );
    println!("  Dashboard: http://{listen}/dashboard/  (sign in with the admin token below)");
    println!("  Status:    http://{listen}/api/v1/fleet/workers/status");
    println!("  Servers:   http://{listen}/api/v1/fleet/servers");
    println!("  Incidents: http://{listen}/api/v1/fleet/incidents");
    if let Some(addr) = receiver {
        println!(
            "  Alerts go to the demo's webhook receiver at http://{addr}/hook; what it gets is printed below."
        );
    }
    println!("  Admin token (shown once): {token}");
    println!();
    println!("  curl -H 'Authorization: Bearer {token}' http://{listen}/api/v1/fleet/incidents");
    println!();
    println!("Stop with Ctrl-C.");

    if !args.change_every.is_zero() {
        let (fleet, cancel, every) = (fleet.clone(), running.cancel.clone(), args.change_every);
        // Each fault lasts several health intervals, then the server recovers.
        let fault_for = (health_interval * 8).max(Duration::from_secs(30));
        running.tasks.spawn(async move {
            let faults = [Behavior::Critical, Behavior::Unreachable, Behavior::Degraded];
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
                let (server, fault) = {
                    let mut rng = rand::rng();
                    let healthy: Vec<_> = fleet
                        .servers()
                        .iter()
                        .filter(|s| s.behavior() == Behavior::Healthy)
                        .cloned()
                        .collect();
                    if healthy.is_empty() {
                        continue;
                    }
                    let s = healthy[rng.random_range(0..healthy.len())].clone();
                    (s, faults[rng.random_range(0..faults.len())])
                };
                tracing::info!(target: "fleet::demo", "demo: {} turns {} for {} s", server.name(), fault, fault_for.as_secs());
                server.set_behavior(fault);
                let cancel = cancel.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        () = cancel.cancelled() => {}
                        () = tokio::time::sleep(fault_for) => {
                            tracing::info!(target: "fleet::demo", "demo: {} is healthy again", server.name());
                            server.set_behavior(Behavior::Healthy);
                        }
                    }
                });
            }
        });
    }

    let run = running.until_signalled().await;
    receiver_stop.cancel();
    receiver_tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), receiver_tasks.wait()).await;
    fleet.shutdown().await;
    run?;
    Ok(())
}

async fn pg_store(db: &DbArgs, keys: &KeyArgs) -> anyhow::Result<PgStore> {
    let settings = db.settings()?;
    let pool = settings.pool()?;
    fleet_pg::migrate(&pool)
        .await
        .with_context(|| format!("applying migrations to PostgreSQL at {}", settings.target()))?;
    Ok(PgStore::new(
        pool,
        keys.vault()?,
        Arc::new(SystemClock),
        Default::default(),
    )
    .with_target(settings.target()))
}

/// The server named `name`, exactly.
async fn find_server(store: &PgStore, name: &str) -> anyhow::Result<fleet_core::ManagedServer> {
    let filter = ServerFilter {
        search: Some(name.to_owned()),
        limit: Some(1000),
        ..Default::default()
    };
    store
        .list_servers(&filter)
        .await
        .map_err(store_error)?
        .into_iter()
        .find(|s| s.name.eq_ignore_ascii_case(name))
        .ok_or_else(|| anyhow::anyhow!("no server named `{}`", name.escape_debug()))
}

/// An import file: a fleet-sim manifest, or the same shape with more of each server.
#[derive(Debug, serde::Deserialize)]
struct ImportFile {
    servers: Vec<ImportEntry>,
}

#[derive(Debug, serde::Deserialize)]
struct ImportEntry {
    name: String,
    api_url: String,
    #[serde(default)]
    api_token: Option<String>,
    #[serde(default)]
    status: Option<fleet_core::ServerStatus>,
    /// `fleet` (the default), `agent` or `node_exporter`.
    #[serde(default)]
    kind: Option<fleet_core::ServerKind>,
    #[serde(default)]
    metrics_path: Option<String>,
    /// A PEM CA certificate the server's TLS is trusted by.
    #[serde(default)]
    ca_cert: Option<String>,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    environment: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    /// fleet-sim's manifests say how each server started; informational, ignored.
    #[serde(default, rename = "behavior")]
    _behavior: Option<String>,
}

impl ImportEntry {
    fn into_new(self) -> NewServer {
        let mut new = NewServer::new(self.name, self.api_url);
        new.api_token = self.api_token.map(ApiToken::new);
        if let Some(status) = self.status {
            new.status = status;
        }
        new.kind = self.kind.unwrap_or_default();
        new.metrics_path = self.metrics_path;
        new.ca_cert = self.ca_cert;
        new.region = self.region;
        new.environment = self.environment;
        new.tags = self.tags;
        new
    }
}

/// `fleet-server keys ...`.
pub async fn keys(command: KeysCommand, db: DbArgs, keys: KeyArgs) -> anyhow::Result<()> {
    let store = pg_store(&db, &keys).await?;
    match command {
        KeysCommand::Rotate => {
            let report = store.rotate_keys().await.map_err(store_error)?;
            for (column, r) in report {
                println!(
                    "{column}: {} re-sealed, {} already under the current key",
                    r.resealed, r.current
                );
            }
        }
        KeysCommand::List => {
            println!("{:<14} VALUES", "KEY ID");
            for (id, n) in store.key_ids_in_use().await.map_err(store_error)? {
                println!("{id:<14} {n}");
            }
        }
    }
    Ok(())
}

/// `fleet-server migrate`.
pub async fn migrate(db: DbArgs) -> anyhow::Result<()> {
    let settings = db.settings()?;
    let pool = settings.pool()?;
    let applied = fleet_pg::migrate(&pool)
        .await
        .with_context(|| format!("applying migrations to PostgreSQL at {}", settings.target()))?;
    if applied.is_empty() {
        println!("database is up to date");
    } else {
        println!("applied: {}", applied.join(", "));
    }
    Ok(())
}

/// `fleet-server token ...`.
pub async fn token(command: TokenCommand, db: DbArgs) -> anyhow::Result<()> {
    let store = pg_store(&db, &KeyArgs::default()).await?;
    match command {
        TokenCommand::Create { name, role } => {
            if name.trim().is_empty() || name.len() > 200 {
                anyhow::bail!("invalid --name: must be 1 to 200 characters");
            }
            let token = auth::generate();
            let record = store
                .insert_token(&name, role.into(), auth::hash(&token))
                .await
                .map_err(store_error)?;
            println!("{token}");
            eprintln!(
                "created {} token `{}`; it is shown only this once",
                record.role, record.name
            );
        }
        TokenCommand::List => {
            println!("{:<30} {:<7} {:<26} REVOKED", "NAME", "ROLE", "CREATED");
            for t in store.list_tokens().await.map_err(store_error)? {
                let revoked = t.revoked_at.map_or("-".to_owned(), crate::api_ts);
                println!(
                    "{:<30} {:<7} {:<26} {revoked}",
                    t.name,
                    t.role.as_str(),
                    crate::api_ts(t.created_at)
                );
            }
        }
        TokenCommand::Revoke { name } => {
            if !store.revoke_token(&name).await.map_err(store_error)? {
                anyhow::bail!("no live token named `{name}`");
            }
            println!("revoked `{name}`");
        }
    }
    Ok(())
}

fn store_error(e: StoreError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// `fleet-server servers ...`.
pub async fn servers(command: ServersCommand, db: DbArgs, keys: KeyArgs) -> anyhow::Result<()> {
    let store = pg_store(&db, &keys).await?;
    match command {
        ServersCommand::Import { file, skip_invalid } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let import: ImportFile = serde_json::from_str(&text).with_context(|| {
                format!(
                    "{} is not an import file: expected {{\"servers\": [{{\"name\", \"api_url\", \"api_token\"?, \"status\"?, \"region\"?, \"environment\"?, \"tags\"?}}]}}",
                    file.display()
                )
            })?;
            // The whole file first: nothing is stored if any entry is bad, unless told to
            // store the good ones.
            let mut good = Vec::new();
            let mut bad = Vec::new();
            for (i, e) in import.servers.into_iter().enumerate() {
                let shown = e.name.escape_debug().to_string();
                match e.into_new().validated() {
                    Ok(new) => good.push(new),
                    Err(why) => bad.push(format!("entry {i} (name \"{shown}\"): {why}")),
                }
            }
            for b in &bad {
                eprintln!("invalid: {b}");
            }
            if !bad.is_empty() && !skip_invalid {
                anyhow::bail!(
                    "{} of {} entries are invalid; nothing was imported (--skip-invalid imports the valid ones)",
                    bad.len(),
                    bad.len() + good.len()
                );
            }
            let (mut added, mut skipped) = (0, 0);
            for new in good {
                let name = new.name.clone();
                match store.create_server(new).await {
                    Ok(_) => added += 1,
                    Err(StoreError::Conflict(_)) => {
                        eprintln!(
                            "skipped: a server named `{}` already exists",
                            name.escape_debug()
                        );
                        skipped += 1;
                    }
                    Err(e) => return Err(store_error(e)),
                }
            }
            let invalid = if bad.is_empty() {
                String::new()
            } else {
                format!(", {} invalid not imported", bad.len())
            };
            println!("imported {added} servers, skipped {skipped} already registered{invalid}");
        }
        ServersCommand::Add {
            name,
            api_url,
            token_file,
            region,
            environment,
            tags,
            status,
        } => {
            let mut new = NewServer::new(name, api_url);
            if let Some(file) = token_file {
                let token = std::fs::read_to_string(&file)
                    .with_context(|| format!("reading --token-file {}", file.display()))?;
                new.api_token = Some(ApiToken::new(token.trim_end_matches(['\r', '\n'])));
            }
            new.region = region;
            new.environment = environment;
            new.tags = tags;
            new.status = status.unwrap_or(fleet_core::ServerStatus::Active);
            let new = new.validated().map_err(|e| anyhow::anyhow!("{e}"))?;
            let server = store.create_server(new).await.map_err(store_error)?;
            println!("added {} ({})", server.name, server.id.0);
        }
        ServersCommand::Remove { name } => {
            let server = find_server(&store, &name).await?;
            store.delete_server(server.id).await.map_err(store_error)?;
            println!("removed {} and its history", server.name);
        }
        ServersCommand::Set {
            name,
            status,
            region,
            environment,
            api_url,
        } => {
            let server = find_server(&store, &name).await?;
            let update = fleet_core::ServerUpdate {
                status,
                region: region.map(|r| Some(r).filter(|r: &String| !r.is_empty())),
                environment: environment.map(|e| Some(e).filter(|e: &String| !e.is_empty())),
                api_url,
                ..Default::default()
            }
            .validated()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            store
                .update_server(server.id, update)
                .await
                .map_err(store_error)?;
            println!("updated {}", server.name);
        }
        ServersCommand::List { health, status } => {
            let filter = ServerFilter {
                health_status: health,
                status,
                ..Default::default()
            };
            let all = store.list_servers(&filter).await.map_err(store_error)?;
            println!(
                "{:<24} {:<14} {:<12} {:<12} {:<26} API URL",
                "NAME", "KIND", "STATUS", "HEALTH", "LAST CHECK"
            );
            for s in all {
                // Escaped: a name from before the rules must not drive the terminal.
                println!(
                    "{:<24} {:<14} {:<12} {:<12} {:<26} {}",
                    s.name.escape_debug().to_string(),
                    s.kind.as_str(),
                    s.status.as_str(),
                    s.health_status.map_or("-", |h| h.as_str()),
                    s.last_health_check_at.map_or("-".to_owned(), crate::api_ts),
                    s.api_url
                );
            }
        }
    }
    Ok(())
}

/// `fleet-server alerts …`: a thin client of a running server's alert routes.
pub async fn alerts(
    command: crate::config::AlertsCommand,
    client: crate::config::ClientArgs,
) -> anyhow::Result<()> {
    use crate::config::{AlertsCommand as A, ChannelsCommand as C};
    let base = client.url.trim_end_matches('/').to_owned();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let call = |method: reqwest::Method, path: String, body: Option<serde_json::Value>| {
        let mut req = http.request(method, format!("{base}{path}"));
        if let Some(t) = &client.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b.to_string());
        }
        async move {
            let res = req.send().await.with_context(|| {
                format!("cannot reach the server at FLEET_URL (--url) = {base}")
            })?;
            let status = res.status();
            let text = res.text().await.unwrap_or_default();
            let value: serde_json::Value =
                serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
            if !status.is_success() {
                let msg = value["error"]["message"]
                    .as_str()
                    .unwrap_or(&text)
                    .to_owned();
                anyhow::bail!("the server answered {status}: {msg}");
            }
            Ok::<_, anyhow::Error>(value)
        }
    };
    use reqwest::Method as M;
    match command {
        A::Channels { command } => match command.unwrap_or(C::List) {
            C::List => {
                let v = call(M::GET, "/api/v1/fleet/alerts/channels".into(), None).await?;
                for c in v["channels"].as_array().into_iter().flatten() {
                    println!(
                        "{}  {:<9}  {}",
                        c["id"].as_str().unwrap_or_default(),
                        c["kind"].as_str().unwrap_or_default(),
                        c["name"].as_str().unwrap_or_default()
                    );
                }
            }
            C::Add { json } => {
                let body: serde_json::Value = serde_json::from_str(&json)
                    .map_err(|e| anyhow::anyhow!("the channel body is not JSON: {e}"))?;
                let v = call(M::POST, "/api/v1/fleet/alerts/channels".into(), Some(body)).await?;
                println!(
                    "added channel {} ({})",
                    v["name"].as_str().unwrap_or_default(),
                    v["id"].as_str().unwrap_or_default()
                );
            }
            C::Remove { id } => {
                call(
                    M::DELETE,
                    format!("/api/v1/fleet/alerts/channels/{id}"),
                    None,
                )
                .await?;
                println!("removed channel {id}");
            }
        },
        A::Incidents {
            state,
            severity,
            limit,
        } => {
            let mut path = format!("/api/v1/fleet/incidents?limit={limit}");
            if let Some(s) = state {
                path.push_str(&format!("&state={s}"));
            }
            if let Some(s) = severity {
                path.push_str(&format!("&severity={s}"));
            }
            let v = call(M::GET, path, None).await?;
            for i in v["incidents"].as_array().into_iter().flatten() {
                println!(
                    "{}  {:<12}  {:<8}  {}  {}",
                    i["id"].as_str().unwrap_or_default(),
                    i["state"].as_str().unwrap_or_default(),
                    i["severity"].as_str().unwrap_or_default(),
                    i["opened_at"].as_str().unwrap_or_default(),
                    i["summary"].as_str().unwrap_or_default()
                );
            }
            println!("{} incident(s) in all", v["total"]);
        }
        A::Ack { id, reason } => {
            let v = call(
                M::POST,
                format!("/api/v1/fleet/incidents/{id}/ack"),
                Some(serde_json::json!({"reason": reason})),
            )
            .await?;
            println!(
                "incident {id} is {}",
                v["state"].as_str().unwrap_or_default()
            );
        }
        A::Silence {
            server_id,
            group_id,
            region,
            rule,
            duration,
            comment,
        } => {
            let now = time::OffsetDateTime::now_utc();
            let body = serde_json::json!({
                "matchers": {"server_id": server_id, "group_id": group_id, "region": region, "rule": rule},
                "starts_at": crate::api_ts(now),
                "ends_at": crate::api_ts(now + duration),
                "comment": comment,
            });
            // Absent matchers are left out, not sent as null.
            let mut body = body;
            if let Some(m) = body["matchers"].as_object_mut() {
                m.retain(|_, v| !v.is_null());
            }
            let v = call(M::POST, "/api/v1/fleet/silences".into(), Some(body)).await?;
            println!(
                "silence {} until {}",
                v["id"].as_str().unwrap_or_default(),
                v["ends_at"].as_str().unwrap_or_default()
            );
        }
        A::Test { channel } => {
            let v = call(
                M::POST,
                format!("/api/v1/fleet/alerts/channels/{channel}/test"),
                None,
            )
            .await?;
            println!(
                "{} in {} ms",
                v["outcome"].as_str().unwrap_or_default(),
                v["latency_ms"]
            );
        }
    }
    Ok(())
}
