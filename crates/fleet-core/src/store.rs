//! Storage: what the workers read and write, and the registry beside it.
//!
//! [`Store`] is all the engine needs. [`Registry`] and [`History`] are separate small traits
//! for the registry's management and for reading history back, so that a backend offering only
//! the workers' side can still run them.

use std::sync::Arc;

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::model::{
    GroupFields, GroupId, HealthCheck, HealthStatus, LlmUsage, ManagedServer, MetricsRecord,
    MetricsSample, NewServer, ProbeTarget, Role, ServerGroup, ServerId, ServerStatus, ServerUpdate,
    StateChange, TokenRecord,
};

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
    /// Every `active` server, stalest `last_health_check_at` first, never-checked first.
    async fn health_targets(&self) -> Result<Vec<ProbeTarget>, StoreError>;

    /// `active` servers whose health is `healthy` or `degraded`, most recent `last_seen_at`
    /// first.
    async fn metrics_targets(&self) -> Result<Vec<ProbeTarget>, StoreError>;

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
    /// A case-insensitive substring of the name or hostname.
    pub search: Option<String>,
    /// Only members of this group.
    pub group: Option<GroupId>,
    /// At most this many (all when `None`).
    pub limit: Option<usize>,
    /// Skip this many first.
    pub offset: usize,
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

    /// Servers matching `filter`, ordered by name.
    async fn list_servers(&self, filter: &ServerFilter) -> Result<Vec<ManagedServer>, StoreError>;

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

    /// Every server's LLM use in `[from, to)`: the increase of its counters, resets handled
    /// as Prometheus's `increase()` does. Servers without two samples in the window are left
    /// out.
    async fn llm_usage(
        &self,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<LlmUsage>, StoreError>;
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
    async fn health_targets(&self) -> Result<Vec<ProbeTarget>, StoreError> {
        (**self).health_targets().await
    }
    async fn metrics_targets(&self) -> Result<Vec<ProbeTarget>, StoreError> {
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
    async fn health_targets(&self) -> Result<Vec<ProbeTarget>, StoreError> {
        (**self).health_targets().await
    }
    async fn metrics_targets(&self) -> Result<Vec<ProbeTarget>, StoreError> {
        (**self).metrics_targets().await
    }
    async fn record_health(&self, checks: &[HealthCheck]) -> Result<(), StoreError> {
        (**self).record_health(checks).await
    }
    async fn record_metrics(&self, records: &[MetricsRecord]) -> Result<(), StoreError> {
        (**self).record_metrics(records).await
    }
}
