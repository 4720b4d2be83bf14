//! Grouping, inhibition, timers and routing: a pure state machine over alert changes and time.
//!
//! The [`Engine`] runs in exactly one place (the single instance, or a shared fleet's leader,
//! fed from the owners' change log). It takes
//! [`AlertChange`]s, ticks and acknowledgements with the time and a [`Context`] (channels,
//! policies, silences, maintenance windows, what is known of each server) and returns
//! [`Effect`]s. The shell writes each call's effects in one transaction, so an incident's
//! transition and the outbox rows that announce it are stored together or not at all.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use fleet_core::{GroupId, ServerId};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::config::AlertConfig;
use crate::model::{
    AlertKey, Incident, IncidentState, MaintenanceWindow, Member, NoticeKind, Policy, Rule,
    Silence, Subject,
};
use crate::payload;
use crate::rules::AlertChange;

/// What the engine knows of a server.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerInfo {
    /// Its name.
    pub name: String,
    /// Its region.
    pub region: Option<String>,
    /// Its groups, ids and names.
    pub groups: Vec<(GroupId, String)>,
}

/// A channel as routing sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelRef {
    /// Its id.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// Whether it wants resolved notices.
    pub send_resolved: bool,
    /// Whether its outbox backlog is at its bound (new notices are dropped and counted).
    pub full: bool,
}

/// Everything the engine reads besides its own state.
#[derive(Debug)]
pub struct Context<'a> {
    /// Now.
    pub now: OffsetDateTime,
    /// The rules' settings.
    pub cfg: &'a AlertConfig,
    /// Every channel.
    pub channels: &'a [ChannelRef],
    /// Every policy.
    pub policies: &'a [Policy],
    /// Every silence (inactive ones are skipped).
    pub silences: &'a [Silence],
    /// Every maintenance window.
    pub windows: &'a [MaintenanceWindow],
    /// What is known of servers.
    pub servers: &'a HashMap<ServerId, ServerInfo>,
    /// Active servers per region, for the regional rule.
    pub region_sizes: &'a HashMap<String, u64>,
    /// Whether the last cycles reached none of the fleet's servers.
    pub fleet_unreachable: Option<u64>,
}

impl Context<'_> {
    fn info(&self, id: ServerId) -> ServerInfo {
        self.servers
            .get(&id)
            .cloned()
            .unwrap_or_else(|| ServerInfo {
                name: id.to_string(),
                ..ServerInfo::default()
            })
    }

    fn in_maintenance(&self, key: &AlertKey) -> bool {
        let Some(id) = key.server else { return false };
        let info = self.servers.get(&id);
        let groups: Vec<GroupId> = info
            .map(|i| i.groups.iter().map(|g| g.0).collect())
            .unwrap_or_default();
        let subject = Subject {
            rule: Some(key.rule),
            server: Some(id),
            region: info.and_then(|i| i.region.as_deref()),
            groups: &groups,
        };
        self.windows
            .iter()
            .any(|w| w.scope.covers(&subject) && w.schedule.contains(self.now))
    }
}

/// What to store (and, for notices, send).
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Insert or update an open or just-resolved incident, with its timers.
    Save(Box<Snapshot>),
    /// A server joined an incident.
    Join {
        /// The incident.
        incident: Uuid,
        /// The member.
        member: Member,
    },
    /// A member recovered.
    Leave {
        /// The incident.
        incident: Uuid,
        /// The server.
        server: ServerId,
        /// Its detail.
        detail: String,
        /// When.
        at: OffsetDateTime,
    },
    /// A timeline line.
    Timeline {
        /// The incident.
        incident: Uuid,
        /// When.
        at: OffsetDateTime,
        /// Its kind.
        kind: &'static str,
        /// For people.
        message: String,
        /// The channel, for notification lines.
        channel: Option<Uuid>,
    },
    /// An outbox row: unique per (incident, seq, channel).
    Notify {
        /// The incident.
        incident: Uuid,
        /// The transition's sequence number.
        seq: i32,
        /// The channel.
        channel: Uuid,
        /// Why.
        kind: NoticeKind,
        /// The notice.
        notice: serde_json::Value,
    },
}

/// An incident's row: what is shown, and the timers that let a restart go on where it stopped.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// The incident.
    pub incident: Incident,
    /// The last transition's sequence number.
    pub seq: i32,
    /// First announced.
    pub announced_at: Option<OffsetDateTime>,
    /// Last notice of any kind.
    pub notified_at: Option<OffsetDateTime>,
    /// Servers added since the last announcement.
    pub additions: bool,
    /// Announce without waiting for group_wait (a server leaving maintenance still down).
    pub immediate: bool,
    /// Escalation steps done (by `after_seconds`).
    pub escalated_until: u64,
    /// Channels told of it.
    pub told: BTreeSet<Uuid>,
}

#[derive(Clone, Debug)]
struct MemberState {
    member: Member,
    firing: bool,
    /// Whether a notice named it.
    told: bool,
}

#[derive(Clone, Debug)]
struct Open {
    snap: Snapshot,
    members: BTreeMap<AlertKey, MemberState>,
}

/// Why a firing alert is not in an incident.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hold {
    /// It is in one.
    No,
    /// Its server is in a maintenance window.
    Maintenance,
    /// Fleet reaches none of its servers: one fleet incident stands for all.
    Fleet,
}

#[derive(Clone, Debug)]
struct Active {
    incident: Option<Uuid>,
    hold: Hold,
}

/// The grouping engine's state.
#[derive(Debug, Default)]
pub struct Engine {
    active: BTreeMap<AlertKey, Active>,
    open: BTreeMap<Uuid, Open>,
    by_key: HashMap<String, Uuid>,
}

/// Open incidents as stored, to rebuild the engine after a restart.
#[derive(Clone, Debug)]
pub struct Restored {
    /// The incident and its timers.
    pub snapshot: Snapshot,
    /// Its members.
    pub members: Vec<Member>,
}

fn group_key(rule: Rule, key: &AlertKey, region: Option<&str>) -> String {
    match rule {
        Rule::Storage | Rule::FleetSelf => format!("{}/{}", rule.as_str(), key.detail),
        Rule::FleetUnreachable => rule.as_str().to_owned(),
        _ => format!("{}/{}", rule.as_str(), region.unwrap_or("-")),
    }
}

impl Engine {
    /// An engine with nothing open.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds the engine from stored open incidents and the alerts firing now.
    pub fn restore(
        incidents: Vec<Restored>,
        firing: impl IntoIterator<Item = (AlertKey, OffsetDateTime)>,
    ) -> Self {
        let mut e = Self::new();
        let mut member_of: HashMap<(ServerId, String, Rule), Uuid> = HashMap::new();
        for r in incidents {
            let id = r.snapshot.incident.id;
            let rule = r.snapshot.incident.rule;
            let mut members = BTreeMap::new();
            for m in r.members {
                let member_rule = if rule == Rule::RegionUnreachable {
                    Rule::ServerUnreachable
                } else {
                    rule
                };
                let key = AlertKey {
                    rule: member_rule,
                    server: Some(m.server_id),
                    detail: m.detail.clone(),
                };
                if m.resolved_at.is_none() {
                    member_of.insert((m.server_id, m.detail.clone(), member_rule), id);
                }
                members.insert(
                    key,
                    MemberState {
                        firing: m.resolved_at.is_none(),
                        member: m,
                        told: true,
                    },
                );
            }
            if matches!(
                rule,
                Rule::Storage | Rule::FleetSelf | Rule::FleetUnreachable
            ) {
                let detail = r
                    .snapshot
                    .incident
                    .group_key
                    .split_once('/')
                    .map(|(_, d)| d.to_owned())
                    .unwrap_or_default();
                e.active.insert(
                    AlertKey {
                        rule,
                        server: None,
                        detail,
                    },
                    Active {
                        incident: Some(id),
                        hold: Hold::No,
                    },
                );
            }
            e.by_key.insert(r.snapshot.incident.group_key.clone(), id);
            e.open.insert(
                id,
                Open {
                    snap: r.snapshot,
                    members,
                },
            );
        }
        for (key, _since) in firing {
            let incident = key
                .server
                .and_then(|s| member_of.get(&(s, key.detail.clone(), key.rule)).copied());
            let hold = if incident.is_some() {
                Hold::No
            } else {
                // Firing but in no incident: it was held back; the next tick decides anew.
                Hold::Maintenance
            };
            e.active.insert(key, Active { incident, hold });
        }
        e
    }

    /// Open incidents.
    pub fn open_count(&self) -> usize {
        self.open.len()
    }

    /// Firing alerts, in incidents or held back.
    pub fn active_count(&self) -> usize {
        self.active.len()
    }

    /// The servers of firing alerts and of open incidents' members: those whose names,
    /// regions and groups routing and notices read from [`Context::servers`].
    pub fn servers(&self) -> BTreeSet<ServerId> {
        self.active
            .keys()
            .chain(self.open.values().flat_map(|o| o.members.keys()))
            .filter_map(|k| k.server)
            .collect()
    }

    /// An alert started or stopped.
    pub fn change(&mut self, change: &AlertChange, ctx: &Context<'_>) -> Vec<Effect> {
        let mut fx = Vec::new();
        if change.firing {
            if self.active.contains_key(&change.key) {
                return fx;
            }
            self.active.insert(
                change.key.clone(),
                Active {
                    incident: None,
                    hold: Hold::No,
                },
            );
            self.place(&change.key, false, ctx, &mut fx);
        } else if let Some(a) = self.active.remove(&change.key)
            && let Some(id) = a.incident
        {
            self.leave(id, &change.key, change.at, ctx, &mut fx);
        }
        fx
    }

    /// Puts a firing alert where it belongs: held back, or into an incident.
    fn place(&mut self, key: &AlertKey, immediate: bool, ctx: &Context<'_>, fx: &mut Vec<Effect>) {
        if ctx.in_maintenance(key) {
            self.hold(key, Hold::Maintenance);
            return;
        }
        if key.rule == Rule::ServerUnreachable && self.by_key.contains_key("fleet_unreachable") {
            self.hold(key, Hold::Fleet);
            return;
        }
        let info = key.server.map(|s| ctx.info(s));
        let region = info.as_ref().and_then(|i| i.region.clone());
        let mut rule = key.rule;
        if rule == Rule::ServerUnreachable
            && let Some(r) = &region
            && self.by_key.contains_key(&format!("region_unreachable/{r}"))
        {
            rule = Rule::RegionUnreachable;
        }
        let gk = group_key(rule, key, region.as_deref());
        let id = match self.by_key.get(&gk) {
            Some(id) => *id,
            None => self.open_incident(rule, gk, region.clone(), key, immediate, ctx, fx),
        };
        if let Some(info) = info {
            self.join(id, key, info, ctx, fx);
        }
        if let Some(a) = self.active.get_mut(key) {
            a.incident = Some(id);
            a.hold = Hold::No;
        }
    }

    fn hold(&mut self, key: &AlertKey, hold: Hold) {
        if let Some(a) = self.active.get_mut(key) {
            a.hold = hold;
            a.incident = None;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn open_incident(
        &mut self,
        rule: Rule,
        gk: String,
        region: Option<String>,
        key: &AlertKey,
        immediate: bool,
        ctx: &Context<'_>,
        fx: &mut Vec<Effect>,
    ) -> Uuid {
        let id = Uuid::new_v4();
        let summary = match rule {
            Rule::Storage | Rule::FleetSelf => format!("{}: {}", rule.alertname(), key.detail),
            Rule::FleetUnreachable => "Fleet cannot reach any of its servers".to_owned(),
            _ => match &region {
                Some(r) => format!("{} in region {r}", rule.alertname()),
                None => rule.alertname().to_owned(),
            },
        };
        let snap = Snapshot {
            incident: Incident {
                id,
                group_key: gk.clone(),
                rule,
                severity: rule.severity(),
                region,
                state: IncidentState::Firing,
                summary: summary.clone(),
                opened_at: ctx.now,
                acknowledged_at: None,
                acknowledged_by: None,
                ack_reason: None,
                resolved_at: None,
                servers: 0,
                covers: 0,
            },
            seq: 0,
            announced_at: None,
            notified_at: None,
            additions: false,
            immediate,
            escalated_until: 0,
            told: BTreeSet::new(),
        };
        self.by_key.insert(gk, id);
        self.open.insert(
            id,
            Open {
                snap,
                members: BTreeMap::new(),
            },
        );
        fx.push(Effect::Timeline {
            incident: id,
            at: ctx.now,
            kind: "opened",
            message: format!("opened: {summary}"),
            channel: None,
        });
        self.save(id, fx);
        id
    }

    fn join(
        &mut self,
        id: Uuid,
        key: &AlertKey,
        info: ServerInfo,
        ctx: &Context<'_>,
        fx: &mut Vec<Effect>,
    ) {
        let Some(open) = self.open.get_mut(&id) else {
            return;
        };
        let Some(server) = key.server else { return };
        let member = Member {
            server_id: server,
            server_name: info.name.clone(),
            region: info.region.clone(),
            detail: key.detail.clone(),
            joined_at: ctx.now,
            resolved_at: None,
        };
        let was = open.members.insert(
            key.clone(),
            MemberState {
                member: member.clone(),
                firing: true,
                told: false,
            },
        );
        if was.is_none() {
            open.snap.incident.servers += 1;
        }
        open.snap.incident.covers = open.members.values().filter(|m| m.firing).count() as u64;
        if open.snap.incident.rule == Rule::RegionUnreachable
            && let Some(region) = &open.snap.incident.region
        {
            // Every server that joined it, recovered ones too.
            let n = open.snap.incident.servers;
            open.snap.incident.summary = format!("{n} servers unreachable in region {region}");
        }
        if open.snap.announced_at.is_some() {
            open.snap.additions = true;
        }
        fx.push(Effect::Join {
            incident: id,
            member,
        });
        fx.push(Effect::Timeline {
            incident: id,
            at: ctx.now,
            kind: "member_added",
            message: format!("{} joined", info.name),
            channel: None,
        });
        self.save(id, fx);
    }

    fn leave(
        &mut self,
        id: Uuid,
        key: &AlertKey,
        at: OffsetDateTime,
        ctx: &Context<'_>,
        fx: &mut Vec<Effect>,
    ) {
        let Some(open) = self.open.get_mut(&id) else {
            return;
        };
        if let Some(m) = open.members.get_mut(key) {
            m.firing = false;
            m.member.resolved_at = Some(at);
            fx.push(Effect::Leave {
                incident: id,
                server: m.member.server_id,
                detail: key.detail.clone(),
                at,
            });
            fx.push(Effect::Timeline {
                incident: id,
                at: ctx.now,
                kind: "member_resolved",
                message: format!("{} recovered", m.member.server_name),
                channel: None,
            });
        }
        open.snap.incident.covers = open.members.values().filter(|m| m.firing).count() as u64;
        let memberless = key.server.is_none();
        if memberless || open.members.values().all(|m| !m.firing) {
            self.resolve(id, ctx, fx);
        } else {
            self.save(id, fx);
        }
    }

    fn resolve(&mut self, id: Uuid, ctx: &Context<'_>, fx: &mut Vec<Effect>) {
        let Some(mut open) = self.open.remove(&id) else {
            return;
        };
        self.by_key.remove(&open.snap.incident.group_key);
        open.snap.incident.state = IncidentState::Resolved;
        open.snap.incident.resolved_at = Some(ctx.now);
        if open.snap.announced_at.is_some() {
            fx.push(Effect::Timeline {
                incident: id,
                at: ctx.now,
                kind: "resolved",
                message: "resolved".into(),
                channel: None,
            });
            let told: Vec<Uuid> = open.snap.told.iter().copied().collect();
            let targets: Vec<Uuid> = told
                .into_iter()
                .filter(|c| {
                    ctx.channels
                        .iter()
                        .any(|ch| ch.id == *c && ch.send_resolved)
                })
                .collect();
            notify(&mut open, NoticeKind::Resolved, &targets, ctx, fx);
        } else {
            fx.push(Effect::Timeline {
                incident: id,
                at: ctx.now,
                kind: "resolved",
                message: "resolved before it was announced: nobody was told".into(),
                channel: None,
            });
        }
        fx.push(Effect::Save(Box::new(open.snap)));
    }

    fn save(&self, id: Uuid, fx: &mut Vec<Effect>) {
        if let Some(open) = self.open.get(&id) {
            fx.push(Effect::Save(Box::new(open.snap.clone())));
        }
    }

    /// Someone acknowledged an open incident. Returns `None` when it is not open.
    pub fn acknowledge(
        &mut self,
        id: Uuid,
        by: &str,
        reason: &str,
        ctx: &Context<'_>,
    ) -> Option<(Incident, Vec<Effect>)> {
        let open = self.open.get_mut(&id)?;
        let mut fx = Vec::new();
        if open.snap.incident.state == IncidentState::Firing {
            open.snap.incident.state = IncidentState::Acknowledged;
            open.snap.incident.acknowledged_at = Some(ctx.now);
            open.snap.incident.acknowledged_by = Some(by.to_owned());
            open.snap.incident.ack_reason = Some(reason.to_owned());
            fx.push(Effect::Timeline {
                incident: id,
                at: ctx.now,
                kind: "acknowledged",
                message: format!("acknowledged by {by}: {reason}"),
                channel: None,
            });
            let told: Vec<Uuid> = open.snap.told.iter().copied().collect();
            notify(open, NoticeKind::Acknowledged, &told, ctx, &mut fx);
            fx.push(Effect::Save(Box::new(open.snap.clone())));
        }
        Some((open.snap.incident.clone(), fx))
    }

    /// Time passed: timers, maintenance ends, regional and fleet-wide inhibition.
    pub fn tick(&mut self, ctx: &Context<'_>) -> Vec<Effect> {
        let mut fx = Vec::new();
        self.fleet_wide(ctx, &mut fx);
        self.regions(ctx, &mut fx);
        // Alerts held back by a maintenance window that has ended open an incident at once.
        let released: Vec<AlertKey> = self
            .active
            .iter()
            .filter(|(k, a)| a.hold == Hold::Maintenance && !ctx.in_maintenance(k))
            .map(|(k, _)| k.clone())
            .collect();
        for key in released {
            self.place(&key, true, ctx, &mut fx);
        }
        let ids: Vec<Uuid> = self.open.keys().copied().collect();
        for id in ids {
            self.timers(id, ctx, &mut fx);
        }
        fx
    }

    fn fleet_wide(&mut self, ctx: &Context<'_>, fx: &mut Vec<Effect>) {
        let key = AlertKey {
            rule: Rule::FleetUnreachable,
            server: None,
            detail: String::new(),
        };
        match (ctx.fleet_unreachable, self.active.contains_key(&key)) {
            (Some(count), false) => {
                self.active.insert(
                    key.clone(),
                    Active {
                        incident: None,
                        hold: Hold::No,
                    },
                );
                self.place(&key, false, ctx, fx);
                if let Some(id) = self.by_key.get("fleet_unreachable").copied()
                    && let Some(open) = self.open.get_mut(&id)
                {
                    open.snap.incident.covers = count;
                }
                // Every per-server and regional unreachable alert is held back, and incidents
                // for them not yet announced are dropped: the fleet incident stands for all.
                let held: Vec<AlertKey> = self
                    .active
                    .keys()
                    .filter(|k| k.rule == Rule::ServerUnreachable)
                    .cloned()
                    .collect();
                for k in held {
                    let was = self.active.get(&k).and_then(|a| a.incident);
                    // An alert already told of stays in its incident until it recovers.
                    if self.told(&k) {
                        continue;
                    }
                    self.hold(&k, Hold::Fleet);
                    if let Some(inc) = was {
                        self.drop_member(inc, &k, ctx, fx);
                    }
                }
            }
            (None, true) => {
                self.active.remove(&key);
                if let Some(id) = self.by_key.get("fleet_unreachable").copied() {
                    self.resolve(id, ctx, fx);
                }
                let released: Vec<AlertKey> = self
                    .active
                    .iter()
                    .filter(|(_, a)| a.hold == Hold::Fleet)
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in released {
                    self.place(&k, false, ctx, fx);
                }
            }
            (Some(count), true) => {
                if let Some(id) = self.by_key.get("fleet_unreachable").copied()
                    && let Some(open) = self.open.get_mut(&id)
                    && open.snap.incident.covers != count
                {
                    open.snap.incident.covers = count;
                    self.save(id, fx);
                }
            }
            (None, false) => {}
        }
    }

    /// Whether a notice named this alert (in the incident it is in).
    fn told(&self, key: &AlertKey) -> bool {
        self.active
            .get(key)
            .and_then(|a| a.incident)
            .and_then(|inc| self.open.get(&inc))
            .and_then(|o| o.members.get(key))
            .is_some_and(|m| m.told)
    }

    /// Removes a member no notice named yet, whose alert moved elsewhere; an incident left
    /// with nobody before it was announced is closed without a word.
    fn drop_member(&mut self, id: Uuid, key: &AlertKey, ctx: &Context<'_>, fx: &mut Vec<Effect>) {
        let Some(open) = self.open.get_mut(&id) else {
            return;
        };
        if let Some(m) = open.members.remove(key) {
            open.snap.incident.servers = open.snap.incident.servers.saturating_sub(1);
            fx.push(Effect::Leave {
                incident: id,
                server: m.member.server_id,
                detail: key.detail.clone(),
                at: ctx.now,
            });
        }
        open.snap.incident.covers = open.members.values().filter(|m| m.firing).count() as u64;
        open.snap.additions =
            open.snap.announced_at.is_some() && open.members.values().any(|m| m.firing && !m.told);
        if open.members.values().all(|m| !m.firing) {
            self.resolve(id, ctx, fx);
        } else {
            self.save(id, fx);
        }
    }

    /// Regions where the share of unreachable servers is crossed get one regional incident;
    /// their per-server unreachable alerts move into it.
    fn regions(&mut self, ctx: &Context<'_>, fx: &mut Vec<Effect>) {
        if ctx.cfg.region_share == 0 {
            return;
        }
        let mut down: BTreeMap<String, Vec<AlertKey>> = BTreeMap::new();
        for (k, a) in &self.active {
            if k.rule != Rule::ServerUnreachable || a.hold != Hold::No {
                continue;
            }
            let Some(region) = k.server.and_then(|s| ctx.servers.get(&s)?.region.clone()) else {
                continue;
            };
            down.entry(region).or_default().push(k.clone());
        }
        for (region, keys) in down {
            let gk = format!("region_unreachable/{region}");
            let size = ctx.region_sizes.get(&region).copied().unwrap_or(0);
            let n = keys.len() as u64;
            let crossed = size >= u64::from(ctx.cfg.region_min)
                && n >= u64::from(ctx.cfg.region_min)
                && n * 100 >= u64::from(ctx.cfg.region_share) * size;
            if !crossed || self.by_key.contains_key(&gk) {
                continue;
            }
            // Alerts already announced stay where they were told of (moving them would tell
            // their channels they had resolved); the regional incident takes the others.
            let keys: Vec<AlertKey> = keys.into_iter().filter(|k| !self.told(k)).collect();
            let Some(first) = keys.first().cloned() else {
                continue;
            };
            let id = self.open_incident(
                Rule::RegionUnreachable,
                gk,
                Some(region.clone()),
                &first,
                false,
                ctx,
                fx,
            );
            for k in keys {
                if let Some(inc) = self.active.get(&k).and_then(|a| a.incident)
                    && inc != id
                {
                    self.drop_member(inc, &k, ctx, fx);
                }
                if let Some(server) = k.server {
                    self.join(id, &k, ctx.info(server), ctx, fx);
                }
                if let Some(a) = self.active.get_mut(&k) {
                    a.incident = Some(id);
                }
            }
            self.save(id, fx);
        }
    }

    fn timers(&mut self, id: Uuid, ctx: &Context<'_>, fx: &mut Vec<Effect>) {
        let now = ctx.now;
        let cfg = ctx.cfg;
        let Some(open) = self.open.get_mut(&id) else {
            return;
        };
        let steps = steps_for(open, ctx);
        match open.snap.announced_at {
            None => {
                let due =
                    open.snap.immediate || now - open.snap.incident.opened_at >= cfg.group_wait;
                if !due {
                    return;
                }
                open.snap.announced_at = Some(now);
                let first: Vec<Uuid> = steps
                    .iter()
                    .filter(|(after, _)| *after == 0)
                    .flat_map(|(_, c)| c.iter().copied())
                    .collect();
                fx.push(Effect::Timeline {
                    incident: id,
                    at: ctx.now,
                    kind: "announced",
                    message: format!("announced to {} channel(s)", first.len()),
                    channel: None,
                });
                let kind = NoticeKind::Firing;
                notify(open, kind, &first, ctx, fx);
                fx.push(Effect::Save(Box::new(open.snap.clone())));
            }
            Some(announced) => {
                let told: Vec<Uuid> = open.snap.told.iter().copied().collect();
                let last = open.snap.notified_at.unwrap_or(announced);
                let acked = open.snap.incident.state != IncidentState::Firing;
                if open.snap.additions && now - last >= cfg.group_interval {
                    open.snap.additions = false;
                    notify(open, NoticeKind::Update, &told, ctx, fx);
                    fx.push(Effect::Save(Box::new(open.snap.clone())));
                } else if !acked
                    && !cfg.repeat_interval.is_zero()
                    && now - last >= cfg.repeat_interval
                {
                    notify(open, NoticeKind::Reminder, &told, ctx, fx);
                    fx.push(Effect::Save(Box::new(open.snap.clone())));
                }
                if acked {
                    return;
                }
                let elapsed = (now - announced).whole_seconds().max(0) as u64;
                let due: Vec<(u64, Vec<Uuid>)> = steps
                    .into_iter()
                    .filter(|(after, _)| *after > open.snap.escalated_until && *after <= elapsed)
                    .collect();
                if let Some(until) = due.iter().map(|(a, _)| *a).max() {
                    open.snap.escalated_until = until;
                    let channels: Vec<Uuid> = due.into_iter().flat_map(|(_, c)| c).collect();
                    fx.push(Effect::Timeline {
                        incident: id,
                        at: ctx.now,
                        kind: "escalated",
                        message: format!(
                            "unacknowledged after {until} s: escalated to {} channel(s)",
                            channels.len()
                        ),
                        channel: None,
                    });
                    notify(open, NoticeKind::Escalation, &channels, ctx, fx);
                    fx.push(Effect::Save(Box::new(open.snap.clone())));
                }
            }
        }
    }
}

/// The escalation steps for an incident: its matching policies' steps, or every channel at
/// once when no policy matches.
fn steps_for(open: &Open, ctx: &Context<'_>) -> Vec<(u64, Vec<Uuid>)> {
    let inc = &open.snap.incident;
    let first = open.members.values().next().map(|m| &m.member);
    let single = (open.members.len() == 1)
        .then(|| first.map(|m| m.server_id))
        .flatten();
    let groups: Vec<GroupId> = open
        .members
        .values()
        .filter_map(|m| ctx.servers.get(&m.member.server_id))
        .flat_map(|i| i.groups.iter().map(|g| g.0))
        .collect();
    let subject = Subject {
        rule: Some(inc.rule),
        server: single,
        region: inc.region.as_deref(),
        groups: &groups,
    };
    let mut steps: BTreeMap<u64, Vec<Uuid>> = BTreeMap::new();
    let mut any = false;
    for p in ctx.policies.iter().filter(|p| p.matchers.matches(&subject)) {
        any = true;
        for s in &p.steps {
            steps
                .entry(s.after_seconds)
                .or_default()
                .extend(s.channel_ids.iter().copied());
        }
    }
    if !any {
        steps.insert(0, ctx.channels.iter().map(|c| c.id).collect());
    }
    steps.into_iter().collect()
}

/// Queues a notice to `channels`, unless every firing member is silenced (then it is
/// recorded as muted), and records the transition's sequence number.
fn notify(
    open: &mut Open,
    kind: NoticeKind,
    channels: &[Uuid],
    ctx: &Context<'_>,
    fx: &mut Vec<Effect>,
) {
    let id = open.snap.incident.id;
    open.snap.seq += 1;
    open.snap.notified_at = Some(ctx.now);
    if !matches!(kind, NoticeKind::Acknowledged | NoticeKind::Resolved) {
        for m in open.members.values_mut() {
            m.told = true;
        }
    }
    let members: Vec<&Member> = open.members.values().map(|m| &m.member).collect();
    let silenced = |m: Option<&Member>| {
        let groups: Vec<GroupId> = m
            .and_then(|m| ctx.servers.get(&m.server_id))
            .map(|i| i.groups.iter().map(|g| g.0).collect())
            .unwrap_or_default();
        let subject = Subject {
            rule: Some(open.snap.incident.rule),
            server: m.map(|m| m.server_id),
            region: m
                .and_then(|m| m.region.as_deref())
                .or(open.snap.incident.region.as_deref()),
            groups: &groups,
        };
        ctx.silences
            .iter()
            .find(|s| s.active(ctx.now) && s.matchers.matches(&subject))
            .map(|s| s.id)
    };
    let muted = if members.is_empty() {
        silenced(None)
    } else {
        let mut all = None;
        for m in &members {
            match silenced(Some(m)) {
                Some(s) => all = Some(s),
                None => {
                    all = None;
                    break;
                }
            }
        }
        all
    };
    if let Some(silence) = muted {
        fx.push(Effect::Timeline {
            incident: id,
            at: ctx.now,
            kind: "muted",
            message: format!("{} notice muted by silence {silence}", kind.as_str()),
            channel: None,
        });
        return;
    }
    let unique: BTreeSet<Uuid> = channels.iter().copied().collect();
    for channel in unique {
        let Some(ch) = ctx.channels.iter().find(|c| c.id == channel) else {
            continue;
        };
        if ch.full {
            fx.push(Effect::Timeline {
                incident: id,
                at: ctx.now,
                kind: "dropped",
                message: format!(
                    "{} notice for channel {} dropped: its backlog is full",
                    kind.as_str(),
                    ch.name
                ),
                channel: Some(channel),
            });
            continue;
        }
        open.snap.told.insert(channel);
        let notice = payload::notice(&open.snap, &members, kind, &ch.name, ctx);
        fx.push(Effect::Notify {
            incident: id,
            seq: open.snap.seq,
            channel,
            kind,
            notice,
        });
        fx.push(Effect::Timeline {
            incident: id,
            at: ctx.now,
            kind: "notification",
            message: format!("{} notice queued for {}", kind.as_str(), ch.name),
            channel: Some(channel),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Matchers, Scope, Step};
    use crate::schedule::Schedule;
    use std::time::Duration;
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2026-01-01 0:00 UTC);

    /// The engine with its surroundings, fed at whole seconds after T0.
    struct World {
        engine: Engine,
        cfg: AlertConfig,
        channels: Vec<ChannelRef>,
        policies: Vec<Policy>,
        silences: Vec<Silence>,
        windows: Vec<MaintenanceWindow>,
        servers: HashMap<ServerId, ServerInfo>,
        sizes: HashMap<String, u64>,
        fleet: Option<u64>,
        ids: Vec<ServerId>,
        /// Every notice: (second, incident, kind, channel index).
        sent: Vec<(u64, Uuid, NoticeKind, usize)>,
        effects: Vec<Effect>,
        ticked: Option<u64>,
    }

    impl World {
        /// `n` servers in region `eu` (and `us` for the rest of `total`), two channels.
        fn new(n_eu: usize, total: usize) -> Self {
            let mut servers = HashMap::new();
            let mut ids = Vec::new();
            for i in 0..total {
                let id = ServerId::new();
                let region = if i < n_eu { "eu" } else { "us" };
                servers.insert(
                    id,
                    ServerInfo {
                        name: format!("web-{i}"),
                        region: Some(region.into()),
                        groups: vec![],
                    },
                );
                ids.push(id);
            }
            let mut sizes = HashMap::new();
            sizes.insert("eu".to_owned(), n_eu as u64);
            sizes.insert("us".to_owned(), (total - n_eu) as u64);
            let channel = |name: &str| ChannelRef {
                id: Uuid::new_v4(),
                name: name.into(),
                send_resolved: true,
                full: false,
            };
            Self {
                engine: Engine::new(),
                cfg: AlertConfig {
                    group_wait: Duration::from_secs(30),
                    group_interval: Duration::from_secs(300),
                    repeat_interval: Duration::from_secs(3600),
                    ..AlertConfig::default()
                },
                channels: vec![channel("hook"), channel("slack")],
                policies: vec![],
                silences: vec![],
                windows: vec![],
                servers,
                sizes,
                fleet: None,
                ids,
                sent: vec![],
                effects: vec![],
                ticked: None,
            }
        }

        fn ctx(&self, at: u64) -> Context<'_> {
            Context {
                now: T0 + Duration::from_secs(at),
                cfg: &self.cfg,
                channels: &self.channels,
                policies: &self.policies,
                silences: &self.silences,
                windows: &self.windows,
                servers: &self.servers,
                region_sizes: &self.sizes,
                fleet_unreachable: self.fleet,
            }
        }

        fn record(&mut self, at: u64, fx: Vec<Effect>) {
            for e in &fx {
                if let Effect::Notify {
                    incident,
                    kind,
                    channel,
                    ..
                } = e
                {
                    let c = self.channels.iter().position(|c| c.id == *channel).unwrap();
                    self.sent.push((at, *incident, *kind, c));
                }
            }
            self.effects.extend(fx);
        }

        fn change(&mut self, at: u64, server: usize, rule: Rule, firing: bool) {
            let change = AlertChange {
                key: AlertKey::server(rule, self.ids[server]),
                firing,
                at: T0 + Duration::from_secs(at),
                since: T0 + Duration::from_secs(at),
            };
            let mut engine = std::mem::take(&mut self.engine);
            let fx = engine.change(&change, &self.ctx(at));
            self.engine = engine;
            self.record(at, fx);
        }

        fn tick_until(&mut self, until: u64) {
            let from = self.last_tick();
            for at in from..=until {
                let mut engine = std::mem::take(&mut self.engine);
                let fx = engine.tick(&self.ctx(at));
                self.engine = engine;
                self.record(at, fx);
            }
            self.ticked = Some(until + 1);
        }

        fn last_tick(&self) -> u64 {
            self.ticked.unwrap_or(0)
        }

        /// Notices in time order; at one time, by channel.
        fn kinds(&self) -> Vec<(NoticeKind, usize)> {
            let mut sent = self.sent.clone();
            sent.sort_by_key(|s| (s.0, s.3));
            sent.iter().map(|s| (s.2, s.3)).collect()
        }

        fn incidents(&self) -> BTreeSet<Uuid> {
            self.effects
                .iter()
                .filter_map(|e| match e {
                    Effect::Save(s) => Some(s.incident.id),
                    _ => None,
                })
                .collect()
        }

        /// The last state of every incident of `rule`.
        fn of_rule(&self, rule: Rule) -> Vec<Snapshot> {
            self.incidents()
                .into_iter()
                .map(|id| self.last_snapshot(id))
                .filter(|s| s.incident.rule == rule)
                .collect()
        }

        fn last_snapshot(&self, id: Uuid) -> Snapshot {
            self.effects
                .iter()
                .rev()
                .find_map(|e| match e {
                    Effect::Save(s) if s.incident.id == id => Some((**s).clone()),
                    _ => None,
                })
                .unwrap()
        }
    }

    use NoticeKind::*;

    #[test]
    fn a_storm_in_one_region_is_one_incident_and_one_notice_per_channel() {
        let mut w = World::new(20, 20);
        w.cfg.region_share = 0; // inhibition is tested on its own
        for s in 0..20 {
            w.change(s as u64, s, Rule::ServerUnreachable, true);
        }
        w.tick_until(100);
        assert_eq!(w.incidents().len(), 1);
        assert_eq!(w.kinds(), vec![(Firing, 0), (Firing, 1)]);
        let id = *w.incidents().iter().next().unwrap();
        assert_eq!(w.last_snapshot(id).incident.servers, 20);
        for s in 0..20 {
            w.change(200 + s as u64, s, Rule::ServerUnreachable, false);
        }
        w.tick_until(300);
        assert_eq!(w.kinds()[2..], [(Resolved, 0), (Resolved, 1)]);
        assert_eq!(w.last_snapshot(id).incident.state, IncidentState::Resolved);
    }

    #[test]
    fn an_incident_over_within_group_wait_is_never_announced() {
        let mut w = World::new(1, 1);
        w.change(0, 0, Rule::ServerCritical, true);
        w.tick_until(10);
        w.change(11, 0, Rule::ServerCritical, false);
        w.tick_until(400);
        assert!(w.sent.is_empty(), "{:?}", w.sent);
        let id = *w.incidents().iter().next().unwrap();
        assert_eq!(w.last_snapshot(id).incident.state, IncidentState::Resolved);
    }

    #[test]
    fn additions_are_announced_at_most_every_group_interval_and_reminders_repeat() {
        let mut w = World::new(3, 3);
        w.change(0, 0, Rule::ServerCritical, true);
        w.tick_until(40);
        w.change(50, 1, Rule::ServerCritical, true);
        w.change(60, 2, Rule::ServerCritical, true);
        w.tick_until(3_000);
        let at: Vec<(u64, NoticeKind)> = w
            .sent
            .iter()
            .filter(|s| s.3 == 0)
            .map(|s| (s.0, s.2))
            .collect();
        // Announced at 30 s; both additions in one update 300 s after that.
        assert_eq!(at, vec![(30, Firing), (330, Update)]);
        w.tick_until(4_000);
        let at: Vec<(u64, NoticeKind)> = w
            .sent
            .iter()
            .filter(|s| s.3 == 0)
            .map(|s| (s.0, s.2))
            .collect();
        assert_eq!(at.last(), Some(&(330 + 3600, Reminder)));
    }

    #[test]
    fn ack_stops_reminders_and_escalation_and_clears_on_recovery() {
        let mut w = World::new(1, 1);
        let (slack, pager) = (w.channels[0].id, w.channels[1].id);
        w.policies.push(Policy {
            id: Uuid::new_v4(),
            name: "p".into(),
            matchers: Matchers::default(),
            steps: vec![
                Step {
                    after_seconds: 0,
                    channel_ids: vec![slack],
                },
                Step {
                    after_seconds: 1800,
                    channel_ids: vec![pager],
                },
            ],
            created_at: T0,
        });
        w.change(0, 0, Rule::ServerCritical, true);
        w.tick_until(2_000);
        // Slack at once, PagerDuty after 30 minutes unacknowledged.
        assert_eq!(w.kinds(), vec![(Firing, 0), (Escalation, 1)]);
        let id = *w.incidents().iter().next().unwrap();
        let (inc, fx) = {
            let mut engine = std::mem::take(&mut w.engine);
            let r = engine
                .acknowledge(id, "ops", "on it", &w.ctx(2_001))
                .unwrap();
            w.engine = engine;
            r
        };
        w.record(2_001, fx);
        assert_eq!(inc.state, IncidentState::Acknowledged);
        // Both channels were told, so both hear of the acknowledgement.
        assert_eq!(w.kinds()[2..], [(Acknowledged, 0), (Acknowledged, 1)]);
        w.tick_until(20_000);
        assert_eq!(w.sent.len(), 4, "no reminder after an ack: {:?}", w.kinds());
        w.change(20_001, 0, Rule::ServerCritical, false);
        assert_eq!(w.kinds()[4..], [(Resolved, 0), (Resolved, 1)]);
        let snap = w.last_snapshot(id);
        assert_eq!(snap.incident.state, IncidentState::Resolved);
        assert_eq!(snap.incident.ack_reason.as_deref(), Some("on it"));
    }

    #[test]
    fn crossing_the_region_share_makes_one_regional_incident() {
        let mut w = World::new(10, 20);
        for s in 0..6 {
            w.change(s as u64, s, Rule::ServerUnreachable, true);
        }
        w.tick_until(100);
        let regional = w.of_rule(Rule::RegionUnreachable);
        assert_eq!(regional.len(), 1);
        assert_eq!(regional[0].incident.covers, 6);
        // The per-server incident was dropped before it was announced: one notice per channel.
        assert_eq!(w.kinds(), vec![(Firing, 0), (Firing, 1)]);
        // A later one in the region joins the regional incident.
        w.change(101, 6, Rule::ServerUnreachable, true);
        let snap = w.last_snapshot(regional[0].incident.id);
        assert_eq!(snap.incident.covers, 7);
        // A server in another region is its own incident.
        w.change(102, 15, Rule::ServerUnreachable, true);
        assert_eq!(w.incidents().len(), 3);
    }

    #[test]
    fn alerts_already_announced_stay_in_their_incident_when_the_region_crosses() {
        let mut w = World::new(10, 20);
        w.change(0, 0, Rule::ServerUnreachable, true);
        w.change(0, 1, Rule::ServerUnreachable, true);
        w.tick_until(40);
        assert_eq!(w.kinds(), vec![(Firing, 0), (Firing, 1)]);
        for s in 2..8 {
            w.change(50, s, Rule::ServerUnreachable, true);
        }
        w.tick_until(100);
        // Nobody is told the first incident resolved; the regional one takes the others.
        assert!(
            !w.kinds().iter().any(|k| k.0 == Resolved),
            "{:?}",
            w.kinds()
        );
        let regional = w.of_rule(Rule::RegionUnreachable);
        assert_eq!(regional.len(), 1);
        assert_eq!(regional[0].incident.covers, 6);
    }

    #[test]
    fn when_no_server_answers_one_fleet_incident_stands_for_all() {
        let mut w = World::new(10, 20);
        for s in 0..20 {
            w.change(0, s, Rule::ServerUnreachable, true);
        }
        w.fleet = Some(20);
        w.tick_until(100);
        let announced: BTreeSet<Uuid> = w.sent.iter().map(|s| s.1).collect();
        assert_eq!(announced.len(), 1);
        let snap = w.last_snapshot(*announced.iter().next().unwrap());
        assert_eq!(snap.incident.rule, Rule::FleetUnreachable);
        assert_eq!(snap.incident.covers, 20);
        w.fleet = None;
        w.tick_until(110);
        assert!(w.kinds().contains(&(Resolved, 0)));
    }

    #[test]
    fn maintenance_opens_nothing_and_a_server_still_down_after_it_opens_an_incident_at_once() {
        let mut w = World::new(1, 1);
        w.windows.push(MaintenanceWindow {
            id: Uuid::new_v4(),
            name: "upgrade".into(),
            scope: Scope::ServerId(w.ids[0]),
            schedule: Schedule::Once {
                starts_at: T0,
                ends_at: T0 + Duration::from_secs(600),
            },
            created_at: T0,
        });
        w.change(10, 0, Rule::ServerCritical, true);
        w.tick_until(599);
        assert!(w.incidents().is_empty());
        w.tick_until(600);
        assert_eq!(w.incidents().len(), 1);
        assert_eq!(
            w.sent.iter().map(|s| s.0).collect::<Vec<_>>(),
            vec![600, 600]
        );
    }

    #[test]
    fn a_silence_mutes_notices_but_the_incident_is_recorded() {
        let mut w = World::new(1, 1);
        w.silences.push(Silence {
            id: Uuid::new_v4(),
            matchers: Matchers {
                rule: Some(Rule::ServerCritical),
                ..Matchers::default()
            },
            starts_at: T0,
            ends_at: T0 + Duration::from_secs(3600),
            comment: "known".into(),
            created_at: T0,
        });
        w.change(0, 0, Rule::ServerCritical, true);
        w.tick_until(100);
        assert_eq!(w.incidents().len(), 1);
        assert!(w.sent.is_empty());
        assert!(
            w.effects
                .iter()
                .any(|e| matches!(e, Effect::Timeline { kind: "muted", .. }))
        );
    }

    #[test]
    fn a_full_backlog_drops_and_records_the_notice() {
        let mut w = World::new(1, 1);
        w.channels[0].full = true;
        w.change(0, 0, Rule::ServerCritical, true);
        w.tick_until(40);
        assert_eq!(w.kinds(), vec![(Firing, 1)]);
        assert!(w.effects.iter().any(|e| matches!(
            e,
            Effect::Timeline {
                kind: "dropped",
                ..
            }
        )));
    }

    #[test]
    fn a_restored_engine_goes_on_without_announcing_again() {
        let mut w = World::new(1, 1);
        w.change(0, 0, Rule::ServerCritical, true);
        w.tick_until(40);
        let id = *w.incidents().iter().next().unwrap();
        let snap = w.last_snapshot(id);
        let members: Vec<Member> = w
            .effects
            .iter()
            .filter_map(|e| match e {
                Effect::Join { member, .. } => Some(member.clone()),
                _ => None,
            })
            .collect();
        w.engine = Engine::restore(
            vec![Restored {
                snapshot: snap,
                members,
            }],
            [(AlertKey::server(Rule::ServerCritical, w.ids[0]), T0)],
        );
        w.tick_until(1000);
        assert_eq!(w.sent.len(), 2, "{:?}", w.kinds());
        w.change(1001, 0, Rule::ServerCritical, false);
        assert_eq!(w.kinds()[2..], [(Resolved, 0), (Resolved, 1)]);
    }
}
