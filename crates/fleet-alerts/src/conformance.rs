//! The alert store conformance suite: [`MemoryAlertStore`](crate::MemoryAlertStore) and
//! fleet-pg's store both run it. [`alert_store_conformance_tests!`](crate::alert_store_conformance_tests)
//! declares one test per case; the factory returns `(guard, alert store, registry)`, fresh.

use std::collections::BTreeSet;
use std::time::Duration;

use fleet_core::{NewServer, Registry, ServerId};
use time::OffsetDateTime;
use time::macros::datetime;
use uuid::Uuid;

use crate::incidents::{Effect, Snapshot};
use crate::model::{
    AlertKey, AlertTransition, Attempted, ChannelConfig, Incident, IncidentFilter, IncidentState,
    Matchers, Member, NoticeKind, Phase, Rule, Scope, Severity, Step,
};
use crate::rules::AlertChange;
use crate::schedule::{Schedule, Weekly};
use crate::store::{AlertStore, ChannelPatch, OwnedWrite, PolicyPatch, WindowPatch};

const T0: OffsetDateTime = datetime!(2026-03-31 23:59:00 UTC);

/// Declares one `#[tokio::test]` per case.
#[macro_export]
macro_rules! alert_store_conformance_tests {
    ($make:expr) => {
        $crate::alert_store_conformance_tests!(@cases $make;
            phases_keep_the_last_transition_and_forget_resolved_alerts,
            incidents_members_and_timeline_survive_a_restart,
            one_open_incident_per_group_key,
            each_notice_is_queued_once_and_claimed_by_one_sender,
            a_claim_that_expires_is_sent_again_with_the_same_key,
            retries_wait_and_failures_stop,
            channels_keep_their_secrets_and_refuse_taken_names,
            incidents_are_listed_by_filter_newest_first,
            silences_windows_and_policies_round_trip,
            owners_log_changes_in_order_and_the_leader_moves_its_position_with_its_firing_set
        );
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                let (_guard, store, registry) = ($make)().await;
                $crate::conformance::$case(&store, &registry).await;
            }
        )*
    };
}

async fn server(registry: &dyn Registry, name: &str) -> ServerId {
    registry
        .create_server(NewServer::new(name, format!("http://127.0.0.1:9/{name}")))
        .await
        .expect("create server")
        .id
}

fn snapshot(key: &str, rule: Rule) -> Snapshot {
    Snapshot {
        incident: Incident {
            id: Uuid::new_v4(),
            group_key: key.into(),
            rule,
            severity: rule.severity(),
            region: Some("eu".into()),
            state: IncidentState::Firing,
            summary: format!("{} in region eu", rule.alertname()),
            opened_at: T0,
            acknowledged_at: None,
            acknowledged_by: None,
            ack_reason: None,
            resolved_at: None,
            servers: 1,
            covers: 1,
        },
        seq: 1,
        announced_at: Some(T0),
        notified_at: Some(T0),
        additions: false,
        immediate: false,
        escalated_until: 0,
        told: BTreeSet::new(),
    }
}

fn member(id: ServerId, name: &str) -> Member {
    Member {
        server_id: id,
        server_name: name.into(),
        region: Some("eu".into()),
        detail: String::new(),
        joined_at: T0,
        resolved_at: None,
    }
}

fn line(incident: Uuid, kind: &'static str) -> Effect {
    Effect::Timeline {
        incident,
        at: T0,
        kind,
        message: kind.into(),
        channel: None,
    }
}

async fn webhook(store: &dyn AlertStore, name: &str) -> Uuid {
    store
        .create_channel(
            name,
            ChannelConfig::Webhook {
                url: format!("http://127.0.0.1:9/{name}"),
                send_resolved: true,
            },
            T0,
        )
        .await
        .expect("create channel")
        .id
}

/// An open incident with one member and one queued notice to `channel`.
async fn queued(store: &dyn AlertStore, registry: &dyn Registry, channel: Uuid) -> Uuid {
    let s = server(registry, &format!("s-{}", Uuid::new_v4())).await;
    let snap = snapshot(
        &format!("server_critical/{}", Uuid::new_v4()),
        Rule::ServerCritical,
    );
    let id = snap.incident.id;
    store
        .apply(
            &[],
            &[
                Effect::Save(Box::new(snap)),
                Effect::Join {
                    incident: id,
                    member: member(s, "web-1"),
                },
                Effect::Notify {
                    incident: id,
                    seq: 1,
                    channel,
                    kind: NoticeKind::Firing,
                    notice: serde_json::json!({"version": "4"}),
                },
            ],
        )
        .await
        .expect("apply");
    id
}

/// Phases: an upsert per alert, a resolved alert's row gone.
pub async fn phases_keep_the_last_transition_and_forget_resolved_alerts(
    store: &dyn AlertStore,
    registry: &dyn Registry,
) {
    let a = server(registry, "a").await;
    let b = server(registry, "b").await;
    let t = |s, rule, from, to| AlertTransition {
        key: AlertKey::server(rule, s),
        from,
        to,
        at: T0,
        since: T0,
    };
    store
        .apply(
            &[
                t(a, Rule::ServerCritical, Phase::Inactive, Phase::Pending),
                t(a, Rule::ServerCritical, Phase::Pending, Phase::Firing),
                t(b, Rule::ServerDegraded, Phase::Inactive, Phase::Pending),
            ],
            &[],
        )
        .await
        .unwrap();
    store
        .apply(
            &[t(b, Rule::ServerDegraded, Phase::Pending, Phase::Inactive)],
            &[],
        )
        .await
        .unwrap();
    let phases = store.alert_phases().await.unwrap();
    assert_eq!(phases.len(), 1, "{phases:?}");
    assert_eq!(phases[0].key, AlertKey::server(Rule::ServerCritical, a));
    assert_eq!(phases[0].phase, Phase::Firing);
}

/// A shared fleet's log: owners' changes come back in order, after any position; the
/// leader's position and firing set move together; phases are found by bucket.
pub async fn owners_log_changes_in_order_and_the_leader_moves_its_position_with_its_firing_set(
    store: &dyn AlertStore,
    registry: &dyn Registry,
) {
    let a = server(registry, "a").await;
    let b = server(registry, "b").await;
    let change = |s, firing| AlertChange {
        key: AlertKey::server(Rule::ServerCritical, s),
        firing,
        at: T0,
        since: T0,
    };
    let write = |s, to, firing| OwnedWrite {
        fence: None,
        transitions: vec![AlertTransition {
            key: AlertKey::server(Rule::ServerCritical, s),
            from: Phase::Pending,
            to,
            at: T0,
            since: T0,
        }],
        changes: vec![change(s, firing)],
    };
    let refused = store
        .record_owned(&[write(a, Phase::Firing, true), write(b, Phase::Firing, true)])
        .await
        .unwrap();
    assert_eq!(refused, 0);
    store
        .record_owned(&[write(a, Phase::Inactive, false)])
        .await
        .unwrap();
    let bucket = fleet_core::cluster::bucket_of(b);
    let in_b = store.phases_in_buckets(&[bucket]).await.unwrap();
    assert!(in_b.iter().any(|p| p.key.server == Some(b)), "{in_b:?}");
    assert!(
        in_b.iter().all(|p| p.key.server != Some(a)),
        "a resolved: {in_b:?}"
    );

    let log = store.changes_after(0, 10).await.unwrap();
    let seen: Vec<_> = log
        .iter()
        .map(|l| (l.change.key.server, l.change.firing))
        .collect();
    assert_eq!(seen, [(Some(a), true), (Some(b), true), (Some(a), false)]);
    assert!(log.windows(2).all(|w| w[0].id < w[1].id));
    let rest = store.changes_after(log[0].id, 10).await.unwrap();
    assert_eq!(rest, log[1..]);
    assert_eq!(store.changes_after(log[0].id, 1).await.unwrap(), log[1..2]);

    let start = store.led_state().await.unwrap();
    assert_eq!((start.position, start.firing.len()), (0, 0));
    assert!(store.apply_led(&[], &log[..2], 1).await.unwrap());
    let led = store.led_state().await.unwrap();
    assert_eq!(led.position, log[1].id);
    let firing: BTreeSet<_> = led.firing.iter().map(|(k, _)| k.server).collect();
    assert_eq!(firing, BTreeSet::from([Some(a), Some(b)]));
    assert!(store.apply_led(&[], &log[2..], 1).await.unwrap());
    let led = store.led_state().await.unwrap();
    assert_eq!(led.position, log[2].id);
    assert_eq!(led.firing.len(), 1);
    assert_eq!(led.firing[0].0, AlertKey::server(Rule::ServerCritical, b));
}

/// Open incidents come back with their timers and members; the timeline keeps its order.
pub async fn incidents_members_and_timeline_survive_a_restart(
    store: &dyn AlertStore,
    registry: &dyn Registry,
) {
    let s = server(registry, "web-1").await;
    let ch = webhook(store, "hook").await;
    let mut snap = snapshot("server_critical/eu", Rule::ServerCritical);
    snap.told.insert(ch);
    snap.escalated_until = 1800;
    let id = snap.incident.id;
    store
        .apply(
            &[],
            &[
                line(id, "opened"),
                Effect::Save(Box::new(snap.clone())),
                Effect::Join {
                    incident: id,
                    member: member(s, "web-1"),
                },
                line(id, "member_added"),
                line(id, "announced"),
            ],
        )
        .await
        .unwrap();
    let open = store.open_incidents().await.unwrap();
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].snapshot, snap);
    assert_eq!(open[0].members, vec![member(s, "web-1")]);
    store
        .apply(
            &[],
            &[
                Effect::Leave {
                    incident: id,
                    server: s,
                    detail: String::new(),
                    at: T0 + Duration::from_secs(60),
                },
                Effect::Save(Box::new(Snapshot {
                    incident: Incident {
                        state: IncidentState::Resolved,
                        resolved_at: Some(T0 + Duration::from_secs(60)),
                        ..snap.incident.clone()
                    },
                    ..snap.clone()
                })),
                line(id, "resolved"),
            ],
        )
        .await
        .unwrap();
    assert!(store.open_incidents().await.unwrap().is_empty());
    let detail = store.incident(id).await.unwrap().unwrap();
    assert_eq!(detail.incident.state, IncidentState::Resolved);
    assert_eq!(
        detail.members[0].resolved_at,
        Some(T0 + Duration::from_secs(60))
    );
    let kinds: Vec<&str> = detail.timeline.iter().map(|t| t.kind.as_str()).collect();
    assert_eq!(kinds, ["opened", "member_added", "announced", "resolved"]);
    // The timeline of every incident is tailed by id, oldest first.
    let (oldest, newest) = store.timeline_ids().await.unwrap().unwrap();
    assert_eq!(
        (oldest, newest),
        (detail.timeline[0].id, detail.timeline[3].id)
    );
    let tail = store.timeline_after(oldest, 2).await.unwrap();
    assert_eq!(tail, detail.timeline[1..3]);
    assert!(store.timeline_after(newest, 10).await.unwrap().is_empty());
}

/// A second open incident for a group key is refused, and the batch with it.
pub async fn one_open_incident_per_group_key(store: &dyn AlertStore, _registry: &dyn Registry) {
    let first = snapshot("region_unreachable/eu", Rule::RegionUnreachable);
    store
        .apply(&[], &[Effect::Save(Box::new(first.clone()))])
        .await
        .unwrap();
    let second = snapshot("region_unreachable/eu", Rule::RegionUnreachable);
    let err = store
        .apply(
            &[],
            &[
                Effect::Save(Box::new(second.clone())),
                line(second.incident.id, "opened"),
            ],
        )
        .await;
    assert!(err.is_err(), "two open incidents for one group key");
    assert!(store.incident(second.incident.id).await.unwrap().is_none());
    // Once the first resolves, the key is free again.
    let mut done = first.clone();
    done.incident.state = IncidentState::Resolved;
    store
        .apply(&[], &[Effect::Save(Box::new(done))])
        .await
        .unwrap();
    store
        .apply(&[], &[Effect::Save(Box::new(second))])
        .await
        .unwrap();
}

/// The same (incident, seq, channel) is queued once; a claimed row is not claimed again
/// while its lease runs, and busy channels are skipped.
pub async fn each_notice_is_queued_once_and_claimed_by_one_sender(
    store: &dyn AlertStore,
    registry: &dyn Registry,
) {
    let ch = webhook(store, "hook").await;
    let id = queued(store, registry, ch).await;
    store
        .apply(
            &[],
            &[Effect::Notify {
                incident: id,
                seq: 1,
                channel: ch,
                kind: NoticeKind::Firing,
                notice: serde_json::json!({"version": "4", "again": true}),
            }],
        )
        .await
        .unwrap();
    let now = OffsetDateTime::now_utc();
    assert!(
        store
            .claim(now, 10, Duration::from_secs(60), &[ch])
            .await
            .unwrap()
            .is_empty()
    );
    let claimed = store
        .claim(now, 10, Duration::from_secs(60), &[])
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].notice, serde_json::json!({"version": "4"}));
    assert!(
        store
            .claim(now, 10, Duration::from_secs(60), &[])
            .await
            .unwrap()
            .is_empty()
    );
    let d = &claimed[0];
    assert!(
        !store
            .finish(d.id, Uuid::new_v4(), &Attempted::Sent, now)
            .await
            .unwrap()
    );
    assert!(
        store
            .finish(d.id, d.claim_token, &Attempted::Sent, now)
            .await
            .unwrap()
    );
    let backlog = store.backlog().await.unwrap();
    assert_eq!((backlog[0].pending, backlog[0].sent), (0, 1));
}

/// A sender that dies after sending leaves its claim to expire; the row is sent again, with
/// the same idempotency key, and the late sender cannot mark it.
pub async fn a_claim_that_expires_is_sent_again_with_the_same_key(
    store: &dyn AlertStore,
    registry: &dyn Registry,
) {
    let ch = webhook(store, "hook").await;
    queued(store, registry, ch).await;
    let now = OffsetDateTime::now_utc();
    let first = store.claim(now, 10, Duration::ZERO, &[]).await.unwrap();
    assert_eq!(first.len(), 1);
    // A zero lease has expired by the next claim.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let later = OffsetDateTime::now_utc() + Duration::from_millis(20);
    let second = store
        .claim(later, 10, Duration::from_secs(60), &[])
        .await
        .unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(first[0].idempotency_key(), second[0].idempotency_key());
    assert!(
        !store
            .finish(first[0].id, first[0].claim_token, &Attempted::Sent, later)
            .await
            .unwrap()
    );
    assert!(
        store
            .finish(second[0].id, second[0].claim_token, &Attempted::Sent, later)
            .await
            .unwrap()
    );
}

/// A retried row waits its back-off; a failed one is never claimed again.
pub async fn retries_wait_and_failures_stop(store: &dyn AlertStore, registry: &dyn Registry) {
    let ch = webhook(store, "hook").await;
    queued(store, registry, ch).await;
    let now = OffsetDateTime::now_utc();
    let d = store
        .claim(now, 10, Duration::from_secs(60), &[])
        .await
        .unwrap()
        .remove(0);
    let retry = Attempted::Retry {
        after: Duration::from_secs(3600),
        error: "server_error (503)".into(),
        counts: true,
    };
    assert!(
        store
            .finish(d.id, d.claim_token, &retry, now)
            .await
            .unwrap()
    );
    assert!(
        store
            .claim(now, 10, Duration::from_secs(60), &[])
            .await
            .unwrap()
            .is_empty()
    );
    let ch2 = webhook(store, "hook2").await;
    queued(store, registry, ch2).await;
    let d = store
        .claim(now, 10, Duration::from_secs(60), &[])
        .await
        .unwrap()
        .remove(0);
    assert_eq!(d.attempts, 0);
    let failed = Attempted::Failed {
        error: "rejected (400)".into(),
    };
    assert!(
        store
            .finish(d.id, d.claim_token, &failed, now)
            .await
            .unwrap()
    );
    let later = now + Duration::from_secs(7200);
    let claimed = store.claim(later, 10, Duration::from_secs(60), &[]).await;
    // Only the retried row comes back once its back-off is over (PostgreSQL decides "due" by
    // its own clock, so it may not be due yet there).
    assert!(
        claimed
            .unwrap()
            .iter()
            .all(|r| r.channel_id == ch && r.attempts == 1)
    );
    let b = store.backlog().await.unwrap();
    let failed: u64 = b.iter().map(|b| b.failed).sum();
    assert_eq!(failed, 1);
}

/// A channel's configuration comes back whole; names are unique, case-insensitively.
pub async fn channels_keep_their_secrets_and_refuse_taken_names(
    store: &dyn AlertStore,
    _registry: &dyn Registry,
) {
    let config = ChannelConfig::Pagerduty {
        routing_key: "R0UT1NG".into(),
        url: Some("http://127.0.0.1:9/pd".into()),
    };
    let c = store
        .create_channel("pager", config.clone(), T0)
        .await
        .unwrap();
    assert!(matches!(
        store.create_channel("PAGER", config.clone(), T0).await,
        Err(fleet_core::StoreError::Conflict(_))
    ));
    assert_eq!(
        store.get_channel(c.id).await.unwrap().unwrap().config,
        config
    );
    let email = ChannelConfig::Email {
        to: vec!["ops@example.test".into()],
        from: "fleet@example.test".into(),
        smtp_host: "127.0.0.1".into(),
        smtp_port: 2525,
        smtp_tls: crate::model::SmtpTls::None,
        smtp_username: None,
        smtp_password: Some("hunter2".into()),
    };
    let changed = store
        .update_channel(
            c.id,
            ChannelPatch {
                name: Some("mail".into()),
                config: Some(email.clone()),
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(changed.config, email);
    assert_eq!(store.list_channels().await.unwrap()[0].name, "mail");
    assert!(store.delete_channel(c.id).await.unwrap());
    assert!(store.get_channel(c.id).await.unwrap().is_none());
}

/// Filters by state, severity, region and server; newest first; the total counts all.
pub async fn incidents_are_listed_by_filter_newest_first(
    store: &dyn AlertStore,
    registry: &dyn Registry,
) {
    let s = server(registry, "web-1").await;
    let mut ids = Vec::new();
    for i in 0..3u64 {
        let mut snap = snapshot(
            &format!("k{i}"),
            if i == 2 {
                Rule::ServerDegraded
            } else {
                Rule::ServerCritical
            },
        );
        snap.incident.opened_at = T0 + Duration::from_secs(i * 60);
        let id = snap.incident.id;
        let mut fx = vec![Effect::Save(Box::new(snap))];
        if i == 1 {
            fx.push(Effect::Join {
                incident: id,
                member: member(s, "web-1"),
            });
        }
        store.apply(&[], &fx).await.unwrap();
        ids.push(id);
    }
    let all = IncidentFilter {
        limit: 2,
        ..IncidentFilter::default()
    };
    let (page, total) = store.list_incidents(&all).await.unwrap();
    assert_eq!(total, 3);
    assert_eq!(
        page.iter().map(|i| i.id).collect::<Vec<_>>(),
        [ids[2], ids[1]]
    );
    let warn = IncidentFilter {
        severity: Some(Severity::Warning),
        limit: 10,
        ..IncidentFilter::default()
    };
    assert_eq!(store.list_incidents(&warn).await.unwrap().1, 1);
    let by_server = IncidentFilter {
        server: Some(s),
        limit: 10,
        ..IncidentFilter::default()
    };
    let (page, _) = store.list_incidents(&by_server).await.unwrap();
    assert_eq!(page.iter().map(|i| i.id).collect::<Vec<_>>(), [ids[1]]);
    let other_region = IncidentFilter {
        region: Some("us".into()),
        limit: 10,
        ..IncidentFilter::default()
    };
    assert_eq!(store.list_incidents(&other_region).await.unwrap().1, 0);
    let open = store.open_by_severity().await.unwrap();
    assert!(open.contains(&(Severity::Critical, 2)) && open.contains(&(Severity::Warning, 1)));
}

/// Silences, windows and policies come back as written.
pub async fn silences_windows_and_policies_round_trip(
    store: &dyn AlertStore,
    _registry: &dyn Registry,
) {
    let m = Matchers {
        region: Some("eu".into()),
        rule: Some(Rule::ServerUnreachable),
        ..Matchers::default()
    };
    let s = store
        .create_silence(m.clone(), T0, T0 + Duration::from_secs(3600), "upgrade", T0)
        .await
        .unwrap();
    assert_eq!(store.get_silence(s.id).await.unwrap().unwrap(), s);
    assert_eq!(store.list_silences(T0).await.unwrap(), vec![s.clone()]);
    assert!(
        store
            .list_silences(T0 + Duration::from_secs(3600))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.delete_silence(s.id).await.unwrap());

    let weekly = Schedule::Weekly(Weekly {
        weekdays: vec!["sat".into()],
        start_time: "02:00".into(),
        duration_seconds: 7200,
        time_zone: "Europe/Berlin".into(),
    });
    let w = store
        .create_window("nightly", Scope::Region("eu".into()), weekly, T0)
        .await
        .unwrap();
    assert_eq!(store.get_window(w.id).await.unwrap().unwrap(), w);
    let once = Schedule::Once {
        starts_at: T0,
        ends_at: T0 + Duration::from_secs(60),
    };
    let w2 = store
        .update_window(
            w.id,
            WindowPatch {
                schedule: Some(once.clone()),
                ..WindowPatch::default()
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(w2.schedule, once);
    assert_eq!(store.list_windows().await.unwrap(), vec![w2]);

    let ch = Uuid::new_v4();
    let p = store
        .create_policy(
            "eu on-call",
            m,
            vec![Step {
                after_seconds: 0,
                channel_ids: vec![ch],
            }],
            T0,
        )
        .await
        .unwrap();
    assert_eq!(store.get_policy(p.id).await.unwrap().unwrap(), p);
    assert!(
        store
            .create_policy("EU ON-CALL", Matchers::default(), vec![], T0)
            .await
            .is_err()
    );
    let p2 = store
        .update_policy(
            p.id,
            PolicyPatch {
                steps: Some(vec![]),
                ..PolicyPatch::default()
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert!(p2.steps.is_empty());
    assert!(store.delete_policy(p.id).await.unwrap());
    assert!(store.list_policies().await.unwrap().is_empty());
}
