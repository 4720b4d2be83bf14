//! [`PgStore`]: the core traits on a deadpool-postgres pool.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use deadpool_postgres::{Object, Pool};
use fleet_core::cluster::{ClusterStats, Fence};
use fleet_core::{
    ApiToken, ChangeLog, ChangeQuery, Clock, Counts, Findings, HealthBucket, HealthCheck,
    HealthRollup, HealthStatus, History, HistoryQuery, LlmSummary, LlmUsage, ManagedServer,
    MetricValues, MetricsBucket, MetricsRecord, MetricsRollup, MetricsSample, NewServer, Period,
    ProbeTarget, Registry, Resolution, SeriesWindow, ServerFilter, ServerId, ServerStatus,
    ServerTally, ServerUpdate, SortKey, StateChange, StorageCheck, Store, StoreError, Targets,
};
use futures_util::TryStreamExt;
use time::OffsetDateTime;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{GenericClient, Row};
use uuid::Uuid;

use crate::crypto::{CryptoError, TokenVault};
use crate::partitions::{
    PARTITIONED, PartitionPolicy, SPLIT_BY_DAY, TIER_1H, TIER_5M, YearMonth, day_create_sql,
    day_from_partition, day_partition, days_of,
};

/// The advisory lock that serializes partition maintenance across processes.
pub(crate) const PARTITION_LOCK: i64 = 0x666c_6565_7470_6172; // "fleetpar"

/// Fleet's PostgreSQL store.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    /// Where the pool points (`host:port/db`), for messages.
    target: String,
    vault: Arc<TokenVault>,
    clock: Arc<dyn Clock>,
    policy: PartitionPolicy,
    /// The instance this store selects and writes for, when the fleet is shared.
    member: Option<Member>,
}

/// The instance a shared store works for.
#[derive(Clone, Debug)]
struct Member {
    id: Arc<str>,
    stats: ClusterStats,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("policy", &self.policy)
            .field("pool", &self.pool.status())
            .finish()
    }
}

pub(crate) fn db_error(e: tokio_postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error() {
        let state = db.code();
        if *state == SqlState::UNIQUE_VIOLATION {
            return StoreError::Conflict(db.message().to_owned());
        }
        let transient = [
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::LOCK_NOT_AVAILABLE,
            SqlState::QUERY_CANCELED,
        ];
        if transient.contains(state) {
            return StoreError::Unavailable {
                message: db.message().to_owned(),
                source: Some(Box::new(e)),
            };
        }
        return StoreError::Backend {
            message: db.message().to_owned(),
            source: Some(Box::new(e)),
        };
    }
    StoreError::Unavailable {
        message: e.to_string(),
        source: Some(Box::new(e)),
    }
}

/// A connection that could not be had: said once, with where, and never the password.
fn pool_error(e: deadpool_postgres::PoolError, target: &str) -> StoreError {
    // The server refused us (authentication, no such database): its own words, once.
    if let deadpool_postgres::PoolError::Backend(db) = &e
        && let Some(refused) = db.as_db_error()
    {
        return StoreError::Unavailable {
            message: format!(
                "PostgreSQL at {target} refused the connection: {}",
                refused.message()
            ),
            source: None,
        };
    }
    StoreError::Unavailable {
        message: format!(
            "cannot connect to PostgreSQL at {target}: {}",
            crate::migrate::root_cause(&e)
        ),
        source: None,
    }
}

fn crypto_error(e: CryptoError) -> StoreError {
    StoreError::Invalid(e.to_string())
}

/// Creates the partitions of `months` for every partitioned table (the raw tables' split by
/// day, with every day made) and the hourly rollup tier's, under the advisory lock, on
/// `client`.
async fn create_partitions_on(
    client: &mut Object,
    months: &BTreeSet<YearMonth>,
) -> Result<Vec<String>, StoreError> {
    let tx = client.transaction().await.map_err(db_error)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK])
        .await
        .map_err(db_error)?;
    let mut kinds = relation_kinds(&tx).await?;
    let mut created = Vec::new();
    for month in months {
        for table in PARTITIONED.iter().chain(&TIER_1H) {
            let name = month.partition(table);
            if !kinds.contains_key(&name) {
                tx.batch_execute(&month.create_sql(table))
                    .await
                    .map_err(db_error)?;
                let split = SPLIT_BY_DAY.contains(table);
                kinds.insert(name.clone(), if split { 'p' } else { 'r' });
                created.push(name.clone());
            }
            // A month made before V13 holds its rows whole: it has no days.
            if kinds.get(&name) == Some(&'p') {
                for day in days_of(*month) {
                    let leaf = day_partition(table, day);
                    if let std::collections::hash_map::Entry::Vacant(e) = kinds.entry(leaf) {
                        tx.batch_execute(&day_create_sql(&name, e.key(), day))
                            .await
                            .map_err(db_error)?;
                        e.insert('r');
                    }
                }
            }
        }
    }
    tx.commit().await.map_err(db_error)?;
    if !created.is_empty() {
        tracing::info!(target: "fleet::pg", "created partitions {}", created.join(", "));
    }
    Ok(created)
}

/// The partitions of `parent` (with `nested`, those of its partitions).
async fn children(
    tx: &tokio_postgres::Transaction<'_>,
    parent: &str,
    nested: bool,
) -> Result<Vec<String>, StoreError> {
    let sql = if nested {
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         JOIN pg_inherits i2 ON i2.inhrelid = i.inhparent JOIN pg_class p ON p.oid = i2.inhparent \
         WHERE p.relname = $1"
    } else {
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = $1"
    };
    Ok(tx
        .query(sql, &[&parent])
        .await
        .map_err(db_error)?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Every visible relation of the history tables by name, with its kind (`r` a table, `p`
/// partitioned).
pub(crate) async fn relation_kinds(
    tx: &tokio_postgres::Transaction<'_>,
) -> Result<HashMap<String, char>, StoreError> {
    Ok(tx
        .query(
            "SELECT relname::text, relkind::text FROM pg_class \
             WHERE relname LIKE ANY ('{server_health_%,server_metrics_%,server_state_changes%,server_llm_marks%}') \
               AND relkind IN ('r', 'p') AND pg_table_is_visible(oid)",
            &[],
        )
        .await
        .map_err(db_error)?
        .iter()
        .map(|r| {
            let kind: String = r.get(1);
            (r.get(0), kind.chars().next().unwrap_or('r'))
        })
        .collect())
}

fn is_missing_partition(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|d| {
        d.code() == &SqlState::CHECK_VIOLATION && d.message().contains("no partition")
    })
}

pub(crate) const SERVER_COLUMNS: &str = "id, name, description, hostname, api_url, region, environment, tags, metadata, status, \
     health_status, last_seen_at, last_health_check_at, last_metrics_error, last_metrics_error_at, \
     last_response_time_ms, last_error, kind, metrics_path, ca_cert";

pub(crate) fn server_from_row(row: &Row) -> Result<ManagedServer, StoreError> {
    let status: &str = row.get("status");
    let health: Option<&str> = row.get("health_status");
    let tags: serde_json::Value = row.get("tags");
    Ok(ManagedServer {
        id: ServerId(row.get("id")),
        name: row.get("name"),
        description: row.get("description"),
        hostname: row.get("hostname"),
        api_url: row.get("api_url"),
        region: row.get("region"),
        environment: row.get("environment"),
        tags: serde_json::from_value(tags)
            .map_err(|e| StoreError::backend(format!("managed_servers.tags: {e}")))?,
        metadata: row.get("metadata"),
        status: parsed("managed_servers.status", status)?,
        health_status: health
            .map(|h| parsed("managed_servers.health_status", h))
            .transpose()?,
        last_seen_at: row.get("last_seen_at"),
        last_health_check_at: row.get("last_health_check_at"),
        last_metrics_error: row.get("last_metrics_error"),
        last_metrics_error_at: row.get("last_metrics_error_at"),
        last_response_time_ms: row
            .get::<_, Option<i32>>("last_response_time_ms")
            .map(|v| u32::try_from(v).unwrap_or(0)),
        last_error: row.get("last_error"),
        kind: parsed("managed_servers.kind", row.get("kind"))?,
        metrics_path: row.get("metrics_path"),
        ca_cert: row.get("ca_cert"),
    })
}

/// A stored enum read back; a value the code does not know is a backend error naming the
/// column and the value.
pub(crate) fn parsed<T: std::str::FromStr>(column: &str, text: &str) -> Result<T, StoreError> {
    text.parse()
        .map_err(|_| StoreError::backend(format!("{column} holds `{text}`")))
}

const STATE_CHANGES: &str = "SELECT c.id, c.server_id, m.name, c.changed_at, c.from_status, c.to_status, c.error_message \
     FROM server_state_changes c JOIN managed_servers m ON m.id = c.server_id \
     ORDER BY c.changed_at DESC, c.id DESC LIMIT $1 OFFSET $2";
const CHANGES_AFTER: &str = "SELECT c.id, c.server_id, m.name, c.changed_at, c.from_status, c.to_status, c.error_message \
     FROM server_state_changes c JOIN managed_servers m ON m.id = c.server_id \
     WHERE c.id > $1 ORDER BY c.id LIMIT $2";
const SERVER_STATE_CHANGES: &str = "SELECT c.id, c.server_id, m.name, c.changed_at, c.from_status, c.to_status, c.error_message \
     FROM server_state_changes c JOIN managed_servers m ON m.id = c.server_id \
     WHERE c.server_id = $3 ORDER BY c.changed_at DESC, c.id DESC LIMIT $1 OFFSET $2";

/// The tallies kept by `managed_servers`' own triggers (migration V4): a few rows, whatever the
/// fleet's size.
const SERVER_TALLIES: &str = "SELECT status, health_status, region, environment, count \
     FROM server_tallies WHERE count > 0";

#[async_trait]
impl Counts for PgStore {
    async fn server_tallies(&self) -> Result<Vec<ServerTally>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(SERVER_TALLIES)
            .await
            .map_err(db_error)?;
        let rows = client.query(&stmt, &[]).await.map_err(db_error)?;
        rows.iter()
            .map(|r| {
                let status: &str = r.get(0);
                let health: Option<&str> = r.get(1);
                let count: i64 = r.get(4);
                Ok(ServerTally {
                    status: parsed("managed_servers.status", status)?,
                    health: health
                        .map(|h| parsed("managed_servers.health_status", h))
                        .transpose()?,
                    region: r.get(2),
                    environment: r.get(3),
                    count: count as u64,
                })
            })
            .collect()
    }
}

#[async_trait]
impl ChangeLog for PgStore {
    async fn state_changes(&self, query: ChangeQuery) -> Result<Vec<StateChange>, StoreError> {
        let client = self.client().await?;
        let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
        let offset = i64::try_from(query.offset).unwrap_or(i64::MAX);
        let rows = match query.server {
            None => {
                let stmt = client
                    .prepare_cached(STATE_CHANGES)
                    .await
                    .map_err(db_error)?;
                client.query(&stmt, &[&limit, &offset]).await
            }
            Some(id) => {
                let stmt = client
                    .prepare_cached(SERVER_STATE_CHANGES)
                    .await
                    .map_err(db_error)?;
                client.query(&stmt, &[&limit, &offset, &id.0]).await
            }
        }
        .map_err(db_error)?;
        rows.iter().map(change_from_row).collect()
    }

    async fn changes_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<StateChange>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(CHANGES_AFTER)
            .await
            .map_err(db_error)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client
            .query(&stmt, &[&after, &limit])
            .await
            .map_err(db_error)?;
        rows.iter().map(change_from_row).collect()
    }

    async fn change_ids(&self) -> Result<Option<(i64, i64)>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT min(id), max(id) FROM server_state_changes", &[])
            .await
            .map_err(db_error)?;
        let ids: (Option<i64>, Option<i64>) = (row.get(0), row.get(1));
        Ok(ids.0.zip(ids.1))
    }
}

fn change_from_row(r: &Row) -> Result<StateChange, StoreError> {
    let from: Option<&str> = r.get(4);
    Ok(StateChange {
        id: r.get(0),
        server_id: ServerId(r.get(1)),
        server_name: r.get(2),
        changed_at: r.get(3),
        from_status: from
            .map(|h| parsed("server_state_changes.from_status", h))
            .transpose()?,
        to_status: parsed("server_state_changes.to_status", r.get(5))?,
        error_message: r.get(6),
    })
}

impl PgStore {
    /// A store on `pool`, sealing tokens with `vault` and timing maintenance by `clock`.
    /// Run [`crate::migrate`] first.
    pub fn new(
        pool: Pool,
        vault: TokenVault,
        clock: Arc<dyn Clock>,
        policy: PartitionPolicy,
    ) -> Self {
        Self {
            pool,
            target: "the database".into(),
            vault: Arc::new(vault),
            clock,
            policy,
            member: None,
        }
    }

    /// The same store working for instance `id` of a shared fleet: the workers' selections
    /// hold only servers in the buckets `id` owns, each with its bucket's fence and how long
    /// ago it was checked (by the database's clock); results carrying a fence are written only
    /// while it holds, and those refused are counted in `stats` and dropped as superseded.
    pub fn shared_as(mut self, id: &str, stats: ClusterStats) -> Self {
        self.member = Some(Member {
            id: id.into(),
            stats,
        });
        self
    }

    /// The instance this store works for, with its figures, when the fleet is shared.
    pub(crate) fn member(&self) -> Option<(&str, &ClusterStats)> {
        self.member.as_ref().map(|m| (&*m.id, &m.stats))
    }

    fn member_id(&self) -> Option<&str> {
        self.member.as_ref().map(|m| &*m.id)
    }

    /// The same store on another pool: the alert senders get a small pool of their own, so
    /// that a hung receiver never holds the writer's connections.
    pub fn with_pool(&self, pool: Pool) -> Self {
        Self {
            pool,
            ..self.clone()
        }
    }

    /// The pool, for callers that need a connection of their own.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Names where the pool points in connection errors (see [`PgSettings::target`]).
    ///
    /// [`PgSettings::target`]: crate::PgSettings::target
    pub fn with_target(mut self, target: impl Into<String>) -> Self {
        self.target = target.into();
        self
    }

    /// Where the pool points, as given by [`PgStore::with_target`].
    pub fn describe_target(&self) -> &str {
        &self.target
    }

    pub(crate) fn vault(&self) -> &TokenVault {
        &self.vault
    }

    pub(crate) async fn client(&self) -> Result<Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| pool_error(e, &self.target))
    }

    /// Whether the database answers a trivial query.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.client()
            .await?
            .simple_query("SELECT 1")
            .await
            .map_err(db_error)?;
        Ok(())
    }

    fn target(&self, row: &Row) -> ProbeTarget {
        let id = ServerId(row.get(0));
        let name: String = row.get(1);
        let sealed: Option<Vec<u8>> = row.get(3);
        let key_id: Option<String> = row.get(4);
        // A token no configured key opens is not logged here, once per server per selection:
        // the worker counts such servers and says so once per cycle.
        let (token, unreadable_token) = match (sealed, key_id) {
            (Some(sealed), Some(key_id)) => match self.vault.open(id, &sealed, &key_id) {
                Ok(t) => (Some(t), None),
                Err(e) => {
                    tracing::debug!(target: "fleet::pg", server = %name, error = %e, "cannot open the probe token of {name}: {e}");
                    (None, Some(key_id))
                }
            },
            _ => (None, None),
        };
        let health: Option<&str> = row.get(5);
        let kind: &str = row.get(6);
        // Shared selections add the bucket, its epoch and the seconds since the last check.
        let (fence, checked_ago) = if row.len() > 9 {
            let bucket: i16 = row.get(9);
            let ago: Option<f64> = row.get(11);
            (
                Some(Fence {
                    bucket: bucket as u16,
                    epoch: row.get(10),
                }),
                ago.map(|s| std::time::Duration::from_secs_f64(s.max(0.0))),
            )
        } else {
            (None, None)
        };
        ProbeTarget {
            fence,
            checked_ago,
            id,
            name,
            api_url: row.get(2),
            token,
            unreadable_token,
            health: health.and_then(|h| h.parse().ok()),
            kind: kind.parse().unwrap_or_default(),
            metrics_path: row.get(7),
            ca_cert: row.get(8),
        }
    }

    /// Runs a selection: `sql` alone, or `shared` for this store's instance. Rows are read
    /// one at a time as they arrive, each made a target and dropped, so a selection of the
    /// whole fleet never holds the fleet's rows and its targets at once.
    async fn targets(&self, sql: &str, shared: &str) -> Result<Targets, StoreError> {
        let client = self.client().await?;
        let me = self.member_id();
        let stmt = client
            .prepare_cached(if me.is_some() { shared } else { sql })
            .await
            .map_err(db_error)?;
        let params: Vec<&(dyn ToSql + Sync)> = match &me {
            None => Vec::new(),
            Some(me) => vec![me],
        };
        let rows = client.query_raw(&stmt, params).await.map_err(db_error)?;
        let mut rows = std::pin::pin!(rows);
        // Each row is packed as it arrives: the selection is never held unpacked.
        let mut targets = Targets::new();
        while let Some(row) = rows.try_next().await.map_err(db_error)? {
            targets.push(self.target(&row));
        }
        targets.shrink_to_fit();
        Ok(targets)
    }

    /// Runs a batch write; when a row has no partition, makes the partitions of the batch's
    /// months and runs it once more, so no row is lost to a missing partition.
    async fn write_with_partitions(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        months: BTreeSet<YearMonth>,
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let stmt = client.prepare_cached(sql).await.map_err(db_error)?;
        let row = match client.query_one(&stmt, params).await {
            Ok(row) => row,
            Err(e) if is_missing_partition(&e) => {
                tracing::warn!(target: "fleet::pg", "a batch had no partition for its rows: creating {months:?}");
                // On the same connection: the statement was prepared on this one.
                create_partitions_on(&mut client, &months).await?;
                client.query_one(&stmt, params).await.map_err(db_error)?
            }
            Err(e) => return Err(db_error(e)),
        };
        let rejected: i64 = row.get(0);
        if rejected > 0 {
            tracing::debug!(target: "fleet::pg", rejected, "{rejected} results refused by their bucket's fence: the bucket changed hands");
            if let Some(m) = &self.member {
                m.stats.add_rejected(rejected as u64);
            }
        }
        Ok(())
    }

    /// Creates the partitions of `months` for every partitioned table, under the advisory lock.
    async fn create_partitions(
        &self,
        months: &BTreeSet<YearMonth>,
    ) -> Result<Vec<String>, StoreError> {
        let mut client = self.client().await?;
        create_partitions_on(&mut client, months).await
    }

    /// Makes the current month's partitions and the next `premake_months` for both tables.
    /// Idempotent and safe to run from several processes at once. Returns what it created.
    pub async fn ensure_partitions(&self) -> Result<Vec<String>, StoreError> {
        let now = YearMonth::of(self.clock.now());
        let months = (0..=self.policy.premake_months as i32)
            .map(|i| now.plus(i))
            .collect();
        self.create_partitions(&months).await
    }

    /// Whether this store may run a fleet-wide job in `tx`: always when the fleet is not
    /// shared; otherwise only while this instance leads at the epoch it knows, with the
    /// leader row share-locked until `tx` ends (a write under a superseded fence is counted).
    pub(crate) async fn leader_fence(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
    ) -> Result<bool, StoreError> {
        let Some(m) = &self.member else {
            return Ok(true);
        };
        let Some(epoch) = m.stats.snapshot().leader_epoch else {
            return Ok(false);
        };
        let fenced = tx
            .query_opt(
                "SELECT 1 FROM fleet_leader WHERE owner = $1 AND epoch = $2 FOR SHARE",
                &[&&*m.id, &epoch],
            )
            .await
            .map_err(db_error)?;
        if fenced.is_none() {
            m.stats.add_rejected(1);
            tracing::info!(target: "fleet::pg", "a leader's job skipped: this instance no longer leads");
        }
        Ok(fenced.is_some())
    }

    /// Wall-clock now, from the store's clock.
    pub(crate) fn clock_now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    /// What the partition lifecycle keeps.
    pub(crate) fn policy(&self) -> &PartitionPolicy {
        &self.policy
    }

    /// Drops whole partitions older than the retention ages; never the current month.
    /// Returns what it dropped.
    pub async fn drop_expired_partitions(&self) -> Result<Vec<String>, StoreError> {
        let now = YearMonth::of(self.clock.now());
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK])
            .await
            .map_err(db_error)?;
        // A shared store drops history only as the leader, under the leader's fence: a paused
        // former leader waking up cannot run retention over its successor.
        if !self.leader_fence(&tx).await? {
            return Ok(Vec::new());
        }
        let mut dropped = Vec::new();
        for (table, keep) in [
            (PARTITIONED[0], self.policy.health_retention_months),
            (PARTITIONED[1], self.policy.metrics_retention_months),
            (PARTITIONED[2], self.policy.change_log_retention_months()),
        ] {
            if keep == 0 {
                continue;
            }
            let oldest_kept = now.plus(-(keep as i32));
            for name in children(&tx, table, false).await? {
                if let Some(month) = YearMonth::from_partition(table, &name)
                    && month < oldest_kept
                {
                    tx.batch_execute(&format!("DROP TABLE IF EXISTS {name}"))
                        .await
                        .map_err(db_error)?;
                    dropped.push(name);
                }
            }
        }
        // The tiers: each goes only once the next has been made from it (raw rows once rolled
        // into 5-minute rows, those once rolled into hours), whatever its age.
        let at = self.clock.now();
        let rolled = |tier: &'static str| {
            let tx = &tx;
            async move {
                tx.query_one(
                    "SELECT rolled_until FROM rollup_progress WHERE tier = $1",
                    &[&tier],
                )
                .await
                .map_err(db_error)
                .map(|r| r.get::<_, Option<OffsetDateTime>>(0))
            }
        };
        let (rolled_5m, rolled_1h) = (rolled("5m").await?, rolled("1h").await?);
        let mut days: Vec<(&str, bool, Option<OffsetDateTime>)> = Vec::new();
        if let (Some(window), Some(r)) = (self.policy.raw_window(), rolled_5m) {
            for table in SPLIT_BY_DAY {
                days.push((table, true, Some((at - window).min(r))));
            }
        }
        if let Some(r) = rolled_1h {
            let window = time::Duration::days(i64::from(self.policy.rollup_5m_retention_days));
            for table in TIER_5M {
                days.push((table, false, Some((at - window).min(r))));
            }
        }
        for (table, nested, cutoff) in days {
            let Some(cutoff) = cutoff else { continue };
            for name in children(&tx, table, nested).await? {
                if let Some(day) = day_from_partition(table, &name)
                    && day
                        .next_day()
                        .is_some_and(|d| d.midnight().assume_utc() <= cutoff)
                {
                    tx.batch_execute(&format!("DROP TABLE IF EXISTS {name}"))
                        .await
                        .map_err(db_error)?;
                    dropped.push(name);
                }
            }
        }
        if self.policy.rollup_1h_retention_months > 0 {
            let oldest_kept = now.plus(-(self.policy.rollup_1h_retention_months as i32));
            for table in TIER_1H {
                for name in children(&tx, table, false).await? {
                    if YearMonth::from_partition(table, &name).is_some_and(|m| m < oldest_kept) {
                        tx.batch_execute(&format!("DROP TABLE IF EXISTS {name}"))
                            .await
                            .map_err(db_error)?;
                        dropped.push(name);
                    }
                }
            }
        }
        tx.commit().await.map_err(db_error)?;
        if !dropped.is_empty() {
            tracing::info!(target: "fleet::pg", "dropped expired partitions {}", dropped.join(", "));
        }
        Ok(dropped)
    }

    /// Partition maintenance as the server schedules it (at start, then hourly): premake,
    /// then retention.
    pub async fn maintain(&self) -> Result<(), StoreError> {
        self.ensure_partitions().await?;
        self.drop_expired_partitions().await?;
        Ok(())
    }

    /// Changes a server's probe token.
    pub async fn set_token(&self, id: ServerId, token: &ApiToken) -> Result<bool, StoreError> {
        let (sealed, key_id) = self.vault.seal(id, token).map_err(crypto_error)?;
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE managed_servers SET api_token_sealed = $2, api_token_key_id = $3, updated_at = now() WHERE id = $1",
                &[&id.0, &sealed, &key_id],
            )
            .await
            .map_err(db_error)?;
        Ok(n == 1)
    }
}

const HEALTH_TARGETS: &str = "SELECT id, name, api_url, api_token_sealed, api_token_key_id, health_status, kind, metrics_path, ca_cert FROM managed_servers \
     WHERE status = 'active' ORDER BY last_health_check_at ASC NULLS FIRST, id";

const METRICS_TARGETS: &str = "SELECT id, name, api_url, api_token_sealed, api_token_key_id, health_status, kind, metrics_path, ca_cert FROM managed_servers \
     WHERE status = 'active' AND health_status IN ('healthy', 'degraded') \
     ORDER BY last_seen_at DESC NULLS LAST, id";

/// [`HEALTH_TARGETS`] in the buckets `$1` owns, with each bucket's epoch and the seconds
/// since the server's last check by the database's clock.
const SHARED_HEALTH_TARGETS: &str = "SELECT s.id, s.name, s.api_url, s.api_token_sealed, s.api_token_key_id, s.health_status, s.kind, \
     s.metrics_path, s.ca_cert, l.bucket, l.epoch, EXTRACT(EPOCH FROM now() - s.last_health_check_at)::float8 \
     FROM managed_servers s JOIN fleet_bucket_leases l ON l.bucket = s.bucket \
     WHERE s.status = 'active' AND l.owner = $1 ORDER BY s.last_health_check_at ASC NULLS FIRST, s.id";

/// [`METRICS_TARGETS`] in the buckets `$1` owns, as [`SHARED_HEALTH_TARGETS`], timed from
/// the last collection.
const SHARED_METRICS_TARGETS: &str = "SELECT s.id, s.name, s.api_url, s.api_token_sealed, s.api_token_key_id, s.health_status, s.kind, \
     s.metrics_path, s.ca_cert, l.bucket, l.epoch, EXTRACT(EPOCH FROM now() - ms.last_metrics_at)::float8 \
     FROM managed_servers s JOIN fleet_bucket_leases l ON l.bucket = s.bucket \
     LEFT JOIN server_metrics_state ms ON ms.server_id = s.id \
     WHERE s.status = 'active' AND s.health_status IN ('healthy', 'degraded') AND l.owner = $1 \
     ORDER BY s.last_seen_at DESC NULLS LAST, s.id";

/// One round trip for a whole batch: history rows (skipping servers that no longer exist and
/// rows already stored) and each server's current state, moved only forward in time.
/// One statement per batch: the history rows, each server's forward-only state, and a
/// change-log row for every check newer than the stored state whose health differs from the
/// one before it (the stored one for a server's first fresh check, the previous check in the
/// batch otherwise). A retried batch has no fresh check, so it logs nothing again.
///
/// Fenced: a row carrying a bucket epoch is kept only while `$13` owns that bucket at that
/// epoch, and the lease rows are share-locked until commit, so a takeover waits for this write
/// and then sees it. A row without an epoch (check-now) is unfenced; it is marked manual when
/// the store is shared. The statement returns how many rows the fence refused.
const RECORD_HEALTH: &str = "\
WITH raw AS (
    SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::text[], $4::int4[], $5::bool[], $6::bool[],
                         $7::bool[], $8::bool[], $9::text[], $10::jsonb[], $11::int2[], $12::int8[])
        AS u(server_id, ts, status, response_time_ms, database_healthy, redis_healthy, services_healthy,
             successful, error_message, error_details, bucket, epoch)
), fence AS (
    SELECT bucket, epoch FROM fleet_bucket_leases
    WHERE owner = $13::text AND bucket IN (SELECT bucket FROM raw WHERE epoch IS NOT NULL)
    ORDER BY bucket
    FOR SHARE
), input AS (
    SELECT r.* FROM raw r
    WHERE r.epoch IS NULL OR EXISTS (SELECT 1 FROM fence f WHERE f.bucket = r.bucket AND f.epoch = r.epoch)
), old AS (
    SELECT m.id, m.health_status, m.last_health_check_at FROM managed_servers m
    WHERE m.id IN (SELECT server_id FROM input)
    ORDER BY m.id
    FOR NO KEY UPDATE
), fresh AS (
    SELECT i.server_id, i.ts, i.status, i.error_message,
           CASE WHEN row_number() OVER w = 1 THEN o.health_status ELSE lag(i.status) OVER w END AS before
    FROM input i JOIN old o ON o.id = i.server_id
    WHERE o.last_health_check_at IS NULL OR i.ts > o.last_health_check_at
    WINDOW w AS (PARTITION BY i.server_id ORDER BY i.ts)
), changes AS (
    INSERT INTO server_state_changes (server_id, changed_at, from_status, to_status, error_message)
    SELECT server_id, ts, before, status, error_message FROM fresh
    WHERE status IS DISTINCT FROM before
    ORDER BY ts, server_id
    ON CONFLICT DO NOTHING
), latest AS (
    SELECT DISTINCT ON (i.server_id) i.server_id, i.ts, i.status, i.response_time_ms, i.error_message,
           o.last_health_check_at IS NULL OR o.last_health_check_at <= i.ts AS forward
    FROM input i JOIN old o ON o.id = i.server_id ORDER BY i.server_id, i.ts DESC
), seen AS (
    SELECT server_id, max(ts) FILTER (WHERE status <> 'unreachable') AS seen_at FROM input GROUP BY server_id
), updated AS (
    UPDATE managed_servers m SET
        health_status = CASE WHEN l.forward THEN l.status ELSE m.health_status END,
        last_response_time_ms = CASE WHEN l.forward THEN l.response_time_ms ELSE m.last_response_time_ms END,
        last_error = CASE WHEN l.forward THEN l.error_message ELSE m.last_error END,
        last_health_check_at = GREATEST(m.last_health_check_at, l.ts),
        last_seen_at = GREATEST(m.last_seen_at, s.seen_at)
    FROM latest l JOIN seen s USING (server_id)
    WHERE m.id = l.server_id
    RETURNING m.id
), inserted AS (
    INSERT INTO server_health_checks (server_id, timestamp, status, response_time_ms, database_healthy,
                                      redis_healthy, services_healthy, successful, error_message, error_details,
                                      manual)
    SELECT i.server_id, i.ts, i.status, i.response_time_ms, i.database_healthy, i.redis_healthy,
           i.services_healthy, i.successful, i.error_message, i.error_details,
           i.epoch IS NULL AND $13::text IS NOT NULL
    FROM input i WHERE i.server_id IN (SELECT id FROM updated)
    ON CONFLICT DO NOTHING
)
SELECT (SELECT count(*) FROM raw) - (SELECT count(*) FROM input) AS rejected";

/// Fenced as [`RECORD_HEALTH`]: samples and failures carrying a bucket epoch are kept only
/// while `$23` owns the bucket at that epoch. Each kept collection moves the server's
/// `last_metrics_at` forward in `server_metrics_state` (the next one is due from it; a table
/// of its own, so that the metrics writer never takes the health writer's row locks), and a
/// failure its last error.
/// Returns how many records the fence refused.
const RECORD_METRICS: &str = "\
WITH s_raw AS (
    SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::text[], $4::float8[], $5::float8[], $6::float8[],
                         $7::int8[], $8::int8[], $9::int8[], $10::int8[], $11::int8[], $12::int8[], $13::float8[],
                         $14::int8[], $15::int8[], $19::int2[], $20::int8[])
        AS u(server_id, ts, period, cpu_percent, memory_percent, disk_percent, network_rx_bytes, network_tx_bytes,
             active_services, failed_services, total_services, llm_requests, llm_cost_usd, active_users, total_users,
             bucket, epoch)
), f_raw AS (
    SELECT * FROM unnest($16::uuid[], $17::timestamptz[], $18::text[], $21::int2[], $22::int8[])
        AS f(server_id, ts, error, bucket, epoch)
), fence AS (
    SELECT bucket, epoch FROM fleet_bucket_leases
    WHERE owner = $23::text
      AND bucket IN (SELECT bucket FROM s_raw WHERE epoch IS NOT NULL
                     UNION SELECT bucket FROM f_raw WHERE epoch IS NOT NULL)
    ORDER BY bucket
    FOR SHARE
), samples AS (
    SELECT r.* FROM s_raw r
    WHERE r.epoch IS NULL OR EXISTS (SELECT 1 FROM fence f WHERE f.bucket = r.bucket AND f.epoch = r.epoch)
), failed AS (
    SELECT r.* FROM f_raw r
    WHERE r.epoch IS NULL OR EXISTS (SELECT 1 FROM fence f WHERE f.bucket = r.bucket AND f.epoch = r.epoch)
), inserted AS (
    INSERT INTO server_metrics_aggregated (server_id, timestamp, period, cpu_percent, memory_percent, disk_percent,
        network_rx_bytes, network_tx_bytes, active_services, failed_services, total_services, llm_requests,
        llm_cost_usd, active_users, total_users)
    SELECT s.server_id, s.ts, s.period, s.cpu_percent, s.memory_percent, s.disk_percent, s.network_rx_bytes,
           s.network_tx_bytes, s.active_services, s.failed_services, s.total_services, s.llm_requests,
           s.llm_cost_usd, s.active_users, s.total_users
    FROM samples s JOIN managed_servers m ON m.id = s.server_id
    ON CONFLICT DO NOTHING
), failures AS (
    SELECT DISTINCT ON (server_id) server_id, ts, error FROM failed ORDER BY server_id, ts DESC
), locked AS (
    SELECT m.id FROM managed_servers m WHERE m.id IN (SELECT server_id FROM failures)
    ORDER BY m.id
    FOR NO KEY UPDATE
), errors AS (
    UPDATE managed_servers m SET last_metrics_error = f.error, last_metrics_error_at = f.ts
    FROM failures f
    WHERE m.id = f.server_id AND m.id IN (SELECT id FROM locked)
      AND (m.last_metrics_error_at IS NULL OR m.last_metrics_error_at <= f.ts)
), collected AS (
    INSERT INTO server_metrics_state (server_id, last_metrics_at)
    SELECT c.server_id, max(c.ts) FROM (SELECT server_id, ts FROM samples UNION ALL SELECT server_id, ts FROM failed) c
    WHERE c.server_id IN (SELECT id FROM managed_servers)
    GROUP BY c.server_id
    ON CONFLICT (server_id) DO UPDATE
        SET last_metrics_at = GREATEST(server_metrics_state.last_metrics_at, EXCLUDED.last_metrics_at)
)
SELECT (SELECT count(*) FROM s_raw) + (SELECT count(*) FROM f_raw)
     - (SELECT count(*) FROM samples) - (SELECT count(*) FROM failed) AS rejected";

#[async_trait]
impl Store for PgStore {
    async fn health_targets(&self) -> Result<Targets, StoreError> {
        self.targets(HEALTH_TARGETS, SHARED_HEALTH_TARGETS).await
    }

    async fn metrics_targets(&self) -> Result<Targets, StoreError> {
        self.targets(METRICS_TARGETS, SHARED_METRICS_TARGETS).await
    }

    async fn record_health(&self, checks: &[HealthCheck]) -> Result<(), StoreError> {
        if checks.is_empty() {
            return Ok(());
        }
        let n = checks.len();
        let mut ids = Vec::with_capacity(n);
        let mut ts = Vec::with_capacity(n);
        let mut status = Vec::with_capacity(n);
        let mut rt = Vec::with_capacity(n);
        let mut db = Vec::with_capacity(n);
        let mut redis = Vec::with_capacity(n);
        let mut svc = Vec::with_capacity(n);
        let mut ok = Vec::with_capacity(n);
        let mut msg = Vec::with_capacity(n);
        let mut details = Vec::with_capacity(n);
        let mut buckets = Vec::with_capacity(n);
        let mut epochs = Vec::with_capacity(n);
        let mut months = BTreeSet::new();
        for c in checks {
            buckets.push(c.fence.map(|f| f.bucket as i16));
            epochs.push(c.fence.map(|f| f.epoch));
            ids.push(c.server_id.0);
            ts.push(c.timestamp);
            status.push(c.status.as_str());
            rt.push(
                c.response_time_ms
                    .map(|v| i32::try_from(v).unwrap_or(i32::MAX)),
            );
            db.push(c.database_healthy);
            redis.push(c.redis_healthy);
            svc.push(c.services_healthy);
            ok.push(c.successful);
            msg.push(c.error_message.as_deref());
            details.push(c.error_details.as_ref());
            months.insert(YearMonth::of(c.timestamp));
        }
        let me = self.member_id();
        let params: [&(dyn ToSql + Sync); 13] = [
            &ids, &ts, &status, &rt, &db, &redis, &svc, &ok, &msg, &details, &buckets, &epochs, &me,
        ];
        self.write_with_partitions(RECORD_HEALTH, &params, months)
            .await
    }

    async fn record_metrics(&self, records: &[MetricsRecord]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        #[derive(Default)]
        struct Cols<'a> {
            ids: Vec<Uuid>,
            ts: Vec<OffsetDateTime>,
            period: Vec<&'static str>,
            f: [Vec<Option<f64>>; 4],
            i: [Vec<Option<i64>>; 8],
            fail_ids: Vec<Uuid>,
            fail_ts: Vec<OffsetDateTime>,
            fail_err: Vec<&'a str>,
            buckets: Vec<Option<i16>>,
            epochs: Vec<Option<i64>>,
            fail_buckets: Vec<Option<i16>>,
            fail_epochs: Vec<Option<i64>>,
        }
        let mut c = Cols::default();
        let mut months = BTreeSet::new();
        for r in records {
            match r {
                MetricsRecord::Sample(s) => {
                    let v = &s.values;
                    c.buckets.push(s.fence.map(|f| f.bucket as i16));
                    c.epochs.push(s.fence.map(|f| f.epoch));
                    c.ids.push(s.server_id.0);
                    c.ts.push(s.timestamp);
                    c.period.push(s.period.as_str());
                    for (col, val) in c.f.iter_mut().zip([
                        v.cpu_percent,
                        v.memory_percent,
                        v.disk_percent,
                        v.llm_cost_usd,
                    ]) {
                        col.push(val);
                    }
                    let ints = [
                        v.network_rx_bytes,
                        v.network_tx_bytes,
                        v.active_services,
                        v.failed_services,
                        v.total_services,
                        v.llm_requests,
                        v.active_users,
                        v.total_users,
                    ];
                    for (col, val) in c.i.iter_mut().zip(ints) {
                        col.push(val);
                    }
                    months.insert(YearMonth::of(s.timestamp));
                }
                MetricsRecord::Failure(f) => {
                    c.fail_ids.push(f.server_id.0);
                    c.fail_ts.push(f.timestamp);
                    c.fail_err.push(&f.error);
                    c.fail_buckets.push(f.fence.map(|f| f.bucket as i16));
                    c.fail_epochs.push(f.fence.map(|f| f.epoch));
                }
            }
        }
        let [cpu, mem, disk, cost] = &c.f;
        let [
            rx,
            tx,
            active_s,
            failed_s,
            total_s,
            llm_req,
            active_u,
            total_u,
        ] = &c.i;
        let me = self.member_id();
        let params: [&(dyn ToSql + Sync); 23] = [
            &c.ids,
            &c.ts,
            &c.period,
            cpu,
            mem,
            disk,
            rx,
            tx,
            active_s,
            failed_s,
            total_s,
            llm_req,
            cost,
            active_u,
            total_u,
            &c.fail_ids,
            &c.fail_ts,
            &c.fail_err,
            &c.buckets,
            &c.epochs,
            &c.fail_buckets,
            &c.fail_epochs,
            &me,
        ];
        self.write_with_partitions(RECORD_METRICS, &params, months)
            .await
    }
}

type Params = Vec<Box<dyn ToSql + Sync + Send>>;

/// The `WHERE` of a server filter (with its leading space), and its parameters.
fn where_clause(filter: &ServerFilter) -> (String, Params) {
    let mut clauses: Vec<String> = Vec::new();
    let mut params: Params = Vec::new();
    let mut add = |clause: &str, value: Box<dyn ToSql + Sync + Send>| {
        params.push(value);
        clauses.push(clause.replace('?', &format!("${}", params.len())));
    };
    if let Some(v) = filter.status {
        add("status = ?", Box::new(v.as_str()));
    }
    if let Some(v) = filter.health_status {
        add("health_status = ?", Box::new(v.as_str()));
    }
    if let Some(v) = &filter.region {
        add("region = ?", Box::new(v.clone()));
    }
    if let Some(v) = &filter.environment {
        add("environment = ?", Box::new(v.clone()));
    }
    if let Some(v) = &filter.tag {
        add("tags @> jsonb_build_array(?::text)", Box::new(v.clone()));
    }
    if let Some(g) = filter.group {
        add(
            "id IN (SELECT server_id FROM server_group_members WHERE group_id = ?)",
            Box::new(g.0),
        );
    }
    if let Some(q) = &filter.search {
        let escaped = q
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        // `search_text` (migration V6) is the lower-cased name, hostname, region and tags,
        // trigram-indexed where pg_trgm is available.
        add(
            "search_text LIKE lower(?)",
            Box::new(format!("%{escaped}%")),
        );
    }
    if clauses.is_empty() {
        (String::new(), params)
    } else {
        (format!(" WHERE {}", clauses.join(" AND ")), params)
    }
}

#[async_trait]
impl Registry for PgStore {
    async fn create_server(&self, new: NewServer) -> Result<ManagedServer, StoreError> {
        let new = new.validated()?;
        let id = ServerId::new();
        let sealed = match &new.api_token {
            Some(token) => Some(self.vault.seal(id, token).map_err(crypto_error)?),
            None => None,
        };
        let (sealed, key_id) = sealed.unzip();
        let tags = serde_json::to_value(&new.tags).expect("strings serialize");
        let client = self.client().await?;
        let sql = format!(
            "INSERT INTO managed_servers (id, name, description, hostname, api_url, api_token_sealed, \
             api_token_key_id, region, environment, tags, metadata, status, kind, metrics_path, ca_cert) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) RETURNING {SERVER_COLUMNS}"
        );
        let row = client
            .query_one(
                &sql,
                &[
                    &id.0,
                    &new.name,
                    &new.description,
                    &new.hostname,
                    &new.api_url,
                    &sealed,
                    &key_id,
                    &new.region,
                    &new.environment,
                    &tags,
                    &new.metadata,
                    &new.status.as_str(),
                    &new.kind.as_str(),
                    &new.metrics_path,
                    &new.ca_cert,
                ],
            )
            .await
            .map_err(|e| match db_error(e) {
                StoreError::Conflict(_) => {
                    StoreError::Conflict(format!("a server named `{}` already exists", new.name))
                }
                other => other,
            })?;
        server_from_row(&row)
    }

    async fn probe_target(&self, id: ServerId) -> Result<Option<ProbeTarget>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT id, name, api_url, api_token_sealed, api_token_key_id, health_status, kind, metrics_path, ca_cert FROM managed_servers WHERE id = $1",
                &[&id.0],
            )
            .await
            .map_err(db_error)?;
        Ok(row.as_ref().map(|r| self.target(r)))
    }

    async fn get_server(&self, id: ServerId) -> Result<Option<ManagedServer>, StoreError> {
        let client = self.client().await?;
        let sql = format!("SELECT {SERVER_COLUMNS} FROM managed_servers WHERE id = $1");
        let row = client.query_opt(&sql, &[&id.0]).await.map_err(db_error)?;
        row.as_ref().map(server_from_row).transpose()
    }

    async fn list_servers(&self, filter: &ServerFilter) -> Result<Vec<ManagedServer>, StoreError> {
        let (clauses, params) = where_clause(filter);
        let direction = if filter.sort.descending {
            "DESC"
        } else {
            "ASC"
        };
        let order = match filter.sort.key {
            SortKey::Name => format!("lower(name) {direction}, id"),
            SortKey::Health => format!(
                "CASE health_status WHEN 'healthy' THEN 0 WHEN 'degraded' THEN 1 \
                 WHEN 'critical' THEN 2 WHEN 'unreachable' THEN 3 END {direction} NULLS LAST, \
                 lower(name), id"
            ),
            SortKey::LastSeen => format!("last_seen_at {direction} NULLS LAST, lower(name), id"),
            SortKey::ResponseTime => {
                format!("last_response_time_ms {direction} NULLS LAST, lower(name), id")
            }
        };
        let mut sql =
            format!("SELECT {SERVER_COLUMNS} FROM managed_servers{clauses} ORDER BY {order}");
        if let Some(limit) = filter.limit {
            sql.push_str(&format!(" LIMIT {}", limit.min(i64::MAX as usize)));
        }
        if filter.offset > 0 {
            sql.push_str(&format!(" OFFSET {}", filter.offset));
        }
        let client = self.client().await?;
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect();
        let rows = client.query(&sql, &refs).await.map_err(db_error)?;
        rows.iter().map(server_from_row).collect()
    }

    async fn count_servers(&self, filter: &ServerFilter) -> Result<u64, StoreError> {
        // What the kept tallies can answer costs a few rows, not a scan of the registry.
        let tallied = filter.tag.is_none() && filter.search.is_none() && filter.group.is_none();
        if tallied {
            let tallies = self.server_tallies().await?;
            return Ok(tallies
                .iter()
                .filter(|t| filter.status.is_none_or(|v| t.status == v))
                .filter(|t| filter.health_status.is_none_or(|v| t.health == Some(v)))
                .filter(|t| filter.region.is_none() || t.region == filter.region)
                .filter(|t| filter.environment.is_none() || t.environment == filter.environment)
                .map(|t| t.count)
                .sum());
        }
        let (clauses, params) = where_clause(filter);
        let sql = format!("SELECT count(*) FROM managed_servers{clauses}");
        let client = self.client().await?;
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect();
        let n: i64 = client
            .query_one(&sql, &refs)
            .await
            .map_err(db_error)?
            .get(0);
        Ok(n.max(0) as u64)
    }

    async fn set_server_status(
        &self,
        id: ServerId,
        status: ServerStatus,
    ) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE managed_servers SET status = $2, updated_at = now() WHERE id = $1",
                &[&id.0, &status.as_str()],
            )
            .await
            .map_err(db_error)?;
        Ok(n == 1)
    }

    async fn delete_server(&self, id: ServerId) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        let n = tx
            .execute("DELETE FROM managed_servers WHERE id = $1", &[&id.0])
            .await
            .map_err(db_error)?;
        tx.execute(
            "DELETE FROM server_health_checks WHERE server_id = $1",
            &[&id.0],
        )
        .await
        .map_err(db_error)?;
        tx.execute(
            "DELETE FROM server_metrics_aggregated WHERE server_id = $1",
            &[&id.0],
        )
        .await
        .map_err(db_error)?;
        tx.execute(
            "DELETE FROM server_state_changes WHERE server_id = $1",
            &[&id.0],
        )
        .await
        .map_err(db_error)?;
        // Its rollups go too (the running LLM totals drop it with its number).
        for table in ["server_health_rollups", "server_metrics_rollups"] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE server_id = $1"),
                &[&id.0],
            )
            .await
            .map_err(db_error)?;
        }
        tx.execute(
            "DELETE FROM server_metrics_state WHERE server_id = $1",
            &[&id.0],
        )
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        Ok(n == 1)
    }

    async fn update_server(
        &self,
        id: ServerId,
        update: ServerUpdate,
    ) -> Result<Option<ManagedServer>, StoreError> {
        let update = update.validated()?;
        let sealed = match &update.api_token {
            Some(token) => Some(self.vault.seal(id, token).map_err(crypto_error)?),
            None => None,
        };
        self.update_server_row(id, update, sealed).await
    }
}

fn health_from_row(row: &Row) -> Result<HealthCheck, StoreError> {
    let status: HealthStatus = parsed("server_health_checks.status", row.get("status"))?;
    let rt: Option<i32> = row.get("response_time_ms");
    Ok(HealthCheck {
        fence: None,
        server_id: ServerId(row.get("server_id")),
        timestamp: row.get("timestamp"),
        status,
        response_time_ms: rt.map(|v| v.max(0) as u32),
        database_healthy: row.get("database_healthy"),
        redis_healthy: row.get("redis_healthy"),
        services_healthy: row.get("services_healthy"),
        error_message: row.get("error_message"),
        error_details: row.get("error_details"),
        responded: status != HealthStatus::Unreachable,
        successful: row.get("successful"),
    })
}

fn sample_from_row(row: &Row) -> Result<MetricsSample, StoreError> {
    Ok(MetricsSample {
        fence: None,
        server_id: ServerId(row.get("server_id")),
        timestamp: row.get("timestamp"),
        period: parsed::<Period>("server_metrics_aggregated.period", row.get("period"))?,
        values: MetricValues {
            cpu_percent: row.get("cpu_percent"),
            memory_percent: row.get("memory_percent"),
            disk_percent: row.get("disk_percent"),
            network_rx_bytes: row.get("network_rx_bytes"),
            network_tx_bytes: row.get("network_tx_bytes"),
            active_services: row.get("active_services"),
            failed_services: row.get("failed_services"),
            total_services: row.get("total_services"),
            llm_requests: row.get("llm_requests"),
            llm_cost_usd: row.get("llm_cost_usd"),
            active_users: row.get("active_users"),
            total_users: row.get("total_users"),
        },
    })
}

async fn window<C: GenericClient>(
    client: &C,
    table: &str,
    id: ServerId,
    q: HistoryQuery,
) -> Result<Vec<Row>, StoreError> {
    let sql = format!(
        "SELECT * FROM {table} WHERE server_id = $1 AND ($2::timestamptz IS NULL OR timestamp >= $2) \
         AND ($3::timestamptz IS NULL OR timestamp < $3) ORDER BY timestamp DESC LIMIT $4"
    );
    let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
    client
        .query(&sql, &[&id.0, &q.from, &q.to, &limit])
        .await
        .map_err(db_error)
}

#[async_trait]
impl History for PgStore {
    async fn health_history(
        &self,
        id: ServerId,
        query: HistoryQuery,
    ) -> Result<Vec<HealthCheck>, StoreError> {
        let client = self.client().await?;
        window(&**client, "server_health_checks", id, query)
            .await?
            .iter()
            .map(health_from_row)
            .collect()
    }

    async fn metrics_history(
        &self,
        id: ServerId,
        query: HistoryQuery,
    ) -> Result<Vec<MetricsSample>, StoreError> {
        let client = self.client().await?;
        window(&**client, "server_metrics_aggregated", id, query)
            .await?
            .iter()
            .map(sample_from_row)
            .collect()
    }

    async fn health_rollups(
        &self,
        id: ServerId,
        res: Resolution,
        query: HistoryQuery,
    ) -> Result<Vec<HealthRollup>, StoreError> {
        self.read_health_rollups(id, res, query).await
    }

    async fn metrics_rollups(
        &self,
        id: ServerId,
        res: Resolution,
        query: HistoryQuery,
    ) -> Result<Vec<MetricsRollup>, StoreError> {
        self.read_metrics_rollups(id, res, query).await
    }

    async fn llm_usage(
        &self,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<LlmUsage>, StoreError> {
        self.usage(from, to).await
    }

    async fn llm_summary(
        &self,
        window: (OffsetDateTime, OffsetDateTime),
        resolution: Option<Resolution>,
        limit: usize,
    ) -> Result<LlmSummary, StoreError> {
        self.summarise_llm(window, resolution, limit).await
    }

    async fn recent_checks(
        &self,
        servers: &[ServerId],
        per_server: usize,
    ) -> Result<Vec<(ServerId, Vec<HealthCheck>)>, StoreError> {
        if servers.is_empty() {
            return Ok(Vec::new());
        }
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT h.* FROM unnest($1::uuid[]) AS s(id) CROSS JOIN LATERAL \
                 (SELECT * FROM server_health_checks c WHERE c.server_id = s.id \
                  ORDER BY c.timestamp DESC LIMIT $2) h",
            )
            .await
            .map_err(db_error)?;
        let ids: Vec<Uuid> = servers.iter().map(|s| s.0).collect();
        let limit = i64::try_from(per_server).unwrap_or(i64::MAX);
        let rows = client
            .query(&stmt, &[&ids, &limit])
            .await
            .map_err(db_error)?;
        let mut out: Vec<(ServerId, Vec<HealthCheck>)> =
            servers.iter().map(|s| (*s, Vec::new())).collect();
        for row in &rows {
            let check = health_from_row(row)?;
            if let Some((_, checks)) = out.iter_mut().find(|(id, _)| *id == check.server_id) {
                checks.push(check);
            }
        }
        Ok(out)
    }

    async fn health_series(
        &self,
        id: ServerId,
        window: SeriesWindow,
    ) -> Result<Vec<HealthBucket>, StoreError> {
        if let Some(span) = self.tier_span(&window).await? {
            return self.tiered_health_series(id, &window, span).await;
        }
        let rows = self
            .series_rows(
                &format!(
                    "SELECT {BUCKET} AS b, count(*), count(*) FILTER (WHERE NOT successful), \
                     max(CASE status WHEN 'healthy' THEN 0 WHEN 'degraded' THEN 1 \
                         WHEN 'critical' THEN 2 ELSE 3 END), \
                     avg(response_time_ms)::float8, max(response_time_ms) \
                     FROM server_health_checks"
                ),
                id,
                &window,
            )
            .await?;
        Ok(rows.iter().map(|r| health_bucket(&window, r)).collect())
    }

    async fn metrics_series(
        &self,
        id: ServerId,
        window: SeriesWindow,
    ) -> Result<Vec<MetricsBucket>, StoreError> {
        if let Some(span) = self.tier_span(&window).await? {
            return self.tiered_metrics_series(id, &window, span).await;
        }
        let rows = self
            .series_rows(
                &format!(
                    "SELECT {BUCKET} AS b, count(*), avg(cpu_percent), avg(memory_percent), \
                     avg(disk_percent), max(llm_requests), max(llm_cost_usd) \
                     FROM server_metrics_aggregated"
                ),
                id,
                &window,
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| MetricsBucket {
                start: window.start_of(bucket(r)),
                samples: r.get::<_, i64>(1) as u32,
                cpu_percent: r.get(2),
                memory_percent: r.get(3),
                disk_percent: r.get(4),
                llm_requests: r.get(5),
                llm_cost_usd: r.get(6),
            })
            .collect())
    }
}

/// Where a chart reads rollups: the tier, and the part of the window it covers; raw rows
/// fill the rest.
#[derive(Clone, Copy, Debug)]
struct TierSpan {
    res: Resolution,
    from: OffsetDateTime,
    to: OffsetDateTime,
}

impl PgStore {
    /// The rollups a chart over `window` reads: none while the raw window covers it;
    /// otherwise the finest tier still kept from its start, over what that tier has rolled up.
    async fn tier_span(&self, window: &SeriesWindow) -> Result<Option<TierSpan>, StoreError> {
        let Some(raw) = self.policy.raw_window() else {
            return Ok(None);
        };
        let now = self.clock.now();
        if window.from >= now - raw {
            return Ok(None);
        }
        let marks = self.rollup_marks().await?;
        let five = time::Duration::days(i64::from(self.policy.rollup_5m_retention_days));
        let (res, until) = if window.from >= now - five {
            (Resolution::FiveMinutes, marks.until_5m)
        } else {
            (Resolution::Hour, marks.until_1h)
        };
        let (Some(first), Some(until)) = (marks.from_5m, until) else {
            return Ok(None);
        };
        let from = window.from.max(first);
        let to = until.min(window.to);
        Ok((from < to).then_some(TierSpan { res, from, to }))
    }

    async fn tiered_health_series(
        &self,
        id: ServerId,
        window: &SeriesWindow,
        span: TierSpan,
    ) -> Result<Vec<HealthBucket>, StoreError> {
        let table = match span.res {
            Resolution::FiveMinutes => "server_health_rollups_5m",
            _ => "server_health_rollups_1h",
        };
        let by_period = BUCKET.replace("timestamp", "period_start");
        let sql = format!(
            "SELECT b, sum(n)::int8, sum(fail)::int8, max(worst), \
                    (sum(rt_sum)::float8 / nullif(sum(rt_n), 0)), max(rt_max) FROM ( \
               SELECT {by_period} AS b, (healthy + degraded + critical + unreachable)::int8 AS n, \
                      unreachable::int8 AS fail, \
                      CASE WHEN unreachable > 0 THEN 3 WHEN critical > 0 THEN 2 \
                           WHEN degraded > 0 THEN 1 ELSE 0 END AS worst, \
                      rt_sum::int8 AS rt_sum, rt_count::int8 AS rt_n, rt_max \
               FROM {table} WHERE server_id = $1 AND period_start >= $6 AND period_start < $7 \
               UNION ALL \
               SELECT {BUCKET}, 1, CASE WHEN successful THEN 0 ELSE 1 END, \
                      CASE status WHEN 'healthy' THEN 0 WHEN 'degraded' THEN 1 \
                           WHEN 'critical' THEN 2 ELSE 3 END, \
                      response_time_ms::int8, (response_time_ms IS NOT NULL)::int::int8, response_time_ms \
               FROM server_health_checks WHERE server_id = $1 AND timestamp >= $2 AND timestamp < $3 \
                 AND (timestamp < $6 OR timestamp >= $7)) x \
             GROUP BY b ORDER BY b"
        );
        let rows = self.tiered_rows(&sql, id, window, span).await?;
        Ok(rows.iter().map(|r| health_bucket(window, r)).collect())
    }

    /// Metrics from rollups and raw rows. The LLM counters are given as the increase
    /// accumulated from the window's start (rollups keep increases, not values): a chart
    /// taking each bucket's difference from the last shows the same increases as from raw.
    async fn tiered_metrics_series(
        &self,
        id: ServerId,
        window: &SeriesWindow,
        span: TierSpan,
    ) -> Result<Vec<MetricsBucket>, StoreError> {
        let table = match span.res {
            Resolution::FiveMinutes => "server_metrics_rollups_5m",
            _ => "server_metrics_rollups_1h",
        };
        let by_period = BUCKET.replace("timestamp", "period_start");
        let mean = |g: &str| format!("sum({g}_w) / nullif(sum({g}_n), 0)");
        let tier_gauge = |short: &str| {
            format!(
                "{short}_mean::float8 / 100 * samples AS {short}_w, \
                 CASE WHEN {short}_mean IS NULL THEN 0 ELSE samples END AS {short}_n"
            )
        };
        let raw_gauge = |raw: &str, short: &str| {
            format!("{raw} AS {short}_w, ({raw} IS NOT NULL)::int AS {short}_n")
        };
        let step = |c: &str| {
            format!(
                "CASE WHEN {c} IS NULL OR p_{c} IS NULL THEN NULL \
                      WHEN {c} >= p_{c} THEN {c} - p_{c} ELSE {c} END"
            )
        };
        let sql = format!(
            "SELECT b, sum(n)::int8, {cpu}, {mem}, {disk}, sum(req)::float8, sum(cost)::float8 FROM ( \
               SELECT {by_period} AS b, samples::int8 AS n, {tc}, {tm}, {td}, \
                      llm_requests_increase::float8 AS req, llm_cost_usd_increase AS cost \
               FROM {table} WHERE server_id = $1 AND period_start >= $6 AND period_start < $7 \
               UNION ALL \
               SELECT {BUCKET}, 1, {rc}, {rm}, {rd}, {sreq}::float8, {scost} FROM ( \
                 SELECT *, lag(llm_requests) OVER w AS p_llm_requests, lag(llm_cost_usd) OVER w AS p_llm_cost_usd \
                 FROM server_metrics_aggregated \
                 WHERE server_id = $1 AND timestamp >= $2 AND timestamp < $3 AND (timestamp < $6 OR timestamp >= $7) \
                 WINDOW w AS (PARTITION BY timestamp >= $7 ORDER BY timestamp)) r) x \
             GROUP BY b ORDER BY b",
            cpu = mean("cpu"),
            mem = mean("memory"),
            disk = mean("disk"),
            tc = tier_gauge("cpu"),
            tm = tier_gauge("memory"),
            td = tier_gauge("disk"),
            rc = raw_gauge("cpu_percent", "cpu"),
            rm = raw_gauge("memory_percent", "memory"),
            rd = raw_gauge("disk_percent", "disk"),
            sreq = step("llm_requests"),
            scost = step("llm_cost_usd"),
        );
        let rows = self.tiered_rows(&sql, id, window, span).await?;
        let (mut req, mut cost) = (0.0f64, 0.0f64);
        Ok(rows
            .iter()
            .map(|r| {
                let step_req: Option<f64> = r.get(5);
                let step_cost: Option<f64> = r.get(6);
                req += step_req.unwrap_or(0.0);
                cost += step_cost.unwrap_or(0.0);
                MetricsBucket {
                    start: window.start_of(bucket(r)),
                    samples: r.get::<_, i64>(1) as u32,
                    cpu_percent: r.get(2),
                    memory_percent: r.get(3),
                    disk_percent: r.get(4),
                    llm_requests: step_req.map(|_| req.round() as i64),
                    llm_cost_usd: step_cost.map(|_| cost),
                }
            })
            .collect())
    }

    async fn tiered_rows(
        &self,
        sql: &str,
        id: ServerId,
        window: &SeriesWindow,
        span: TierSpan,
    ) -> Result<Vec<Row>, StoreError> {
        let client = self.client().await?;
        let args = SeriesArgs::new(id, window);
        let [a, b, c, d, e] = args.params();
        client
            .query(sql, &[a, b, c, d, e, &span.from, &span.to])
            .await
            .map_err(db_error)
    }

    /// The rows of a series query: `select` (columns and table) over one server's window,
    /// grouped by bucket.
    async fn series_rows(
        &self,
        select: &str,
        id: ServerId,
        window: &SeriesWindow,
    ) -> Result<Vec<Row>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "{select} WHERE server_id = $1 AND timestamp >= $2 AND timestamp < $3 \
                 GROUP BY b ORDER BY b"
            ))
            .await
            .map_err(db_error)?;
        let args = SeriesArgs::new(id, window);
        client.query(&stmt, &args.params()).await.map_err(db_error)
    }
}

/// A row's bucket: its offset into the window in microseconds, times the buckets, over the
/// window's length, in integers, as [`SeriesWindow::bucket_of`] computes it.
const BUCKET: &str = "((extract(epoch FROM (timestamp - $2)) * 1000000)::bigint * $4 / $5)";

/// The parameters of a series query: server, from, to, buckets, and the window's length in
/// microseconds.
struct SeriesArgs(Uuid, OffsetDateTime, OffsetDateTime, i64, i64);

impl SeriesArgs {
    fn new(id: ServerId, w: &SeriesWindow) -> Self {
        let span = (w.to - w.from).whole_microseconds().max(1);
        Self(
            id.0,
            w.from,
            w.to,
            i64::from(w.buckets),
            i64::try_from(span).unwrap_or(i64::MAX),
        )
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 5] {
        [&self.0, &self.1, &self.2, &self.3, &self.4]
    }
}

/// A health series row: bucket, checks, failures, worst rank, mean and longest response.
fn health_bucket(window: &SeriesWindow, r: &Row) -> HealthBucket {
    let worst = match r.get::<_, i32>(3) {
        0 => HealthStatus::Healthy,
        1 => HealthStatus::Degraded,
        2 => HealthStatus::Critical,
        _ => HealthStatus::Unreachable,
    };
    HealthBucket {
        start: window.start_of(bucket(r)),
        checks: r.get::<_, i64>(1) as u32,
        failures: r.get::<_, i64>(2) as u32,
        worst,
        avg_response_ms: r.get(4),
        max_response_ms: r.get::<_, Option<i32>>(5).map(|v| v.max(0) as u32),
    }
}

fn bucket(r: &Row) -> u32 {
    r.get::<_, i64>(0).max(0) as u32
}

#[async_trait]
impl fleet_core::Ping for PgStore {
    async fn ping(&self) -> Result<(), StoreError> {
        PgStore::ping(self).await
    }
}

/// The seed's partition health check: the current month's partition of each table must exist.
/// A missing one is reported (`PARTITION MISSING: … does not exist!`) and then made, so no row
/// is lost to it.
#[async_trait]
impl StorageCheck for PgStore {
    async fn check_storage(&self) -> Result<Findings, StoreError> {
        let month = YearMonth::of(self.clock.now());
        let client = self.client().await?;
        let mut findings = Vec::new();
        for table in PARTITIONED {
            let name = month.partition(table);
            let exists: bool = client
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
                .await
                .map_err(db_error)?
                .get(0);
            if !exists {
                findings.push(format!("PARTITION MISSING: {name} does not exist!"));
            }
        }
        drop(client);
        if !findings.is_empty() {
            self.create_partitions(&BTreeSet::from([month])).await?;
        }
        Ok(findings)
    }
}
