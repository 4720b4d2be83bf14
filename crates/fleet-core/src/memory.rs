//! The in-memory store: the embedded default for the demo, and the reference implementation
//! that the conformance suite holds every other store to.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::model::{
    ApiToken, GroupFields, GroupId, HealthCheck, HealthStatus, LlmUsage, ManagedServer,
    MetricsRecord, MetricsSample, NewServer, ProbeTarget, Role, ServerGroup, ServerId,
    ServerStatus, ServerUpdate, StateChange, TokenRecord, counter_increase,
};
use crate::rollup::{HealthRollup, MetricsRollup, Resolution};
use crate::series::{HealthBucket, MetricsBucket, SeriesWindow, health_buckets, metrics_buckets};
use crate::store::{
    AdminTokens, ChangeLog, ChangeQuery, Counts, Groups, History, HistoryQuery, Ping, Registry,
    ServerFilter, ServerTally, SessionRecord, Sessions, SortKey, Store, StoreError, health_rank,
};
use crate::targets::Targets;

/// Keeps the registry and a bounded history in memory.
///
/// History is capped per server ([`InMemoryStore::with_history_limit`], default 1,000 rows of
/// each kind), oldest dropped first, so a long-running demo stays small.
#[derive(Debug)]
pub struct InMemoryStore {
    state: Mutex<State>,
    history_limit: usize,
    token_lookups: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    servers: HashMap<ServerId, Entry>,
    groups: HashMap<GroupId, ServerGroup>,
    tokens: Vec<(TokenRecord, [u8; 32])>,
    /// The state-change log, oldest first, capped at `history_limit` times
    /// [`InMemoryStore::CHANGES_PER_LIMIT`].
    changes: VecDeque<StateChange>,
    last_change_id: i64,
    sessions: HashMap<[u8; 32], SessionRecord>,
}

impl State {
    /// A logged change under its server's name now, as the log is read back.
    fn named(&self, c: &StateChange) -> StateChange {
        StateChange {
            server_name: self
                .servers
                .get(&c.server_id)
                .map_or_else(|| c.server_name.clone(), |e| e.server.name.clone()),
            ..c.clone()
        }
    }

    /// Names are unique case-insensitively.
    fn name_taken(&self, name: &str, except: Option<ServerId>) -> bool {
        let name = name.to_lowercase();
        self.servers
            .values()
            .any(|e| e.server.name.to_lowercase() == name && Some(e.server.id) != except)
    }
}

fn conflict(name: &str) -> StoreError {
    StoreError::Conflict(format!("a server named `{name}` already exists"))
}

#[derive(Debug)]
struct Entry {
    server: ManagedServer,
    token: Option<ApiToken>,
    health: BTreeMap<OffsetDateTime, HealthCheck>,
    metrics: BTreeMap<OffsetDateTime, MetricsSample>,
}

impl Default for InMemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::with_history_limit(1_000)
    }

    /// An empty store keeping at most `limit` history rows of each kind per server.
    pub fn with_history_limit(limit: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            history_limit: limit.max(1),
            token_lookups: AtomicU64::new(0),
        }
    }

    /// How many token lookups the store has answered (a client over its failure limit must
    /// cause none).
    pub fn token_lookups(&self) -> u64 {
        self.token_lookups.load(Ordering::Relaxed)
    }

    /// The state-change log keeps this many times the per-server history limit, fleet-wide.
    pub const CHANGES_PER_LIMIT: usize = 10;

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn target(entry: &Entry) -> ProbeTarget {
    ProbeTarget {
        id: entry.server.id,
        name: entry.server.name.clone(),
        api_url: entry.server.api_url.clone(),
        token: entry.token.clone(),
        unreadable_token: None,
        health: entry.server.health_status,
        kind: entry.server.kind,
        metrics_path: entry.server.metrics_path.clone(),
        ca_cert: entry.server.ca_cert.clone(),
        fence: None,
        checked_ago: None,
    }
}

fn trim<V>(map: &mut BTreeMap<OffsetDateTime, V>, limit: usize) {
    while map.len() > limit {
        map.pop_first();
    }
}

#[async_trait]
impl Store for InMemoryStore {
    async fn health_targets(&self) -> Result<Targets, StoreError> {
        let state = self.state();
        let mut due: Vec<&Entry> = state
            .servers
            .values()
            .filter(|e| e.server.status == ServerStatus::Active)
            .collect();
        // Never-checked first (None sorts first), then stalest; the id breaks ties.
        due.sort_by_key(|e| (e.server.last_health_check_at, e.server.id));
        Ok(due.into_iter().map(target).collect())
    }

    async fn metrics_targets(&self) -> Result<Targets, StoreError> {
        let state = self.state();
        let mut due: Vec<&Entry> = state
            .servers
            .values()
            .filter(|e| {
                e.server.status == ServerStatus::Active
                    && matches!(
                        e.server.health_status,
                        Some(HealthStatus::Healthy | HealthStatus::Degraded)
                    )
            })
            .collect();
        // Most recently seen first; never seen last.
        due.sort_by_key(|e| (std::cmp::Reverse(e.server.last_seen_at), e.server.id));
        Ok(due.into_iter().map(target).collect())
    }

    async fn record_health(&self, checks: &[HealthCheck]) -> Result<(), StoreError> {
        let mut state = self.state();
        let mut changes = Vec::new();
        for check in checks {
            let Some(entry) = state.servers.get_mut(&check.server_id) else {
                continue;
            };
            if entry
                .health
                .insert(check.timestamp, check.clone())
                .is_some()
            {
                // Written before: a retried batch moves nothing and logs no change again.
                continue;
            }
            trim(&mut entry.health, self.history_limit);
            let s = &mut entry.server;
            let newer = s.last_health_check_at.is_none_or(|t| t < check.timestamp);
            if newer && s.health_status != Some(check.status) {
                let change = StateChange {
                    id: 0,
                    server_id: s.id,
                    server_name: s.name.clone(),
                    changed_at: check.timestamp,
                    from_status: s.health_status,
                    to_status: check.status,
                    error_message: check.error_message.clone(),
                };
                changes.push(change);
            }
            if s.last_health_check_at.is_none_or(|t| t <= check.timestamp) {
                s.last_health_check_at = Some(check.timestamp);
                s.health_status = Some(check.status);
                s.last_response_time_ms = check.response_time_ms;
                s.last_error = check.error_message.clone();
            }
            if check.responded && s.last_seen_at.is_none_or(|t| t < check.timestamp) {
                s.last_seen_at = Some(check.timestamp);
            }
        }
        let cap = self.history_limit.saturating_mul(Self::CHANGES_PER_LIMIT);
        for mut change in changes {
            state.last_change_id += 1;
            change.id = state.last_change_id;
            state.changes.push_back(change);
            if state.changes.len() > cap {
                state.changes.pop_front();
            }
        }
        Ok(())
    }

    async fn record_metrics(&self, records: &[MetricsRecord]) -> Result<(), StoreError> {
        let mut state = self.state();
        for record in records {
            let Some(entry) = state.servers.get_mut(&record.server_id()) else {
                continue;
            };
            match record {
                MetricsRecord::Sample(sample) => {
                    entry.metrics.insert(sample.timestamp, sample.clone());
                    trim(&mut entry.metrics, self.history_limit);
                }
                MetricsRecord::Failure(f) => {
                    let s = &mut entry.server;
                    if s.last_metrics_error_at.is_none_or(|t| t <= f.timestamp) {
                        s.last_metrics_error_at = Some(f.timestamp);
                        s.last_metrics_error = Some(f.error.clone());
                    }
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Counts for InMemoryStore {
    async fn server_tallies(&self) -> Result<Vec<ServerTally>, StoreError> {
        let state = self.state();
        let mut groups: BTreeMap<_, u64> = BTreeMap::new();
        for e in state.servers.values() {
            let s = &e.server;
            *groups
                .entry((
                    s.status,
                    s.health_status,
                    s.region.clone(),
                    s.environment.clone(),
                ))
                .or_default() += 1;
        }
        Ok(groups
            .into_iter()
            .map(
                |((status, health, region, environment), count)| ServerTally {
                    status,
                    health,
                    region,
                    environment,
                    count,
                },
            )
            .collect())
    }
}

#[async_trait]
impl ChangeLog for InMemoryStore {
    async fn state_changes(&self, query: ChangeQuery) -> Result<Vec<StateChange>, StoreError> {
        let state = self.state();
        Ok(state
            .changes
            .iter()
            .rev()
            .filter(|c| query.server.is_none_or(|id| c.server_id == id))
            .skip(query.offset)
            .take(query.limit)
            .map(|c| state.named(c))
            .collect())
    }

    async fn changes_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<StateChange>, StoreError> {
        let state = self.state();
        // Ids increase along the log, so the first one past `after` is found by halving.
        let start = state.changes.partition_point(|c| c.id <= after);
        Ok(state
            .changes
            .range(start..)
            .take(limit)
            .map(|c| state.named(c))
            .collect())
    }

    async fn change_ids(&self) -> Result<Option<(i64, i64)>, StoreError> {
        let state = self.state();
        Ok(state
            .changes
            .front()
            .zip(state.changes.back())
            .map(|(a, b)| (a.id, b.id)))
    }
}

#[async_trait]
impl Registry for InMemoryStore {
    async fn create_server(&self, new: NewServer) -> Result<ManagedServer, StoreError> {
        let new = new.validated()?;
        let mut state = self.state();
        if state.name_taken(&new.name, None) {
            return Err(conflict(&new.name));
        }
        let server = ManagedServer {
            id: ServerId::new(),
            name: new.name,
            description: new.description,
            hostname: new.hostname,
            api_url: new.api_url,
            region: new.region,
            environment: new.environment,
            tags: new.tags,
            metadata: new.metadata,
            status: new.status,
            kind: new.kind,
            metrics_path: new.metrics_path,
            ca_cert: new.ca_cert,
            health_status: None,
            last_seen_at: None,
            last_health_check_at: None,
            last_metrics_error: None,
            last_metrics_error_at: None,
            last_response_time_ms: None,
            last_error: None,
        };
        state.servers.insert(
            server.id,
            Entry {
                server: server.clone(),
                token: new.api_token,
                health: BTreeMap::new(),
                metrics: BTreeMap::new(),
            },
        );
        Ok(server)
    }

    async fn get_server(&self, id: ServerId) -> Result<Option<ManagedServer>, StoreError> {
        Ok(self.state().servers.get(&id).map(|e| e.server.clone()))
    }

    async fn probe_target(&self, id: ServerId) -> Result<Option<ProbeTarget>, StoreError> {
        Ok(self.state().servers.get(&id).map(target))
    }

    async fn list_servers(&self, filter: &ServerFilter) -> Result<Vec<ManagedServer>, StoreError> {
        let state = self.state();
        let mut found = matching(&state, filter);
        let rank = |s: &ManagedServer| -> Option<i128> {
            match filter.sort.key {
                SortKey::Name => Some(0),
                SortKey::Health => s.health_status.map(|h| i128::from(health_rank(h))),
                SortKey::LastSeen => s.last_seen_at.map(|t| t.unix_timestamp_nanos()),
                SortKey::ResponseTime => s.last_response_time_ms.map(i128::from),
            }
        };
        let descending = filter.sort.descending;
        found.sort_by(|a, b| {
            let by_key = match (rank(a), rank(b)) {
                (Some(x), Some(y)) if descending => y.cmp(&x),
                (Some(x), Some(y)) => x.cmp(&y),
                // Without a value: last, in either direction.
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
            };
            let by_name = a.name.to_lowercase().cmp(&b.name.to_lowercase());
            let by_name = if descending && filter.sort.key == SortKey::Name {
                by_name.reverse()
            } else {
                by_name
            };
            by_key.then(by_name).then(a.id.cmp(&b.id))
        });
        Ok(found
            .into_iter()
            .skip(filter.offset)
            .take(filter.limit.unwrap_or(usize::MAX))
            .cloned()
            .collect())
    }

    async fn count_servers(&self, filter: &ServerFilter) -> Result<u64, StoreError> {
        Ok(matching(&self.state(), filter).len() as u64)
    }

    async fn set_server_status(
        &self,
        id: ServerId,
        status: ServerStatus,
    ) -> Result<bool, StoreError> {
        Ok(match self.state().servers.get_mut(&id) {
            Some(e) => {
                e.server.status = status;
                true
            }
            None => false,
        })
    }

    async fn delete_server(&self, id: ServerId) -> Result<bool, StoreError> {
        let mut state = self.state();
        for g in state.groups.values_mut() {
            g.members.retain(|m| *m != id);
        }
        state.changes.retain(|c| c.server_id != id);
        Ok(state.servers.remove(&id).is_some())
    }

    async fn update_server(
        &self,
        id: ServerId,
        u: ServerUpdate,
    ) -> Result<Option<ManagedServer>, StoreError> {
        let u = u.validated()?;
        let mut state = self.state();
        if let Some(name) = &u.name
            && state.name_taken(name, Some(id))
        {
            return Err(conflict(name));
        }
        let Some(entry) = state.servers.get_mut(&id) else {
            return Ok(None);
        };
        let s = &mut entry.server;
        if let Some(v) = u.name {
            s.name = v;
        }
        if let Some(v) = u.api_url {
            s.api_url = v;
        }
        if let Some(v) = u.description {
            s.description = v;
        }
        if let Some(v) = u.hostname {
            s.hostname = v;
        }
        if let Some(v) = u.region {
            s.region = v;
        }
        if let Some(v) = u.environment {
            s.environment = v;
        }
        if let Some(v) = u.tags {
            s.tags = v;
        }
        if let Some(v) = u.metadata {
            s.metadata = v;
        }
        if let Some(v) = u.kind {
            s.kind = v;
        }
        if let Some(v) = u.metrics_path {
            s.metrics_path = v;
        }
        if let Some(v) = u.ca_cert {
            s.ca_cert = v;
        }
        if let Some(v) = u.status {
            s.status = v;
        }
        if let Some(t) = u.api_token {
            entry.token = Some(t);
        }
        Ok(Some(entry.server.clone()))
    }
}

#[async_trait]
impl Ping for InMemoryStore {
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

fn apply(g: &mut ServerGroup, f: GroupFields) {
    if let Some(v) = f.name {
        g.name = v;
    }
    if let Some(v) = f.description {
        g.description = v;
    }
    if let Some(v) = f.color {
        g.color = v;
    }
    if let Some(v) = f.tags {
        g.tags = v;
    }
    if let Some(v) = f.regions {
        g.regions = v;
    }
    if let Some(v) = f.environments {
        g.environments = v;
    }
}

fn group_conflict(name: &str) -> StoreError {
    StoreError::Conflict(format!("a group named `{name}` already exists"))
}

#[async_trait]
impl Groups for InMemoryStore {
    async fn create_group(&self, fields: GroupFields) -> Result<ServerGroup, StoreError> {
        let Some(name) = fields.name.clone() else {
            return Err(StoreError::Invalid("a group needs a name".into()));
        };
        let mut state = self.state();
        if state.groups.values().any(|g| g.name == name) {
            return Err(group_conflict(&name));
        }
        let mut g = ServerGroup {
            id: GroupId(uuid::Uuid::new_v4()),
            name,
            description: None,
            color: None,
            tags: Vec::new(),
            regions: Vec::new(),
            environments: Vec::new(),
            members: Vec::new(),
        };
        apply(&mut g, fields);
        state.groups.insert(g.id, g.clone());
        Ok(g)
    }

    async fn list_groups(&self) -> Result<Vec<ServerGroup>, StoreError> {
        let mut all: Vec<ServerGroup> = self.state().groups.values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    async fn get_group(&self, id: GroupId) -> Result<Option<ServerGroup>, StoreError> {
        Ok(self.state().groups.get(&id).cloned())
    }

    async fn update_group(
        &self,
        id: GroupId,
        fields: GroupFields,
    ) -> Result<Option<ServerGroup>, StoreError> {
        let mut state = self.state();
        if let Some(name) = &fields.name
            && state.groups.values().any(|g| &g.name == name && g.id != id)
        {
            return Err(group_conflict(name));
        }
        let Some(g) = state.groups.get_mut(&id) else {
            return Ok(None);
        };
        apply(g, fields);
        Ok(Some(g.clone()))
    }

    async fn delete_group(&self, id: GroupId) -> Result<bool, StoreError> {
        Ok(self.state().groups.remove(&id).is_some())
    }

    async fn add_member(&self, group: GroupId, server: ServerId) -> Result<bool, StoreError> {
        let mut state = self.state();
        if !state.servers.contains_key(&server) {
            return Ok(false);
        }
        let Some(g) = state.groups.get_mut(&group) else {
            return Ok(false);
        };
        if !g.members.contains(&server) {
            g.members.push(server);
            g.members.sort();
        }
        Ok(true)
    }

    async fn remove_member(&self, group: GroupId, server: ServerId) -> Result<bool, StoreError> {
        let mut state = self.state();
        let Some(g) = state.groups.get_mut(&group) else {
            return Ok(false);
        };
        let before = g.members.len();
        g.members.retain(|m| *m != server);
        Ok(g.members.len() < before)
    }

    async fn add_members(
        &self,
        group: GroupId,
        servers: &[ServerId],
    ) -> Result<Option<u64>, StoreError> {
        let mut state = self.state();
        let known: Vec<ServerId> = servers
            .iter()
            .filter(|s| state.servers.contains_key(s))
            .copied()
            .collect();
        let Some(g) = state.groups.get_mut(&group) else {
            return Ok(None);
        };
        let before = g.members.len();
        g.members.extend(known);
        g.members.sort();
        g.members.dedup();
        Ok(Some((g.members.len() - before) as u64))
    }

    async fn remove_members(
        &self,
        group: GroupId,
        servers: &[ServerId],
    ) -> Result<Option<u64>, StoreError> {
        let mut state = self.state();
        let Some(g) = state.groups.get_mut(&group) else {
            return Ok(None);
        };
        let before = g.members.len();
        g.members.retain(|m| !servers.contains(m));
        Ok(Some((before - g.members.len()) as u64))
    }
}

/// The servers a filter selects, its order, limit and offset aside.
fn matching<'a>(state: &'a State, filter: &ServerFilter) -> Vec<&'a ManagedServer> {
    let search = filter.search.as_ref().map(|s| s.to_lowercase());
    let contains =
        |v: &Option<String>, q: &str| v.as_ref().is_some_and(|v| v.to_lowercase().contains(q));
    let members = filter.group.map(|g| {
        state
            .groups
            .get(&g)
            .map(|g| g.members.clone())
            .unwrap_or_default()
    });
    state
        .servers
        .values()
        .map(|e| &e.server)
        .filter(|s| filter.status.is_none_or(|v| s.status == v))
        .filter(|s| {
            filter
                .health_status
                .is_none_or(|v| s.health_status == Some(v))
        })
        .filter(|s| {
            filter
                .region
                .as_ref()
                .is_none_or(|v| s.region.as_ref() == Some(v))
        })
        .filter(|s| {
            filter
                .environment
                .as_ref()
                .is_none_or(|v| s.environment.as_ref() == Some(v))
        })
        .filter(|s| filter.tag.as_ref().is_none_or(|v| s.tags.contains(v)))
        .filter(|s| members.as_ref().is_none_or(|m| m.contains(&s.id)))
        .filter(|s| {
            search.as_ref().is_none_or(|q| {
                s.name.to_lowercase().contains(q)
                    || contains(&s.hostname, q)
                    || contains(&s.region, q)
                    || s.tags.iter().any(|t| t.to_lowercase().contains(q))
            })
        })
        .collect()
}

#[async_trait]
impl AdminTokens for InMemoryStore {
    async fn insert_token(
        &self,
        name: &str,
        role: Role,
        sha256: [u8; 32],
    ) -> Result<TokenRecord, StoreError> {
        let mut state = self.state();
        if state.tokens.iter().any(|(t, _)| t.name == name) {
            return Err(StoreError::Conflict(format!(
                "a token named `{name}` already exists"
            )));
        }
        let record = TokenRecord {
            id: uuid::Uuid::new_v4(),
            name: name.to_owned(),
            role,
            created_at: OffsetDateTime::now_utc(),
            revoked_at: None,
        };
        state.tokens.push((record.clone(), sha256));
        Ok(record)
    }

    async fn find_token(&self, sha256: [u8; 32]) -> Result<Option<TokenRecord>, StoreError> {
        self.token_lookups.fetch_add(1, Ordering::Relaxed);
        Ok(self
            .state()
            .tokens
            .iter()
            .find(|(t, h)| *h == sha256 && t.revoked_at.is_none())
            .map(|(t, _)| t.clone()))
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let mut all: Vec<TokenRecord> =
            self.state().tokens.iter().map(|(t, _)| t.clone()).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    async fn revoke_token(&self, name: &str) -> Result<bool, StoreError> {
        let mut state = self.state();
        match state
            .tokens
            .iter_mut()
            .find(|(t, _)| t.name == name && t.revoked_at.is_none())
        {
            Some((t, hash)) => {
                t.revoked_at = Some(OffsetDateTime::now_utc());
                let hash = *hash;
                state.sessions.retain(|_, s| s.token_sha256 != hash);
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

#[async_trait]
impl Sessions for InMemoryStore {
    async fn create_session(&self, session: SessionRecord) -> Result<(), StoreError> {
        let mut state = self.state();
        let now = session.created_at;
        state
            .sessions
            .retain(|_, s| s.expires_at > now && s.idle_expires_at > now);
        state.sessions.insert(session.sha256, session);
        Ok(())
    }

    async fn find_session(
        &self,
        sha256: [u8; 32],
        now: OffsetDateTime,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let state = self.state();
        let Some(s) = state.sessions.get(&sha256) else {
            return Ok(None);
        };
        let revoked = state
            .tokens
            .iter()
            .any(|(t, h)| *h == s.token_sha256 && t.revoked_at.is_some());
        let live = s.expires_at > now && s.idle_expires_at > now && !revoked;
        Ok(live.then(|| s.clone()))
    }

    async fn touch_session(
        &self,
        sha256: [u8; 32],
        idle_expires_at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        if let Some(s) = self.state().sessions.get_mut(&sha256) {
            s.idle_expires_at = idle_expires_at.min(s.expires_at);
        }
        Ok(())
    }

    async fn delete_session(&self, sha256: [u8; 32]) -> Result<bool, StoreError> {
        Ok(self.state().sessions.remove(&sha256).is_some())
    }
}

fn window<V: Clone>(map: &BTreeMap<OffsetDateTime, V>, q: HistoryQuery) -> Vec<V> {
    map.iter()
        .rev()
        .filter(|(t, _)| q.from.is_none_or(|f| **t >= f) && q.to.is_none_or(|to| **t < to))
        .take(q.limit)
        .map(|(_, v)| v.clone())
        .collect()
}

/// Rows (newest first) whose period starts in the query's window, at most its limit.
fn in_window<R>(rows: Vec<R>, start: impl Fn(&R) -> OffsetDateTime, q: HistoryQuery) -> Vec<R> {
    rows.into_iter()
        .filter(|r| {
            let t = start(r);
            q.from.is_none_or(|f| t >= f) && q.to.is_none_or(|to| t < to)
        })
        .take(q.limit)
        .collect()
}

#[async_trait]
impl History for InMemoryStore {
    async fn health_history(
        &self,
        id: ServerId,
        query: HistoryQuery,
    ) -> Result<Vec<HealthCheck>, StoreError> {
        Ok(self
            .state()
            .servers
            .get(&id)
            .map(|e| window(&e.health, query))
            .unwrap_or_default())
    }

    async fn metrics_history(
        &self,
        id: ServerId,
        query: HistoryQuery,
    ) -> Result<Vec<MetricsSample>, StoreError> {
        Ok(self
            .state()
            .servers
            .get(&id)
            .map(|e| window(&e.metrics, query))
            .unwrap_or_default())
    }

    /// Rolled up on the fly from the rows kept; with no clock here, a period is closed once
    /// a later period has a row.
    async fn health_rollups(
        &self,
        id: ServerId,
        res: Resolution,
        query: HistoryQuery,
    ) -> Result<Vec<HealthRollup>, StoreError> {
        let state = self.state();
        let Some(e) = state.servers.get(&id).filter(|_| res != Resolution::Raw) else {
            return Ok(Vec::new());
        };
        let closed = e.health.keys().next_back().map(|t| res.floor(*t));
        let all = crate::rollup::health_rollups(
            res,
            e.health.values(),
            closed.unwrap_or(OffsetDateTime::UNIX_EPOCH),
        );
        Ok(in_window(all, |r| r.period_start, query))
    }

    async fn metrics_rollups(
        &self,
        id: ServerId,
        res: Resolution,
        query: HistoryQuery,
    ) -> Result<Vec<MetricsRollup>, StoreError> {
        let state = self.state();
        let Some(e) = state.servers.get(&id).filter(|_| res != Resolution::Raw) else {
            return Ok(Vec::new());
        };
        let closed = e.metrics.keys().next_back().map(|t| res.floor(*t));
        let all = crate::rollup::metrics_rollups(
            res,
            e.metrics.values(),
            closed.unwrap_or(OffsetDateTime::UNIX_EPOCH),
        );
        Ok(in_window(all, |r| r.period_start, query))
    }

    async fn llm_usage(
        &self,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<LlmUsage>, StoreError> {
        let state = self.state();
        let mut out: Vec<LlmUsage> = state
            .servers
            .values()
            .filter_map(|e| {
                let in_window: Vec<&MetricsSample> =
                    e.metrics.range(from..to).map(|(_, s)| s).collect();
                if in_window.len() < 2 {
                    return None;
                }
                Some(LlmUsage {
                    server_id: e.server.id,
                    requests: counter_increase(
                        in_window.iter().filter_map(|s| s.values.llm_requests),
                    ),
                    cost_usd: counter_increase(
                        in_window.iter().filter_map(|s| s.values.llm_cost_usd),
                    ),
                })
            })
            .collect();
        out.sort_by_key(|u| u.server_id);
        Ok(out)
    }

    async fn recent_checks(
        &self,
        servers: &[ServerId],
        per_server: usize,
    ) -> Result<Vec<(ServerId, Vec<HealthCheck>)>, StoreError> {
        let state = self.state();
        Ok(servers
            .iter()
            .filter_map(|id| {
                let e = state.servers.get(id)?;
                Some((
                    *id,
                    e.health.values().rev().take(per_server).cloned().collect(),
                ))
            })
            .collect())
    }

    async fn health_series(
        &self,
        id: ServerId,
        window: SeriesWindow,
    ) -> Result<Vec<HealthBucket>, StoreError> {
        let state = self.state();
        Ok(state
            .servers
            .get(&id)
            .map(|e| {
                health_buckets(
                    &window,
                    e.health.range(window.from..window.to).map(|(_, c)| c),
                )
            })
            .unwrap_or_default())
    }

    async fn metrics_series(
        &self,
        id: ServerId,
        window: SeriesWindow,
    ) -> Result<Vec<MetricsBucket>, StoreError> {
        let state = self.state();
        Ok(state
            .servers
            .get(&id)
            .map(|e| {
                metrics_buckets(
                    &window,
                    e.metrics.range(window.from..window.to).map(|(_, s)| s),
                )
            })
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    mod conformance {
        use super::*;

        crate::store_conformance_tests!(|| async { ((), InMemoryStore::new()) });
    }

    #[tokio::test]
    async fn history_is_capped_per_server() {
        let store = InMemoryStore::with_history_limit(3);
        let s = store
            .create_server(NewServer::new("a", "http://127.0.0.1:1"))
            .await
            .unwrap();
        let t0 = OffsetDateTime::UNIX_EPOCH;
        let checks: Vec<HealthCheck> = (0..5)
            .map(|i| {
                crate::conformance::check_at(
                    s.id,
                    t0 + time::Duration::seconds(i),
                    HealthStatus::Healthy,
                )
            })
            .collect();
        store.record_health(&checks).await.unwrap();
        let h = store
            .health_history(s.id, HistoryQuery::default())
            .await
            .unwrap();
        assert_eq!(
            h.iter().map(|c| c.timestamp).collect::<Vec<_>>(),
            (2..5)
                .rev()
                .map(|i| t0 + time::Duration::seconds(i))
                .collect::<Vec<_>>()
        );
    }
}
