//! The in-memory store: the embedded default for the demo, and the reference implementation
//! that the conformance suite holds every other store to.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::model::{
    ApiToken, HealthCheck, HealthStatus, ManagedServer, MetricsRecord, MetricsSample, NewServer,
    ProbeTarget, ServerId, ServerStatus,
};
use crate::store::{History, HistoryQuery, Registry, ServerFilter, Store, StoreError};

/// Keeps the registry and a bounded history in memory.
///
/// History is capped per server ([`InMemoryStore::with_history_limit`], default 1,000 rows of
/// each kind), oldest dropped first, so a long-running demo stays small.
#[derive(Debug)]
pub struct InMemoryStore {
    state: Mutex<State>,
    history_limit: usize,
}

#[derive(Debug, Default)]
struct State {
    servers: HashMap<ServerId, Entry>,
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
        }
    }

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
    }
}

fn trim<V>(map: &mut BTreeMap<OffsetDateTime, V>, limit: usize) {
    while map.len() > limit {
        map.pop_first();
    }
}

#[async_trait]
impl Store for InMemoryStore {
    async fn health_targets(&self) -> Result<Vec<ProbeTarget>, StoreError> {
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

    async fn metrics_targets(&self) -> Result<Vec<ProbeTarget>, StoreError> {
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
        for check in checks {
            let Some(entry) = state.servers.get_mut(&check.server_id) else {
                continue;
            };
            entry.health.insert(check.timestamp, check.clone());
            trim(&mut entry.health, self.history_limit);
            let s = &mut entry.server;
            if s.last_health_check_at.is_none_or(|t| t <= check.timestamp) {
                s.last_health_check_at = Some(check.timestamp);
                s.health_status = Some(check.status);
            }
            if check.responded && s.last_seen_at.is_none_or(|t| t < check.timestamp) {
                s.last_seen_at = Some(check.timestamp);
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
impl Registry for InMemoryStore {
    async fn create_server(&self, new: NewServer) -> Result<ManagedServer, StoreError> {
        let mut state = self.state();
        if state.servers.values().any(|e| e.server.name == new.name) {
            return Err(StoreError::Conflict(format!(
                "a server named `{}` already exists",
                new.name
            )));
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
            health_status: None,
            last_seen_at: None,
            last_health_check_at: None,
            last_metrics_error: None,
            last_metrics_error_at: None,
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

    async fn list_servers(&self, filter: &ServerFilter) -> Result<Vec<ManagedServer>, StoreError> {
        let state = self.state();
        let search = filter.search.as_ref().map(|s| s.to_lowercase());
        let mut found: Vec<&ManagedServer> = state
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
            .filter(|s| {
                search.as_ref().is_none_or(|q| {
                    s.name.to_lowercase().contains(q)
                        || s.hostname
                            .as_ref()
                            .is_some_and(|h| h.to_lowercase().contains(q))
                })
            })
            .collect();
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found
            .into_iter()
            .skip(filter.offset)
            .take(filter.limit.unwrap_or(usize::MAX))
            .cloned()
            .collect())
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
        Ok(self.state().servers.remove(&id).is_some())
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_the_conformance_suite() {
        crate::conformance::run_all(|| async { InMemoryStore::new() }).await;
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
