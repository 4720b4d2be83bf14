//! Configuration: every setting is a flag and an environment variable, parsed by clap.
//! A bad value exits non-zero with a message naming the setting and the value.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use fleet_core::{ConfigError, Role, WorkerConfig, WorkerKind};
use fleet_pg::{PartitionPolicy, PgSettings, SecretKey, TokenVault};

/// Fleet: keeps a fleet of managed servers under continuous watch.
#[derive(Debug, Parser)]
#[command(name = "fleet-server", version, about, max_term_width = 100)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run migrations, both workers and the API against PostgreSQL, until SIGTERM or Ctrl-C.
    Serve(Box<ServeArgs>),
    /// Run on the in-memory store with an in-process simulated fleet of 50 servers; no
    /// database needed. Prints an admin token and the URL to open.
    Demo(Box<DemoArgs>),
    /// Apply the database migrations and exit.
    Migrate {
        #[command(flatten)]
        db: DbArgs,
    },
    /// Manage admin API tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Import and list managed servers.
    Servers {
        #[command(subcommand)]
        command: ServersCommand,
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        keys: KeyArgs,
    },
    /// Alert channels, incidents, acknowledgements, silences and test sends, through a
    /// running server's API (FLEET_URL, with an admin token in FLEET_TOKEN).
    Alerts {
        #[command(subcommand)]
        command: AlertsCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Manage the keys that seal secrets at rest.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        keys: KeyArgs,
    },
}

/// Where a running server's API is, and the token to use.
#[derive(Clone, Debug, Args)]
pub struct ClientArgs {
    /// The server's base URL.
    #[arg(
        long,
        env = "FLEET_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// An API token (admin, to change anything).
    #[arg(long, env = "FLEET_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
}

/// `alerts` subcommands.
#[derive(Debug, Subcommand)]
pub enum AlertsCommand {
    /// List channels, or add or remove one.
    Channels {
        #[command(subcommand)]
        command: Option<ChannelsCommand>,
    },
    /// List incidents, newest first.
    Incidents {
        /// Only this state: firing, acknowledged or resolved.
        #[arg(long)]
        state: Option<String>,
        /// Only this severity: critical or warning.
        #[arg(long)]
        severity: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Acknowledge an incident, with a reason.
    Ack {
        /// The incident's id.
        id: String,
        /// Why (required).
        #[arg(long)]
        reason: String,
    },
    /// Mute notifications for matching alerts from now on, for a while.
    Silence {
        #[arg(long)]
        server_id: Option<String>,
        #[arg(long)]
        group_id: Option<String>,
        #[arg(long)]
        region: Option<String>,
        /// A rule, e.g. server_unreachable.
        #[arg(long)]
        rule: Option<String>,
        /// How long, in seconds.
        #[arg(long, default_value = "3600", value_parser = seconds)]
        duration: Duration,
        /// Why.
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Send a test notice to a channel: its outcome and latency.
    Test {
        /// The channel's id.
        channel: String,
    },
}

/// `alerts channels` subcommands.
#[derive(Debug, Subcommand)]
pub enum ChannelsCommand {
    /// List channels (never their secrets).
    List,
    /// Add a channel from its JSON body, e.g.
    /// '{"name": "ops", "kind": "webhook", "url": "https://hooks.example/fleet"}'.
    Add {
        /// The body.
        json: String,
    },
    /// Remove a channel.
    Remove {
        /// The channel's id.
        id: String,
    },
}

/// `keys` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Re-seal every sealed column under FLEET_SECRET_KEY, opening with it or with
    /// FLEET_SECRET_KEY_PREVIOUS; prints the counts per column. Afterwards the previous keys
    /// can be dropped.
    Rotate,
    /// List the key ids in use and how many values each seals.
    List,
}

/// The keys that seal secrets at rest.
#[derive(Clone, Debug, Default, Args)]
pub struct KeyArgs {
    /// Key that seals secrets (probe tokens) at rest: 32 bytes in base64. Without it, servers
    /// cannot be given tokens.
    #[arg(long, env = "FLEET_SECRET_KEY", hide_env_values = true, global = true)]
    pub secret_key: Option<String>,
    /// Previous keys, comma-separated, still accepted for opening (during a rotation).
    #[arg(
        long,
        env = "FLEET_SECRET_KEY_PREVIOUS",
        hide_env_values = true,
        value_delimiter = ',',
        global = true
    )]
    pub secret_key_previous: Vec<String>,
}

impl KeyArgs {
    /// The vault: the current key, and the previous ones for opening.
    pub fn vault(&self) -> anyhow::Result<TokenVault> {
        let mut vault = TokenVault::new(secret_key(self.secret_key.as_deref())?);
        for (i, text) in self
            .secret_key_previous
            .iter()
            .filter(|t| !t.trim().is_empty())
            .enumerate()
        {
            let key = SecretKey::from_base64(text).map_err(|e| {
                anyhow::anyhow!(
                    "invalid FLEET_SECRET_KEY_PREVIOUS (--secret-key-previous), key {}: {e}",
                    i + 1
                )
            })?;
            vault = vault.with_previous(key);
        }
        Ok(vault)
    }
}

/// `token` subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it once.
    Create {
        /// A unique name to list and revoke it by.
        #[arg(long)]
        name: String,
        /// What it may do.
        #[arg(long, value_enum, default_value_t = RoleArg::Viewer)]
        role: RoleArg,
    },
    /// List tokens (never the tokens themselves).
    List,
    /// Revoke a token by name.
    Revoke {
        /// The token's name.
        name: String,
    },
}

/// `servers` subcommands.
#[derive(Debug, Subcommand)]
pub enum ServersCommand {
    /// Import servers from a fleet-sim manifest or a file of the same shape:
    /// {"servers": [{"name", "api_url", "api_token"?, "status"?, "region"?, "environment"?,
    /// "tags"?}]}. The whole file is checked first: if any entry is invalid, every invalid
    /// one is reported and nothing is stored. Existing names are skipped, and said so.
    Import {
        /// The file.
        file: PathBuf,
        /// Store the valid entries even when some are invalid.
        #[arg(long)]
        skip_invalid: bool,
    },
    /// Register one server.
    Add {
        /// A unique name.
        #[arg(long)]
        name: String,
        /// Its base URL (http or https, without credentials).
        #[arg(long)]
        api_url: String,
        /// A file holding its probe token (never the command line, where others can see it).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Its region.
        #[arg(long)]
        region: Option<String>,
        /// Its environment.
        #[arg(long)]
        environment: Option<String>,
        /// Tags, comma-separated.
        #[arg(long, value_delimiter = ',')]
        tags: Vec<String>,
        /// Its status (default active).
        #[arg(long, value_parser = parse_status)]
        status: Option<fleet_core::ServerStatus>,
    },
    /// Remove a server and its history.
    Remove {
        /// Its name.
        name: String,
    },
    /// Change a server: its status (active, inactive, maintenance), region, environment or
    /// URL; an empty region or environment clears it.
    Set {
        /// Its name.
        name: String,
        /// The new status.
        #[arg(long, value_parser = parse_status)]
        status: Option<fleet_core::ServerStatus>,
        /// The new region.
        #[arg(long)]
        region: Option<String>,
        /// The new environment.
        #[arg(long)]
        environment: Option<String>,
        /// The new base URL.
        #[arg(long)]
        api_url: Option<String>,
    },
    /// List servers as a table.
    List {
        /// Only servers with this health (healthy, degraded, critical, unreachable).
        #[arg(long, value_parser = parse_health)]
        health: Option<fleet_core::HealthStatus>,
        /// Only servers with this status.
        #[arg(long, value_parser = parse_status)]
        status: Option<fleet_core::ServerStatus>,
    },
}

fn parse_status(text: &str) -> Result<fleet_core::ServerStatus, String> {
    text.parse()
        .map_err(|e: fleet_core::ParseEnumError| e.to_string())
}

fn parse_health(text: &str) -> Result<fleet_core::HealthStatus, String> {
    text.parse()
        .map_err(|e: fleet_core::ParseEnumError| e.to_string())
}

/// A role on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    /// Everything.
    Admin,
    /// Read only.
    Viewer,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Admin => Role::Admin,
            RoleArg::Viewer => Role::Viewer,
        }
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A duration in seconds, fractions allowed.
pub fn seconds(text: &str) -> Result<Duration, String> {
    let v: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number of seconds"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("`{text}` is not a number of seconds of 0 or more"));
    }
    if v > 365.0 * 86400.0 {
        return Err(format!("`{text}` seconds is more than a year"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// An IP network such as `10.0.0.0/8`, or one address.
pub fn network(text: &str) -> Result<fleet_http::IpNet, String> {
    let text = text.trim();
    text.parse::<fleet_http::IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(Into::into))
        .map_err(|_| format!("`{text}` is not an IP network like 10.0.0.0/8"))
}

/// Where the database is: `DATABASE_URL`, or the seed's `POSTGRES_*` settings.
#[derive(Clone, Debug, Default, Args)]
pub struct DbArgs {
    /// PostgreSQL URL, e.g. postgres://fleet@127.0.0.1/fleet. Either this or POSTGRES_HOST.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    pub database_url: Option<String>,
    /// PostgreSQL host (when DATABASE_URL is not set).
    #[arg(long, env = "POSTGRES_HOST", global = true)]
    pub postgres_host: Option<String>,
    /// PostgreSQL port.
    #[arg(long, env = "POSTGRES_PORT", global = true)]
    pub postgres_port: Option<u16>,
    /// PostgreSQL user.
    #[arg(long, env = "POSTGRES_USER", global = true)]
    pub postgres_user: Option<String>,
    /// PostgreSQL password.
    #[arg(long, env = "POSTGRES_PASSWORD", hide_env_values = true, global = true)]
    pub postgres_password: Option<String>,
    /// PostgreSQL database name.
    #[arg(long, env = "POSTGRES_DB", global = true)]
    pub postgres_db: Option<String>,
    /// Connections in the pool.
    #[arg(long, env = "FLEET_DB_POOL_SIZE", default_value_t = 16, global = true)]
    pub db_pool_size: usize,
    /// TLS to PostgreSQL: disable, prefer (default: TLS when offered), require (TLS, the
    /// certificate unchecked) or verify-full (checked against the system's roots or
    /// POSTGRES_SSLROOTCERT, host name included). The URL's sslmode wins.
    #[arg(long, env = "POSTGRES_SSLMODE", global = true, value_parser = parse_sslmode)]
    pub postgres_sslmode: Option<fleet_pg::SslMode>,
    /// A PEM file of the roots verify-full trusts instead of the system's.
    #[arg(long, env = "POSTGRES_SSLROOTCERT", global = true)]
    pub postgres_sslrootcert: Option<PathBuf>,
}

fn parse_sslmode(text: &str) -> Result<fleet_pg::SslMode, String> {
    text.parse()
}

impl DbArgs {
    /// The pool settings, or an error saying what to set.
    pub fn settings(&self) -> anyhow::Result<PgSettings> {
        let s = PgSettings {
            url: self.database_url.clone().filter(|u| !u.is_empty()),
            host: self.postgres_host.clone().filter(|h| !h.is_empty()),
            port: self.postgres_port,
            user: self.postgres_user.clone(),
            password: self.postgres_password.clone(),
            dbname: self.postgres_db.clone(),
            pool_size: self.db_pool_size,
            sslmode: self.postgres_sslmode,
            sslrootcert: self.postgres_sslrootcert.clone(),
        };
        if !s.is_configured() {
            anyhow::bail!(
                "no database configured: set DATABASE_URL (or POSTGRES_HOST, POSTGRES_PORT, POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB)"
            );
        }
        if self.db_pool_size == 0 {
            anyhow::bail!("invalid FLEET_DB_POOL_SIZE (--db-pool-size) = 0: must be at least 1");
        }
        Ok(s)
    }
}

/// Both workers' settings.
#[derive(Clone, Debug, Args)]
pub struct WorkerArgs {
    /// Seconds between health cycles, start to start.
    #[arg(long, env = "FLEET_HEALTH_INTERVAL", default_value = "30", value_parser = seconds, value_name = "SECONDS")]
    pub health_interval: Duration,
    /// Seconds between metrics cycles, start to start.
    #[arg(long, env = "FLEET_METRICS_INTERVAL", default_value = "60", value_parser = seconds, value_name = "SECONDS")]
    pub metrics_interval: Duration,
    /// Health checks started together.
    #[arg(long, env = "FLEET_HEALTH_BATCH_SIZE", default_value_t = 10)]
    pub health_batch_size: usize,
    /// Metrics collections started together.
    #[arg(long, env = "FLEET_METRICS_BATCH_SIZE", default_value_t = 5)]
    pub metrics_batch_size: usize,
    /// Seconds between health batch starts; shortened when the batches would not all start
    /// within a quarter of the interval, unless --fixed-batch-delay.
    #[arg(long, env = "FLEET_HEALTH_BATCH_DELAY", default_value = "0.5", value_parser = seconds, value_name = "SECONDS")]
    pub health_batch_delay: Duration,
    /// Seconds between metrics batch starts (shortened as for health).
    #[arg(long, env = "FLEET_METRICS_BATCH_DELAY", default_value = "1.0", value_parser = seconds, value_name = "SECONDS")]
    pub metrics_batch_delay: Duration,
    /// Threads that run both workers, their writers and the jobs (the API answers on one of
    /// its own). One is the cheapest per check: a check's tasks wake each other on the same
    /// thread instead of across threads (docs/benchmarks.md, "Profile").
    #[arg(long, env = "FLEET_WORKER_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub worker_threads: u16,
    /// Hold the batch delays as given, as the seed design did, even for large fleets.
    #[arg(long, env = "FLEET_FIXED_BATCH_DELAY", default_value_t = false)]
    pub fixed_batch_delay: bool,
    /// Health checks running at once, across batches.
    #[arg(long, env = "FLEET_HEALTH_MAX_IN_FLIGHT", default_value_t = 256)]
    pub health_max_in_flight: usize,
    /// Metrics collections running at once, across batches.
    #[arg(long, env = "FLEET_METRICS_MAX_IN_FLIGHT", default_value_t = 64)]
    pub metrics_max_in_flight: usize,
    /// Hard deadline of one health check, in seconds; shorter than the interval.
    #[arg(long, env = "FLEET_HEALTH_TIMEOUT", default_value = "10", value_parser = seconds, value_name = "SECONDS")]
    pub health_timeout: Duration,
    /// Hard deadline of one metrics collection, in seconds; shorter than the interval.
    #[arg(long, env = "FLEET_METRICS_TIMEOUT", default_value = "10", value_parser = seconds, value_name = "SECONDS")]
    pub metrics_timeout: Duration,
    /// Seconds given at shutdown to in-flight checks and the final write.
    #[arg(long, env = "FLEET_SHUTDOWN_GRACE", default_value = "10", value_parser = seconds, value_name = "SECONDS")]
    pub shutdown_grace: Duration,
    /// Results held per worker while the store cannot take them; past it the oldest are
    /// dropped and counted.
    #[arg(long, env = "FLEET_RESULT_BUFFER", default_value_t = 100_000)]
    pub result_buffer: usize,
    /// The most memory those results may take per worker, in MiB, by their estimated size;
    /// past it the oldest are dropped and counted.
    #[arg(long, env = "FLEET_RESULT_BUFFER_MB", default_value_t = 128)]
    pub result_buffer_mb: usize,
    /// Idle connections kept per managed server for reuse. 0 closes each after use: a server
    /// is asked once per cycle, so reuse saves little, while an idle connection costs some
    /// 30 KB and a file descriptor per server (see docs/benchmarks.md).
    #[arg(long, env = "FLEET_HTTP_IDLE_PER_HOST", default_value_t = 0)]
    pub http_idle_per_host: usize,
    /// Networks probes never connect to, comma-separated (e.g. 127.0.0.0/8,10.0.0.0/8), beside
    /// link-local, unspecified and multicast addresses, which are always refused.
    #[arg(long, env = "FLEET_PROBE_DENY_NETS", value_delimiter = ',', value_parser = network)]
    pub probe_deny_nets: Vec<fleet_http::IpNet>,
    /// A PEM file of extra CA certificates every probe trusts, beside the system's: for
    /// agents that serve TLS with a private CA.
    #[arg(long, env = "FLEET_PROBE_CA_FILE")]
    pub probe_ca_file: Option<std::path::PathBuf>,
}

impl WorkerArgs {
    /// The validated configuration of both workers.
    pub fn configs(&self) -> anyhow::Result<(WorkerConfig, WorkerConfig)> {
        let health = WorkerConfig::builder(WorkerKind::Health)
            .interval(self.health_interval)
            .batch_size(self.health_batch_size)
            .batch_delay(self.health_batch_delay)
            .fixed_batch_delay(self.fixed_batch_delay)
            .max_in_flight(self.health_max_in_flight)
            .timeout(self.health_timeout)
            .shutdown_grace(self.shutdown_grace)
            .result_buffer(self.result_buffer)
            .result_buffer_bytes(self.result_buffer_mb.saturating_mul(1 << 20))
            .build()
            .map_err(|e| named(WorkerKind::Health, e, self))?;
        let metrics = WorkerConfig::builder(WorkerKind::Metrics)
            .interval(self.metrics_interval)
            .batch_size(self.metrics_batch_size)
            .batch_delay(self.metrics_batch_delay)
            .fixed_batch_delay(self.fixed_batch_delay)
            .max_in_flight(self.metrics_max_in_flight)
            .timeout(self.metrics_timeout)
            .shutdown_grace(self.shutdown_grace)
            .result_buffer(self.result_buffer)
            .result_buffer_bytes(self.result_buffer_mb.saturating_mul(1 << 20))
            .build()
            .map_err(|e| named(WorkerKind::Metrics, e, self))?;
        Ok((health, metrics))
    }
}

/// Names the environment variable, flag and value behind a refused worker setting.
fn named(kind: WorkerKind, e: ConfigError, a: &WorkerArgs) -> anyhow::Error {
    let h = kind == WorkerKind::Health;
    let secs = |d: Duration| format!("{}", d.as_secs_f64());
    let (var, value) = match (e.setting, h) {
        ("interval", true) => ("FLEET_HEALTH_INTERVAL", secs(a.health_interval)),
        ("interval", false) => ("FLEET_METRICS_INTERVAL", secs(a.metrics_interval)),
        ("batch_size", true) => ("FLEET_HEALTH_BATCH_SIZE", a.health_batch_size.to_string()),
        ("batch_size", false) => ("FLEET_METRICS_BATCH_SIZE", a.metrics_batch_size.to_string()),
        ("max_in_flight", true) => (
            "FLEET_HEALTH_MAX_IN_FLIGHT",
            a.health_max_in_flight.to_string(),
        ),
        ("max_in_flight", false) => (
            "FLEET_METRICS_MAX_IN_FLIGHT",
            a.metrics_max_in_flight.to_string(),
        ),
        ("timeout", true) => ("FLEET_HEALTH_TIMEOUT", secs(a.health_timeout)),
        ("timeout", false) => ("FLEET_METRICS_TIMEOUT", secs(a.metrics_timeout)),
        ("shutdown_grace", _) => ("FLEET_SHUTDOWN_GRACE", secs(a.shutdown_grace)),
        ("result_buffer", _) => ("FLEET_RESULT_BUFFER", a.result_buffer.to_string()),
        ("result_buffer_bytes", _) => ("FLEET_RESULT_BUFFER_MB", a.result_buffer_mb.to_string()),
        // Settings the server does not expose keep the engine's own message.
        _ => return anyhow::anyhow!("{} worker: {e}", kind.as_str()),
    };
    let flag = var
        .trim_start_matches("FLEET_")
        .to_lowercase()
        .replace('_', "-");
    anyhow::anyhow!("invalid {var} (--{flag}) = {value}: {}", e.message)
}

/// The API's settings.
#[derive(Clone, Debug, Args)]
pub struct ApiArgs {
    /// Address the API listens on.
    #[arg(long, env = "FLEET_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// A bootstrap admin token, accepted beside the stored ones (optional).
    #[arg(long, env = "FLEET_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Failed authentications allowed per client address per minute before 429 (0: no limit).
    #[arg(long, env = "FLEET_AUTH_FAILURE_LIMIT", default_value_t = 20)]
    pub auth_failure_limit: u32,
    /// Proxies whose X-Forwarded-For is believed, as networks, comma-separated (e.g.
    /// 10.0.0.0/8). None by default: the peer's address is the client's.
    #[arg(long, env = "FLEET_TRUSTED_PROXIES", value_delimiter = ',', value_parser = network)]
    pub trusted_proxies: Vec<fleet_http::IpNet>,
    /// Longest wait for a request's headers, in seconds.
    #[arg(long, env = "FLEET_API_HEADER_TIMEOUT", default_value = "30", value_parser = seconds)]
    pub api_header_timeout: Duration,
    /// Longest wait for a request's body, in seconds.
    #[arg(long, env = "FLEET_API_BODY_TIMEOUT", default_value = "30", value_parser = seconds)]
    pub api_body_timeout: Duration,
    /// Most API connections open at once; more are closed on arrival. Lowered at start when the
    /// open-file limit would otherwise let them eat the probes' file budget.
    #[arg(long, env = "FLEET_API_MAX_CONNECTIONS", default_value_t = 1024)]
    pub api_max_connections: usize,
    /// Most checks a group check (`POST …/groups/{id}/check`) may have queued at once.
    #[arg(long, env = "FLEET_BULK_CHECK_MAX", default_value_t = 1000)]
    pub bulk_check_max: usize,
    /// Most change or incident events a live stream carries in a second; past that it sends
    /// one `resync` and the page reloads its data.
    #[arg(long, env = "FLEET_SSE_MAX_RATE", default_value_t = 50)]
    pub sse_max_rate: u32,
    /// Most live streams (dashboard tabs) open at once; more get 503 and poll instead.
    #[arg(long, env = "FLEET_SSE_MAX_STREAMS", default_value_t = 256)]
    pub sse_max_streams: usize,
}

/// Logging.
#[derive(Clone, Debug, Args)]
pub struct LogArgs {
    /// Log format.
    #[arg(long, env = "FLEET_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// A tracing filter, e.g. info or fleet=debug,info.
    #[arg(long, env = "FLEET_LOG", default_value = "info")]
    pub log: String,
}

/// The partition lifecycle.
#[derive(Clone, Debug, Args)]
pub struct PartitionArgs {
    /// Months of partitions made ahead of the current one.
    #[arg(long, env = "FLEET_PARTITION_PREMAKE_MONTHS", default_value_t = 3)]
    pub partition_premake_months: u32,
    /// Months of health checks kept before the current one (0 keeps forever).
    #[arg(long, env = "FLEET_HEALTH_RETENTION_MONTHS", default_value_t = 3)]
    pub health_retention_months: u32,
    /// Months of metrics kept before the current one (0 keeps forever).
    #[arg(long, env = "FLEET_METRICS_RETENTION_MONTHS", default_value_t = 13)]
    pub metrics_retention_months: u32,
    /// Hours of raw checks and samples kept, then dropped a day at a time once rolled up
    /// (0 keeps them for the monthly retentions).
    #[arg(long, env = "FLEET_RAW_RETENTION_HOURS", default_value_t = 48)]
    pub raw_retention_hours: u32,
    /// Days of 5-minute rollups kept.
    #[arg(long, env = "FLEET_ROLLUP_5M_RETENTION_DAYS", default_value_t = 7)]
    pub rollup_5m_retention_days: u32,
    /// Months of hourly rollups and of the state-change log kept before the current one (0
    /// keeps forever).
    #[arg(long, env = "FLEET_ROLLUP_1H_RETENTION_MONTHS", default_value_t = 13)]
    pub rollup_1h_retention_months: u32,
}

impl PartitionArgs {
    /// The policy, or which setting is out of range.
    pub fn policy(&self) -> anyhow::Result<PartitionPolicy> {
        if self.rollup_5m_retention_days == 0 {
            anyhow::bail!(
                "invalid FLEET_ROLLUP_5M_RETENTION_DAYS (--rollup-5m-retention-days) = 0: must be at least 1, or hours could not be rolled up from it"
            );
        }
        Ok(PartitionPolicy {
            premake_months: self.partition_premake_months,
            health_retention_months: self.health_retention_months,
            metrics_retention_months: self.metrics_retention_months,
            raw_retention_hours: self.raw_retention_hours,
            rollup_5m_retention_days: self.rollup_5m_retention_days,
            rollup_1h_retention_months: self.rollup_1h_retention_months,
        })
    }

    /// How long each history tier holds, for the API's choice of source.
    pub fn tiers(&self) -> fleet_core::Tiers {
        fleet_core::Tiers {
            raw: (self.raw_retention_hours > 0)
                .then(|| time::Duration::hours(i64::from(self.raw_retention_hours))),
            five_minutes: time::Duration::days(i64::from(self.rollup_5m_retention_days)),
        }
    }
}

/// `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub workers: WorkerArgs,
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub partitions: PartitionArgs,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub alerts: AlertArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// Several instances sharing one fleet through PostgreSQL. A single instance needs none of
/// these; instances started on the same database share the fleet by themselves.
#[derive(Clone, Debug, Args)]
pub struct ClusterArgs {
    /// This instance's id: unique among the instances, and stable across restarts so that a
    /// restarted instance takes its own buckets back at once [default: the host name and the
    /// API port, e.g. `web-1:8080`].
    #[arg(long, env = "FLEET_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Seconds between heartbeats.
    #[arg(long, env = "FLEET_HEARTBEAT_INTERVAL", default_value = "5", value_parser = seconds, value_name = "SECONDS")]
    pub heartbeat_interval: Duration,
    /// Seconds a lease lasts without a heartbeat: a silent instance's buckets are taken over
    /// after it.
    #[arg(long, env = "FLEET_LEASE_TTL", default_value = "20", value_parser = seconds, value_name = "SECONDS")]
    pub lease_ttl: Duration,
}

impl ClusterArgs {
    /// The heartbeat and TTL, checked: the TTL must cover at least two heartbeats.
    pub fn times(&self) -> anyhow::Result<fleet_core::cluster::LeaseTimes> {
        if self.heartbeat_interval < Duration::from_millis(100) {
            anyhow::bail!(
                "invalid FLEET_HEARTBEAT_INTERVAL (--heartbeat-interval) = {}s: must be at least 0.1",
                self.heartbeat_interval.as_secs_f64()
            );
        }
        if self.lease_ttl < self.heartbeat_interval * 2 {
            anyhow::bail!(
                "invalid FLEET_LEASE_TTL (--lease-ttl) = {}s: must be at least twice FLEET_HEARTBEAT_INTERVAL ({}s), or one late heartbeat would lose every lease",
                self.lease_ttl.as_secs_f64(),
                self.heartbeat_interval.as_secs_f64()
            );
        }
        Ok(fleet_core::cluster::LeaseTimes {
            heartbeat: self.heartbeat_interval,
            ttl: self.lease_ttl,
        })
    }

    /// `FLEET_INSTANCE_ID`, or the host name and the API port.
    pub fn instance_id(&self, listen: SocketAddr) -> anyhow::Result<String> {
        let id = match &self.instance_id {
            Some(id) => id.trim().to_owned(),
            None => format!("{}:{}", host_name(), listen.port()),
        };
        if id.is_empty() || id.len() > 200 || id.chars().any(char::is_control) {
            anyhow::bail!(
                "invalid FLEET_INSTANCE_ID (--instance-id) = {id:?}: must be 1 to 200 printable characters"
            );
        }
        Ok(id)
    }
}

/// This machine's host name, as the kernel has it.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Alert rules and grouping. Every duration is in seconds; 0 turns its rule off. Unset
/// values take the defaults shown (the demo uses shorter ones, so that an incident opens,
/// is announced and resolves within two minutes).
#[derive(Clone, Debug, Default, Args)]
pub struct AlertArgs {
    /// Run the alert pipeline (rules, incidents, notifications).
    #[arg(long, env = "FLEET_ALERTS", default_value_t = true, action = clap::ArgAction::Set)]
    pub alerts: bool,
    /// The base of every link in a notification [default: http://{FLEET_LISTEN}].
    #[arg(long, env = "FLEET_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Consecutive critical checks before "server critical" fires [default: 2].
    #[arg(long, env = "FLEET_ALERT_CRITICAL_AFTER")]
    pub alert_critical_after: Option<u32>,
    /// Seconds unreachable before "server unreachable" fires [default: 300].
    #[arg(long, env = "FLEET_ALERT_UNREACHABLE_FOR", value_parser = seconds)]
    pub alert_unreachable_for: Option<Duration>,
    /// Seconds degraded before a warning [default: 600].
    #[arg(long, env = "FLEET_ALERT_DEGRADED_FOR", value_parser = seconds)]
    pub alert_degraded_for: Option<Duration>,
    /// Consecutive failed metrics collections before a warning [default: 3].
    #[arg(long, env = "FLEET_ALERT_METRICS_FAILURES")]
    pub alert_metrics_failures: Option<u32>,
    /// CPU percent threshold [default: 90; 0 = off].
    #[arg(long, env = "FLEET_ALERT_CPU_PERCENT")]
    pub alert_cpu_percent: Option<f64>,
    /// Memory percent threshold [default: 90; 0 = off].
    #[arg(long, env = "FLEET_ALERT_MEMORY_PERCENT")]
    pub alert_memory_percent: Option<f64>,
    /// Disk percent threshold [default: 90; 0 = off].
    #[arg(long, env = "FLEET_ALERT_DISK_PERCENT")]
    pub alert_disk_percent: Option<f64>,
    /// Seconds a resource must stay over its threshold [default: 600].
    #[arg(long, env = "FLEET_ALERT_RESOURCE_FOR", value_parser = seconds)]
    pub alert_resource_for: Option<Duration>,
    /// Consecutive good checks in recovering before resolved [default: 2].
    #[arg(long, env = "FLEET_ALERT_RESOLVE_AFTER")]
    pub alert_resolve_after: Option<u32>,
    /// Health changes within the flap window that mark a server flapping [default: 6].
    #[arg(long, env = "FLEET_ALERT_FLAP_CHANGES")]
    pub alert_flap_changes: Option<u32>,
    /// The flap window, in seconds [default: 1800].
    #[arg(long, env = "FLEET_ALERT_FLAP_WINDOW", value_parser = seconds)]
    pub alert_flap_window: Option<Duration>,
    /// Seconds a new incident waits for more alerts before it is announced [default: 30].
    #[arg(long, env = "FLEET_ALERT_GROUP_WAIT", value_parser = seconds)]
    pub alert_group_wait: Option<Duration>,
    /// Least seconds between announcements of servers added to an incident [default: 300].
    #[arg(long, env = "FLEET_ALERT_GROUP_INTERVAL", value_parser = seconds)]
    pub alert_group_interval: Option<Duration>,
    /// Seconds between reminders of a still-firing, unacknowledged incident [default: 14400].
    #[arg(long, env = "FLEET_ALERT_REPEAT_INTERVAL", value_parser = seconds)]
    pub alert_repeat_interval: Option<Duration>,
    /// Percent of a region's servers unreachable at once that makes one regional incident
    /// [default: 50; 0 = off].
    #[arg(long, env = "FLEET_ALERT_REGION_SHARE")]
    pub alert_region_share: Option<u32>,
    /// The least servers a region needs for the regional rule [default: 5].
    #[arg(long, env = "FLEET_ALERT_REGION_MIN")]
    pub alert_region_min: Option<u32>,
    /// The storage rule: missing partitions, failing writes, dropped results [default: true].
    #[arg(long, env = "FLEET_ALERT_STORAGE")]
    pub alert_storage: Option<bool>,
    /// The rule about Fleet itself: overruns, local resource failures, unopenable keys
    /// [default: true].
    #[arg(long, env = "FLEET_ALERT_SELF")]
    pub alert_self: Option<bool>,
    /// One notification attempt's deadline, in seconds [default: 10]. A sender's claim on a
    /// notice lasts twice that and 5 s more.
    #[arg(long, env = "FLEET_ALERT_SEND_TIMEOUT", value_parser = seconds)]
    pub alert_send_timeout: Option<Duration>,
    /// Database connections of the alert senders' own pool (PostgreSQL only).
    #[arg(long, env = "FLEET_ALERT_DB_POOL_SIZE", default_value_t = 2)]
    pub alert_db_pool_size: usize,
}

impl AlertArgs {
    /// The rules' settings: what is set, over `base`.
    pub fn config(
        &self,
        mut base: fleet_alerts::AlertConfig,
        listen: SocketAddr,
    ) -> anyhow::Result<fleet_alerts::AlertConfig> {
        macro_rules! set {
            ($($field:ident <- $arg:ident),* $(,)?) => {
                $(if let Some(v) = self.$arg { base.$field = v; })*
            };
        }
        set!(
            critical_after <- alert_critical_after,
            unreachable_for <- alert_unreachable_for,
            degraded_for <- alert_degraded_for,
            metrics_failures <- alert_metrics_failures,
            cpu_percent <- alert_cpu_percent,
            memory_percent <- alert_memory_percent,
            disk_percent <- alert_disk_percent,
            resource_for <- alert_resource_for,
            resolve_after <- alert_resolve_after,
            flap_changes <- alert_flap_changes,
            flap_window <- alert_flap_window,
            group_wait <- alert_group_wait,
            group_interval <- alert_group_interval,
            repeat_interval <- alert_repeat_interval,
            region_share <- alert_region_share,
            region_min <- alert_region_min,
            storage <- alert_storage,
            fleet_self <- alert_self,
            send_timeout <- alert_send_timeout,
        );
        base.public_url = match &self.public_url {
            Some(u) => u.trim_end_matches('/').to_owned(),
            None => format!("http://{listen}"),
        };
        if self.alert_db_pool_size == 0 {
            anyhow::bail!(
                "invalid FLEET_ALERT_DB_POOL_SIZE (--alert-db-pool-size) = 0: must be at least 1"
            );
        }
        base.validate()
            .map_err(|e| anyhow::anyhow!("invalid {}: {}", e.setting, e.message))?;
        Ok(base)
    }
}

impl AlertArgs {
    /// `FLEET_PUBLIC_URL`, parsed, when given.
    pub fn public_url(&self) -> anyhow::Result<Option<url::Url>> {
        self.public_url
            .as_deref()
            .map(|u| {
                url::Url::parse(u).map_err(|e| {
                    anyhow::anyhow!("invalid FLEET_PUBLIC_URL (--public-url) = {u:?}: {e}")
                })
            })
            .transpose()
    }
}

/// `demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub workers: WorkerArgs,
    #[command(flatten)]
    pub alerts: AlertArgs,
    /// Whether FLEET_HEALTH_INTERVAL (or the flag) was given; without it the demo checks
    /// every 5 s.
    #[arg(skip)]
    pub health_interval_given: bool,
    /// Whether FLEET_HEALTH_TIMEOUT (or the flag) was given; without it the demo's is 2 s.
    #[arg(skip)]
    pub health_timeout_given: bool,
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(flatten)]
    pub log: LogArgs,
    /// Simulated servers.
    #[arg(long, env = "FLEET_DEMO_SERVERS", default_value_t = 50)]
    pub servers: usize,
    /// Seconds between behaviour changes in the simulated fleet (0: none).
    #[arg(long, env = "FLEET_DEMO_CHANGE_EVERY", default_value = "20", value_parser = seconds, value_name = "SECONDS")]
    pub change_every: Duration,
}

/// Reads the secret key setting.
pub fn secret_key(text: Option<&str>) -> anyhow::Result<Option<SecretKey>> {
    match text.filter(|t| !t.is_empty()) {
        None => Ok(None),
        Some(t) => Ok(Some(SecretKey::from_base64(t).map_err(|e| {
            anyhow::anyhow!("invalid FLEET_SECRET_KEY (--secret-key): {e}")
        })?)),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn seconds_take_fractions_and_refuse_nonsense() {
        assert_eq!(seconds("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(seconds("30"), Ok(Duration::from_secs(30)));
        assert!(seconds("abc").unwrap_err().contains("`abc`"));
        assert!(seconds("-1").is_err());
        assert!(seconds("NaN").is_err());
        assert!(seconds("1e12").is_err());
    }

    #[test]
    fn a_refused_worker_setting_names_the_variable_and_value() {
        let cli = Cli::try_parse_from(["fleet-server", "demo", "--health-timeout", "30"]).unwrap();
        let Command::Demo(d) = cli.command else {
            panic!()
        };
        let err = d.workers.configs().unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid FLEET_HEALTH_TIMEOUT (--health-timeout) = 30: 30s must be shorter than the interval (30s)"
        );
        let cli =
            Cli::try_parse_from(["fleet-server", "demo", "--metrics-batch-size", "0"]).unwrap();
        let Command::Demo(d) = cli.command else {
            panic!()
        };
        assert_eq!(
            d.workers.configs().unwrap_err().to_string(),
            "invalid FLEET_METRICS_BATCH_SIZE (--metrics-batch-size) = 0: must be at least 1"
        );
    }

    #[test]
    fn serve_without_a_database_says_what_to_set() {
        let err = DbArgs::default().settings().unwrap_err().to_string();
        assert!(err.contains("DATABASE_URL"), "{err}");
    }
}
