//! The API's JSON shapes, mapped from core types. Each is a typed struct from which both the
//! response and its OpenAPI schema are derived, so the document cannot drift from what the
//! API sends. Timestamps are RFC 3339 in UTC.

use std::collections::BTreeMap;

use fleet_core::{
    EventStats, HealthCheck, HealthStatus, ManagedServer, MetricsSample, ServerGroup, ServerStatus,
    StateChange, WorkerStats,
};
use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;
use utoipa::ToSchema;
use uuid::Uuid;

/// RFC 3339 in UTC, as the API shows times: always six fraction digits and a `Z`, as in
/// `2026-01-26T14:30:15.123456Z`.
pub fn ts(t: OffsetDateTime) -> String {
    const FORMAT: &[time::format_description::FormatItem<'_>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    t.to_offset(time::UtcOffset::UTC)
        .format(FORMAT)
        .unwrap_or_default()
}

/// A number of seconds: a whole number when whole (`30`), a fraction only when configured so
/// (`0.5`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Seconds(pub f64);

impl Serialize for Seconds {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.fract() == 0.0 && (0.0..9.0e15).contains(&self.0) {
            s.serialize_u64(self.0 as u64)
        } else {
            s.serialize_f64(self.0)
        }
    }
}

fn opt_ts(t: Option<OffsetDateTime>) -> Option<String> {
    t.map(ts)
}

/// A server's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Every component reported healthy.
    Healthy,
    /// Something other than the database or redis is unhealthy.
    Degraded,
    /// The database or redis is unhealthy.
    Critical,
    /// No complete answer.
    Unreachable,
}

impl From<HealthStatus> for Health {
    fn from(h: HealthStatus) -> Self {
        match h {
            HealthStatus::Healthy => Health::Healthy,
            HealthStatus::Degraded => Health::Degraded,
            HealthStatus::Critical => Health::Critical,
            HealthStatus::Unreachable => Health::Unreachable,
        }
    }
}

/// Whether a server is under watch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Probed and collected from.
    Active,
    /// Not probed.
    Inactive,
    /// Not probed, on purpose for a while.
    Maintenance,
}

/// What a server speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Fleet's wire format (`/health`, `/api/v1/metrics/current`).
    Fleet,
    /// The same format, served by fleet-agent.
    Agent,
    /// Prometheus's node_exporter (`/metrics`, or `metrics_path`).
    NodeExporter,
}

impl From<fleet_core::ServerKind> for Kind {
    fn from(k: fleet_core::ServerKind) -> Self {
        match k {
            fleet_core::ServerKind::Fleet => Kind::Fleet,
            fleet_core::ServerKind::Agent => Kind::Agent,
            fleet_core::ServerKind::NodeExporter => Kind::NodeExporter,
        }
    }
}

impl From<ServerStatus> for Status {
    fn from(s: ServerStatus) -> Self {
        match s {
            ServerStatus::Active => Status::Active,
            ServerStatus::Inactive => Status::Inactive,
            ServerStatus::Maintenance => Status::Maintenance,
        }
    }
}

/// A managed server. Its probe token is never shown.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub id: Uuid,
    pub name: String,
    pub description: Option<String>,
    pub hostname: Option<String>,
    pub api_url: String,
    pub region: Option<String>,
    pub environment: Option<String>,
    pub tags: Vec<String>,
    #[schema(value_type = Object)]
    pub metadata: Value,
    pub status: Status,
    pub kind: Kind,
    /// The page a node_exporter server is read from, when not `/metrics`.
    pub metrics_path: Option<String>,
    /// The PEM CA certificate the server's TLS is trusted by, when it has its own.
    pub ca_cert: Option<String>,
    /// `null` until the first check.
    pub health_status: Option<Health>,
    #[schema(format = DateTime)]
    pub last_seen_at: Option<String>,
    #[schema(format = DateTime)]
    pub last_health_check_at: Option<String>,
    pub last_metrics_error: Option<String>,
    #[schema(format = DateTime)]
    pub last_metrics_error_at: Option<String>,
    /// The last health check's response time.
    pub last_response_time_ms: Option<u32>,
    /// The last health check's error.
    pub last_error: Option<String>,
}

impl From<&ManagedServer> for Server {
    fn from(s: &ManagedServer) -> Self {
        Self {
            id: s.id.0,
            name: s.name.clone(),
            description: s.description.clone(),
            hostname: s.hostname.clone(),
            api_url: s.api_url.clone(),
            region: s.region.clone(),
            environment: s.environment.clone(),
            tags: s.tags.clone(),
            metadata: s.metadata.clone(),
            status: s.status.into(),
            kind: s.kind.into(),
            metrics_path: s.metrics_path.clone(),
            ca_cert: s.ca_cert.clone(),
            health_status: s.health_status.map(Into::into),
            last_seen_at: opt_ts(s.last_seen_at),
            last_health_check_at: opt_ts(s.last_health_check_at),
            last_metrics_error: s.last_metrics_error.clone(),
            last_metrics_error_at: opt_ts(s.last_metrics_error_at),
            last_response_time_ms: s.last_response_time_ms,
            last_error: s.last_error.clone(),
        }
    }
}

/// A page of servers.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerList {
    pub servers: Vec<Server>,
    /// How many servers match the filters, on every page.
    pub total: u64,
    pub limit: usize,
    pub offset: usize,
}

/// One health check.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Check {
    pub server_id: Uuid,
    #[schema(format = DateTime)]
    pub timestamp: String,
    pub status: Health,
    pub successful: bool,
    pub response_time_ms: Option<u32>,
    pub database_healthy: Option<bool>,
    pub redis_healthy: Option<bool>,
    pub services_healthy: Option<bool>,
    pub error_message: Option<String>,
    /// The unhealthy components and their statuses.
    #[schema(value_type = Option<Object>)]
    pub error_details: Option<Value>,
}

impl From<&HealthCheck> for Check {
    fn from(c: &HealthCheck) -> Self {
        Self {
            server_id: c.server_id.0,
            timestamp: ts(c.timestamp),
            status: c.status.into(),
            successful: c.successful,
            response_time_ms: c.response_time_ms,
            database_healthy: c.database_healthy,
            redis_healthy: c.redis_healthy,
            services_healthy: c.services_healthy,
            error_message: c.error_message.clone(),
            error_details: c.error_details.clone(),
        }
    }
}

/// A server's health history, newest first: raw checks, or rollups per period.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthHistory {
    pub server_id: Uuid,
    /// The source read: `raw` checks, `5m` or `1h` rollups (the finest that covers the range
    /// asked for, unless `resolution` chose one).
    #[schema(value_type = String, example = "raw")]
    pub resolution: &'static str,
    pub health_checks: HealthItems,
}

/// Raw checks or rollups.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum HealthItems {
    Raw(Vec<Check>),
    Rollups(Vec<HealthRollup>),
}

/// Checks by classification in a period.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatusCounts {
    pub healthy: u32,
    pub degraded: u32,
    pub critical: u32,
    pub unreachable: u32,
}

/// Response times in a period; the p95 is read from a fixed histogram.
#[derive(Debug, Serialize, ToSchema)]
pub struct ResponseTimes {
    pub min: u32,
    pub mean: f64,
    pub p95: u32,
    pub max: u32,
}

/// One server's health over one period.
#[derive(Debug, Serialize, ToSchema)]
pub struct HealthRollup {
    #[schema(format = DateTime)]
    pub period_start: String,
    pub checks: StatusCounts,
    pub response_time_ms: Option<ResponseTimes>,
    pub last_error: Option<String>,
}

impl From<&fleet_core::HealthRollup> for HealthRollup {
    fn from(r: &fleet_core::HealthRollup) -> Self {
        let c = r.checks;
        Self {
            period_start: ts(r.period_start),
            checks: StatusCounts {
                healthy: c.healthy,
                degraded: c.degraded,
                critical: c.critical,
                unreachable: c.unreachable,
            },
            response_time_ms: r.response_time_ms.map(|t| ResponseTimes {
                min: t.min,
                mean: t.mean,
                p95: t.p95,
                max: t.max,
            }),
            last_error: r.last_error.clone(),
        }
    }
}

/// A gauge over a period.
#[derive(Debug, Serialize, ToSchema)]
pub struct Gauge {
    pub min: f64,
    pub mean: f64,
    pub max: f64,
}

/// A counter's increase over a period (a drop counts as a restart from zero).
#[derive(Debug, Serialize, ToSchema)]
pub struct Counter {
    pub increase: f64,
}

/// One server's metrics over one period: each gauge's min, mean and max, each counter's
/// increase; `null` when no sample in the period had the value.
#[derive(Debug, Serialize, ToSchema)]
pub struct MetricsRollup {
    #[schema(format = DateTime)]
    pub period_start: String,
    pub samples: u32,
    pub cpu_percent: Option<Gauge>,
    pub memory_percent: Option<Gauge>,
    pub disk_percent: Option<Gauge>,
    pub active_services: Option<Gauge>,
    pub failed_services: Option<Gauge>,
    pub total_services: Option<Gauge>,
    pub active_users: Option<Gauge>,
    pub total_users: Option<Gauge>,
    pub llm_requests: Option<Counter>,
    pub llm_cost_usd: Option<Counter>,
    pub network_rx_bytes: Option<Counter>,
    pub network_tx_bytes: Option<Counter>,
}

impl From<&fleet_core::MetricsRollup> for MetricsRollup {
    fn from(r: &fleet_core::MetricsRollup) -> Self {
        let g = |n: &str| {
            r.gauges.get(n).map(|g| Gauge {
                min: g.min,
                mean: g.mean,
                max: g.max,
            })
        };
        let c = |n: &str| r.counters.get(n).map(|v| Counter { increase: *v });
        Self {
            period_start: ts(r.period_start),
            samples: r.samples,
            cpu_percent: g("cpu_percent"),
            memory_percent: g("memory_percent"),
            disk_percent: g("disk_percent"),
            active_services: g("active_services"),
            failed_services: g("failed_services"),
            total_services: g("total_services"),
            active_users: g("active_users"),
            total_users: g("total_users"),
            llm_requests: c("llm_requests"),
            llm_cost_usd: c("llm_cost_usd"),
            network_rx_bytes: c("network_rx_bytes"),
            network_tx_bytes: c("network_tx_bytes"),
        }
    }
}

/// One metrics sample.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Sample {
    pub server_id: Uuid,
    #[schema(format = DateTime)]
    pub timestamp: String,
    /// `raw`, `hour` or `day`.
    pub period: String,
    pub cpu_percent: Option<f64>,
    pub memory_percent: Option<f64>,
    pub disk_percent: Option<f64>,
    pub network_rx_bytes: Option<i64>,
    pub network_tx_bytes: Option<i64>,
    pub active_services: Option<i64>,
    pub failed_services: Option<i64>,
    pub total_services: Option<i64>,
    pub llm_requests: Option<i64>,
    pub llm_cost_usd: Option<f64>,
    pub active_users: Option<i64>,
    pub total_users: Option<i64>,
}

impl From<&MetricsSample> for Sample {
    fn from(s: &MetricsSample) -> Self {
        let v = &s.values;
        Self {
            server_id: s.server_id.0,
            timestamp: ts(s.timestamp),
            period: s.period.as_str().to_owned(),
            cpu_percent: v.cpu_percent,
            memory_percent: v.memory_percent,
            disk_percent: v.disk_percent,
            network_rx_bytes: v.network_rx_bytes,
            network_tx_bytes: v.network_tx_bytes,
            active_services: v.active_services,
            failed_services: v.failed_services,
            total_services: v.total_services,
            llm_requests: v.llm_requests,
            llm_cost_usd: v.llm_cost_usd,
            active_users: v.active_users,
            total_users: v.total_users,
        }
    }
}

/// A server's metrics samples, newest first.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MetricsHistory {
    pub server_id: Uuid,
    /// The source read: `raw` samples, `5m` or `1h` rollups.
    #[schema(value_type = String, example = "raw")]
    pub resolution: &'static str,
    pub metrics: MetricsItems,
}

/// Raw samples or rollups.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum MetricsItems {
    Raw(Vec<Sample>),
    Rollups(Vec<MetricsRollup>),
}

/// One change of a server's health.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Change {
    /// The log's id, increasing.
    pub id: i64,
    pub server_id: Uuid,
    pub server_name: String,
    /// When the check that made the change started.
    #[schema(format = DateTime)]
    pub changed_at: String,
    /// `null` when the server had never been checked.
    pub from_status: Option<Health>,
    pub to_status: Health,
    pub error_message: Option<String>,
}

impl From<&StateChange> for Change {
    fn from(c: &StateChange) -> Self {
        Self {
            id: c.id,
            server_id: c.server_id.0,
            server_name: c.server_name.clone(),
            changed_at: ts(c.changed_at),
            from_status: c.from_status.map(Into::into),
            to_status: c.to_status.into(),
            error_message: c.error_message.clone(),
        }
    }
}

/// A page of the state-change log, newest first.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeList {
    pub state_changes: Vec<Change>,
    pub limit: usize,
    pub offset: usize,
}

/// A server group.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub id: Uuid,
    pub name: String,
    pub description: Option<String>,
    pub color: Option<String>,
    pub tags: Vec<String>,
    pub regions: Vec<String>,
    pub environments: Vec<String>,
    pub members: Vec<Uuid>,
}

impl From<&ServerGroup> for Group {
    fn from(g: &ServerGroup) -> Self {
        Self {
            id: g.id.0,
            name: g.name.clone(),
            description: g.description.clone(),
            color: g.color.clone(),
            tags: g.tags.clone(),
            regions: g.regions.clone(),
            environments: g.environments.clone(),
            members: g.members.iter().map(|m| m.0).collect(),
        }
    }
}

/// Every group, by name.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupList {
    pub groups: Vec<Group>,
}

fn owned(m: &BTreeMap<&'static str, u64>) -> BTreeMap<String, u64> {
    m.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

/// What both workers share in the status shape.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkerCommon {
    pub running: bool,
    #[schema(value_type = f64)]
    pub interval_seconds: Seconds,
    /// `successful / performed` in percent, one decimal.
    pub success_rate: f64,
    /// When the last completed cycle started.
    #[schema(format = DateTime)]
    pub last_run: Option<String>,
    pub last_duration_seconds: Option<f64>,
    pub cycles: u64,
    /// Ticks that fell while a cycle still ran.
    pub overruns: u64,
    pub in_flight: u64,
    pub results_pending: u64,
    pub results_written: u64,
    pub results_dropped: u64,
    pub last_cycle_targets: u64,
    #[schema(value_type = f64)]
    pub batch_delay_seconds: Seconds,
    /// Checks started together in the last cycle (grown for a large fleet).
    pub batch_size: u64,
    /// Checks allowed at once in the last cycle (grown to hold a hung tenth of the fleet,
    /// within the worker's file budget).
    pub max_in_flight: u64,
    /// Checks since start whose start waited for a free slot: more of the fleet hung than
    /// `max_in_flight` holds.
    pub starts_delayed: u64,
    /// Checks since start by resulting label (the seed's name; see `checks_by_status`).
    pub by_status: BTreeMap<String, u64>,
    /// The same counts as `by_status`, named for what they are: checks since start, not
    /// servers now.
    pub checks_by_status: BTreeMap<String, u64>,
    /// Targets not checked through Fleet's own fault since start, by kind.
    pub not_checked: BTreeMap<String, u64>,
    pub last_error: Option<String>,
}

impl WorkerCommon {
    fn new(stats: Option<&WorkerStats>, interval: f64, error: Option<&str>) -> Self {
        let default = WorkerStats::default();
        let s = stats.unwrap_or(&default);
        Self {
            running: stats.is_some_and(|s| s.running),
            interval_seconds: Seconds(if stats.is_some() {
                s.interval_seconds
            } else {
                interval
            }),
            success_rate: s.success_rate,
            last_run: opt_ts(s.last_run),
            last_duration_seconds: s.last_duration_seconds,
            cycles: s.cycles,
            overruns: s.overruns,
            in_flight: s.in_flight,
            results_pending: s.pending,
            results_written: s.written,
            results_dropped: s.dropped,
            last_cycle_targets: s.last_cycle_targets,
            batch_delay_seconds: Seconds(s.batch_delay_seconds),
            batch_size: s.batch_size,
            max_in_flight: s.max_in_flight,
            starts_delayed: s.starts_delayed,
            by_status: owned(&s.by_status),
            checks_by_status: owned(&s.by_status),
            not_checked: owned(&s.not_checked),
            last_error: error.map(str::to_owned).or_else(|| s.last_error.clone()),
        }
    }
}

/// The health worker in the seed's status shape, with Fleet's extra keys beside it.
#[derive(Debug, Serialize, ToSchema)]
pub struct HealthWorker {
    pub checks_performed: u64,
    pub checks_successful: u64,
    pub checks_failed: u64,
    #[serde(flatten)]
    pub common: WorkerCommon,
    /// Active servers by their current health (`unknown`: never checked); `null` while the
    /// store cannot be read.
    pub servers_by_health: Option<BTreeMap<String, u64>>,
}

impl HealthWorker {
    /// The health worker's shape, from its statistics once it runs.
    pub fn new(
        stats: Option<&WorkerStats>,
        interval: f64,
        error: Option<&str>,
        servers_by_health: Option<BTreeMap<String, u64>>,
    ) -> Self {
        let s = stats.cloned().unwrap_or_default();
        Self {
            checks_performed: s.performed,
            checks_successful: s.successful,
            checks_failed: s.failed,
            common: WorkerCommon::new(stats, interval, error),
            servers_by_health,
        }
    }
}

/// Whether the storage self-check found anything wrong after the last cycle.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PartitionHealth {
    pub ok: bool,
    pub findings: Vec<String>,
}

/// The metrics worker in the seed's status shape, with Fleet's extra keys beside it.
#[derive(Debug, Serialize, ToSchema)]
pub struct MetricsWorker {
    pub collections_performed: u64,
    pub collections_successful: u64,
    pub collections_failed: u64,
    #[serde(flatten)]
    pub common: WorkerCommon,
    pub total_metrics_collected: u64,
    pub partition_health: PartitionHealth,
}

impl MetricsWorker {
    /// The metrics worker's shape, from its statistics once it runs.
    pub fn new(stats: Option<&WorkerStats>, interval: f64, error: Option<&str>) -> Self {
        let s = stats.cloned().unwrap_or_default();
        Self {
            collections_performed: s.performed,
            collections_successful: s.successful,
            collections_failed: s.failed,
            common: WorkerCommon::new(stats, interval, error),
            total_metrics_collected: s.values_collected,
            partition_health: PartitionHealth {
                ok: s.storage_findings.is_empty(),
                findings: s.storage_findings,
            },
        }
    }
}

/// One subscriber of the result events.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Subscriber {
    pub name: String,
    /// Its queue's bound.
    pub capacity: usize,
    /// Events waiting in its queue.
    pub queued: usize,
    pub delivered: u64,
    /// Events dropped because its queue was full.
    pub lost: u64,
}

/// The result events' figures.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Events {
    pub published: u64,
    /// Dropped for any subscriber since start.
    pub lost: u64,
    pub subscribers: Vec<Subscriber>,
}

impl From<EventStats> for Events {
    fn from(e: EventStats) -> Self {
        Self {
            published: e.published,
            lost: e.lost,
            subscribers: e
                .subscribers
                .into_iter()
                .map(|s| Subscriber {
                    name: s.name,
                    capacity: s.capacity,
                    queued: s.queued,
                    delivered: s.delivered,
                    lost: s.lost,
                })
                .collect(),
        }
    }
}

/// Both workers' statistics.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkersStatus {
    pub health_worker: HealthWorker,
    pub metrics_worker: MetricsWorker,
    pub events: Events,
    /// Open incidents by severity (`critical`, `warning`); null without alerts.
    pub incidents: Option<BTreeMap<String, u64>>,
    /// The alert pipeline's counters; null without alerts.
    #[schema(value_type = Option<Object>)]
    pub alerts: Option<serde_json::Value>,
    /// This instance's share of the fleet.
    pub instance: InstanceShare,
    #[schema(format = DateTime)]
    pub timestamp: String,
}

/// This instance's share of a fleet shared among instances.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceShare {
    /// This instance's id (`FLEET_INSTANCE_ID`); null for a store this process has alone.
    pub id: Option<String>,
    /// Live instances, this one included, at its last heartbeat.
    pub live_instances: u64,
    /// Buckets this instance owns.
    pub buckets_owned: u64,
    /// Buckets in all (1,024).
    pub buckets_total: u64,
    /// `buckets_owned / buckets_total`.
    pub share: f64,
    /// Whether this instance leads fleet-wide jobs.
    pub leader: bool,
    /// Buckets taken since start.
    pub lease_takeovers: u64,
    /// Buckets given up to another instance since start.
    pub lease_releases: u64,
    /// Results refused because their bucket changed hands, dropped as superseded.
    pub fenced_writes_rejected: u64,
    /// The last heartbeat's error, while heartbeats fail.
    pub error: Option<String>,
}

impl InstanceShare {
    /// The share of `snapshot`, or the whole fleet when not shared.
    pub fn new(snapshot: Option<&fleet_core::cluster::ShareSnapshot>) -> Self {
        let total = u64::from(fleet_core::cluster::BUCKETS);
        match snapshot {
            None => Self {
                id: None,
                live_instances: 1,
                buckets_owned: total,
                buckets_total: total,
                share: 1.0,
                leader: true,
                lease_takeovers: 0,
                lease_releases: 0,
                fenced_writes_rejected: 0,
                error: None,
            },
            Some(s) => Self {
                id: Some(s.instance_id.clone()),
                live_instances: s.live_instances,
                buckets_owned: s.buckets_owned,
                buckets_total: total,
                share: s.buckets_owned as f64 / total as f64,
                leader: s.leader_epoch.is_some(),
                lease_takeovers: s.takeovers,
                lease_releases: s.releases,
                fenced_writes_rejected: s.fenced_writes_rejected,
                error: s.last_error.clone(),
            },
        }
    }
}

/// `GET /api/v1/fleet/instances`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceList {
    /// Every registered instance, by id.
    pub instances: Vec<Instance>,
    /// Instances whose heartbeat is younger than the lease TTL.
    pub live: u64,
    /// Buckets in all (1,024).
    pub buckets_total: u64,
}

/// One instance.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    pub id: String,
    pub version: String,
    /// Seconds since its last heartbeat, by the database's clock.
    pub heartbeat_age_seconds: f64,
    /// Its heartbeat is younger than the lease TTL.
    pub live: bool,
    /// Buckets it owns.
    pub buckets: u64,
    /// Active servers in those buckets.
    pub servers: u64,
    /// It leads fleet-wide jobs.
    pub leader: bool,
    /// It is the instance answering.
    pub this: bool,
}

impl Instance {
    /// A listed instance; `me` is the answering instance's id.
    pub fn new(r: fleet_core::cluster::InstanceRecord, me: &str) -> Self {
        Self {
            this: r.id == me,
            id: r.id,
            version: r.version,
            heartbeat_age_seconds: r.heartbeat_age_seconds,
            live: r.live,
            buckets: r.buckets,
            servers: r.servers,
            leader: r.leader,
        }
    }
}

/// `/healthz`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Alive {
    /// Always `ok`.
    pub status: String,
}

/// `/readyz`: public, so it says what is wrong, never the errors' text (the admin status
/// endpoint has those).
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Ready {
    /// The store answers, both workers run, and every probe token opens.
    pub ready: bool,
    /// `ok` or `unavailable`.
    pub store: String,
    /// Both workers run.
    pub workers_running: bool,
    /// `ok`, or `unopenable` when the last cycle met tokens no configured key opens.
    pub keys: String,
}

/// Servers counted several ways.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerCounts {
    pub total: usize,
    pub by_status: BTreeMap<String, u64>,
    /// Every health, and `unknown` for never checked.
    pub by_health_status: BTreeMap<String, u64>,
    pub by_region: BTreeMap<String, u64>,
    pub by_environment: BTreeMap<String, u64>,
}

/// One server's LLM use in the window.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerLlm {
    pub server_id: Uuid,
    pub name: Option<String>,
    pub llm_requests: i64,
    pub llm_cost_usd: f64,
}

/// The fleet's LLM use in a window.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Llm {
    /// The window counted: the asked one, or at `1h` the asked one on whole hours, ending at
    /// the last hour rolled up.
    #[schema(format = DateTime)]
    pub from: String,
    #[schema(format = DateTime)]
    pub to: String,
    /// `raw`: every sample in the window counts; `1h`: the window is on whole hours.
    #[schema(value_type = String, example = "1h")]
    pub resolution: &'static str,
    pub total_requests: i64,
    pub total_cost_usd: f64,
    pub per_server: Vec<ServerLlm>,
}

/// `/summary`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Summary {
    pub servers: ServerCounts,
    /// Open incidents by severity (`critical`, `warning`); null without alerts.
    pub incidents: Option<BTreeMap<String, u64>>,
    pub llm: Llm,
    #[schema(format = DateTime)]
    pub timestamp: String,
}

/// What went wrong.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorDetail {
    /// A stable, machine-readable code.
    pub code: String,
    /// For people; names the field or parameter at fault.
    pub message: String,
}

/// Every error: a status and this body.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_have_six_fraction_digits_and_a_z() {
        use time::macros::datetime;
        assert_eq!(
            ts(datetime!(2026-01-26 14:30:15.123456789 UTC)),
            "2026-01-26T14:30:15.123456Z"
        );
        assert_eq!(
            ts(datetime!(2026-01-26 15:30:15 +01:00)),
            "2026-01-26T14:30:15.000000Z"
        );
    }

    #[test]
    fn whole_seconds_are_integers() {
        let json = |v: f64| serde_json::to_string(&Seconds(v)).unwrap();
        assert_eq!(json(30.0), "30");
        assert_eq!(json(0.5), "0.5");
        assert_eq!(json(60.0), "60");
    }
}

/// A server's health over a range, aggregated into buckets (empty ones left out).
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthSeries {
    pub server_id: Uuid,
    #[schema(format = DateTime)]
    pub from: String,
    #[schema(format = DateTime)]
    pub to: String,
    /// How long each bucket lasts.
    pub step_seconds: f64,
    pub buckets: Vec<HealthBucket>,
}

/// Health checks in one bucket.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthBucket {
    #[schema(format = DateTime)]
    pub start: String,
    pub checks: u32,
    pub failures: u32,
    /// The worst health in the bucket.
    pub worst: Health,
    pub avg_response_ms: Option<f64>,
    pub max_response_ms: Option<u32>,
}

impl From<&fleet_core::HealthBucket> for HealthBucket {
    fn from(b: &fleet_core::HealthBucket) -> Self {
        Self {
            start: ts(b.start),
            checks: b.checks,
            failures: b.failures,
            worst: b.worst.into(),
            avg_response_ms: b.avg_response_ms,
            max_response_ms: b.max_response_ms,
        }
    }
}

/// A server's metrics over a range, aggregated into buckets (empty ones left out).
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MetricsSeries {
    pub server_id: Uuid,
    #[schema(format = DateTime)]
    pub from: String,
    #[schema(format = DateTime)]
    pub to: String,
    /// How long each bucket lasts.
    pub step_seconds: f64,
    pub buckets: Vec<MetricsBucket>,
}

/// Metrics samples in one bucket: means of the gauges, the highest value of the counters.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MetricsBucket {
    #[schema(format = DateTime)]
    pub start: String,
    pub samples: u32,
    pub cpu_percent: Option<f64>,
    pub memory_percent: Option<f64>,
    pub disk_percent: Option<f64>,
    pub llm_requests: Option<i64>,
    pub llm_cost_usd: Option<f64>,
}

impl From<&fleet_core::MetricsBucket> for MetricsBucket {
    fn from(b: &fleet_core::MetricsBucket) -> Self {
        Self {
            start: ts(b.start),
            samples: b.samples,
            cpu_percent: b.cpu_percent,
            memory_percent: b.memory_percent,
            disk_percent: b.disk_percent,
            llm_requests: b.llm_requests,
            llm_cost_usd: b.llm_cost_usd,
        }
    }
}
