//! Storage: what the workers read and write, and the registry beside it.
//!
//! [`Store`] is all the engine needs. [`Registry`] and [`History`] are separate small traits
//! for the registry's management and for reading history back, so that a backend offering only
//! the workers' side can still run them.

use std::sync::Arc;

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::model::{
    GroupFields, GroupId, HealthCheck, HealthStatus, LlmSummary, LlmUsage, ManagedServer,
    MetricsRecord, MetricsSample, NewServer, ProbeTarget, Role, ServerGroup, ServerId,
    ServerStatus, ServerUpdate, StateChange, TokenRecord,
};
use crate::rollup::{HealthRollup, MetricsRollup, Resolution};
use crate::series::{HealthBucket, MetricsBucket, SeriesWindow};
use crate::targets::Targets;

/// A boxed error source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong in a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend could not be reached, or dropped the connection.
    #[error("store unavailable: {message}")]
    Unavailable {
        /// What failed.
        message: String,
        /// The cause.
        #[source]
        source: Option<BoxError>,
    },
    /// A unique name is already taken.
    #[error("{0}")]
    Conflict(String),
    /// The input was refused (a setting missing, a value out of range).
    #[error("{0}")]
    Invalid(String),
    /// Any other backend failure.
    #[error("store error: {message}")]
    Backend {
        /// What failed.
        message: String,
        /// The cause.
        #[source]
        source: Option<BoxError>,
    },
}

impl From<crate::validate::Invalid> for StoreError {
    fn from(e: crate::validate::Invalid) -> Self {
        StoreError::Invalid(e.to_string())
    }
}

impl StoreError {
    /// An unavailable store, with a message and no source.
    pub fn unavailable(message: impl Into<String>) -> Self {
        StoreError::Unavailable {
            message: message.into(),
            source: None,
        }
    }

    /// A backend failure, with a message and no source.
    pub fn backend(message: impl Into<String>) -> Self {
        StoreError::Backend {
            message: message.into(),
            source: None,
        }
    }
}

/// The workers' side of storage: select what to check, record what was found.
///
/// Results are recorded in batches: one call for many results. Recording is idempotent (a
/// retried batch adds no duplicate) and a server's current state only moves forward in time (a
/// late batch does not overwrite a newer state).
#[async_trait]
pub trait Store: Send + Sync {
    /// Every `active` server, stalest `last_health_check_at` first, never-checked first,
    /// packed ([`Targets`]): a store that reads rows one at a time pushes each as it comes, so
    /// that a large fleet's selection is never held twice.
    async fn health_targets(&self) -> Result<Targets, StoreError>;

    /// `active` servers whose health is `healthy` or `degraded`, most recent `last_seen_at`
    /// first.
    async fn metrics_targets(&self) -> Result<Targets, StoreError>;

    /// Records a batch of health checks: history rows, each server's current state, and a
    /// state-change row for each check that changed a server's health (see [`ChangeLog`]).
    async fn record_health(&self, checks: &[HealthCheck]) -> Result<(), StoreError>;

    /// Records a batch of metrics samples and failures.
    async fn record_metrics(&self, records: &[MetricsRecord]) -> Result<(), StoreError>;
}

/// Which servers to list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerFilter {
    /// Only this status.
    pub status: Option<ServerStatus>,
    /// Only this health.
    pub health_status: Option<HealthStatus>,
    /// Only this region.
    pub region: Option<String>,
    /// Only this environment.
    pub environment: Option<String>,
    /// Only servers with this tag.
    pub tag: Option<String>,
    /// A case-insensitive substring of the name, hostname, region or one of the tags.
    pub search: Option<String>,
    /// Only members of this group.
    pub group: Option<GroupId>,
    /// At most this many (all when `None`).
    pub limit: Option<usize>,
    /// Skip this many first.
    pub offset: usize,
    /// In which order.
    pub sort: ServerSort,
}

/// What a server listing is ordered by. Ties are broken by name, and servers without the
/// value (never checked, never seen) come last in either direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerSort {
    /// The key.
    pub key: SortKey,
    /// Largest (or worst) first.
    pub descending: bool,
}

/// A key to order servers by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SortKey {
    /// By name, case-insensitively.
    #[default]
    Name,
    /// By health, healthy < degraded < critical < unreachable.
    Health,
    /// By `last_seen_at`.
    LastSeen,
    /// By the last check's response time.
    ResponseTime,
}

impl std::str::FromStr for ServerSort {
    type Err = String;

    /// `name`, `health`, `last_seen` or `response_time`, descending with a leading `-`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (descending, key) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let key = match key {
            "name" => SortKey::Name,
            "health" => SortKey::Health,
            "last_seen" => SortKey::LastSeen,
            "response_time" => SortKey::ResponseTime,
            other => {
                return Err(format!(
                    "unknown sort `{other}`; expected name, health, last_seen or response_time, \
                     with a leading - for descending"
                ));
            }
        };
        Ok(Self { key, descending })
    }
}

impl std::fmt::Display for ServerSort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let key = match self.key {
            SortKey::Name => "name",
            SortKey::Health => "health",
            SortKey::LastSeen => "last_seen",
            SortKey::ResponseTime => "response_time",
        };
        write!(f, "{}{key}", if self.descending { "-" } else { "" })
    }
}

/// The rank [`SortKey::Health`] orders by.
pub fn health_rank(h: HealthStatus) -> u8 {
    match h {
        HealthStatus::Healthy => 0,
        HealthStatus::Degraded => 1,
        HealthStatus::Critical => 2,
        HealthStatus::Unreachable => 3,
    }
}

/// The registry of managed servers.
#[async_trait]
pub trait Registry: Send + Sync {
    /// Registers a server; a taken name is a [`StoreError::Conflict`].
    async fn create_server(&self, new: NewServer) -> Result<ManagedServer, StoreError>;

    /// One server, if it exists.
    async fn get_server(&self, id: ServerId) -> Result<Option<ManagedServer>, StoreError>;

    /// What a probe needs to reach one server (its token included), if it exists.
    async fn probe_target(&self, id: ServerId) -> Result<Option<ProbeTarget>, StoreError>;

    /// Servers matching `filter`, in its order.
    async fn list_servers(&self, filter: &ServerFilter) -> Result<Vec<ManagedServer>, StoreError>;

    /// How many servers match `filter` (its limit, offset and sort aside).
    async fn count_servers(&self, filter: &ServerFilter) -> Result<u64, StoreError>;

    /// Changes a server's status; false when it does not exist.
    async fn set_server_status(
        &self,
        id: ServerId,
        status: ServerStatus,
    ) -> Result<bool, StoreError>;

    /// Removes a server and its history; false when it did not exist.
    async fn delete_server(&self, id: ServerId) -> Result<bool, StoreError>;

    /// Changes a server; `None` when it does not exist, a taken name is a conflict.
    async fn update_server(
        &self,
        id: ServerId,
        update: ServerUpdate,
    ) -> Result<Option<ManagedServer>, StoreError>;
}

/// Server groups.
#[async_trait]
pub trait Groups: Send + Sync {
    /// Makes a group; `fields.name` is required, a taken name is a conflict.
    async fn create_group(&self, fields: GroupFields) -> Result<ServerGroup, StoreError>;

    /// Every group, by name.
    async fn list_groups(&self) -> Result<Vec<ServerGroup>, StoreError>;

    /// One group.
    async fn get_group(&self, id: GroupId) -> Result<Option<ServerGroup>, StoreError>;

    /// Changes a group; `None` when it does not exist.
    async fn update_group(
        &self,
        id: GroupId,
        fields: GroupFields,
    ) -> Result<Option<ServerGroup>, StoreError>;

    /// Removes a group (not its servers); false when it did not exist.
    async fn delete_group(&self, id: GroupId) -> Result<bool, StoreError>;

    /// Adds a server to a group; false when either does not exist.
    async fn add_member(&self, group: GroupId, server: ServerId) -> Result<bool, StoreError>;

    /// Removes a server from a group; false when it was not a member.
    async fn remove_member(&self, group: GroupId, server: ServerId) -> Result<bool, StoreError>;

    /// Adds servers to a group at once: how many became members (members already, and ids
    /// of no server, are skipped); `None` when the group does not exist.
    async fn add_members(
        &self,
        group: GroupId,
        servers: &[ServerId],
    ) -> Result<Option<u64>, StoreError>;

    /// Removes servers from a group at once: how many were members; `None` when the group
    /// does not exist.
    async fn remove_members(
        &self,
        group: GroupId,
        servers: &[ServerId],
    ) -> Result<Option<u64>, StoreError>;
}

/// Admin API tokens, kept only as SHA-256 hashes.
#[async_trait]
pub trait AdminTokens: Send + Sync {
    /// Records a token by its hash; a taken name is a conflict.
    async fn insert_token(
        &self,
        name: &str,
        role: Role,
        sha256: [u8; 32],
    ) -> Result<TokenRecord, StoreError>;

    /// The live (unrevoked) token with this hash.
    async fn find_token(&self, sha256: [u8; 32]) -> Result<Option<TokenRecord>, StoreError>;

    /// Every token, revoked ones too, by name.
    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;

    /// Revokes the token named `name`; false when there is no live one.
    async fn revoke_token(&self, name: &str) -> Result<bool, StoreError>;
}

/// A window of history to read back, newest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryQuery {
    /// From this time, inclusive.
    pub from: Option<OffsetDateTime>,
    /// Up to this time, exclusive.
    pub to: Option<OffsetDateTime>,
    /// At most this many rows.
    pub limit: usize,
}

impl Default for HistoryQuery {
    fn default() -> Self {
        Self {
            from: None,
            to: None,
            limit: 100,
        }
    }
}

/// Reading history back.
#[async_trait]
pub trait History: Send + Sync {
    /// A server's health checks in the window, newest first.
    async fn health_history(
        &self,
        id: ServerId,
        query: HistoryQuery,
    ) -> Result<Vec<HealthCheck>, StoreError>;

    /// A server's metrics samples in the window, newest first.
    async fn metrics_history(
        &self,
        id: ServerId,
        query: HistoryQuery,
    ) -> Result<Vec<MetricsSample>, StoreError>;

    /// A server's rollups at `res` (5 minutes or hours) whose periods start in the query's
    /// window, newest first. Only closed periods are rolled up: before one has closed the
    /// list is empty. Raw asks for nothing here (read [`health_history`](Self::health_history)).
    async fn health_rollups(
        &self,
        id: ServerId,
        res: Resolution,
        query: HistoryQuery,
    ) -> Result<Vec<HealthRollup>, StoreError>;

    /// A server's metrics rollups at `res`, as [`health_rollups`](Self::health_rollups).
    async fn metrics_rollups(
        &self,
        id: ServerId,
        res: Resolution,
        query: HistoryQuery,
    ) -> Result<Vec<MetricsRollup>, StoreError>;

    /// Every server's LLM use in `[from, to)`: the increase of its counters, resets handled
    /// as Prometheus's `increase()` does. Servers without two samples in the window are left
    /// out.
    async fn llm_usage(
        &self,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<LlmUsage>, StoreError>;

    /// The fleet's LLM use in `[from, to)` and its `limit` top spenders. `resolution` asks
    /// for every sample ([`Resolution::Raw`]) or for whole hours ([`Resolution::Hour`]: the
    /// window's ends move back to the hour, and `to` to the last hour the store has rolled
    /// up); `None` lets the store choose. This default reads [`llm_usage`](Self::llm_usage)
    /// over the window; a store that keeps running totals answers whole hours from two of
    /// them, whatever the fleet's history.
    async fn llm_summary(
        &self,
        (from, to): (OffsetDateTime, OffsetDateTime),
        resolution: Option<Resolution>,
        limit: usize,
    ) -> Result<LlmSummary, StoreError> {
        let (res, window) = match resolution {
            Some(Resolution::Hour) => {
                let to = Resolution::Hour.floor(to);
                (Resolution::Hour, (Resolution::Hour.floor(from).min(to), to))
            }
            _ => (Resolution::Raw, (from, to)),
        };
        let usage = if window.0 < window.1 {
            self.llm_usage(window.0, window.1).await?
        } else {
            Vec::new()
        };
        Ok(LlmSummary::of(window, res, usage, limit))
    }

    /// Each server's last `per_server` health checks, newest first, for a page of servers:
    /// one round trip however many servers the page shows.
    async fn recent_checks(
        &self,
        servers: &[ServerId],
        per_server: usize,
    ) -> Result<Vec<(ServerId, Vec<HealthCheck>)>, StoreError>;

    /// A server's health in `window`, aggregated by the store into its buckets; empty buckets
    /// are left out.
    async fn health_series(
        &self,
        id: ServerId,
        window: SeriesWindow,
    ) -> Result<Vec<HealthBucket>, StoreError>;

    /// A server's metrics in `window`, aggregated by the store into its buckets; empty
    /// buckets are left out.
    async fn metrics_series(
        &self,
        id: ServerId,
        window: SeriesWindow,
    ) -> Result<Vec<MetricsBucket>, StoreError>;
}

/// How many servers share a status, a current health, a region and an environment.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServerTally {
    /// Their status.
    pub status: ServerStatus,
    /// Their current health, `None` when never checked.
    pub health: Option<HealthStatus>,
    /// Their region.
    pub region: Option<String>,
    /// Their environment.
    pub environment: Option<String>,
    /// How many.
    pub count: u64,
}

/// Counting servers without listing them, for summaries and `/metrics`: the cost is the
/// number of distinct (status, health, region, environment) groups, never one row per server
/// sent to the caller.
#[async_trait]
pub trait Counts: Send + Sync {
    /// Every non-empty group, in no particular order.
    async fn server_tallies(&self) -> Result<Vec<ServerTally>, StoreError>;
}

/// A page of the state-change log, newest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChangeQuery {
    /// Only this server's changes; every server's when `None`.
    pub server: Option<ServerId>,
    /// At most this many.
    pub limit: usize,
    /// Skip this many first.
    pub offset: usize,
}

impl Default for ChangeQuery {
    fn default() -> Self {
        Self {
            server: None,
            limit: 100,
            offset: 0,
        }
    }
}

/// Reading the state-change log back. Stores write it themselves, in the same step as the
/// forward-only state update of [`Store::record_health`], so that each change is recorded
/// exactly once, retries included.
#[async_trait]
pub trait ChangeLog: Send + Sync {
    /// A page of changes, newest first.
    async fn state_changes(&self, query: ChangeQuery) -> Result<Vec<StateChange>, StoreError>;

    /// At most `limit` changes with an id above `after`, oldest first: how a live stream
    /// tails the log.
    async fn changes_after(&self, after: i64, limit: usize)
    -> Result<Vec<StateChange>, StoreError>;

    /// The oldest and newest id still in the log, `None` when it is empty.
    async fn change_ids(&self) -> Result<Option<(i64, i64)>, StoreError>;
}

/// A dashboard session as stored: only a hash of its id is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    /// SHA-256 of the session id.
    pub sha256: [u8; 32],
    /// SHA-256 of the token that signed in; the session ends with the token.
    pub token_sha256: [u8; 32],
    /// The token's name, shown and recorded (e.g. on an acknowledgement).
    pub token_name: String,
    /// The token's role.
    pub role: Role,
    /// When the session was made.
    pub created_at: OffsetDateTime,
    /// When it ends if unused (moved forward by [`Sessions::touch_session`]).
    pub idle_expires_at: OffsetDateTime,
    /// When it ends regardless.
    pub expires_at: OffsetDateTime,
}

/// Dashboard sessions. Revoking a token ([`AdminTokens::revoke_token`]) deletes its
/// sessions.
#[async_trait]
pub trait Sessions: Send + Sync {
    /// Stores a session, and deletes every session over at `session.created_at`.
    async fn create_session(&self, session: SessionRecord) -> Result<(), StoreError>;

    /// The session with this hash, if it is not over at `now` and its token still stands:
    /// a token of the store that is not revoked, or one the store does not hold (the
    /// bootstrap token, which the caller checks).
    async fn find_session(
        &self,
        sha256: [u8; 32],
        now: OffsetDateTime,
    ) -> Result<Option<SessionRecord>, StoreError>;

    /// Moves a session's idle end to `idle_expires_at`.
    async fn touch_session(
        &self,
        sha256: [u8; 32],
        idle_expires_at: OffsetDateTime,
    ) -> Result<(), StoreError>;

    /// Deletes a session (sign-out); false when there was none.
    async fn delete_session(&self, sha256: [u8; 32]) -> Result<bool, StoreError>;
}

/// Whether a store is reachable now, for readiness checks.
#[async_trait]
pub trait Ping: Send + Sync {
    /// Succeeds when the store answers.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// What a store's self-check found, e.g. a missing partition. Empty when all is well.
pub type Findings = Vec<String>;

/// A store's self-check, run by the metrics worker after each cycle (the seed's partition
/// health check). Stores with nothing to check do not implement it.
#[async_trait]
pub trait StorageCheck: Send + Sync {
    /// Checks the storage and repairs what it can, returning what it found wrong.
    async fn check_storage(&self) -> Result<Findings, StoreError>;
}

#[async_trait]
impl<T: Store + ?Sized> Store for Arc<T> {
    async fn health_targets(&self) -> Result<Targets, StoreError> {
        (**self).health_targets().await
    }
    async fn metrics_targets(&self) -> Result<Targets, StoreError> {
        (**self).metrics_targets().await
    }
    async fn record_health(&self, checks: &[HealthCheck]) -> Result<(), StoreError> {
        (**self).record_health(checks).await
    }
    async fn record_metrics(&self, records: &[MetricsRecord]) -> Result<(), StoreError> {
        (**self).record_metrics(records).await
    }
}

#[async_trait]
impl<T: Store + ?Sized> Store for &T {
    async fn health_targets(&self) -> Result<Targets, StoreError> {
        (**self).health_targets().await
    }
    async fn metrics_targets(&self) -> Result<Targets, StoreError> {
        (**self).metrics_targets().await
    }
    async fn record_health(&self, checks: &[HealthCheck]) -> Result<(), StoreError> {
        (**self).record_health(checks).await
    }
    async fn record_metrics(&self, records: &[MetricsRecord]) -> Result<(), StoreError> {
        (**self).record_metrics(records).await
    }
}
