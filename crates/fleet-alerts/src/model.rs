//! Alert domain types: rules, incidents, channels, silences, maintenance windows, policies.

use std::fmt;

use fleet_core::{GroupId, ServerId};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// How bad an alert is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Someone should act now.
    Critical,
    /// Someone should look.
    Warning,
}

impl Severity {
    /// Both, most severe first.
    pub const ALL: [Severity; 2] = [Severity::Critical, Severity::Warning];

    /// The name on the wire and in storage.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::Warning => "warning",
        }
    }

    /// Parses [`Severity::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// The built-in rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// Consecutive critical checks.
    ServerCritical,
    /// Unreachable for a while.
    ServerUnreachable,
    /// Most of a region unreachable at once.
    RegionUnreachable,
    /// Fleet reaches none of its servers.
    FleetUnreachable,
    /// Degraded for a while.
    ServerDegraded,
    /// Health changing too often.
    ServerFlapping,
    /// Consecutive failed metrics collections.
    MetricsFailing,
    /// CPU, memory or disk over a threshold for a while.
    ResourceHigh,
    /// A missing partition, failing writes, dropped results.
    Storage,
    /// Fleet itself: overruns, local resource failures, unopenable tokens.
    FleetSelf,
}

impl Rule {
    /// Every rule.
    pub const ALL: [Rule; 10] = [
        Rule::ServerCritical,
        Rule::ServerUnreachable,
        Rule::RegionUnreachable,
        Rule::FleetUnreachable,
        Rule::ServerDegraded,
        Rule::ServerFlapping,
        Rule::MetricsFailing,
        Rule::ResourceHigh,
        Rule::Storage,
        Rule::FleetSelf,
    ];

    /// The name in matchers and storage.
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::ServerCritical => "server_critical",
            Rule::ServerUnreachable => "server_unreachable",
            Rule::RegionUnreachable => "region_unreachable",
            Rule::FleetUnreachable => "fleet_unreachable",
            Rule::ServerDegraded => "server_degraded",
            Rule::ServerFlapping => "server_flapping",
            Rule::MetricsFailing => "metrics_failing",
            Rule::ResourceHigh => "resource_high",
            Rule::Storage => "storage",
            Rule::FleetSelf => "fleet_self",
        }
    }

    /// The `alertname` label.
    pub fn alertname(self) -> &'static str {
        match self {
            Rule::ServerCritical => "ServerCritical",
            Rule::ServerUnreachable => "ServerUnreachable",
            Rule::RegionUnreachable => "RegionUnreachable",
            Rule::FleetUnreachable => "FleetCannotReachFleet",
            Rule::ServerDegraded => "ServerDegraded",
            Rule::ServerFlapping => "ServerFlapping",
            Rule::MetricsFailing => "MetricsCollectionFailing",
            Rule::ResourceHigh => "ResourceHigh",
            Rule::Storage => "StorageProblem",
            Rule::FleetSelf => "FleetSelf",
        }
    }

    /// Its severity.
    pub fn severity(self) -> Severity {
        match self {
            Rule::ServerDegraded
            | Rule::ServerFlapping
            | Rule::MetricsFailing
            | Rule::ResourceHigh => Severity::Warning,
            _ => Severity::Critical,
        }
    }

    /// Parses [`Rule::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One alert's identity: a rule, and what it is about. Per-server rules name the server;
/// `detail` tells apart alerts of one rule on one subject (`cpu`, `disk`, a storage finding).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AlertKey {
    /// The rule.
    pub rule: Rule,
    /// The server, for per-server rules.
    pub server: Option<ServerId>,
    /// What else tells it apart, empty when nothing.
    pub detail: String,
}

impl AlertKey {
    /// A per-server alert.
    pub fn server(rule: Rule, server: ServerId) -> Self {
        Self {
            rule,
            server: Some(server),
            detail: String::new(),
        }
    }

    /// A stable fingerprint, as Alertmanager's: the same alert always has the same one.
    pub fn fingerprint(&self) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(self.rule.as_str());
        h.update([0]);
        if let Some(s) = self.server {
            h.update(s.0.as_bytes());
        }
        h.update([0]);
        h.update(self.detail.as_bytes());
        let d = h.finalize();
        d[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Where a per-server alert's rule state is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Nothing wrong.
    Inactive,
    /// Wrong, but not for long enough yet.
    Pending,
    /// Wrong for long enough.
    Firing,
    /// Was firing, good again, but not for long enough yet.
    Recovering,
}

impl Phase {
    /// The name in storage.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Inactive => "resolved",
            Phase::Pending => "pending",
            Phase::Firing => "firing",
            Phase::Recovering => "recovering",
        }
    }

    /// Parses [`Phase::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        [
            Phase::Inactive,
            Phase::Pending,
            Phase::Firing,
            Phase::Recovering,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
    }
}

/// A stored change of an alert's phase: only these are written, never per-check counters.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AlertTransition {
    /// The alert.
    pub key: AlertKey,
    /// From.
    pub from: Phase,
    /// To.
    pub to: Phase,
    /// When (the check's time).
    pub at: OffsetDateTime,
    /// Since when the alert has been in its current episode (pending or firing).
    pub since: OffsetDateTime,
}

/// An incident's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IncidentState {
    /// Open and nobody has said they are on it.
    Firing,
    /// Open, and someone said they are on it.
    Acknowledged,
    /// Over.
    Resolved,
}

impl IncidentState {
    /// The name on the wire and in storage.
    pub fn as_str(self) -> &'static str {
        match self {
            IncidentState::Firing => "firing",
            IncidentState::Acknowledged => "acknowledged",
            IncidentState::Resolved => "resolved",
        }
    }

    /// Parses [`IncidentState::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Firing, Self::Acknowledged, Self::Resolved]
            .into_iter()
            .find(|v| v.as_str() == s)
    }
}

/// An incident: alerts of one rule (and region) grouped into one durable record.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Incident {
    /// Its id.
    pub id: Uuid,
    /// What groups its alerts, e.g. `server_unreachable/eu`; one open incident per key.
    pub group_key: String,
    /// Its rule.
    pub rule: Rule,
    /// Its severity.
    pub severity: Severity,
    /// The region its alerts share, if any.
    pub region: Option<String>,
    /// Its state.
    pub state: IncidentState,
    /// A one-line summary.
    pub summary: String,
    /// Opened.
    #[serde(with = "time::serde::rfc3339")]
    pub opened_at: OffsetDateTime,
    /// Acknowledged.
    #[serde(with = "time::serde::rfc3339::option")]
    pub acknowledged_at: Option<OffsetDateTime>,
    /// Who acknowledged it.
    pub acknowledged_by: Option<String>,
    /// Why.
    pub ack_reason: Option<String>,
    /// Resolved.
    #[serde(with = "time::serde::rfc3339::option")]
    pub resolved_at: Option<OffsetDateTime>,
    /// Servers affected (members), also those already recovered.
    pub servers: u64,
    /// Servers a regional or fleet-wide incident stands for.
    pub covers: u64,
}

/// A server in an incident.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Member {
    /// The server.
    pub server_id: ServerId,
    /// Its name when it joined.
    pub server_name: String,
    /// Its region.
    pub region: Option<String>,
    /// What told it apart within the rule (`cpu`), empty when nothing.
    pub detail: String,
    /// Joined.
    #[serde(with = "time::serde::rfc3339")]
    pub joined_at: OffsetDateTime,
    /// Recovered, when it has.
    #[serde(with = "time::serde::rfc3339::option")]
    pub resolved_at: Option<OffsetDateTime>,
}

/// One line of an incident's append-only timeline.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TimelineEntry {
    /// Its id, increasing.
    pub id: i64,
    /// The incident.
    pub incident_id: Uuid,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// What kind: `opened`, `member_added`, `member_resolved`, `announced`, `acknowledged`,
    /// `resolved`, `notification`, `muted`, `dropped`.
    pub kind: String,
    /// What happened, for people.
    pub message: String,
    /// The channel a notification went to.
    pub channel_id: Option<Uuid>,
}

/// An incident with its members and timeline.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct IncidentDetail {
    /// The incident.
    #[serde(flatten)]
    pub incident: Incident,
    /// Its members.
    pub members: Vec<Member>,
    /// Its timeline, oldest first.
    pub timeline: Vec<TimelineEntry>,
}

/// Which incidents to list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IncidentFilter {
    /// Only this state.
    pub state: Option<IncidentState>,
    /// Only this severity.
    pub severity: Option<Severity>,
    /// Only incidents this server is a member of.
    pub server: Option<ServerId>,
    /// Only incidents one of this group's servers is a member of.
    pub group: Option<GroupId>,
    /// Only this region.
    pub region: Option<String>,
    /// At most this many.
    pub limit: usize,
    /// Skip this many first.
    pub offset: usize,
}

/// A channel's kind and its configuration, secrets included.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ChannelConfig {
    /// An Alertmanager-compatible webhook.
    Webhook {
        /// Where to POST (secret).
        url: String,
        /// Whether to send resolved notices.
        #[serde(default = "yes")]
        send_resolved: bool,
    },
    /// A Slack incoming webhook.
    Slack {
        /// The incoming webhook URL (secret).
        url: String,
    },
    /// PagerDuty Events v2.
    Pagerduty {
        /// The integration's routing key (secret).
        routing_key: String,
        /// The events endpoint; PagerDuty's when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        url: Option<String>,
    },
    /// Email over SMTP.
    Email {
        /// Recipients.
        to: Vec<String>,
        /// Sender.
        from: String,
        /// SMTP server.
        smtp_host: String,
        /// Its port.
        smtp_port: u16,
        /// How to secure the connection.
        #[serde(default)]
        smtp_tls: SmtpTls,
        /// Login.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        smtp_username: Option<String>,
        /// Password (secret).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        smtp_password: Option<String>,
    },
}

fn yes() -> bool {
    true
}

/// PagerDuty's Events v2 endpoint.
pub const PAGERDUTY_EVENTS_URL: &str = "https://events.pagerduty.com/v2/enqueue";

impl ChannelConfig {
    /// The kind's name.
    pub fn kind(&self) -> &'static str {
        match self {
            ChannelConfig::Webhook { .. } => "webhook",
            ChannelConfig::Slack { .. } => "slack",
            ChannelConfig::Pagerduty { .. } => "pagerduty",
            ChannelConfig::Email { .. } => "email",
        }
    }

    /// Whether resolved notices go to it.
    pub fn send_resolved(&self) -> bool {
        match self {
            ChannelConfig::Webhook { send_resolved, .. } => *send_resolved,
            _ => true,
        }
    }

    /// What may be shown of it: no URL, key or password.
    pub fn public(&self) -> serde_json::Value {
        match self {
            ChannelConfig::Webhook { send_resolved, .. } => {
                serde_json::json!({"kind": "webhook", "send_resolved": send_resolved})
            }
            ChannelConfig::Slack { .. } => serde_json::json!({"kind": "slack"}),
            ChannelConfig::Pagerduty { .. } => serde_json::json!({"kind": "pagerduty"}),
            ChannelConfig::Email {
                to,
                from,
                smtp_host,
                smtp_port,
                smtp_tls,
                smtp_username,
                ..
            } => serde_json::json!({
                "kind": "email", "to": to, "from": from, "smtp_host": smtp_host,
                "smtp_port": smtp_port, "smtp_tls": smtp_tls, "smtp_username": smtp_username,
            }),
        }
    }
}

impl fmt::Debug for ChannelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChannelConfig({})", self.public())
    }
}

/// How an SMTP connection is secured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain, upgraded with STARTTLS (required).
    #[default]
    Starttls,
    /// TLS from the first byte.
    Tls,
    /// No TLS (loopback sinks, relays on the same host).
    None,
}

/// A notification channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Channel {
    /// Its id.
    pub id: Uuid,
    /// Its unique name.
    pub name: String,
    /// Its kind and configuration.
    pub config: ChannelConfig,
    /// Created.
    pub created_at: OffsetDateTime,
}

/// What a silence, a policy or an incident filter matches; every field given must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Matchers {
    /// This server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_id: Option<ServerId>,
    /// Servers of this group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<GroupId>,
    /// This region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// This rule (its snake_case name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<Rule>,
}

/// What an alert is, for matching.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Subject<'a> {
    /// Its rule.
    pub rule: Option<Rule>,
    /// Its server.
    pub server: Option<ServerId>,
    /// Its region.
    pub region: Option<&'a str>,
    /// Its server's groups.
    pub groups: &'a [GroupId],
}

impl Matchers {
    /// Whether every given matcher matches.
    pub fn matches(&self, s: &Subject<'_>) -> bool {
        self.rule.is_none_or(|r| s.rule == Some(r))
            && self.server_id.is_none_or(|id| s.server == Some(id))
            && self.region.as_deref().is_none_or(|r| s.region == Some(r))
            && self.group_id.is_none_or(|g| s.groups.contains(&g))
    }

    /// Whether nothing is given (matches everything).
    pub fn is_empty(&self) -> bool {
        *self == Matchers::default()
    }
}

/// Notifications muted for matching alerts between two times; incidents are still recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Silence {
    /// Its id.
    pub id: Uuid,
    /// What it mutes.
    pub matchers: Matchers,
    /// From.
    pub starts_at: OffsetDateTime,
    /// Until (exclusive).
    pub ends_at: OffsetDateTime,
    /// Why.
    pub comment: String,
    /// Created.
    pub created_at: OffsetDateTime,
}

impl Silence {
    /// Whether it is in force at `now`.
    pub fn active(&self, now: OffsetDateTime) -> bool {
        self.starts_at <= now && now < self.ends_at
    }
}

/// The servers a maintenance window covers: one of the three.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// One server.
    ServerId(ServerId),
    /// A group's servers.
    GroupId(GroupId),
    /// A region's servers.
    Region(String),
}

impl Scope {
    /// Whether it covers a server.
    pub fn covers(&self, s: &Subject<'_>) -> bool {
        match self {
            Scope::ServerId(id) => s.server == Some(*id),
            Scope::GroupId(g) => s.groups.contains(g),
            Scope::Region(r) => s.region == Some(r.as_str()),
        }
    }
}

/// A maintenance window: servers inside it open no incidents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaintenanceWindow {
    /// Its id.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// Which servers.
    pub scope: Scope,
    /// When.
    pub schedule: crate::schedule::Schedule,
    /// Created.
    pub created_at: OffsetDateTime,
}

/// One escalation step: after this long unacknowledged, tell these channels.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Seconds after the incident was first announced.
    pub after_seconds: u64,
    /// Which channels.
    pub channel_ids: Vec<Uuid>,
}

/// An escalation policy: for matching incidents, steps in time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Its id.
    pub id: Uuid,
    /// Its unique name.
    pub name: String,
    /// Which incidents.
    pub matchers: Matchers,
    /// Its steps, by `after_seconds`.
    pub steps: Vec<Step>,
    /// Created.
    pub created_at: OffsetDateTime,
}

/// Why a notification is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoticeKind {
    /// First announcement.
    Firing,
    /// Servers were added since the last announcement.
    Update,
    /// Still firing after the repeat interval.
    Reminder,
    /// An escalation step was reached unacknowledged.
    Escalation,
    /// Somebody acknowledged it.
    Acknowledged,
    /// It is over.
    Resolved,
}

impl NoticeKind {
    /// The name in storage.
    pub fn as_str(self) -> &'static str {
        match self {
            NoticeKind::Firing => "firing",
            NoticeKind::Update => "update",
            NoticeKind::Reminder => "reminder",
            NoticeKind::Escalation => "escalation",
            NoticeKind::Acknowledged => "acknowledged",
            NoticeKind::Resolved => "resolved",
        }
    }

    /// Parses [`NoticeKind::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Firing,
            Self::Update,
            Self::Reminder,
            Self::Escalation,
            Self::Acknowledged,
            Self::Resolved,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }
}

/// A notification waiting in, or gone from, the outbox.
#[derive(Clone, Debug, PartialEq)]
pub struct Delivery {
    /// Its row.
    pub id: i64,
    /// The incident.
    pub incident_id: Uuid,
    /// The incident's transition it tells of.
    pub seq: i32,
    /// The channel.
    pub channel_id: Uuid,
    /// Why.
    pub kind: NoticeKind,
    /// The Alertmanager-compatible notice; channels render their own form from it.
    pub notice: serde_json::Value,
    /// Attempts so far.
    pub attempts: u32,
    /// The claim that lets its sender mark it.
    pub claim_token: Uuid,
}

impl Delivery {
    /// The `Idempotency-Key`: the same on every attempt.
    pub fn idempotency_key(&self) -> String {
        format!("{}-{}-{}", self.incident_id, self.seq, self.channel_id)
    }
}

/// What became of one delivery attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempted {
    /// The receiver took it.
    Sent,
    /// Try again after a while.
    Retry {
        /// How long from now.
        after: std::time::Duration,
        /// Why it failed.
        error: String,
        /// Whether this attempt counts (a rate-limit wait does not).
        counts: bool,
    },
    /// Give up.
    Failed {
        /// Why.
        error: String,
    },
}

/// One channel's outbox figures.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Backlog {
    /// The channel.
    pub channel_id: Uuid,
    /// Waiting to be sent.
    pub pending: u64,
    /// Sent.
    pub sent: u64,
    /// Given up.
    pub failed: u64,
}
