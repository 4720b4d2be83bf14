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
use crate::series::SeriesWindow;
use crate::store::{
    AdminTokens, ChangeLog, ChangeQuery, Counts, Groups, History, HistoryQuery, Registry,
    ServerFilter, SessionRecord, Sessions, Store, StoreError,
};

/// A store the suite can drive: the workers' side, the registry, groups, tokens, history,
/// the state-change log and dashboard sessions.
pub trait ConformingStore:
    Store + Registry + History + Groups + AdminTokens + ChangeLog + Counts + Sessions
{
}
impl<T: Store + Registry + History + Groups + AdminTokens + ChangeLog + Counts + Sessions>
    ConformingStore for T
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
        fence: None,
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
        fence: None,
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
            servers_are_counted_by_status_health_region_and_environment,
            servers_are_searched_sorted_and_counted,
            recent_checks_and_series_come_per_page_and_per_bucket,
            the_change_log_is_tailed_by_id,
            sessions_end_when_idle_when_old_on_sign_out_and_with_their_token,
            kinds_and_metrics_paths_reach_the_probe
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
            fence: None,
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
        Some(&secret)
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

#[doc(hidden)]
pub async fn servers_are_searched_sorted_and_counted(store: &impl ConformingStore) {
    use HealthStatus::*;
    let t0 = base_time();
    let mut ids = Vec::new();
    for (name, region, tag, host) in [
        ("alpha", "eu-west", "db", "a.example"),
        ("Bravo", "us-east", "web", "b.example"),
        ("charlie", "eu-north", "web", "c.internal"),
        ("delta", "ap-south", "cache", "d.example"),
    ] {
        let mut new = NewServer::new(name, format!("http://127.0.0.1:9/{name}"));
        new.region = Some(region.into());
        new.tags = vec![tag.into()];
        new.hostname = Some(host.into());
        ids.push(store.create_server(new).await.unwrap().id);
    }
    // alpha healthy 30 ms, Bravo critical 5 ms, charlie unreachable, delta never checked.
    let mut a = check_at(ids[0], t0, Healthy);
    a.response_time_ms = Some(30);
    let mut b = check_at(ids[1], t0 + secs(5), Critical);
    b.response_time_ms = Some(5);
    let mut c = check_at(ids[2], t0 + secs(9), Unreachable);
    c.response_time_ms = None;
    store.record_health(&[a, b, c]).await.unwrap();

    let list = |search: Option<&str>, sort: &str| {
        let filter = ServerFilter {
            search: search.map(Into::into),
            sort: sort.parse().unwrap(),
            ..Default::default()
        };
        async move {
            let found = store.list_servers(&filter).await.unwrap();
            let count = store.count_servers(&filter).await.unwrap();
            assert_eq!(count as usize, found.len(), "{filter:?}");
            found.into_iter().map(|s| s.name).collect::<Vec<_>>()
        }
    };
    assert_eq!(
        list(None, "name").await,
        ["alpha", "Bravo", "charlie", "delta"]
    );
    assert_eq!(
        list(None, "-name").await,
        ["delta", "charlie", "Bravo", "alpha"]
    );
    assert_eq!(
        list(None, "health").await,
        ["alpha", "Bravo", "charlie", "delta"]
    );
    assert_eq!(
        list(None, "-health").await,
        ["charlie", "Bravo", "alpha", "delta"]
    );
    // charlie never answered: no last_seen, like delta; both last, by name.
    assert_eq!(
        list(None, "-last_seen").await,
        ["Bravo", "alpha", "charlie", "delta"]
    );
    assert_eq!(
        list(None, "last_seen").await,
        ["alpha", "Bravo", "charlie", "delta"]
    );
    assert_eq!(
        list(None, "-response_time").await,
        ["alpha", "Bravo", "charlie", "delta"]
    );
    assert_eq!(
        list(None, "response_time").await,
        ["Bravo", "alpha", "charlie", "delta"]
    );
    // Search reaches the name, the hostname, the region and the tags, in any case.
    assert_eq!(list(Some("BRAV"), "name").await, ["Bravo"]);
    assert_eq!(list(Some("internal"), "name").await, ["charlie"]);
    assert_eq!(list(Some("eu-"), "name").await, ["alpha", "charlie"]);
    assert_eq!(list(Some("WEB"), "name").await, ["Bravo", "charlie"]);
    assert_eq!(list(Some("100%_"), "name").await, Vec::<String>::new());
    let page = ServerFilter {
        limit: Some(2),
        offset: 1,
        ..Default::default()
    };
    let names: Vec<String> = store
        .list_servers(&page)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["Bravo", "charlie"]);
    assert_eq!(
        store.count_servers(&page).await.unwrap(),
        4,
        "a count ignores the page"
    );
    let filtered = ServerFilter {
        health_status: Some(Critical),
        ..Default::default()
    };
    assert_eq!(store.count_servers(&filtered).await.unwrap(), 1);
}

#[doc(hidden)]
pub async fn recent_checks_and_series_come_per_page_and_per_bucket(store: &impl ConformingStore) {
    use HealthStatus::*;
    let t0 = base_time();
    let a = add(store, "a").await;
    let b = add(store, "b").await;
    let quiet = add(store, "quiet").await;
    let mut checks = Vec::new();
    for i in 0..40 {
        let status = if i == 35 { Critical } else { Healthy };
        let mut c = check_at(a, t0 + secs(30 * i), status);
        c.response_time_ms = Some(10 + i as u32);
        checks.push(c);
    }
    checks.push(check_at(b, t0, Degraded));
    store.record_health(&checks).await.unwrap();

    let recent = store.recent_checks(&[a, b, quiet], 30).await.unwrap();
    let of = |id: ServerId| {
        recent
            .iter()
            .find(|(s, _)| *s == id)
            .map(|(_, c)| c.clone())
    };
    let of_a = of(a).unwrap();
    assert_eq!(of_a.len(), 30);
    assert_eq!(of_a[0].timestamp, t0 + secs(30 * 39), "newest first");
    assert_eq!(of_a[29].timestamp, t0 + secs(30 * 10));
    assert_eq!(of(b).unwrap().len(), 1);
    assert!(of(quiet).is_none_or(|c| c.is_empty()));

    // 20 minutes in 4 buckets of 5 minutes: 10 checks each.
    let window = SeriesWindow::new(t0, t0 + Duration::minutes(20), 4).unwrap();
    let series = store.health_series(a, window).await.unwrap();
    assert_eq!(series.len(), 4);
    assert_eq!(
        series.iter().map(|b| b.checks).collect::<Vec<_>>(),
        [10, 10, 10, 10]
    );
    assert_eq!(series[3].start, t0 + Duration::minutes(15));
    assert_eq!(series[3].worst, Critical);
    assert_eq!(series[2].worst, Healthy);
    assert_eq!(series[0].avg_response_ms, Some(14.5));
    assert_eq!(series[0].max_response_ms, Some(19));
    // Outside the range, nothing; empty buckets are left out.
    let later = SeriesWindow::new(t0 + Duration::minutes(15), t0 + Duration::hours(2), 10).unwrap();
    assert_eq!(store.health_series(a, later).await.unwrap().len(), 1);

    let samples: Vec<MetricsRecord> = (0..6)
        .map(|i| {
            let mut s = sample_at(a, t0 + secs(60 * i), 10.0 * i as f64);
            s.values.llm_requests = Some(100 + i);
            MetricsRecord::Sample(s)
        })
        .collect();
    store.record_metrics(&samples).await.unwrap();
    let window = SeriesWindow::new(t0, t0 + Duration::minutes(6), 2).unwrap();
    let m = store.metrics_series(a, window).await.unwrap();
    assert_eq!(m.len(), 2);
    assert_eq!((m[0].samples, m[0].cpu_percent), (3, Some(10.0)));
    assert_eq!(
        (m[1].cpu_percent, m[1].llm_requests),
        (Some(40.0), Some(105))
    );
    assert_eq!(m[1].memory_percent, Some(50.5));
}

#[doc(hidden)]
pub async fn the_change_log_is_tailed_by_id(store: &impl ConformingStore) {
    use HealthStatus::*;
    assert_eq!(store.change_ids().await.unwrap(), None);
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
    let newest_first = store.state_changes(ChangeQuery::default()).await.unwrap();
    let (oldest, newest) = store.change_ids().await.unwrap().unwrap();
    assert_eq!(newest, newest_first[0].id);
    assert_eq!(oldest, newest_first[5].id);
    let all = store.changes_after(oldest - 1, 100).await.unwrap();
    let mut expected = newest_first.clone();
    expected.reverse();
    assert_eq!(all, expected, "oldest first, the same rows");
    let tail = store.changes_after(all[2].id, 2).await.unwrap();
    assert_eq!(tail, all[3..5]);
    assert!(store.changes_after(newest, 10).await.unwrap().is_empty());
}

#[doc(hidden)]
pub async fn sessions_end_when_idle_when_old_on_sign_out_and_with_their_token(
    store: &impl ConformingStore,
) {
    let t0 = base_time();
    let token = [7u8; 32];
    store
        .insert_token("ops", Role::Viewer, token)
        .await
        .unwrap();
    let session = |n: u8, token_sha256: [u8; 32]| SessionRecord {
        sha256: [n; 32],
        token_sha256,
        token_name: "ops".into(),
        role: Role::Viewer,
        created_at: t0,
        idle_expires_at: t0 + Duration::hours(8),
        expires_at: t0 + Duration::days(7),
    };
    store.create_session(session(1, token)).await.unwrap();
    store.create_session(session(2, token)).await.unwrap();
    // A session of a token the store does not hold (the bootstrap token) stands.
    store.create_session(session(3, [9u8; 32])).await.unwrap();
    let found = store
        .find_session([1; 32], t0 + Duration::hours(1))
        .await
        .unwrap();
    assert_eq!(found, Some(session(1, token)));
    assert!(store.find_session([4; 32], t0).await.unwrap().is_none());
    // Idle past 8 h: over, unless touched.
    assert!(
        store
            .find_session([1; 32], t0 + Duration::hours(9))
            .await
            .unwrap()
            .is_none()
    );
    store
        .touch_session([1; 32], t0 + Duration::hours(16))
        .await
        .unwrap();
    assert!(
        store
            .find_session([1; 32], t0 + Duration::hours(9))
            .await
            .unwrap()
            .is_some()
    );
    // Never past the absolute end, however often touched.
    store
        .touch_session([1; 32], t0 + Duration::days(30))
        .await
        .unwrap();
    assert!(
        store
            .find_session([1; 32], t0 + Duration::days(8))
            .await
            .unwrap()
            .is_none()
    );
    // Sign-out.
    assert!(store.delete_session([3; 32]).await.unwrap());
    assert!(!store.delete_session([3; 32]).await.unwrap());
    assert!(store.find_session([3; 32], t0).await.unwrap().is_none());
    // Revoking the token ends its sessions.
    assert!(store.find_session([2; 32], t0).await.unwrap().is_some());
    assert!(store.revoke_token("ops").await.unwrap());
    assert!(store.find_session([2; 32], t0).await.unwrap().is_none());
    assert!(
        !store.delete_session([2; 32]).await.unwrap(),
        "deleted with the token"
    );
}

#[doc(hidden)]
pub async fn kinds_and_metrics_paths_reach_the_probe(store: &impl ConformingStore) {
    use crate::model::ServerKind;
    let mut new = NewServer::new("db-7", "http://127.0.0.1:9100");
    new.kind = ServerKind::NodeExporter;
    new.metrics_path = Some("/node/metrics".into());
    let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    new.ca_cert = Some(pem.into());
    let db = store.create_server(new).await.unwrap();
    assert_eq!(db.ca_cert.as_deref(), Some(pem));
    assert_eq!(
        store
            .probe_target(db.id)
            .await
            .unwrap()
            .unwrap()
            .ca_cert
            .as_deref(),
        Some(pem)
    );
    assert_eq!(
        (db.kind, db.metrics_path.as_deref()),
        (ServerKind::NodeExporter, Some("/node/metrics"))
    );
    let plain = add(store, "web").await;
    let targets = store.health_targets().await.unwrap();
    let t = targets.iter().find(|t| t.id == db.id).unwrap();
    assert_eq!(
        (t.kind, t.metrics_path.as_deref()),
        (ServerKind::NodeExporter, Some("/node/metrics"))
    );
    let t = targets.iter().find(|t| t.id == plain).unwrap();
    assert_eq!(
        (t.kind, t.metrics_path.as_deref()),
        (ServerKind::Fleet, None)
    );
    let changed = store
        .update_server(
            db.id,
            ServerUpdate {
                kind: Some(ServerKind::Agent),
                metrics_path: Some(None),
                ca_cert: Some(None),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (changed.kind, changed.metrics_path),
        (ServerKind::Agent, None)
    );
    let t = store.probe_target(db.id).await.unwrap().unwrap();
    assert_eq!(t.kind, ServerKind::Agent);
    let bad = NewServer {
        metrics_path: Some("metrics".into()),
        ..NewServer::new("db-8", "http://127.0.0.1:9100")
    };
    assert!(matches!(
        store.create_server(bad).await,
        Err(StoreError::Invalid(_))
    ));
}
