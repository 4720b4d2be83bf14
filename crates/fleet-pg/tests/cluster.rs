//! Leases, fences and the leader on a real PostgreSQL, each test in a database of its own.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use fleet_core::cluster::{
    BUCKETS, Beat, ClusterStats, InstanceMeta, InstanceRecord, Lease, LeaseTimes, Leases,
    Membership, bucket_of, share,
};
use fleet_core::conformance::check_at;
use fleet_core::{HealthStatus, History, HistoryQuery, NewServer, Registry, Store, StoreError};
use fleet_pg::testing::TestDb;
use fleet_pg::{PgStore, migrate};

const TIMES: LeaseTimes = LeaseTimes {
    heartbeat: Duration::from_millis(200),
    ttl: Duration::from_secs(2),
};

fn meta(id: &str) -> InstanceMeta {
    InstanceMeta {
        id: id.to_owned(),
        version: "test".to_owned(),
    }
}

/// Leases that can be made to fail, as during a database outage.
struct Outage {
    inner: PgStore,
    down: AtomicBool,
}

impl Outage {
    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::unavailable("the database is down"))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Leases for Outage {
    async fn beat(&self, me: &InstanceMeta, ttl: Duration) -> Result<Beat, StoreError> {
        self.check()?;
        self.inner.beat(me, ttl).await
    }
    async fn release(&self, me: &str, buckets: &[u16]) -> Result<u64, StoreError> {
        self.check()?;
        self.inner.release(me, buckets).await
    }
    async fn acquire(
        &self,
        me: &str,
        buckets: &[u16],
        ttl: Duration,
        take_expired: bool,
    ) -> Result<Vec<Lease>, StoreError> {
        self.check()?;
        self.inner.acquire(me, buckets, ttl, take_expired).await
    }
    async fn lead(
        &self,
        me: &str,
        ttl: Duration,
        take_expired: bool,
    ) -> Result<Option<i64>, StoreError> {
        self.check()?;
        self.inner.lead(me, ttl, take_expired).await
    }
    async fn leave(&self, me: &str) -> Result<(), StoreError> {
        self.check()?;
        self.inner.leave(me).await
    }
    async fn instances(&self, ttl: Duration) -> Result<Vec<InstanceRecord>, StoreError> {
        self.check()?;
        self.inner.instances(ttl).await
    }
}

/// Each bucket's owner and epoch.
async fn leases(store: &PgStore) -> Vec<(u16, Option<String>, i64)> {
    let client = store.pool().get().await.unwrap();
    client
        .query(
            "SELECT bucket, owner, epoch FROM fleet_bucket_leases ORDER BY bucket",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, i16>(0) as u16, r.get(1), r.get(2)))
        .collect()
}

fn owned_by(leases: &[(u16, Option<String>, i64)], id: &str) -> BTreeSet<u16> {
    leases
        .iter()
        .filter(|(_, owner, _)| owner.as_deref() == Some(id))
        .map(|(b, _, _)| *b)
        .collect()
}

async fn exec(store: &PgStore, sql: &str) {
    store
        .pool()
        .get()
        .await
        .unwrap()
        .batch_execute(sql)
        .await
        .unwrap();
}

#[tokio::test]
async fn the_database_and_core_put_servers_in_the_same_buckets() {
    let db = TestDb::create().await;
    let store = db.store(Arc::new(fleet_core::SystemClock)).await;
    let client = store.pool().get().await.unwrap();
    for i in 0..300 {
        let s = store
            .create_server(NewServer::new(format!("s{i}"), "http://127.0.0.1:9"))
            .await
            .unwrap();
        let bucket: i16 = client
            .query_one(
                "SELECT bucket FROM managed_servers WHERE id = $1",
                &[&s.id.0],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(bucket as u16, bucket_of(s.id));
    }
}

#[tokio::test]
async fn buckets_are_shared_by_rendezvous_and_an_expired_owner_is_replaced() {
    let db = TestDb::create().await;
    let store = db.store(Arc::new(fleet_core::SystemClock)).await;
    let mut a = Membership::new(Arc::new(store.clone()), meta("a:1"), TIMES);
    let mut b = Membership::new(Arc::new(store.clone()), meta("b:1"), TIMES);

    a.round().await.unwrap();
    let before = leases(&store).await;
    assert_eq!(owned_by(&before, "a:1").len(), usize::from(BUCKETS));
    assert!(
        before.iter().all(|(_, _, e)| *e == 1),
        "first owner, epoch 1"
    );
    assert_eq!(a.stats().snapshot().leader_epoch, Some(1));

    // B joins: A gives up B's share at its next heartbeat, and B takes it at its next one.
    b.round().await.unwrap();
    assert!(
        owned_by(&leases(&store).await, "b:1").is_empty(),
        "A's leases hold"
    );
    a.round().await.unwrap();
    b.round().await.unwrap();
    let live = ["a:1".to_owned(), "b:1".to_owned()];
    let after = leases(&store).await;
    assert_eq!(owned_by(&after, "a:1"), share("a:1", &live));
    assert_eq!(owned_by(&after, "b:1"), share("b:1", &live));
    for ((bucket, owner, epoch), (_, _, old)) in after.iter().zip(&before) {
        let moved = owner.as_deref() == Some("b:1");
        assert_eq!(*epoch, old + i64::from(moved), "bucket {bucket}");
    }
    assert_eq!(b.stats().snapshot().leader_epoch, None, "one leader");

    // A dies without a word: B takes its buckets, and the leader's lease, once they expire
    // (by the database's clock).
    let end = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        b.round().await.unwrap();
        let now = leases(&store).await;
        if owned_by(&now, "b:1").len() == usize::from(BUCKETS)
            && b.stats().snapshot().leader_epoch.is_some()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "B never took A's buckets"
        );
        tokio::time::sleep(TIMES.heartbeat).await;
    }
    assert_eq!(b.stats().snapshot().leader_epoch, Some(2));
    let listed = store.instances(TIMES.ttl).await.unwrap();
    let a_row = listed.iter().find(|i| i.id == "a:1").unwrap();
    assert!(
        !a_row.live && a_row.buckets == 0 && !a_row.leader,
        "{a_row:?}"
    );
    let b_row = listed.iter().find(|i| i.id == "b:1").unwrap();
    assert!(
        b_row.live && b_row.buckets == 1024 && b_row.leader,
        "{b_row:?}"
    );
}

#[tokio::test]
async fn a_write_under_a_superseded_fence_is_refused_counted_and_not_stored() {
    let db = TestDb::create().await;
    let base = db.store(Arc::new(fleet_core::SystemClock)).await;
    let a_stats = ClusterStats::new("a:1");
    let a = base.clone().shared_as("a:1", a_stats.clone());
    let b = base.clone().shared_as("b:1", ClusterStats::new("b:1"));
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(
            base.create_server(NewServer::new(format!("s{i}"), "http://127.0.0.1:9"))
                .await
                .unwrap()
                .id,
        );
    }
    let mut ma = Membership::new(Arc::new(base.clone()), meta("a:1"), TIMES);
    ma.round().await.unwrap();
    let targets = a.health_targets().await.unwrap();
    assert_eq!(targets.len(), 20);
    assert!(targets.iter().all(|t| t.fence.is_some()));
    assert!(
        b.health_targets().await.unwrap().is_empty(),
        "B owns nothing"
    );

    // A is paused past its TTL; B takes every bucket over.
    exec(
        &base,
        "UPDATE fleet_bucket_leases SET expires_at = now() - interval '1 minute'",
    )
    .await;
    let taken = base
        .acquire("b:1", &(0..BUCKETS).collect::<Vec<_>>(), TIMES.ttl, true)
        .await
        .unwrap();
    assert_eq!(taken.len(), usize::from(BUCKETS));

    // A wakes up and writes what it checked under its old fences: refused, counted.
    let at = fleet_core::conformance::base_time();
    let late: Vec<_> = targets
        .iter()
        .map(|t| {
            let mut c = check_at(t.id, at, HealthStatus::Critical);
            c.fence = t.fence;
            c
        })
        .collect();
    a.record_health(&late).await.unwrap();
    assert_eq!(a_stats.snapshot().fenced_writes_rejected, 20);
    let server = base.get_server(ids[0]).await.unwrap().unwrap();
    assert_eq!(server.health_status, None, "the late write moved no state");
    assert!(
        base.health_history(ids[0], HistoryQuery::default())
            .await
            .unwrap()
            .is_empty()
    );

    // B's own selection carries the new epochs, and its writes land.
    let fresh = b.health_targets().await.unwrap();
    assert!(fresh.iter().all(|t| t.fence.unwrap().epoch == 2));
    let checks: Vec<_> = fresh
        .iter()
        .map(|t| {
            let mut c = check_at(t.id, at, HealthStatus::Healthy);
            c.fence = t.fence;
            c
        })
        .collect();
    b.record_health(&checks).await.unwrap();
    assert_eq!(
        base.get_server(ids[0])
            .await
            .unwrap()
            .unwrap()
            .health_status,
        Some(HealthStatus::Healthy)
    );

    // A check-now on A is not fenced: it lands, marked manual, and moves state forward only.
    let manual = check_at(
        ids[0],
        at + time::Duration::seconds(5),
        HealthStatus::Degraded,
    );
    a.record_health(std::slice::from_ref(&manual))
        .await
        .unwrap();
    assert_eq!(a_stats.snapshot().fenced_writes_rejected, 20);
    let client = base.pool().get().await.unwrap();
    let manual_rows: i64 = client
        .query_one(
            "SELECT count(*) FROM server_health_checks WHERE manual AND server_id = $1",
            &[&ids[0].0],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(manual_rows, 1);
    // B's next selection sees how recently each server was checked, by the database's clock.
    let again = b.health_targets().await.unwrap();
    assert!(again.iter().all(|t| t.checked_ago.is_some()));
}

#[tokio::test]
async fn after_an_outage_each_instance_renews_its_own_before_anyone_takes_over() {
    let db = TestDb::create().await;
    let store = db.store(Arc::new(fleet_core::SystemClock)).await;
    let la = Arc::new(Outage {
        inner: store.clone(),
        down: AtomicBool::new(false),
    });
    let lb = Arc::new(Outage {
        inner: store.clone(),
        down: AtomicBool::new(false),
    });
    let mut a = Membership::new(la.clone(), meta("a:1"), TIMES);
    let mut b = Membership::new(lb.clone(), meta("b:1"), TIMES);
    for _ in 0..2 {
        a.round().await.unwrap();
        b.round().await.unwrap();
    }
    let before = leases(&store).await;
    let a_share = owned_by(&before, "a:1");
    assert!(!a_share.is_empty() && a_share.len() < usize::from(BUCKETS));

    // An outage far longer than the TTL: every lease and heartbeat is stale when it ends.
    la.down.store(true, Ordering::SeqCst);
    lb.down.store(true, Ordering::SeqCst);
    assert!(a.round().await.is_err() && b.round().await.is_err());
    exec(
        &store,
        "UPDATE fleet_bucket_leases SET expires_at = now() - interval '2 minutes';
         UPDATE fleet_leader SET expires_at = now() - interval '2 minutes';
         UPDATE fleet_instances SET heartbeat_at = now() - interval '2 minutes'",
    )
    .await;
    lb.down.store(false, Ordering::SeqCst);

    // B is back first and sees A silent, yet renews only its own: A's wait one TTL.
    b.round().await.unwrap();
    let mid = leases(&store).await;
    assert_eq!(
        owned_by(&mid, "a:1"),
        a_share,
        "A's expired buckets were taken"
    );
    assert_eq!(mid, before, "epochs changed");

    // A comes back within that TTL and renews its own, epochs unchanged.
    la.down.store(false, Ordering::SeqCst);
    a.round().await.unwrap();
    b.round().await.unwrap();
    assert_eq!(leases(&store).await, before);
}

#[tokio::test]
async fn leaving_hands_buckets_and_leadership_over_at_once() {
    let db = TestDb::create().await;
    let store = db.store(Arc::new(fleet_core::SystemClock)).await;
    // Servers are counted per owner from per-bucket counts: active ones only, and a server
    // that goes inactive or is removed no longer counts.
    let mut ids = Vec::new();
    for i in 0..40 {
        let s = store
            .create_server(NewServer::new(format!("s{i}"), "http://127.0.0.1:9"))
            .await
            .unwrap();
        ids.push(s.id);
    }
    store
        .update_server(
            ids[0],
            fleet_core::ServerUpdate {
                status: Some(fleet_core::ServerStatus::Inactive),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(store.delete_server(ids[1]).await.unwrap());
    let mut a = Membership::new(Arc::new(store.clone()), meta("a:1"), TIMES);
    let mut b = Membership::new(Arc::new(store.clone()), meta("b:1"), TIMES);
    a.round().await.unwrap();
    b.round().await.unwrap();
    a.round().await.unwrap();
    b.round().await.unwrap();
    let listed = store.instances(TIMES.ttl).await.unwrap();
    let live = ["a:1".to_owned(), "b:1".to_owned()];
    for i in &listed {
        let expected = ids[2..]
            .iter()
            .filter(|id| share(&i.id, &live).contains(&bucket_of(**id)))
            .count() as u64;
        assert_eq!(i.servers, expected, "{i:?}");
    }
    assert_eq!(listed.iter().map(|i| i.servers).sum::<u64>(), 38);
    store.leave("a:1").await.unwrap();
    // No wait for an expiry: released buckets and a released leader's lease are free.
    b.round().await.unwrap();
    assert_eq!(
        owned_by(&leases(&store).await, "b:1").len(),
        usize::from(BUCKETS)
    );
    assert_eq!(b.stats().snapshot().leader_epoch, Some(2));
    let listed = store.instances(TIMES.ttl).await.unwrap();
    assert_eq!(
        listed.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
        ["b:1"]
    );
    assert_eq!(listed[0].servers, 38);
}

#[tokio::test]
async fn migrations_refuse_a_schema_newer_than_they_know() {
    let db = TestDb::create().await;
    let store = db.store(Arc::new(fleet_core::SystemClock)).await;
    exec(
        &store,
        "INSERT INTO refinery_schema_history (version, name, applied_on, checksum)
         VALUES (999, 'from_the_future', now()::text, '0')",
    )
    .await;
    let pool = db.settings.pool().unwrap();
    let err = migrate(&pool).await.unwrap_err().to_string();
    assert!(
        err.contains("version 999, newer than this Fleet knows"),
        "{err}"
    );
}

#[tokio::test]
async fn alert_changes_are_kept_only_under_their_fence_and_decided_only_under_the_leaders() {
    use fleet_alerts::{
        AlertChange, AlertKey, AlertStore, AlertTransition, OwnedWrite, Phase, Rule,
    };
    let db = TestDb::create().await;
    let base = db.store(Arc::new(fleet_core::SystemClock)).await;
    let a_stats = ClusterStats::new("a:1");
    let a = base.clone().shared_as("a:1", a_stats.clone());
    let b = base.clone().shared_as("b:1", ClusterStats::new("b:1"));
    let ids = [
        base.create_server(NewServer::new("s0", "http://127.0.0.1:9"))
            .await
            .unwrap()
            .id,
        base.create_server(NewServer::new("s1", "http://127.0.0.1:9"))
            .await
            .unwrap()
            .id,
    ];
    let mut ma = Membership::new(Arc::new(base.clone()), meta("a:1"), TIMES);
    ma.round().await.unwrap();
    let leader_epoch = ma.stats().snapshot().leader_epoch.unwrap();
    let at = fleet_core::conformance::base_time();
    let write = |server: fleet_core::ServerId, epoch: i64, firing: bool| {
        let key = AlertKey {
            rule: Rule::ServerCritical,
            server: Some(server),
            detail: String::new(),
        };
        OwnedWrite {
            fence: Some(fleet_core::cluster::Fence {
                bucket: bucket_of(server),
                epoch,
            }),
            transitions: vec![AlertTransition {
                key: key.clone(),
                from: Phase::Pending,
                to: if firing {
                    Phase::Firing
                } else {
                    Phase::Inactive
                },
                at,
                since: at,
            }],
            changes: vec![AlertChange {
                key,
                firing,
                at,
                since: at,
            }],
        }
    };

    // A owns every bucket at epoch 1: its writes land, phase and change together.
    assert_eq!(a.record_owned(&[write(ids[0], 1, true)]).await.unwrap(), 0);
    assert_eq!(
        b.phases_in_buckets(&[bucket_of(ids[0])])
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(
        b.phases_in_buckets(&[bucket_of(ids[0]) ^ 1])
            .await
            .unwrap()
            .is_empty()
    );

    // B takes every bucket over (epoch 2); A's late write under epoch 1 is refused, counted,
    // and leaves neither a phase nor a change.
    exec(
        &base,
        "UPDATE fleet_bucket_leases SET expires_at = now() - interval '1 minute'",
    )
    .await;
    base.acquire("b:1", &(0..BUCKETS).collect::<Vec<_>>(), TIMES.ttl, true)
        .await
        .unwrap();
    assert_eq!(a.record_owned(&[write(ids[1], 1, true)]).await.unwrap(), 1);
    assert_eq!(a_stats.snapshot().fenced_writes_rejected, 1);
    let phases = b.alert_phases().await.unwrap();
    assert!(
        phases.iter().all(|p| p.key.server != Some(ids[1])),
        "{phases:?}"
    );
    assert_eq!(b.record_owned(&[write(ids[0], 2, false)]).await.unwrap(), 0);

    // The log holds A's firing and B's resolution, in order, and nothing of the refused write.
    let log = a.changes_after(0, 100).await.unwrap();
    let seen: Vec<_> = log
        .iter()
        .map(|l| (l.change.key.server, l.change.firing))
        .collect();
    assert_eq!(seen, [(Some(ids[0]), true), (Some(ids[0]), false)]);
    assert_eq!(a.changes_after(log[0].id, 100).await.unwrap().len(), 1);

    // The leader decides on the first change: its position and firing set move together.
    assert!(a.apply_led(&[], &log[..1], leader_epoch).await.unwrap());
    let led = b.led_state().await.unwrap();
    assert_eq!(led.position, log[0].id);
    assert_eq!(led.firing.len(), 1);
    // A former leader (a superseded epoch) writes nothing.
    assert!(!a.apply_led(&[], &log[1..], leader_epoch + 1).await.unwrap());
    assert_eq!(b.led_state().await.unwrap(), led);
    assert!(a.apply_led(&[], &log[1..], leader_epoch).await.unwrap());
    let led = b.led_state().await.unwrap();
    assert_eq!((led.position, led.firing.len()), (log[1].id, 0));
}

#[tokio::test]
async fn the_leader_never_reads_past_a_change_still_being_written() {
    use fleet_alerts::AlertStore;
    let db = TestDb::create().await;
    let store = db.store(Arc::new(fleet_core::SystemClock)).await;
    // A writer draws id 1 and is slow to commit; another writes id 2 and commits.
    let mut slow = store.pool().get().await.unwrap();
    let tx = slow.transaction().await.unwrap();
    tx.batch_execute(
        "SELECT pg_advisory_xact_lock_shared(x'666c656574616c67'::bigint);
         INSERT INTO alert_change_log (rule, detail, firing, at, since)
         VALUES ('storage', 'slow', true, now(), now());",
    )
    .await
    .unwrap();
    exec(
        &store,
        "INSERT INTO alert_change_log (rule, detail, firing, at, since)
         VALUES ('storage', 'quick', true, now(), now())",
    )
    .await;
    // The reader waits for the slow writer instead of returning id 2 alone (and skipping 1).
    let reader = {
        let store = store.clone();
        tokio::spawn(async move { store.changes_after(0, 10).await.unwrap() })
    };
    let client = store.pool().get().await.unwrap();
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting == 1 {
            break;
        }
        assert!(!reader.is_finished(), "read past an uncommitted change");
        assert!(tokio::time::Instant::now() < end, "the reader never waited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!reader.is_finished(), "read past an uncommitted change");
    tx.commit().await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .unwrap()
        .unwrap();
    let details: Vec<_> = read.iter().map(|l| l.change.key.detail.as_str()).collect();
    assert_eq!(details, ["slow", "quick"]);
}
