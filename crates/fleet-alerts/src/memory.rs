//! The in-memory alert store, for the demo and tests. It keeps the same promises as the
//! PostgreSQL one: atomic apply, one outbox row per (incident, seq, channel), claims with
//! tokens and leases.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use fleet_core::StoreError;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::incidents::{Effect, Restored, Snapshot};
use crate::model::{
    AlertKey, AlertTransition, Attempted, Backlog, Channel, Delivery, Incident, IncidentDetail,
    IncidentFilter, IncidentState, MaintenanceWindow, Matchers, Member, NoticeKind, Phase, Policy,
    Scope, Severity, Silence, Step, TimelineEntry,
};
use crate::rules::AlertChange;
use crate::schedule::Schedule;
use crate::store::{
    AlertStore, ChannelPatch, LedState, LoggedChange, OwnedWrite, PolicyPatch, StoredPhase,
    WindowPatch,
};

#[derive(Clone, Debug, PartialEq, Eq)]
enum RowState {
    Pending,
    Sent,
    Failed,
}

#[derive(Clone, Debug)]
struct OutboxRow {
    delivery: Delivery,
    state: RowState,
    due: OffsetDateTime,
    claim_until: Option<OffsetDateTime>,
}

#[derive(Debug, Default)]
struct Inner {
    phases: BTreeMap<AlertKey, StoredPhase>,
    incidents: BTreeMap<Uuid, Snapshot>,
    members: BTreeMap<Uuid, Vec<Member>>,
    timeline: Vec<TimelineEntry>,
    outbox: Vec<OutboxRow>,
    channels: BTreeMap<Uuid, Channel>,
    silences: BTreeMap<Uuid, Silence>,
    windows: BTreeMap<Uuid, MaintenanceWindow>,
    policies: BTreeMap<Uuid, Policy>,
    /// Incidents in the order they were opened.
    order: Vec<Uuid>,
    /// The owners' change log (a shared fleet), its last id, and the leader's state.
    log: Vec<LoggedChange>,
    log_id: i64,
    position: i64,
    announced: BTreeMap<AlertKey, OffsetDateTime>,
}

/// Applies phase transitions: the last of each alert wins, an inactive one is forgotten.
fn put_phases(phases: &mut BTreeMap<AlertKey, StoredPhase>, transitions: &[AlertTransition]) {
    for t in transitions {
        if t.to == Phase::Inactive {
            phases.remove(&t.key);
        } else {
            phases.insert(
                t.key.clone(),
                StoredPhase {
                    key: t.key.clone(),
                    phase: t.to,
                    since: t.since,
                },
            );
        }
    }
}

/// Alert state in memory.
#[derive(Debug, Default)]
pub struct MemoryAlertStore {
    inner: Mutex<Inner>,
    /// Server → groups, for the incident filter by group (set by the host).
    groups: Mutex<HashMap<fleet_core::ServerId, Vec<fleet_core::GroupId>>>,
}

impl MemoryAlertStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells the store a server's groups, so that incidents can be filtered by group.
    pub fn set_groups(&self, server: fleet_core::ServerId, groups: Vec<fleet_core::GroupId>) {
        self.groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(server, groups);
    }

    /// Every outbox row's (incident, seq, channel, kind, state), for tests.
    pub fn outbox(&self) -> Vec<(Uuid, i32, Uuid, NoticeKind, &'static str)> {
        self.lock()
            .outbox
            .iter()
            .map(|r| {
                (
                    r.delivery.incident_id,
                    r.delivery.seq,
                    r.delivery.channel_id,
                    r.delivery.kind,
                    match r.state {
                        RowState::Pending => "pending",
                        RowState::Sent => "sent",
                        RowState::Failed => "failed",
                    },
                )
            })
            .collect()
    }
}

fn conflict(what: &str, name: &str) -> StoreError {
    StoreError::Conflict(format!("{what} `{name}` already exists"))
}

/// Moves the leader's firing set by one change.
fn announce(announced: &mut BTreeMap<AlertKey, OffsetDateTime>, change: &AlertChange) {
    if change.firing {
        announced.entry(change.key.clone()).or_insert(change.since);
    } else {
        announced.remove(&change.key);
    }
}

#[async_trait]
impl AlertStore for MemoryAlertStore {
    async fn apply(
        &self,
        transitions: &[AlertTransition],
        effects: &[Effect],
    ) -> Result<(), StoreError> {
        let mut g = self.lock();
        let inner = &mut *g;
        // All or nothing, as a transaction: refuse before changing anything.
        for e in effects {
            if let Effect::Save(snap) = e
                && snap.incident.state != IncidentState::Resolved
                && inner.incidents.values().any(|s| {
                    s.incident.id != snap.incident.id
                        && s.incident.group_key == snap.incident.group_key
                        && s.incident.state != IncidentState::Resolved
                })
            {
                return Err(StoreError::Conflict(format!(
                    "an incident for {} is already open",
                    snap.incident.group_key
                )));
            }
        }
        put_phases(&mut inner.phases, transitions);
        for e in effects {
            match e {
                Effect::Save(snap) => {
                    let id = snap.incident.id;
                    if !inner.incidents.contains_key(&id) {
                        inner.order.push(id);
                    }
                    inner.incidents.insert(id, (**snap).clone());
                }
                Effect::Join { incident, member } => {
                    let list = inner.members.entry(*incident).or_default();
                    list.retain(|m| {
                        !(m.server_id == member.server_id && m.detail == member.detail)
                    });
                    list.push(member.clone());
                }
                Effect::Leave {
                    incident,
                    server,
                    detail,
                    at,
                } => {
                    if let Some(list) = inner.members.get_mut(incident) {
                        for m in list.iter_mut() {
                            if m.server_id == *server && &m.detail == detail {
                                m.resolved_at = Some(*at);
                            }
                        }
                    }
                }
                Effect::Timeline {
                    incident,
                    at,
                    kind,
                    message,
                    channel,
                } => {
                    let id = inner.timeline.len() as i64 + 1;
                    inner.timeline.push(TimelineEntry {
                        id,
                        incident_id: *incident,
                        at: *at,
                        kind: (*kind).to_owned(),
                        message: message.clone(),
                        channel_id: *channel,
                    });
                }
                Effect::Notify {
                    incident,
                    seq,
                    channel,
                    kind,
                    notice,
                } => {
                    let exists = inner.outbox.iter().any(|r| {
                        r.delivery.incident_id == *incident
                            && r.delivery.seq == *seq
                            && r.delivery.channel_id == *channel
                    });
                    if exists || !inner.channels.contains_key(channel) {
                        continue;
                    }
                    let id = inner.outbox.len() as i64 + 1;
                    inner.outbox.push(OutboxRow {
                        delivery: Delivery {
                            id,
                            incident_id: *incident,
                            seq: *seq,
                            channel_id: *channel,
                            kind: *kind,
                            notice: notice.clone(),
                            attempts: 0,
                            claim_token: Uuid::nil(),
                        },
                        state: RowState::Pending,
                        due: OffsetDateTime::UNIX_EPOCH,
                        claim_until: None,
                    });
                }
            }
        }
        Ok(())
    }

    /// Memory holds no leases: every write is kept.
    async fn record_owned(&self, writes: &[OwnedWrite]) -> Result<u64, StoreError> {
        let mut g = self.lock();
        let inner = &mut *g;
        for w in writes {
            put_phases(&mut inner.phases, &w.transitions);
            for c in &w.changes {
                inner.log_id += 1;
                inner.log.push(LoggedChange {
                    id: inner.log_id,
                    change: c.clone(),
                });
            }
        }
        Ok(0)
    }

    async fn phases_in_buckets(&self, buckets: &[u16]) -> Result<Vec<StoredPhase>, StoreError> {
        Ok(self
            .lock()
            .phases
            .values()
            .filter(|p| {
                p.key
                    .server
                    .is_some_and(|s| buckets.contains(&fleet_core::cluster::bucket_of(s)))
            })
            .cloned()
            .collect())
    }

    async fn changes_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<LoggedChange>, StoreError> {
        let g = self.lock();
        let from = g.log.partition_point(|c| c.id <= after);
        Ok(g.log[from..].iter().take(limit).cloned().collect())
    }

    async fn led_state(&self) -> Result<LedState, StoreError> {
        let g = self.lock();
        Ok(LedState {
            position: g.position,
            firing: g.announced.iter().map(|(k, s)| (k.clone(), *s)).collect(),
        })
    }

    /// Memory holds no leader row: the write is always the leader's.
    async fn apply_led(
        &self,
        effects: &[Effect],
        consumed: &[LoggedChange],
        _leader_epoch: i64,
    ) -> Result<bool, StoreError> {
        self.apply(&[], effects).await?;
        let mut g = self.lock();
        for LoggedChange { id, change } in consumed {
            announce(&mut g.announced, change);
            g.position = g.position.max(*id);
        }
        Ok(true)
    }

    async fn alert_phases(&self) -> Result<Vec<StoredPhase>, StoreError> {
        Ok(self.lock().phases.values().cloned().collect())
    }

    async fn open_incidents(&self) -> Result<Vec<Restored>, StoreError> {
        let g = self.lock();
        Ok(g.incidents
            .values()
            .filter(|s| s.incident.state != IncidentState::Resolved)
            .map(|s| Restored {
                snapshot: s.clone(),
                members: g.members.get(&s.incident.id).cloned().unwrap_or_default(),
            })
            .collect())
    }

    async fn claim(
        &self,
        now: OffsetDateTime,
        limit: usize,
        lease: Duration,
        skip_channels: &[Uuid],
    ) -> Result<Vec<Delivery>, StoreError> {
        let mut g = self.lock();
        let mut out = Vec::new();
        for r in g.outbox.iter_mut() {
            if out.len() >= limit {
                break;
            }
            let free = r.claim_until.is_none_or(|u| u <= now);
            if r.state == RowState::Pending
                && r.due <= now
                && free
                && !skip_channels.contains(&r.delivery.channel_id)
            {
                r.delivery.claim_token = Uuid::new_v4();
                r.claim_until = Some(now + lease);
                out.push(r.delivery.clone());
            }
        }
        Ok(out)
    }

    async fn finish(
        &self,
        id: i64,
        claim_token: Uuid,
        outcome: &Attempted,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let mut g = self.lock();
        let Some(r) = g
            .outbox
            .iter_mut()
            .find(|r| r.delivery.id == id && r.delivery.claim_token == claim_token)
        else {
            return Ok(false);
        };
        r.claim_until = None;
        match outcome {
            Attempted::Sent => {
                r.state = RowState::Sent;
                r.delivery.attempts += 1;
            }
            Attempted::Retry { after, counts, .. } => {
                r.due = now + *after;
                if *counts {
                    r.delivery.attempts += 1;
                }
            }
            Attempted::Failed { .. } => {
                r.state = RowState::Failed;
                r.delivery.attempts += 1;
            }
        }
        Ok(true)
    }

    async fn backlog(&self) -> Result<Vec<Backlog>, StoreError> {
        let g = self.lock();
        let mut by: BTreeMap<Uuid, Backlog> = BTreeMap::new();
        for r in &g.outbox {
            let b = by.entry(r.delivery.channel_id).or_insert_with(|| Backlog {
                channel_id: r.delivery.channel_id,
                ..Backlog::default()
            });
            match r.state {
                RowState::Pending => b.pending += 1,
                RowState::Sent => b.sent += 1,
                RowState::Failed => b.failed += 1,
            }
        }
        Ok(by.into_values().collect())
    }

    async fn create_channel(
        &self,
        name: &str,
        config: crate::model::ChannelConfig,
        now: OffsetDateTime,
    ) -> Result<Channel, StoreError> {
        let mut g = self.lock();
        if g.channels
            .values()
            .any(|c| c.name.eq_ignore_ascii_case(name))
        {
            return Err(conflict("channel", name));
        }
        let c = Channel {
            id: Uuid::new_v4(),
            name: name.to_owned(),
            config,
            created_at: now,
        };
        g.channels.insert(c.id, c.clone());
        Ok(c)
    }

    async fn list_channels(&self) -> Result<Vec<Channel>, StoreError> {
        let mut v: Vec<Channel> = self.lock().channels.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    async fn get_channel(&self, id: Uuid) -> Result<Option<Channel>, StoreError> {
        Ok(self.lock().channels.get(&id).cloned())
    }

    async fn update_channel(
        &self,
        id: Uuid,
        patch: ChannelPatch,
    ) -> Result<Option<Channel>, StoreError> {
        let mut g = self.lock();
        if let Some(name) = &patch.name
            && g.channels
                .values()
                .any(|c| c.id != id && c.name.eq_ignore_ascii_case(name))
        {
            return Err(conflict("channel", name));
        }
        let Some(c) = g.channels.get_mut(&id) else {
            return Ok(None);
        };
        if let Some(name) = patch.name {
            c.name = name;
        }
        if let Some(config) = patch.config {
            c.config = config;
        }
        Ok(Some(c.clone()))
    }

    async fn delete_channel(&self, id: Uuid) -> Result<bool, StoreError> {
        let mut g = self.lock();
        g.outbox.retain(|r| r.delivery.channel_id != id);
        Ok(g.channels.remove(&id).is_some())
    }

    async fn list_incidents(&self, f: &IncidentFilter) -> Result<(Vec<Incident>, u64), StoreError> {
        let g = self.lock();
        let groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        let matching: Vec<Incident> = g
            .order
            .iter()
            .rev()
            .filter_map(|id| g.incidents.get(id))
            .map(|s| &s.incident)
            .filter(|i| f.state.is_none_or(|s| i.state == s))
            .filter(|i| f.severity.is_none_or(|s| i.severity == s))
            .filter(|i| {
                f.region
                    .as_deref()
                    .is_none_or(|r| i.region.as_deref() == Some(r))
            })
            .filter(|i| {
                let members = g.members.get(&i.id);
                let has =
                    |pred: &dyn Fn(&Member) -> bool| members.is_some_and(|ms| ms.iter().any(pred));
                f.server.is_none_or(|s| has(&|m| m.server_id == s))
                    && f.group.is_none_or(|grp| {
                        has(&|m| groups.get(&m.server_id).is_some_and(|gs| gs.contains(&grp)))
                    })
            })
            .cloned()
            .collect();
        let total = matching.len() as u64;
        Ok((
            matching.into_iter().skip(f.offset).take(f.limit).collect(),
            total,
        ))
    }

    async fn incident(&self, id: Uuid) -> Result<Option<IncidentDetail>, StoreError> {
        let g = self.lock();
        Ok(g.incidents.get(&id).map(|s| IncidentDetail {
            incident: s.incident.clone(),
            members: g.members.get(&id).cloned().unwrap_or_default(),
            timeline: g
                .timeline
                .iter()
                .filter(|t| t.incident_id == id)
                .cloned()
                .collect(),
        }))
    }

    async fn timeline_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<TimelineEntry>, StoreError> {
        let g = self.lock();
        let start = g.timeline.partition_point(|t| t.id <= after);
        Ok(g.timeline[start..].iter().take(limit).cloned().collect())
    }

    async fn timeline_ids(&self) -> Result<Option<(i64, i64)>, StoreError> {
        let g = self.lock();
        Ok(g.timeline
            .first()
            .zip(g.timeline.last())
            .map(|(a, b)| (a.id, b.id)))
    }

    async fn open_by_severity(&self) -> Result<Vec<(Severity, u64)>, StoreError> {
        let g = self.lock();
        Ok(Severity::ALL
            .into_iter()
            .map(|sev| {
                let n = g
                    .incidents
                    .values()
                    .filter(|s| {
                        s.incident.severity == sev && s.incident.state != IncidentState::Resolved
                    })
                    .count() as u64;
                (sev, n)
            })
            .collect())
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
        self.lock().silences.insert(s.id, s.clone());
        Ok(s)
    }

    async fn list_silences(&self, since: OffsetDateTime) -> Result<Vec<Silence>, StoreError> {
        let mut v: Vec<Silence> = self
            .lock()
            .silences
            .values()
            .filter(|s| s.ends_at > since)
            .cloned()
            .collect();
        v.sort_by_key(|s| std::cmp::Reverse(s.created_at));
        Ok(v)
    }

    async fn get_silence(&self, id: Uuid) -> Result<Option<Silence>, StoreError> {
        Ok(self.lock().silences.get(&id).cloned())
    }

    async fn delete_silence(&self, id: Uuid) -> Result<bool, StoreError> {
        Ok(self.lock().silences.remove(&id).is_some())
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
        self.lock().windows.insert(w.id, w.clone());
        Ok(w)
    }

    async fn list_windows(&self) -> Result<Vec<MaintenanceWindow>, StoreError> {
        let mut v: Vec<MaintenanceWindow> = self.lock().windows.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    async fn get_window(&self, id: Uuid) -> Result<Option<MaintenanceWindow>, StoreError> {
        Ok(self.lock().windows.get(&id).cloned())
    }

    async fn update_window(
        &self,
        id: Uuid,
        patch: WindowPatch,
    ) -> Result<Option<MaintenanceWindow>, StoreError> {
        let mut g = self.lock();
        let Some(w) = g.windows.get_mut(&id) else {
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
        Ok(Some(w.clone()))
    }

    async fn delete_window(&self, id: Uuid) -> Result<bool, StoreError> {
        Ok(self.lock().windows.remove(&id).is_some())
    }

    async fn create_policy(
        &self,
        name: &str,
        matchers: Matchers,
        steps: Vec<Step>,
        now: OffsetDateTime,
    ) -> Result<Policy, StoreError> {
        let mut g = self.lock();
        if g.policies
            .values()
            .any(|p| p.name.eq_ignore_ascii_case(name))
        {
            return Err(conflict("policy", name));
        }
        let p = Policy {
            id: Uuid::new_v4(),
            name: name.to_owned(),
            matchers,
            steps,
            created_at: now,
        };
        g.policies.insert(p.id, p.clone());
        Ok(p)
    }

    async fn list_policies(&self) -> Result<Vec<Policy>, StoreError> {
        let mut v: Vec<Policy> = self.lock().policies.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    async fn get_policy(&self, id: Uuid) -> Result<Option<Policy>, StoreError> {
        Ok(self.lock().policies.get(&id).cloned())
    }

    async fn update_policy(
        &self,
        id: Uuid,
        patch: PolicyPatch,
    ) -> Result<Option<Policy>, StoreError> {
        let mut g = self.lock();
        if let Some(name) = &patch.name
            && g.policies
                .values()
                .any(|p| p.id != id && p.name.eq_ignore_ascii_case(name))
        {
            return Err(conflict("policy", name));
        }
        let Some(p) = g.policies.get_mut(&id) else {
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
        Ok(Some(p.clone()))
    }

    async fn delete_policy(&self, id: Uuid) -> Result<bool, StoreError> {
        Ok(self.lock().policies.remove(&id).is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::alert_store_conformance_tests!(|| async {
        (
            (),
            MemoryAlertStore::new(),
            fleet_core::InMemoryStore::new(),
        )
    });
}
