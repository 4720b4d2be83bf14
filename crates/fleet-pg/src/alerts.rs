//! [`AlertStore`] on PostgreSQL: one transaction per batch of effects, outbox rows claimed
//! with `FOR UPDATE SKIP LOCKED` and a claim token, channel configurations sealed.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use fleet_alerts::{
    AlertChange, AlertKey, AlertStore, AlertTransition, Attempted, Backlog, Channel, ChannelConfig,
    ChannelPatch, Delivery, Effect, Incident, IncidentDetail, IncidentFilter, IncidentState,
    LedState, LoggedChange, MaintenanceWindow, Matchers, Member, NoticeKind, OwnedWrite, Phase,
    Policy, PolicyPatch, Restored, Rule, Schedule, Scope, Severity, Silence, Snapshot, Step,
    StoredPhase, TimelineEntry, WindowPatch,
};
use fleet_core::{ApiToken, ServerId, StoreError};
use time::OffsetDateTime;
use tokio_postgres::types::{Json, ToSql};
use tokio_postgres::{Row, Transaction};
use uuid::Uuid;

use crate::store::{PgStore, db_error};

fn corrupt(what: &str, value: &str) -> StoreError {
    StoreError::backend(format!(
        "stored {what} `{value}` is not known to this version"
    ))
}

fn json_error(what: &str, e: serde_json::Error) -> StoreError {
    StoreError::backend(format!("stored {what} cannot be read: {e}"))
}

/// Writes phase transitions: the last of each alert wins; an inactive one is deleted.
async fn write_phases<'t>(
    tx: &Transaction<'_>,
    transitions: impl Iterator<Item = &'t AlertTransition>,
) -> Result<(), StoreError> {
    // Phases: the last transition of each alert in the batch wins.
    let mut last: BTreeMap<(ServerId, Rule, &str), &AlertTransition> = BTreeMap::new();
    for t in transitions {
        if let Some(s) = t.key.server {
            last.insert((s, t.key.rule, t.key.detail.as_str()), t);
        }
    }
    let (mut del_s, mut del_r, mut del_d) = (Vec::new(), Vec::new(), Vec::new());
    let (mut up_s, mut up_r, mut up_d, mut up_p, mut up_since, mut up_at) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for ((s, rule, detail), t) in &last {
        if t.to == Phase::Inactive {
            del_s.push(s.0);
            del_r.push(rule.as_str());
            del_d.push(*detail);
        } else {
            up_s.push(s.0);
            up_r.push(rule.as_str());
            up_d.push(*detail);
            up_p.push(t.to.as_str());
            up_since.push(t.since);
            up_at.push(t.at);
        }
    }
    if !del_s.is_empty() {
        tx.execute(
            "DELETE FROM alert_phases p USING UNNEST($1::uuid[], $2::text[], $3::text[]) AS d(s, r, t) \
             WHERE p.server_id = d.s AND p.rule = d.r AND p.detail = d.t",
            &[&del_s, &del_r, &del_d],
        )
        .await
        .map_err(db_error)?;
    }
    if !up_s.is_empty() {
        // Servers deleted meanwhile are skipped, not an error.
        tx.execute(
            "INSERT INTO alert_phases (server_id, rule, detail, phase, since, changed_at) \
             SELECT u.* FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::timestamptz[]) \
               AS u(s, r, d, p, since, at) \
             WHERE EXISTS (SELECT 1 FROM managed_servers m WHERE m.id = u.s) \
             ON CONFLICT (server_id, rule, detail) DO UPDATE \
             SET phase = EXCLUDED.phase, since = EXCLUDED.since, changed_at = EXCLUDED.changed_at",
            &[&up_s, &up_r, &up_d, &up_p, &up_since, &up_at],
        )
        .await
        .map_err(db_error)?;
    }
    Ok(())
}

/// Writes incident effects: snapshots, members, the timeline and outbox rows.
async fn write_effects(tx: &Transaction<'_>, effects: &[Effect]) -> Result<(), StoreError> {
    // Incidents first (their latest snapshot), then what refers to them.
    let mut saves: BTreeMap<Uuid, &Snapshot> = BTreeMap::new();
    for e in effects {
        if let Effect::Save(s) = e {
            saves.insert(s.incident.id, s);
        }
    }
    let upsert = tx
        .prepare(&format!(
            "INSERT INTO incidents ({INCIDENT_COLUMNS}) VALUES \
             ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21) \
             ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state, summary = EXCLUDED.summary, \
             acknowledged_at = EXCLUDED.acknowledged_at, acknowledged_by = EXCLUDED.acknowledged_by, \
             ack_reason = EXCLUDED.ack_reason, resolved_at = EXCLUDED.resolved_at, servers = EXCLUDED.servers, \
             covers = EXCLUDED.covers, seq = EXCLUDED.seq, announced_at = EXCLUDED.announced_at, \
             notified_at = EXCLUDED.notified_at, additions = EXCLUDED.additions, immediate = EXCLUDED.immediate, \
             escalated_until = EXCLUDED.escalated_until, told = EXCLUDED.told"
        ))
        .await
        .map_err(db_error)?;
    for s in saves.values() {
        let i = &s.incident;
        let told: Vec<Uuid> = s.told.iter().copied().collect();
        let servers = i.servers as i64;
        let covers = i.covers as i64;
        let escalated = s.escalated_until as i64;
        tx.execute(
            &upsert,
            &[
                &i.id,
                &i.group_key,
                &i.rule.as_str(),
                &i.severity.as_str(),
                &i.region,
                &i.state.as_str(),
                &i.summary,
                &i.opened_at,
                &i.acknowledged_at,
                &i.acknowledged_by,
                &i.ack_reason,
                &i.resolved_at,
                &servers,
                &covers,
                &s.seq,
                &s.announced_at,
                &s.notified_at,
                &s.additions,
                &s.immediate,
                &escalated,
                &told,
            ],
        )
        .await
        .map_err(db_error)?;
    }
    // Members, as the batch leaves them; members dropped from an unannounced incident go.
    let mut members: BTreeMap<(Uuid, ServerId, &str), Option<&Member>> = BTreeMap::new();
    let mut left: BTreeMap<(Uuid, ServerId, &str), OffsetDateTime> = BTreeMap::new();
    for e in effects {
        match e {
            Effect::Join { incident, member } => {
                members.insert((*incident, member.server_id, &member.detail), Some(member));
                left.remove(&(*incident, member.server_id, member.detail.as_str()));
            }
            Effect::Leave {
                incident,
                server,
                detail,
                at,
            } => {
                left.insert((*incident, *server, detail.as_str()), *at);
            }
            _ => {}
        }
    }
    let (mut mi, mut ms, mut mn, mut mr, mut md, mut mj) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for ((inc, server, detail), m) in &members {
        if let Some(m) = m {
            mi.push(*inc);
            ms.push(server.0);
            mn.push(m.server_name.as_str());
            mr.push(m.region.as_deref());
            md.push(*detail);
            mj.push(m.joined_at);
        }
    }
    if !mi.is_empty() {
        tx.execute(
            "INSERT INTO incident_members (incident_id, server_id, server_name, region, detail, joined_at) \
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::timestamptz[]) \
             ON CONFLICT (incident_id, server_id, detail) DO UPDATE SET resolved_at = NULL",
            &[&mi, &ms, &mn, &mr, &md, &mj],
        )
        .await
        .map_err(db_error)?;
    }
    if !left.is_empty() {
        let (mut li, mut ls, mut ld, mut la) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ((inc, server, detail), at) in &left {
            li.push(*inc);
            ls.push(server.0);
            ld.push(*detail);
            la.push(*at);
        }
        tx.execute(
            "UPDATE incident_members m SET resolved_at = l.at \
             FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::timestamptz[]) AS l(i, s, d, at) \
             WHERE m.incident_id = l.i AND m.server_id = l.s AND m.detail = l.d",
            &[&li, &ls, &ld, &la],
        )
        .await
        .map_err(db_error)?;
    }
    // The timeline, in order.
    let (mut ti, mut ta, mut tk, mut tm, mut tc) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut ords: Vec<i32> = Vec::new();
    for e in effects {
        if let Effect::Timeline {
            incident,
            at,
            kind,
            message,
            channel,
        } = e
        {
            ti.push(*incident);
            ta.push(*at);
            tk.push(*kind);
            tm.push(message.as_str());
            tc.push(*channel);
            ords.push(ords.len() as i32);
        }
    }
    if !ti.is_empty() {
        tx.execute(
            "INSERT INTO incident_timeline (incident_id, at, kind, message, channel_id) \
             SELECT i, at, k, m, c FROM UNNEST($1::uuid[], $2::timestamptz[], $3::text[], $4::text[], $5::uuid[], $6::int[]) \
               AS t(i, at, k, m, c, o) ORDER BY o",
            &[&ti, &ta, &tk, &tm, &tc, &ords],
        )
        .await
        .map_err(db_error)?;
    }
    // The outbox: one row per (incident, seq, channel), never twice; a channel deleted
    // meanwhile is skipped.
    let (mut oi, mut oq, mut oc, mut ok, mut on) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for e in effects {
        if let Effect::Notify {
            incident,
            seq,
            channel,
            kind,
            notice,
        } = e
        {
            oi.push(*incident);
            oq.push(*seq);
            oc.push(*channel);
            ok.push(kind.as_str());
            on.push(Json(notice));
        }
    }
    if !oi.is_empty() {
        tx.execute(
            "INSERT INTO alert_outbox (incident_id, seq, channel_id, kind, notice) \
             SELECT o.* FROM UNNEST($1::uuid[], $2::int[], $3::uuid[], $4::text[], $5::jsonb[]) AS o(i, s, c, k, n) \
             WHERE EXISTS (SELECT 1 FROM alert_channels ch WHERE ch.id = o.c) \
             ON CONFLICT (incident_id, seq, channel_id) DO NOTHING",
            &[&oi, &oq, &oc, &ok, &on],
        )
        .await
        .map_err(db_error)?;
    }
    Ok(())
}

/// The advisory lock between the change log's writers (shared) and the leader's reader
/// (exclusive).
const CHANGE_LOG_LOCK: i64 = 0x666c_6565_7461_6c67; // "fleetalg"

/// An alert's key in `alert_announced`.
fn announced_key(key: &AlertKey) -> String {
    let server = key.server.map(|s| s.0.to_string()).unwrap_or_default();
    format!("{}/{server}/{}", key.rule.as_str(), key.detail)
}

/// A row of `alert_phases` (server_id, rule, detail, phase, since).
fn stored_phase(r: &Row) -> Result<StoredPhase, StoreError> {
    let rule: String = r.get(1);
    let phase: String = r.get(3);
    Ok(StoredPhase {
        key: AlertKey {
            rule: Rule::parse(&rule).ok_or_else(|| corrupt("rule", &rule))?,
            server: Some(ServerId(r.get(0))),
            detail: r.get(2),
        },
        phase: Phase::parse(&phase).ok_or_else(|| corrupt("phase", &phase))?,
        since: r.get(4),
    })
}

const INCIDENT_COLUMNS: &str = "id, group_key, rule, severity, region, state, summary, opened_at, \
     acknowledged_at, acknowledged_by, ack_reason, resolved_at, servers, covers, seq, announced_at, \
     notified_at, additions, immediate, escalated_until, told";

fn incident(r: &Row) -> Result<Incident, StoreError> {
    let rule: String = r.get(2);
    let severity: String = r.get(3);
    let state: String = r.get(5);
    Ok(Incident {
        id: r.get(0),
        group_key: r.get(1),
        rule: Rule::parse(&rule).ok_or_else(|| corrupt("rule", &rule))?,
        severity: Severity::parse(&severity).ok_or_else(|| corrupt("severity", &severity))?,
        region: r.get(4),
        state: IncidentState::parse(&state).ok_or_else(|| corrupt("state", &state))?,
        summary: r.get(6),
        opened_at: r.get(7),
        acknowledged_at: r.get(8),
        acknowledged_by: r.get(9),
        ack_reason: r.get(10),
        resolved_at: r.get(11),
        servers: r.get::<_, i64>(12) as u64,
        covers: r.get::<_, i64>(13) as u64,
    })
}

fn snapshot(r: &Row) -> Result<Snapshot, StoreError> {
    Ok(Snapshot {
        incident: incident(r)?,
        seq: r.get(14),
        announced_at: r.get(15),
        notified_at: r.get(16),
        additions: r.get(17),
        immediate: r.get(18),
        escalated_until: r.get::<_, i64>(19) as u64,
        told: r.get::<_, Vec<Uuid>>(20).into_iter().collect(),
    })
}

fn member(r: &Row) -> Member {
    Member {
        server_id: ServerId(r.get(0)),
        server_name: r.get(1),
        region: r.get(2),
        detail: r.get(3),
        joined_at: r.get(4),
        resolved_at: r.get(5),
    }
}

const MEMBER_COLUMNS: &str = "server_id, server_name, region, detail, joined_at, resolved_at";

impl PgStore {
    fn seal_config(
        &self,
        id: Uuid,
        config: &ChannelConfig,
    ) -> Result<(Vec<u8>, String), StoreError> {
        let json = serde_json::to_string(config)
            .map_err(|e| StoreError::backend(format!("channel configuration: {e}")))?;
        // Bound to the channel's id, as a probe token is to its server's.
        self.vault()
            .seal(ServerId(id), &ApiToken::new(json))
            .map_err(|e| StoreError::Invalid(format!("channel secrets cannot be sealed: {e}")))
    }

    fn channel(&self, r: &Row) -> Result<Channel, StoreError> {
        let id: Uuid = r.get(0);
        let sealed: Vec<u8> = r.get(2);
        let key_id: String = r.get(3);
        let plain = self
            .vault()
            .open(ServerId(id), &sealed, &key_id)
            .map_err(|e| StoreError::Invalid(format!("channel {id}: {e}")))?;
        let config: ChannelConfig =
            serde_json::from_str(plain.expose()).map_err(|e| json_error("channel", e))?;
        Ok(Channel {
            id,
            name: r.get(1),
            config,
            created_at: r.get(4),
        })
    }

    async fn read_incidents(
        &self,
        sql_where: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Snapshot>, StoreError> {
        let client = self.client().await?;
        let sql = format!("SELECT {INCIDENT_COLUMNS} FROM incidents {sql_where}");
        client
            .query(&sql, params)
            .await
            .map_err(db_error)?
            .iter()
            .map(snapshot)
            .collect()
    }
}

fn silence(r: &Row) -> Result<Silence, StoreError> {
    let Json(matchers): Json<Matchers> = r.try_get(1).map_err(db_error)?;
    Ok(Silence {
        id: r.get(0),
        matchers,
        starts_at: r.get(2),
        ends_at: r.get(3),
        comment: r.get(4),
        created_at: r.get(5),
    })
}

fn window(r: &Row) -> Result<MaintenanceWindow, StoreError> {
    let Json(scope): Json<Scope> = r.try_get(2).map_err(db_error)?;
    let Json(schedule): Json<Schedule> = r.try_get(3).map_err(db_error)?;
    Ok(MaintenanceWindow {
        id: r.get(0),
        name: r.get(1),
        scope,
        schedule,
        created_at: r.get(4),
    })
}

fn policy(r: &Row) -> Result<Policy, StoreError> {
    let Json(matchers): Json<Matchers> = r.try_get(2).map_err(db_error)?;
    let Json(steps): Json<Vec<Step>> = r.try_get(3).map_err(db_error)?;
    Ok(Policy {
        id: r.get(0),
        name: r.get(1),
        matchers,
        steps,
        created_at: r.get(4),
    })
}

fn taken(e: StoreError, what: &str, name: &str) -> StoreError {
    match e {
        StoreError::Conflict(_) => StoreError::Conflict(format!("{what} `{name}` already exists")),
        e => e,
    }
}

#[async_trait]
impl AlertStore for PgStore {
    async fn apply(
        &self,
        transitions: &[AlertTransition],
        effects: &[Effect],
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        write_phases(&tx, transitions.iter()).await?;
        write_effects(&tx, effects).await?;
        tx.commit().await.map_err(db_error)
    }

    async fn record_owned(&self, writes: &[OwnedWrite]) -> Result<u64, StoreError> {
        if writes.is_empty() {
            return Ok(0);
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        // The fences still held, locked FOR SHARE until commit: a takeover (which bumps the
        // epoch) waits for this write, and a write after a takeover finds the new epoch.
        let mut held: HashSet<(u16, i64)> = HashSet::new();
        let fenced: Vec<i16> = writes
            .iter()
            .filter_map(|w| w.fence.map(|f| f.bucket as i16))
            .collect();
        if let Some((me, _)) = self.member()
            && !fenced.is_empty()
        {
            for r in tx
                .query(
                    "SELECT bucket, epoch FROM fleet_bucket_leases \
                     WHERE owner = $1 AND bucket = ANY($2) ORDER BY bucket FOR SHARE",
                    &[&me, &fenced],
                )
                .await
                .map_err(db_error)?
            {
                held.insert((r.get::<_, i16>(0) as u16, r.get(1)));
            }
        }
        let shared = self.member().is_some();
        let kept: Vec<&OwnedWrite> = writes
            .iter()
            .filter(|w| !shared || w.fence.is_none_or(|f| held.contains(&(f.bucket, f.epoch))))
            .collect();
        let refused = (writes.len() - kept.len()) as u64;
        write_phases(&tx, kept.iter().flat_map(|w| &w.transitions)).await?;
        let (mut ls, mut lr, mut ld, mut lf, mut la, mut lsince) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        for c in kept.iter().flat_map(|w| &w.changes) {
            ls.push(c.key.server.map(|s| s.0));
            lr.push(c.key.rule.as_str());
            ld.push(c.key.detail.as_str());
            lf.push(c.firing);
            la.push(c.at);
            lsince.push(c.since);
        }
        if !ls.is_empty() {
            // Shared: the leader's reader takes this lock exclusively, so it reads only once
            // every writer that drew an id has committed.
            tx.execute(
                "SELECT pg_advisory_xact_lock_shared($1)",
                &[&CHANGE_LOG_LOCK],
            )
            .await
            .map_err(db_error)?;
            tx.execute(
                "INSERT INTO alert_change_log (server_id, rule, detail, firing, at, since) \
                 SELECT s, r, d, f, at, since FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::bool[], $5::timestamptz[], $6::timestamptz[]) \
                 WITH ORDINALITY AS c(s, r, d, f, at, since, n) ORDER BY n",
                &[&ls, &lr, &ld, &lf, &la, &lsince],
            )
            .await
            .map_err(db_error)?;
        }
        tx.commit().await.map_err(db_error)?;
        if let Some((_, stats)) = self.member() {
            stats.add_rejected(refused);
        }
        Ok(refused)
    }

    async fn phases_in_buckets(&self, buckets: &[u16]) -> Result<Vec<StoredPhase>, StoreError> {
        let buckets: Vec<i16> = buckets.iter().map(|b| *b as i16).collect();
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT p.server_id, p.rule, p.detail, p.phase, p.since FROM alert_phases p \
                 JOIN managed_servers m ON m.id = p.server_id WHERE m.bucket = ANY($1)",
                &[&buckets],
            )
            .await
            .map_err(db_error)?;
        rows.iter().map(stored_phase).collect()
    }

    async fn changes_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<LoggedChange>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        // Waits for the writers holding the lock shared: every id drawn before this point is
        // committed (or rolled back) when the next statement takes its snapshot.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&CHANGE_LOG_LOCK])
            .await
            .map_err(db_error)?;
        let rows = tx
            .query(
                "SELECT id, server_id, rule, detail, firing, at, since FROM alert_change_log \
                 WHERE id > $1 ORDER BY id LIMIT $2",
                &[&after, &(limit as i64)],
            )
            .await
            .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        rows.iter()
            .map(|r| {
                let rule: String = r.get(2);
                Ok(LoggedChange {
                    id: r.get(0),
                    change: AlertChange {
                        key: AlertKey {
                            rule: Rule::parse(&rule).ok_or_else(|| corrupt("rule", &rule))?,
                            server: r.get::<_, Option<Uuid>>(1).map(ServerId),
                            detail: r.get(3),
                        },
                        firing: r.get(4),
                        at: r.get(5),
                        since: r.get(6),
                    },
                })
            })
            .collect()
    }

    async fn led_state(&self) -> Result<LedState, StoreError> {
        let client = self.client().await?;
        let position: i64 = client
            .query_one("SELECT position FROM alert_leader_state", &[])
            .await
            .map_err(db_error)?
            .get(0);
        let rows = client
            .query(
                "SELECT server_id, rule, detail, since FROM alert_announced",
                &[],
            )
            .await
            .map_err(db_error)?;
        let firing = rows
            .iter()
            .map(|r| {
                let rule: String = r.get(1);
                Ok((
                    AlertKey {
                        rule: Rule::parse(&rule).ok_or_else(|| corrupt("rule", &rule))?,
                        server: r.get::<_, Option<Uuid>>(0).map(ServerId),
                        detail: r.get(2),
                    },
                    r.get(3),
                ))
            })
            .collect::<Result<_, StoreError>>()?;
        Ok(LedState { position, firing })
    }

    async fn apply_led(
        &self,
        effects: &[Effect],
        consumed: &[LoggedChange],
        leader_epoch: i64,
    ) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        if let Some((me, stats)) = self.member() {
            let fenced = tx
                .query_opt(
                    "SELECT 1 FROM fleet_leader WHERE owner = $1 AND epoch = $2 FOR SHARE",
                    &[&me, &leader_epoch],
                )
                .await
                .map_err(db_error)?;
            if fenced.is_none() {
                stats.add_rejected(1);
                return Ok(false);
            }
        }
        write_effects(&tx, effects).await?;
        // The firing set as the consumed changes leave it: the last change of each alert wins.
        let mut last: BTreeMap<String, &AlertChange> = BTreeMap::new();
        for c in consumed {
            last.insert(announced_key(&c.change.key), &c.change);
        }
        let (mut gone, mut ak, mut asv, mut ar, mut ad, mut asince) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        for (key, c) in &last {
            if c.firing {
                ak.push(key.as_str());
                asv.push(c.key.server.map(|s| s.0));
                ar.push(c.key.rule.as_str());
                ad.push(c.key.detail.as_str());
                asince.push(c.since);
            } else {
                gone.push(key.as_str());
            }
        }
        if !gone.is_empty() {
            tx.execute("DELETE FROM alert_announced WHERE key = ANY($1)", &[&gone])
                .await
                .map_err(db_error)?;
        }
        if !ak.is_empty() {
            // A firing change for an alert already held keeps its first episode start.
            tx.execute(
                "INSERT INTO alert_announced (key, server_id, rule, detail, since) \
                 SELECT * FROM UNNEST($1::text[], $2::uuid[], $3::text[], $4::text[], $5::timestamptz[]) \
                 ON CONFLICT (key) DO NOTHING",
                &[&ak, &asv, &ar, &ad, &asince],
            )
            .await
            .map_err(db_error)?;
        }
        if let Some(position) = consumed.iter().map(|c| c.id).max() {
            tx.execute(
                "UPDATE alert_leader_state SET position = $1 WHERE position < $1",
                &[&position],
            )
            .await
            .map_err(db_error)?;
            // Decided changes are kept an hour (for inspection), then trimmed; a bounded
            // statement, run about once in a hundred positions.
            if position % 100 < consumed.len() as i64 {
                tx.execute(
                    "DELETE FROM alert_change_log WHERE id <= $1 AND written_at < now() - interval '1 hour'",
                    &[&position],
                )
                .await
                .map_err(db_error)?;
            }
        }
        tx.commit().await.map_err(db_error)?;
        Ok(true)
    }

    async fn alert_phases(&self) -> Result<Vec<StoredPhase>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT server_id, rule, detail, phase, since FROM alert_phases",
                &[],
            )
            .await
            .map_err(db_error)?;
        rows.iter().map(stored_phase).collect()
    }

    async fn open_incidents(&self) -> Result<Vec<Restored>, StoreError> {
        let snaps = self
            .read_incidents("WHERE state <> 'resolved'", &[])
            .await?;
        let client = self.client().await?;
        let ids: Vec<Uuid> = snaps.iter().map(|s| s.incident.id).collect();
        let rows = client
            .query(
                &format!(
                    "SELECT {MEMBER_COLUMNS}, incident_id FROM incident_members WHERE incident_id = ANY($1)"
                ),
                &[&ids],
            )
            .await
            .map_err(db_error)?;
        let mut by: BTreeMap<Uuid, Vec<Member>> = BTreeMap::new();
        for r in &rows {
            by.entry(r.get(6)).or_default().push(member(r));
        }
        Ok(snaps
            .into_iter()
            .map(|s| Restored {
                members: by.remove(&s.incident.id).unwrap_or_default(),
                snapshot: s,
            })
            .collect())
    }

    async fn claim(
        &self,
        _now: OffsetDateTime,
        limit: usize,
        lease: Duration,
        skip_channels: &[Uuid],
    ) -> Result<Vec<Delivery>, StoreError> {
        let client = self.client().await?;
        let token = Uuid::new_v4();
        let limit = limit as i64;
        let lease = lease.as_secs_f64();
        let skip = skip_channels.to_vec();
        // Claimed and committed in one statement: no transaction stays open while sending.
        // Times are the database's, so that instances with skewed clocks agree on leases.
        let rows = client
            .query(
                "UPDATE alert_outbox SET claim_token = $1, claim_until = now() + make_interval(secs => $2) \
                 WHERE id IN (SELECT id FROM alert_outbox \
                              WHERE state = 'pending' AND next_attempt_at <= now() \
                                AND (claim_until IS NULL OR claim_until < now()) \
                                AND NOT (channel_id = ANY($4)) \
                              ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) \
                 RETURNING id, incident_id, seq, channel_id, kind, notice, attempts",
                &[&token, &lease, &limit, &skip],
            )
            .await
            .map_err(db_error)?;
        let mut out: Vec<Delivery> = rows
            .iter()
            .map(|r| {
                let kind: String = r.get(4);
                let Json(notice): Json<serde_json::Value> = r.get(5);
                Ok(Delivery {
                    id: r.get(0),
                    incident_id: r.get(1),
                    seq: r.get(2),
                    channel_id: r.get(3),
                    kind: NoticeKind::parse(&kind).ok_or_else(|| corrupt("notice kind", &kind))?,
                    notice,
                    attempts: r.get::<_, i32>(6) as u32,
                    claim_token: token,
                })
            })
            .collect::<Result<_, StoreError>>()?;
        out.sort_by_key(|d| d.id);
        Ok(out)
    }

    async fn finish(
        &self,
        id: i64,
        claim_token: Uuid,
        outcome: &Attempted,
        _now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let n = match outcome {
            Attempted::Sent => client
                .execute(
                    "UPDATE alert_outbox SET state = 'sent', sent_at = now(), attempts = attempts + 1, \
                     claim_token = NULL, claim_until = NULL, last_error = NULL \
                     WHERE id = $1 AND claim_token = $2",
                    &[&id, &claim_token],
                )
                .await,
            Attempted::Retry {
                after,
                error,
                counts,
            } => {
                let secs = after.as_secs_f64();
                let add = i32::from(*counts);
                client
                    .execute(
                        "UPDATE alert_outbox SET next_attempt_at = now() + make_interval(secs => $3), \
                         attempts = attempts + $4, last_error = $5, claim_token = NULL, claim_until = NULL \
                         WHERE id = $1 AND claim_token = $2",
                        &[&id, &claim_token, &secs, &add, error],
                    )
                    .await
            }
            Attempted::Failed { error } => client
                .execute(
                    "UPDATE alert_outbox SET state = 'failed', attempts = attempts + 1, last_error = $3, \
                     claim_token = NULL, claim_until = NULL WHERE id = $1 AND claim_token = $2",
                    &[&id, &claim_token, error],
                )
                .await,
        }
        .map_err(db_error)?;
        Ok(n == 1)
    }

    async fn backlog(&self) -> Result<Vec<Backlog>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT channel_id, count(*) FILTER (WHERE state = 'pending'), \
                        count(*) FILTER (WHERE state = 'sent'), count(*) FILTER (WHERE state = 'failed') \
                 FROM alert_outbox GROUP BY channel_id",
                &[],
            )
            .await
            .map_err(db_error)?;
        Ok(rows
            .iter()
            .map(|r| Backlog {
                channel_id: r.get(0),
                pending: r.get::<_, i64>(1) as u64,
                sent: r.get::<_, i64>(2) as u64,
                failed: r.get::<_, i64>(3) as u64,
            })
            .collect())
    }

    async fn create_channel(
        &self,
        name: &str,
        config: ChannelConfig,
        now: OffsetDateTime,
    ) -> Result<Channel, StoreError> {
        let id = Uuid::new_v4();
        let (sealed, key_id) = self.seal_config(id, &config)?;
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO alert_channels (id, name, kind, config_sealed, config_key_id, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[&id, &name, &config.kind(), &sealed, &key_id, &now],
            )
            .await
            .map_err(db_error)
            .map_err(|e| taken(e, "channel", name))?;
        Ok(Channel {
            id,
            name: name.to_owned(),
            config,
            created_at: now,
        })
    }

    async fn list_channels(&self) -> Result<Vec<Channel>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, name, config_sealed, config_key_id, created_at FROM alert_channels ORDER BY name",
                &[],
            )
            .await
            .map_err(db_error)?;
        rows.iter().map(|r| self.channel(r)).collect()
    }

    async fn get_channel(&self, id: Uuid) -> Result<Option<Channel>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT id, name, config_sealed, config_key_id, created_at FROM alert_channels WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(db_error)?;
        row.map(|r| self.channel(&r)).transpose()
    }

    async fn update_channel(
        &self,
        id: Uuid,
        patch: ChannelPatch,
    ) -> Result<Option<Channel>, StoreError> {
        let Some(mut c) = self.get_channel(id).await? else {
            return Ok(None);
        };
        if let Some(n) = patch.name {
            c.name = n;
        }
        if let Some(cfg) = patch.config {
            c.config = cfg;
        }
        let (sealed, key_id) = self.seal_config(id, &c.config)?;
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE alert_channels SET name = $2, kind = $3, config_sealed = $4, config_key_id = $5 WHERE id = $1",
                &[&id, &c.name, &c.config.kind(), &sealed, &key_id],
            )
            .await
            .map_err(db_error)
            .map_err(|e| taken(e, "channel", &c.name))?;
        Ok((n == 1).then_some(c))
    }

    async fn delete_channel(&self, id: Uuid) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let n = client
            .execute("DELETE FROM alert_channels WHERE id = $1", &[&id])
            .await
            .map_err(db_error)?;
        Ok(n == 1)
    }

    async fn list_incidents(&self, f: &IncidentFilter) -> Result<(Vec<Incident>, u64), StoreError> {
        let state = f.state.map(|s| s.as_str());
        let severity = f.severity.map(|s| s.as_str());
        let server = f.server.map(|s| s.0);
        let group = f.group.map(|g| g.0);
        let limit = f.limit as i64;
        let offset = f.offset as i64;
        let filter = "WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR severity = $2) \
             AND ($3::text IS NULL OR region = $3) \
             AND ($4::uuid IS NULL OR EXISTS (SELECT 1 FROM incident_members m WHERE m.incident_id = incidents.id AND m.server_id = $4)) \
             AND ($5::uuid IS NULL OR EXISTS (SELECT 1 FROM incident_members m JOIN server_group_members g ON g.server_id = m.server_id \
                                               WHERE m.incident_id = incidents.id AND g.group_id = $5))";
        let params: [&(dyn ToSql + Sync); 5] = [&state, &severity, &f.region, &server, &group];
        let client = self.client().await?;
        let total: i64 = client
            .query_one(&format!("SELECT count(*) FROM incidents {filter}"), &params)
            .await
            .map_err(db_error)?
            .get(0);
        let mut p: Vec<&(dyn ToSql + Sync)> = params.to_vec();
        p.push(&limit);
        p.push(&offset);
        let rows = client
            .query(
                &format!(
                    "SELECT {INCIDENT_COLUMNS} FROM incidents {filter} ORDER BY opened_at DESC, id LIMIT $6 OFFSET $7"
                ),
                &p,
            )
            .await
            .map_err(db_error)?;
        let list = rows.iter().map(incident).collect::<Result<_, _>>()?;
        Ok((list, total as u64))
    }

    async fn incident(&self, id: Uuid) -> Result<Option<IncidentDetail>, StoreError> {
        let Some(snap) = self
            .read_incidents("WHERE id = $1", &[&id])
            .await?
            .into_iter()
            .next()
        else {
            return Ok(None);
        };
        let client = self.client().await?;
        let members = client
            .query(
                &format!(
                    "SELECT {MEMBER_COLUMNS} FROM incident_members WHERE incident_id = $1 ORDER BY server_name LIMIT 1000"
                ),
                &[&id],
            )
            .await
            .map_err(db_error)?
            .iter()
            .map(member)
            .collect();
        // The newest 1,000 lines, oldest first.
        let timeline = client
            .query(
                "SELECT * FROM (SELECT id, incident_id, at, kind, message, channel_id FROM incident_timeline \
                 WHERE incident_id = $1 ORDER BY id DESC LIMIT 1000) t ORDER BY id",
                &[&id],
            )
            .await
            .map_err(db_error)?
            .iter()
            .map(timeline_from_row)
            .collect();
        Ok(Some(IncidentDetail {
            incident: snap.incident,
            members,
            timeline,
        }))
    }

    async fn timeline_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<TimelineEntry>, StoreError> {
        let client = self.client().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client
            .query(
                "SELECT id, incident_id, at, kind, message, channel_id FROM incident_timeline \
                 WHERE id > $1 ORDER BY id LIMIT $2",
                &[&after, &limit],
            )
            .await
            .map_err(db_error)?;
        Ok(rows.iter().map(timeline_from_row).collect())
    }

    async fn timeline_ids(&self) -> Result<Option<(i64, i64)>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT min(id), max(id) FROM incident_timeline", &[])
            .await
            .map_err(db_error)?;
        let ids: (Option<i64>, Option<i64>) = (row.get(0), row.get(1));
        Ok(ids.0.zip(ids.1))
    }

    async fn open_by_severity(&self) -> Result<Vec<(Severity, u64)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT severity, count(*) FROM incidents WHERE state <> 'resolved' GROUP BY severity",
                &[],
            )
            .await
            .map_err(db_error)?;
        let mut counts: BTreeMap<Severity, u64> =
            Severity::ALL.into_iter().map(|s| (s, 0)).collect();
        for r in &rows {
            let s: String = r.get(0);
            if let Some(sev) = Severity::parse(&s) {
                counts.insert(sev, r.get::<_, i64>(1) as u64);
            }
        }
        Ok(counts.into_iter().collect())
    }

    async fn create_silence(
        &self,
        matchers: Matchers,
        starts_at: OffsetDateTime,
        ends_at: OffsetDateTime,
        comment: &str,
        now: OffsetDateTime,
    ) -> Result<Silence, StoreError> {
        let s = Silence {
            id: Uuid::new_v4(),
            matchers,
            starts_at,
            ends_at,
            comment: comment.to_owned(),
            created_at: now,
        };
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO alert_silences (id, matchers, starts_at, ends_at, comment, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
                &[&s.id, &Json(&s.matchers), &s.starts_at, &s.ends_at, &s.comment, &s.created_at],
            )
            .await
            .map_err(db_error)?;
        Ok(s)
    }

    async fn list_silences(&self, since: OffsetDateTime) -> Result<Vec<Silence>, StoreError> {
        let client = self.client().await?;
        client
            .query(
                "SELECT id, matchers, starts_at, ends_at, comment, created_at FROM alert_silences \
                 WHERE ends_at > $1 ORDER BY created_at DESC LIMIT 1000",
                &[&since],
            )
            .await
            .map_err(db_error)?
            .iter()
            .map(silence)
            .collect()
    }

    async fn get_silence(&self, id: Uuid) -> Result<Option<Silence>, StoreError> {
        let client = self.client().await?;
        client
            .query_opt(
                "SELECT id, matchers, starts_at, ends_at, comment, created_at FROM alert_silences WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(db_error)?
            .map(|r| silence(&r))
            .transpose()
    }

    async fn delete_silence(&self, id: Uuid) -> Result<bool, StoreError> {
        let client = self.client().await?;
        Ok(client
            .execute("DELETE FROM alert_silences WHERE id = $1", &[&id])
            .await
            .map_err(db_error)?
            == 1)
    }

    async fn create_window(
        &self,
        name: &str,
        scope: Scope,
        schedule: Schedule,
        now: OffsetDateTime,
    ) -> Result<MaintenanceWindow, StoreError> {
        let w = MaintenanceWindow {
            id: Uuid::new_v4(),
            name: name.to_owned(),
            scope,
            schedule,
            created_at: now,
        };
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO maintenance_windows (id, name, scope, schedule, created_at) VALUES ($1, $2, $3, $4, $5)",
                &[&w.id, &w.name, &Json(&w.scope), &Json(&w.schedule), &w.created_at],
            )
            .await
            .map_err(db_error)?;
        Ok(w)
    }

    async fn list_windows(&self) -> Result<Vec<MaintenanceWindow>, StoreError> {
        let client = self.client().await?;
        client
            .query(
                "SELECT id, name, scope, schedule, created_at FROM maintenance_windows ORDER BY name LIMIT 10000",
                &[],
            )
            .await
            .map_err(db_error)?
            .iter()
            .map(window)
            .collect()
    }

    async fn get_window(&self, id: Uuid) -> Result<Option<MaintenanceWindow>, StoreError> {
        let client = self.client().await?;
        client
            .query_opt(
                "SELECT id, name, scope, schedule, created_at FROM maintenance_windows WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(db_error)?
            .map(|r| window(&r))
            .transpose()
    }

    async fn update_window(
        &self,
        id: Uuid,
        patch: WindowPatch,
    ) -> Result<Option<MaintenanceWindow>, StoreError> {
        let Some(mut w) = self.get_window(id).await? else {
            return Ok(None);
        };
        if let Some(n) = patch.name {
            w.name = n;
        }
        if let Some(s) = patch.scope {
            w.scope = s;
        }
        if let Some(s) = patch.schedule {
            w.schedule = s;
        }
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE maintenance_windows SET name = $2, scope = $3, schedule = $4 WHERE id = $1",
                &[&id, &w.name, &Json(&w.scope), &Json(&w.schedule)],
            )
            .await
            .map_err(db_error)?;
        Ok((n == 1).then_some(w))
    }

    async fn delete_window(&self, id: Uuid) -> Result<bool, StoreError> {
        let client = self.client().await?;
        Ok(client
            .execute("DELETE FROM maintenance_windows WHERE id = $1", &[&id])
            .await
            .map_err(db_error)?
            == 1)
    }

    async fn create_policy(
        &self,
        name: &str,
        matchers: Matchers,
        steps: Vec<Step>,
        now: OffsetDateTime,
    ) -> Result<Policy, StoreError> {
        let p = Policy {
            id: Uuid::new_v4(),
            name: name.to_owned(),
            matchers,
            steps,
            created_at: now,
        };
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO alert_policies (id, name, matchers, steps, created_at) VALUES ($1, $2, $3, $4, $5)",
                &[&p.id, &p.name, &Json(&p.matchers), &Json(&p.steps), &p.created_at],
            )
            .await
            .map_err(db_error)
            .map_err(|e| taken(e, "policy", name))?;
        Ok(p)
    }

    async fn list_policies(&self) -> Result<Vec<Policy>, StoreError> {
        let client = self.client().await?;
        client
            .query(
                "SELECT id, name, matchers, steps, created_at FROM alert_policies ORDER BY name LIMIT 10000",
                &[],
            )
            .await
            .map_err(db_error)?
            .iter()
            .map(policy)
            .collect()
    }

    async fn get_policy(&self, id: Uuid) -> Result<Option<Policy>, StoreError> {
        let client = self.client().await?;
        client
            .query_opt(
                "SELECT id, name, matchers, steps, created_at FROM alert_policies WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(db_error)?
            .map(|r| policy(&r))
            .transpose()
    }

    async fn update_policy(
        &self,
        id: Uuid,
        patch: PolicyPatch,
    ) -> Result<Option<Policy>, StoreError> {
        let Some(mut p) = self.get_policy(id).await? else {
            return Ok(None);
        };
        if let Some(n) = patch.name {
            p.name = n;
        }
        if let Some(m) = patch.matchers {
            p.matchers = m;
        }
        if let Some(s) = patch.steps {
            p.steps = s;
        }
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE alert_policies SET name = $2, matchers = $3, steps = $4 WHERE id = $1",
                &[&id, &p.name, &Json(&p.matchers), &Json(&p.steps)],
            )
            .await
            .map_err(db_error)
            .map_err(|e| taken(e, "policy", &p.name))?;
        Ok((n == 1).then_some(p))
    }

    async fn delete_policy(&self, id: Uuid) -> Result<bool, StoreError> {
        let client = self.client().await?;
        Ok(client
            .execute("DELETE FROM alert_policies WHERE id = $1", &[&id])
            .await
            .map_err(db_error)?
            == 1)
    }
}

fn timeline_from_row(r: &tokio_postgres::Row) -> TimelineEntry {
    TimelineEntry {
        id: r.get(0),
        incident_id: r.get(1),
        at: r.get(2),
        kind: r.get(3),
        message: r.get(4),
        channel_id: r.get(5),
    }
}
