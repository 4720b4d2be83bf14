//! The store conformance suite: every [`Store`] runs it, so a new backend proves itself by
//! passing it. [`store_conformance_tests!`](crate::store_conformance_tests) declares one test
//! per case, each on a fresh, empty store from the factory.
//!
//! ```text
//! fleet_core::store_conformance_tests!(|| async { ((), MyStore::connect_fresh().await) });
//! ```

use serde_json::json;
use time::{Duration, OffsetDateTime};

use crate::model::{
    ApiToken, GroupFields, HealthCheck, HealthStatus, MetricValues, MetricsFailure, MetricsRecord,
    MetricsSample, NewServer, Period, Role, ServerId, ServerStatus, ServerUpdate,
};
use crate::store::{
    AdminTokens, ChangeLog, ChangeQuery, Counts, Groups, History, HistoryQuery, Registry,
    ServerFilter, Store, StoreError,
};

/// A store the suite can drive: the workers' side, the registry, groups, tokens, history and
/// the state-change log.
pub trait ConformingStore:
    Store + Registry + History + Groups + AdminTokens + ChangeLog + Counts
{
}
impl<T: Store + Registry + History + Groups + AdminTokens + ChangeLog + Counts> ConformingStore
    for T
{
}

/// A fixed, whole-second base time (2026-03-31 23:59:00 UTC), so stores with microsecond
/// precision compare equal.
pub fn base_time() -> OffsetDateTime {
    time::macros::datetime!(2026-03-31 23:59:00 UTC)
}

/// A successful health check of `server` at `at` with status `status`.
pub fn check_at(server: ServerId, at: OffsetDateTime, status: HealthStatus) -> HealthCheck {
    let unhealthy = status != HealthStatus::Healthy;
    HealthCheck {
        server_id: server,
        timestamp: at,
        status,
        response_time_ms: Some(12),
        database_healthy: Some(status != HealthStatus::Critical),
        redis_healthy: Some(true),
        services_healthy: Some(status == HealthStatus::Healthy),
        error_message: unhealthy.then(|| "unhealthy: services (unhealthy)".to_owned()),
        error_details: unhealthy.then(|| json!({"services": "unhealthy"})),
        responded: status != HealthStatus::Unreachable,
        successful: status != HealthStatus::Unreachable,
    }
}

/// A sample of `server` at `at` with a few values set.
pub fn sample_at(server: ServerId, at: OffsetDateTime, cpu: f64) -> MetricsSample {
    MetricsSample {
        server_id: server,
        timestamp: at,
        period: Period::Raw,
        values: MetricValues {
            cpu_percent: Some(cpu),
            memory_percent: Some(50.5),
            network_rx_bytes: Some(1 << 40),
            llm_requests: Some(7),
            llm_cost_usd: Some(0.125),
            total_users: Some(3),
            ..Default::default()
        },
    }
}

fn secs(n: i64) -> Duration {
    Duration::seconds(n)
}

/// Declares one `#[tokio::test]` per conformance case, so that the first failure does not hide
/// the others. `$make` is an async closure returning `(guard, store)`: a fresh, empty store, and
/// whatever must live as long as it (a test database; `()` when nothing must).
///
/// ```text
/// fleet_core::store_conformance_tests!(|| async { ((), MyStore::connect_fresh().await) });
/// ```
#[macro_export]
macro_rules! store_conformance_tests {
    ($make:expr) => {
        $crate::store_conformance_tests!(@cases $make;
            health_targets_are_active_servers_stalest_first,
            metrics_targets_are_healthy_or_degraded_most_recently_seen_first,
            health_batch_lands_once_with_its_values,
            state_only_moves_forward,
            last_seen_moves_only_on_an_answer,
            metrics_land_once_and_failures_are_kept,
            results_for_removed_servers_do_not_block_the_batch,
            registry_refuses_duplicates_and_filters,
            history_windows_are_newest_first,
            tokens_reach_the_probe,
            servers_can_be_changed,
            groups_hold_members_and_filter_servers,
            groups_gain_and_lose_members_in_bulk,
            admin_tokens_are_found_by_hash_until_revoked,
            llm_usage_is_the_counters_increase_with_restarts,
            state_changes_are_logged_once_with_the_check,
            state_changes_page_newest_first_fleet_wide_and_per_server,
            servers_are_counted_by_status_health_region_and_environment
        );
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                let (_guard, store) = ($make)().await;
                $crate::conformance::$case(&store).await;
            }
        )*
    };
}

async fn add(store: &impl ConformingStore, name: &str) -> ServerId {
    store
        .create_server(NewServer::new(name, format!("http://127.0.0.1:9/{name}")))
        .await
        .expect("create server")
        .id
}

async fn names(store: &impl ConformingStore, health: bool) -> Vec<String> {
    let targets = if health {
        store.health_targets().await
    } else {
        store.metrics_targets().await
    };
    targets
        .expect("select targets")
        .into_iter()
        .map(|t| t.name)
        .collect()
}

#[doc(hidden)]
pub async fn health_targets_are_active_servers_stalest_first(store: &impl ConformingStore) {
    let t0 = base_time();
    let a = add(store, "a").await;
    let b = add(store, "b").await;
    let _never = add(store, "never").await;
    let off = add(store, "off").await;
    let maint = add(store, "maint").await;
    store
        .set_server_status(off, ServerStatus::Inactive)
        .await
        .unwrap();
    store
        .set_server_status(maint, ServerStatus::Maintenance)
        .await
        .unwrap();
    store
        .record_health(&[
            check_at(a, t0 + secs(20), HealthStatus::Healthy),
            check_at(b, t0 + secs(10), HealthStatus::Healthy),
            check_at(off, t0, HealthStatus::Healthy),
        ])
        .await
        .unwrap();
    assert_eq!(
        names(store, true).await,
        ["never", "b", "a"],
        "health targets"
    );
}

#[doc(hidden)]
pub async fn metrics_targets_are_healthy_or_degraded_most_recently_seen_first(
    store: &impl ConformingStore,
) {
    let t0 = base_time();
    let ids: Vec<ServerId> = {
        let mut v = Vec::new();
        for n in ["h-old", "h-new", "deg", "crit", "unr", "never", "h-off"] {
            v.push(add(store, n).await);
        }
        v
    };
    store
        .set_server_status(ids[6], ServerStatus::Inactive)
        .await
        .unwrap();
    store
        .record_health(&[
            check_at(ids[0], t0, HealthStatus::Healthy),
            check_at(ids[1], t0 + secs(30), HealthStatus::Healthy),
            check_at(ids[2], t0 + secs(20), HealthStatus::Degraded),
            check_at(ids[3], t0 + secs(40), HealthStatus::Critical),
            check_at(ids[4], t0 + secs(50), HealthStatus::Unreachable),
            check_at(ids[6], t0 + secs(60), HealthStatus::Healthy),
        ])
        .await
        .unwrap();
    assert_eq!(
        names(store, false).await,
        ["h-new", "deg", "h-old"],
        "metrics targets"
    );
}

#[doc(hidden)]
pub async fn health_batch_lands_once_with_its_values(store: &impl ConformingStore) {
    let t0 = base_time();
    let a = add(store, "a").await;
    let b = add(store, "b").await;
    // The batch straddles a month boundary (23:59:00 + 90 s is April).
    let batch = vec![
        check_at(a, t0, HealthStatus::Healthy),
        check_at(b, t0, HealthStatus::Critical),
        check_at(a, t0 + secs(90), HealthStatus::Degraded),
    ];
    store.record_health(&batch).await.unwrap();
    // A retried batch adds nothing.
    store.record_health(&batch).await.unwrap();
    let ha = store
        .health_history(a, HistoryQuery::default())
        .await
        .unwrap();
    assert_eq!(ha, vec![batch[2].clone(), batch[0].clone()], "history of a");
    let hb = store
        .health_history(b, HistoryQuery::default())
        .await
        .unwrap();
    assert_eq!(hb, vec![batch[1].clone()], "history of b");
    let sa = store.get_server(a).await.unwrap().unwrap();
    assert_eq!(sa.health_status, Some(HealthStatus::Degraded));
    assert_eq!(sa.last_health_check_at, Some(t0 + secs(90)));
    assert_eq!(sa.last_seen_at, Some(t0 + secs(90)));
}

#[doc(hidden)]
pub async fn state_only_moves_forward(store: &impl ConformingStore) {
    let t0 = base_time();
    let a = add(store, "a").await;
    store
        .record_health(&[check_at(a, t0 + secs(30), HealthStatus::Healthy)])
        .await
        .unwrap();
    // A late batch with an older check lands in history but does not rewind the state.
    store
        .record_health(&[check_at(a, t0, HealthStatus::Critical)])
        .await
        .unwrap();
    let s = store.get_server(a).await.unwrap().unwrap();
    assert_eq!(
        s.health_status,
        Some(HealthStatus::Healthy),
        "state moved back in time"
    );
    assert_eq!(s.last_health_check_at, Some(t0 + secs(30)));
    assert_eq!(s.last_seen_at, Some(t0 + secs(30)));
    assert_eq!(
        store
            .health_history(a, HistoryQuery::default())
            .await
            .unwrap()
            .len(),
        2
    );
}

#[doc(hidden)]
pub async fn last_seen_moves_only_on_an_answer(store: &impl ConformingStore) {
    let t0 = base_time();
    let a = add(store, "a").await;
    store
        .record_health(&[check_at(a, t0, HealthStatus::Healthy)])
        .await
        .unwrap();
    store
        .record_health(&[check_at(a, t0 + secs(30), HealthStatus::Unreachable)])
        .await
        .unwrap();
    let s = store.get_server(a).await.unwrap().unwrap();
    assert_eq!(s.health_status, Some(HealthStatus::Unreachable));
    assert_eq!(s.last_health_check_at, Some(t0 + secs(30)));
    assert_eq!(
        s.last_seen_at,
        Some(t0),
        "last_seen_at moved without an answer"
    );
}

#[doc(hidden)]
pub async fn metrics_land_once_and_failures_are_kept(store: &impl ConformingStore) {
    let t0 = base_time();
    let a = add(store, "a").await;
    let batch = vec![
        MetricsRecord::Sample(sample_at(a, t0, 12.5)),
        MetricsRecord::Sample(sample_at(a, t0 + secs(60), 13.0)),
        MetricsRecord::Failure(MetricsFailure {
            server_id: a,
            timestamp: t0 + secs(120),
            error: "metrics response field cpu_percent = 140 is out of range 0..=100".into(),
        }),
    ];
    store.record_metrics(&batch).await.unwrap();
    store.record_metrics(&batch[..2]).await.unwrap();
    let h = store
        .metrics_history(a, HistoryQuery::default())
        .await
        .unwrap();
    assert_eq!(
        h,
        vec![sample_at(a, t0 + secs(60), 13.0), sample_at(a, t0, 12.5)]
    );
    let s = store.get_server(a).await.unwrap().unwrap();
    assert_eq!(s.last_metrics_error_at, Some(t0 + secs(120)));
    assert!(s.last_metrics_error.unwrap().contains("cpu_percent = 140"));
}

#[doc(hidden)]
pub async fn results_for_removed_servers_do_not_block_the_batch(store: &impl ConformingStore) {
    let t0 = base_time();
    let a = add(store, "a").await;
    let gone = add(store, "gone").await;
    assert!(store.delete_server(gone).await.unwrap());
    assert!(!store.delete_server(gone).await.unwrap());
    store
        .record_health(&[
            check_at(gone, t0, HealthStatus::Healthy),
            check_at(a, t0, HealthStatus::Healthy),
        ])
        .await
        .unwrap();
    store
        .record_metrics(&[
            MetricsRecord::Sample(sample_at(gone, t0, 1.0)),
            MetricsRecord::Sample(sample_at(a, t0, 1.0)),
        ])
        .await
        .unwrap();
    assert_eq!(
        store
            .health_history(a, HistoryQuery::default())
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        store
            .metrics_history(a, HistoryQuery::default())
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(store.get_server(gone).await.unwrap().is_none());
}

#[doc(hidden)]
pub async fn registry_refuses_duplicates_and_filters(store: &impl ConformingStore) {
    let mut web = NewServer::new("web-1", "https://127.0.0.1:8443");
    web.hostname = Some("Web-Host.example".into());
    web.region = Some("eu".into());
    web.environment = Some("production".into());
    web.tags = vec!["edge".into(), "web".into()];
    let web = store.create_server(web).await.unwrap();
    assert_eq!(web.status, ServerStatus::Active);
    assert_eq!(web.health_status, None);
    let err = store
        .create_server(NewServer::new("web-1", "http://127.0.0.1:1"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict(_)),
        "duplicate name gave {err:?}"
    );
    // Names are trimmed and unique whatever their case; bad ones are refused by every store.
    let err = store
        .create_server(NewServer::new("  WEB-1 ", "http://127.0.0.1:1"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict(m) if m.contains("WEB-1")),
        "a name differing in case gave {err:?}"
    );
    let err = store
        .create_server(NewServer::new("evil\u{1b}[2J", "http://127.0.0.1:1"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Invalid(m) if m.starts_with("name must not contain")),
        "{err:?}"
    );
    let err = store
        .create_server(NewServer::new("creds", "http://admin:hunter2@127.0.0.1:1"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Invalid(m) if m.starts_with("api_url must not carry credentials")),
        "{err:?}"
    );
    let mut db = NewServer::new("db-1", "http://127.0.0.1:5");
    db.region = Some("us".into());
    db.status = ServerStatus::Maintenance;
    store.create_server(db).await.unwrap();

    let list = |f: ServerFilter| async move {
        store
            .list_servers(&f)
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect::<Vec<_>>()
    };
    assert_eq!(list(ServerFilter::default()).await, ["db-1", "web-1"]);
    assert_eq!(
        list(ServerFilter {
            region: Some("eu".into()),
            ..Default::default()
        })
        .await,
        ["web-1"]
    );
    assert_eq!(
        list(ServerFilter {
            status: Some(ServerStatus::Maintenance),
            ..Default::default()
        })
        .await,
        ["db-1"]
    );
    assert_eq!(
        list(ServerFilter {
            tag: Some("edge".into()),
            ..Default::default()
        })
        .await,
        ["web-1"]
    );
    assert_eq!(
        list(ServerFilter {
            search: Some("web-host".into()),
            ..Default::default()
        })
        .await,
        ["web-1"]
    );
    assert_eq!(
        list(ServerFilter {
            environment: Some("production".into()),
            ..Default::default()
        })
        .await,
        ["web-1"]
    );
    assert_eq!(
        list(ServerFilter {
            limit: Some(1),
            offset: 1,
            ..Default::default()
        })
        .await,
        ["web-1"]
    );
    assert!(
        list(ServerFilter {
            health_status: Some(HealthStatus::Healthy),
            ..Default::default()
        })
        .await
        .is_empty()
    );
    let got = store.get_server(web.id).await.unwrap().unwrap();
    assert_eq!(got, web);
    assert!(store.get_server(ServerId::new()).await.unwrap().is_none());
    assert!(
        !store
            .set_server_status(ServerId::new(), ServerStatus::Active)
            .await
            .unwrap()
    );
}

#[doc(hidden)]
pub async fn history_windows_are_newest_first(store: &impl ConformingStore) {
    let t0 = base_time();
    let a = add(store, "a").await;
    let checks: Vec<HealthCheck> = (0..5)
        .map(|i| check_at(a, t0 + secs(i * 30), HealthStatus::Healthy))
        .collect();
    store.record_health(&checks).await.unwrap();
    let q = HistoryQuery {
        from: Some(t0 + secs(30)),
        to: Some(t0 + secs(120)),
        limit: 10,
    };
    let got: Vec<_> = store
        .health_history(a, q)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.timestamp)
        .collect();
    assert_eq!(got, [t0 + secs(90), t0 + secs(60), t0 + secs(30)]);
    let q = HistoryQuery {
        limit: 2,
        ..Default::default()
    };
    assert_eq!(store.health_history(a, q).await.unwrap().len(), 2);
}

#[doc(hidden)]
pub async fn tokens_reach_the_probe(store: &impl ConformingStore) {
    let new = NewServer::new("secret", "http://127.0.0.1:9").with_token(ApiToken::new("tok-123"));
    store.create_server(new).await.unwrap();
    add(store, "plain").await;
    let targets = store.health_targets().await.unwrap();
    let by_name = |n: &str| targets.iter().find(|t| t.name == n).unwrap().token.clone();
    assert_eq!(
        by_name("secret").map(|t| t.expose().to_owned()),
        Some("tok-123".to_owned())
    );
    assert_eq!(by_name("plain"), None);
    let secret = targets.iter().find(|t| t.name == "secret").unwrap();
    assert_eq!(
        store.probe_target(secret.id).await.unwrap().as_ref(),
        Some(secret)
    );
    assert_eq!(store.probe_target(ServerId::new()).await.unwrap(), None);
}

#[doc(hidden)]
pub async fn servers_can_be_changed(store: &impl ConformingStore) {
    let a = add(store, "a").await;
    add(store, "b").await;
    let update = ServerUpdate {
        api_url: Some("https://127.0.0.1:8443".into()),
        api_token: Some(ApiToken::new("new-token")),
        region: Some(Some("eu".into())),
        tags: Some(vec!["x".into()]),
        metadata: Some(json!({"rack": 4})),
        status: Some(ServerStatus::Maintenance),
        ..Default::default()
    };
    let s = store.update_server(a, update).await.unwrap().unwrap();
    assert_eq!(s.api_url, "https://127.0.0.1:8443");
    assert_eq!(s.region.as_deref(), Some("eu"));
    assert_eq!(s.tags, ["x"]);
    assert_eq!(s.metadata, json!({"rack": 4}));
    assert_eq!(s.status, ServerStatus::Maintenance);
    assert_eq!(store.get_server(a).await.unwrap().unwrap(), s);
    let clear = ServerUpdate {
        region: Some(None),
        status: Some(ServerStatus::Active),
        ..Default::default()
    };
    let s = store.update_server(a, clear).await.unwrap().unwrap();
    assert_eq!(s.region, None);
    let targets = store.health_targets().await.unwrap();
    let t = targets.iter().find(|t| t.id == a).unwrap();
    assert_eq!(
        t.token.as_ref().map(|t| t.expose().to_owned()),
        Some("new-token".to_owned())
    );
    let taken = ServerUpdate {
        name: Some("b".into()),
        ..Default::default()
    };
    assert!(matches!(
        store.update_server(a, taken).await,
        Err(StoreError::Conflict(_))
    ));
    let same = ServerUpdate {
        name: Some("a".into()),
        ..Default::default()
    };
    assert!(
        store.update_server(a, same).await.unwrap().is_some(),
        "renaming to its own name"
    );
    assert!(
        store
            .update_server(ServerId::new(), ServerUpdate::default())
            .await
            .unwrap()
            .is_none()
    );
}

#[doc(hidden)]
pub async fn groups_hold_members_and_filter_servers(store: &impl ConformingStore) {
    let a = add(store, "a").await;
    let b = add(store, "b").await;
    let fields = GroupFields {
        name: Some("edge".into()),
        color: Some(Some("#ff0000".into())),
        regions: Some(vec!["eu".into()]),
        ..Default::default()
    };
    let g = store.create_group(fields.clone()).await.unwrap();
    assert_eq!(
        (g.name.as_str(), g.color.as_deref()),
        ("edge", Some("#ff0000"))
    );
    assert!(matches!(
        store.create_group(fields).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(store.add_member(g.id, a).await.unwrap());
    assert!(
        store.add_member(g.id, a).await.unwrap(),
        "adding twice is fine"
    );
    assert!(!store.add_member(g.id, ServerId::new()).await.unwrap());
    let listed = store
        .list_servers(&ServerFilter {
            group: Some(g.id),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.iter().map(|s| s.id).collect::<Vec<_>>(), [a]);
    assert_eq!(store.get_group(g.id).await.unwrap().unwrap().members, [a]);
    let renamed = GroupFields {
        name: Some("core".into()),
        ..Default::default()
    };
    assert_eq!(
        store
            .update_group(g.id, renamed)
            .await
            .unwrap()
            .unwrap()
            .name,
        "core"
    );
    assert!(store.add_member(g.id, b).await.unwrap());
    assert!(store.remove_member(g.id, a).await.unwrap());
    assert!(!store.remove_member(g.id, a).await.unwrap());
    assert!(store.delete_server(b).await.unwrap());
    assert!(
        store
            .get_group(g.id)
            .await
            .unwrap()
            .unwrap()
            .members
            .is_empty(),
        "a deleted server leaves its groups"
    );
    assert_eq!(store.list_groups().await.unwrap().len(), 1);
    assert!(store.delete_group(g.id).await.unwrap());
    assert!(!store.delete_group(g.id).await.unwrap());
    assert!(
        store.get_server(a).await.unwrap().is_some(),
        "deleting a group keeps its servers"
    );
}

#[doc(hidden)]
pub async fn admin_tokens_are_found_by_hash_until_revoked(store: &impl ConformingStore) {
    let hash = [7u8; 32];
    let t = store.insert_token("ops", Role::Admin, hash).await.unwrap();
    assert_eq!(
        (t.name.as_str(), t.role, t.revoked_at),
        ("ops", Role::Admin, None)
    );
    assert!(matches!(
        store.insert_token("ops", Role::Viewer, [8u8; 32]).await,
        Err(StoreError::Conflict(_))
    ));
    store
        .insert_token("read", Role::Viewer, [9u8; 32])
        .await
        .unwrap();
    assert_eq!(
        store.find_token(hash).await.unwrap().map(|t| t.role),
        Some(Role::Admin)
    );
    assert!(store.find_token([1u8; 32]).await.unwrap().is_none());
    assert!(store.revoke_token("ops").await.unwrap());
    assert!(!store.revoke_token("ops").await.unwrap());
    assert!(
        store.find_token(hash).await.unwrap().is_none(),
        "a revoked token still works"
    );
    let all = store.list_tokens().await.unwrap();
    assert_eq!(
        all.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        ["ops", "read"]
    );
    assert!(all[0].revoked_at.is_some());
}

#[doc(hidden)]
pub async fn llm_usage_is_the_counters_increase_with_restarts(store: &impl ConformingStore) {
    let t0 = base_time();
    let a = add(store, "a").await;
    let b = add(store, "b").await;
    let sample = |id, at: i64, requests: i64, cost: f64| {
        let mut s = sample_at(id, t0 + secs(at), 1.0);
        s.values.llm_requests = Some(requests);
        s.values.llm_cost_usd = Some(cost);
        MetricsRecord::Sample(s)
    };
    store
        .record_metrics(&[
            sample(a, 0, 100, 1.0),
            sample(a, 60, 150, 1.5),
            // a restarted: its counters began again from zero.
            sample(a, 120, 20, 0.25),
            sample(a, 180, 30, 0.5),
            // Outside the window.
            sample(a, 600, 1000, 50.0),
            sample(b, 60, 5, 0.0),
        ])
        .await
        .unwrap();
    let usage = store.llm_usage(t0, t0 + secs(300)).await.unwrap();
    assert_eq!(usage.len(), 1, "b has one sample in the window: {usage:?}");
    assert_eq!(usage[0].server_id, a);
    assert_eq!(usage[0].requests, 50 + 20 + 10);
    assert!(
        (usage[0].cost_usd - (0.5 + 0.25 + 0.25)).abs() < 1e-9,
        "{usage:?}"
    );
}

/// (from, to) of the changes `query` lists.
async fn transitions(
    store: &impl ConformingStore,
    query: ChangeQuery,
) -> Vec<(Option<HealthStatus>, HealthStatus)> {
    store
        .state_changes(query)
        .await
        .expect("read the change log")
        .into_iter()
        .map(|c| (c.from_status, c.to_status))
        .collect()
}

#[doc(hidden)]
pub async fn state_changes_are_logged_once_with_the_check(store: &impl ConformingStore) {
    use HealthStatus::*;
    let t0 = base_time();
    let a = add(store, "a").await;
    let of_a = ChangeQuery {
        server: Some(a),
        ..Default::default()
    };
    // First check: never checked → healthy. Same status again: no change.
    let first = [
        check_at(a, t0, Healthy),
        check_at(a, t0 + secs(30), Healthy),
    ];
    store.record_health(&first).await.unwrap();
    assert_eq!(transitions(store, of_a).await, [(None, Healthy)]);
    // One batch holding several changes of one server (written after an outage) logs each.
    let mut down = check_at(a, t0 + secs(60), Unreachable);
    down.error_message = Some("connect failed: connection refused".into());
    down.response_time_ms = None;
    let outage = [
        down.clone(),
        check_at(a, t0 + secs(90), Unreachable),
        check_at(a, t0 + secs(120), Degraded),
    ];
    store.record_health(&outage).await.unwrap();
    // A retried batch logs nothing again.
    store.record_health(&outage).await.unwrap();
    store.record_health(&first).await.unwrap();
    assert_eq!(
        transitions(store, of_a).await,
        [
            (Some(Unreachable), Degraded),
            (Some(Healthy), Unreachable),
            (None, Healthy)
        ]
    );
    let log = store.state_changes(of_a).await.unwrap();
    assert_eq!(
        log[1].changed_at,
        t0 + secs(60),
        "the change is its check's"
    );
    assert_eq!(log[1].error_message, down.error_message);
    assert_eq!(log[1].server_name, "a");
    assert!(log[0].id > log[1].id && log[1].id > log[2].id, "ids grow");
    // A late check older than the state changes nothing.
    store
        .record_health(&[check_at(a, t0 + secs(100), Critical)])
        .await
        .unwrap();
    assert_eq!(store.state_changes(of_a).await.unwrap().len(), 3);
    // The last check's response time and error are on the server.
    let s = store.get_server(a).await.unwrap().unwrap();
    assert_eq!(s.last_response_time_ms, Some(12));
    assert_eq!(
        s.last_error.as_deref(),
        Some("unhealthy: services (unhealthy)")
    );
    store
        .record_health(&[down_at(a, t0 + secs(150))])
        .await
        .unwrap();
    let s = store.get_server(a).await.unwrap().unwrap();
    assert_eq!(s.last_response_time_ms, None);
    assert_eq!(
        s.last_error.as_deref(),
        Some("connect failed: connection refused")
    );
}

fn down_at(server: ServerId, at: OffsetDateTime) -> HealthCheck {
    let mut c = check_at(server, at, HealthStatus::Unreachable);
    c.error_message = Some("connect failed: connection refused".into());
    c.response_time_ms = None;
    c
}

#[doc(hidden)]
pub async fn state_changes_page_newest_first_fleet_wide_and_per_server(
    store: &impl ConformingStore,
) {
    use HealthStatus::*;
    let t0 = base_time();
    let a = add(store, "a").await;
    let b = add(store, "b").await;
    for (i, status) in [Healthy, Critical, Healthy].into_iter().enumerate() {
        let at = t0 + secs(30 * i as i64);
        store
            .record_health(&[check_at(a, at, status), check_at(b, at + secs(1), status)])
            .await
            .unwrap();
    }
    let all = store.state_changes(ChangeQuery::default()).await.unwrap();
    let order: Vec<(&str, OffsetDateTime)> = all
        .iter()
        .map(|c| (c.server_name.as_str(), c.changed_at))
        .collect();
    assert_eq!(
        order,
        [
            ("b", t0 + secs(61)),
            ("a", t0 + secs(60)),
            ("b", t0 + secs(31)),
            ("a", t0 + secs(30)),
            ("b", t0 + secs(1)),
            ("a", t0),
        ]
    );
    let page = store
        .state_changes(ChangeQuery {
            limit: 2,
            offset: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page, all[2..4]);
    let of_b = store
        .state_changes(ChangeQuery {
            server: Some(b),
            limit: 10,
            offset: 1,
        })
        .await
        .unwrap();
    assert_eq!(of_b, [all[2].clone(), all[4].clone()]);
    // Removing a server removes its log.
    assert!(store.delete_server(b).await.unwrap());
    assert_eq!(
        store
            .state_changes(ChangeQuery::default())
            .await
            .unwrap()
            .len(),
        3
    );
}

#[doc(hidden)]
pub async fn servers_are_counted_by_status_health_region_and_environment(
    store: &impl ConformingStore,
) {
    use HealthStatus::*;
    let t0 = base_time();
    for (name, region) in [("a", Some("eu")), ("b", Some("eu")), ("c", None)] {
        let mut new = NewServer::new(name, format!("http://127.0.0.1:9/{name}"));
        new.region = region.map(str::to_owned);
        store.create_server(new).await.unwrap();
    }
    let mut off = NewServer::new("d", "http://127.0.0.1:9/d").with_status(ServerStatus::Inactive);
    off.environment = Some("staging".into());
    store.create_server(off).await.unwrap();
    let ids: Vec<ServerId> = store
        .health_targets()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    store
        .record_health(&[
            check_at(ids[0], t0, Healthy),
            check_at(ids[1], t0, Critical),
        ])
        .await
        .unwrap();
    let mut tallies = store.server_tallies().await.unwrap();
    tallies.sort();
    type Group<'a> = (
        ServerStatus,
        Option<HealthStatus>,
        Option<&'a str>,
        Option<&'a str>,
        u64,
    );
    let got: Vec<Group<'_>> = tallies
        .iter()
        .map(|t| {
            (
                t.status,
                t.health,
                t.region.as_deref(),
                t.environment.as_deref(),
                t.count,
            )
        })
        .collect();
    let total: u64 = got.iter().map(|g| g.4).sum();
    assert_eq!(total, 4, "{got:?}");
    assert_eq!(
        got.iter()
            .filter(|g| g.0 == ServerStatus::Inactive)
            .collect::<Vec<_>>(),
        [&(ServerStatus::Inactive, None, None, Some("staging"), 1)]
    );
    let active_healthy: u64 = got
        .iter()
        .filter(|g| g.0 == ServerStatus::Active && g.1 == Some(Healthy))
        .map(|g| g.4)
        .sum();
    let active_critical: u64 = got
        .iter()
        .filter(|g| g.0 == ServerStatus::Active && g.1 == Some(Critical))
        .map(|g| g.4)
        .sum();
    let eu: u64 = got.iter().filter(|g| g.2 == Some("eu")).map(|g| g.4).sum();
    assert_eq!((active_healthy, active_critical, eu), (1, 1, 2), "{got:?}");

    // Counts follow changes and removals.
    let update = ServerUpdate {
        region: Some(Some("us".into())),
        status: Some(ServerStatus::Maintenance),
        ..Default::default()
    };
    store.update_server(ids[0], update).await.unwrap();
    store.delete_server(ids[1]).await.unwrap();
    let tallies = store.server_tallies().await.unwrap();
    let count = |f: &dyn Fn(&crate::store::ServerTally) -> bool| -> u64 {
        tallies.iter().filter(|t| f(t)).map(|t| t.count).sum()
    };
    assert_eq!(count(&|_| true), 3, "{tallies:?}");
    assert_eq!(count(&|t| t.health == Some(Critical)), 0, "{tallies:?}");
    assert_eq!(
        count(&|t| t.status == ServerStatus::Maintenance && t.region.as_deref() == Some("us")),
        1,
        "{tallies:?}"
    );
}

/// Bulk membership: one call for many servers, members already and unknown ids skipped.
pub async fn groups_gain_and_lose_members_in_bulk(store: &impl ConformingStore) {
    let a = add(store, "a").await;
    let b = add(store, "b").await;
    let c = add(store, "c").await;
    let g = store
        .create_group(GroupFields {
            name: Some("web".into()),
            ..GroupFields::default()
        })
        .await
        .unwrap();
    assert_eq!(store.add_members(g.id, &[a]).await.unwrap(), Some(1));
    let unknown = ServerId::new();
    assert_eq!(
        store.add_members(g.id, &[a, b, c, unknown]).await.unwrap(),
        Some(2)
    );
    let members = store.get_group(g.id).await.unwrap().unwrap().members;
    assert_eq!(members.len(), 3);
    assert_eq!(
        store.remove_members(g.id, &[a, b, unknown]).await.unwrap(),
        Some(2)
    );
    assert_eq!(
        store.get_group(g.id).await.unwrap().unwrap().members,
        vec![c]
    );
    let nowhere = crate::model::GroupId(uuid::Uuid::new_v4());
    assert_eq!(store.add_members(nowhere, &[a]).await.unwrap(), None);
    assert_eq!(store.remove_members(nowhere, &[a]).await.unwrap(), None);
}
