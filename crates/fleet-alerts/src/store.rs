//! Where alert state lives: the [`AlertStore`] trait. fleet-pg implements it for PostgreSQL,
//! [`MemoryAlertStore`](crate::MemoryAlertStore) for the demo and tests.

use std::time::Duration;

use async_trait::async_trait;
use fleet_core::StoreError;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::incidents::{Effect, Restored};
use crate::model::{
    AlertKey, AlertTransition, Attempted, Backlog, Channel, ChannelConfig, Delivery, Incident,
    IncidentDetail, IncidentFilter, MaintenanceWindow, Matchers, Phase, Policy, Scope, Severity,
    Silence, Step, TimelineEntry,
};
use crate::rules::AlertChange;
use crate::schedule::Schedule;

/// A stored alert phase: the last transition of one alert.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredPhase {
    /// The alert.
    pub key: AlertKey,
    /// Its phase.
    pub phase: Phase,
    /// Since when its episode runs.
    pub since: OffsetDateTime,
}

/// What a bucket's owner writes for one observation when the fleet is shared: the phase
/// transitions and the changes it caused, kept only while the owner still holds the fence.
#[derive(Clone, Debug, PartialEq)]
pub struct OwnedWrite {
    /// The fence of the observed result; `None` for a manual check or a fleet-wide signal,
    /// which are written unfenced.
    pub fence: Option<fleet_core::cluster::Fence>,
    /// Phase transitions.
    pub transitions: Vec<AlertTransition>,
    /// Alerts that started or stopped firing, for the leader.
    pub changes: Vec<AlertChange>,
}

/// A change as the leader reads it from the log.
#[derive(Clone, Debug, PartialEq)]
pub struct LoggedChange {
    /// Its position in the log.
    pub id: i64,
    /// The change.
    pub change: AlertChange,
}

/// Where the leader stands: what a new leader starts from, beside the open incidents.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LedState {
    /// The last change decided on.
    pub position: i64,
    /// The alerts held as firing as of that change, with their episodes' start.
    pub firing: Vec<(AlertKey, OffsetDateTime)>,
}

/// Changes to a channel; `None` leaves a field as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChannelPatch {
    /// A new name.
    pub name: Option<String>,
    /// A new configuration (its kind may change).
    pub config: Option<ChannelConfig>,
}

/// Changes to a maintenance window.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WindowPatch {
    /// A new name.
    pub name: Option<String>,
    /// A new scope.
    pub scope: Option<Scope>,
    /// New times.
    pub schedule: Option<Schedule>,
}

/// Changes to a policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyPatch {
    /// A new name.
    pub name: Option<String>,
    /// New matchers.
    pub matchers: Option<Matchers>,
    /// New steps.
    pub steps: Option<Vec<Step>>,
}

/// Alert state, incidents, the outbox, and their configuration.
///
/// [`apply`](AlertStore::apply) is the one write path of the engine: phase transitions and
/// incident effects, outbox rows included, in one transaction. Senders
/// [`claim`](AlertStore::claim) rows (no transaction stays open while they send) and
/// [`finish`](AlertStore::finish) them with their claim token.
#[async_trait]
pub trait AlertStore: Send + Sync {
    /// Writes phase transitions and incident effects atomically. An outbox row already
    /// present for its (incident, seq, channel) is not written again.
    async fn apply(
        &self,
        transitions: &[AlertTransition],
        effects: &[Effect],
    ) -> Result<(), StoreError>;

    /// A shared fleet's owners' write: phase transitions and logged changes, each write kept
    /// only while its fence holds (the bucket still this instance's, at the same epoch).
    /// Returns how many writes were refused as superseded.
    async fn record_owned(&self, writes: &[OwnedWrite]) -> Result<u64, StoreError>;

    /// The stored phases of the servers in `buckets`: what a new owner restores.
    async fn phases_in_buckets(&self, buckets: &[u16]) -> Result<Vec<StoredPhase>, StoreError>;

    /// At most `limit` logged changes after position `after`, oldest first. Never skips a
    /// change that commits later with a smaller position.
    async fn changes_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<LoggedChange>, StoreError>;

    /// The leader's position and firing set.
    async fn led_state(&self) -> Result<LedState, StoreError>;

    /// The leader's write: incident effects, the firing set moved by `consumed`, and the
    /// position past them, in one transaction under the leader's fence `leader_epoch`.
    /// False, with nothing written, when this instance no longer leads at that epoch.
    async fn apply_led(
        &self,
        effects: &[Effect],
        consumed: &[LoggedChange],
        leader_epoch: i64,
    ) -> Result<bool, StoreError>;

    /// Every alert not resolved, as its last transition left it.
    async fn alert_phases(&self) -> Result<Vec<StoredPhase>, StoreError>;

    /// Open incidents with their members and timers.
    async fn open_incidents(&self) -> Result<Vec<Restored>, StoreError>;

    /// Claims up to `limit` due outbox rows for `lease`: rows claimed by others and not yet
    /// expired are skipped, and so are `skip_channels` (busy with a send). The claim is committed before this returns.
    async fn claim(
        &self,
        now: OffsetDateTime,
        limit: usize,
        lease: Duration,
        skip_channels: &[Uuid],
    ) -> Result<Vec<Delivery>, StoreError>;

    /// Records an attempt's outcome, if the claim is still this sender's. False when it is
    /// not (the lease expired and someone else claimed the row).
    async fn finish(
        &self,
        id: i64,
        claim_token: Uuid,
        outcome: &Attempted,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError>;

    /// Each channel's outbox figures.
    async fn backlog(&self) -> Result<Vec<Backlog>, StoreError>;

    /// Adds a channel; a taken name is a conflict.
    async fn create_channel(
        &self,
        name: &str,
        config: ChannelConfig,
        now: OffsetDateTime,
    ) -> Result<Channel, StoreError>;

    /// Every channel, by name.
    async fn list_channels(&self) -> Result<Vec<Channel>, StoreError>;

    /// One channel.
    async fn get_channel(&self, id: Uuid) -> Result<Option<Channel>, StoreError>;

    /// Changes a channel; `None` when it does not exist.
    async fn update_channel(
        &self,
        id: Uuid,
        patch: ChannelPatch,
    ) -> Result<Option<Channel>, StoreError>;

    /// Removes a channel and its outbox rows.
    async fn delete_channel(&self, id: Uuid) -> Result<bool, StoreError>;

    /// A page of incidents, newest first, and how many match.
    async fn list_incidents(
        &self,
        filter: &IncidentFilter,
    ) -> Result<(Vec<Incident>, u64), StoreError>;

    /// One incident with its members and timeline.
    async fn incident(&self, id: Uuid) -> Result<Option<IncidentDetail>, StoreError>;

    /// At most `limit` timeline lines of every incident with an id above `after`, oldest
    /// first: how a live stream tails incident changes.
    async fn timeline_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<TimelineEntry>, StoreError>;

    /// The oldest and newest timeline id, `None` when there is none.
    async fn timeline_ids(&self) -> Result<Option<(i64, i64)>, StoreError>;

    /// Open incidents by severity.
    async fn open_by_severity(&self) -> Result<Vec<(Severity, u64)>, StoreError>;

    /// Adds a silence.
    async fn create_silence(
        &self,
        matchers: Matchers,
        starts_at: OffsetDateTime,
        ends_at: OffsetDateTime,
        comment: &str,
        now: OffsetDateTime,
    ) -> Result<Silence, StoreError>;

    /// Every silence not ended before `since`, newest first.
    async fn list_silences(&self, since: OffsetDateTime) -> Result<Vec<Silence>, StoreError>;

    /// One silence.
    async fn get_silence(&self, id: Uuid) -> Result<Option<Silence>, StoreError>;

    /// Removes a silence.
    async fn delete_silence(&self, id: Uuid) -> Result<bool, StoreError>;

    /// Adds a maintenance window.
    async fn create_window(
        &self,
        name: &str,
        scope: Scope,
        schedule: Schedule,
        now: OffsetDateTime,
    ) -> Result<MaintenanceWindow, StoreError>;

    /// Every window, by name.
    async fn list_windows(&self) -> Result<Vec<MaintenanceWindow>, StoreError>;

    /// One window.
    async fn get_window(&self, id: Uuid) -> Result<Option<MaintenanceWindow>, StoreError>;

    /// Changes a window.
    async fn update_window(
        &self,
        id: Uuid,
        patch: WindowPatch,
    ) -> Result<Option<MaintenanceWindow>, StoreError>;

    /// Removes a window.
    async fn delete_window(&self, id: Uuid) -> Result<bool, StoreError>;

    /// Adds a policy; a taken name is a conflict.
    async fn create_policy(
        &self,
        name: &str,
        matchers: Matchers,
        steps: Vec<Step>,
        now: OffsetDateTime,
    ) -> Result<Policy, StoreError>;

    /// Every policy, by name.
    async fn list_policies(&self) -> Result<Vec<Policy>, StoreError>;

    /// One policy.
    async fn get_policy(&self, id: Uuid) -> Result<Option<Policy>, StoreError>;

    /// Changes a policy.
    async fn update_policy(
        &self,
        id: Uuid,
        patch: PolicyPatch,
    ) -> Result<Option<Policy>, StoreError>;

    /// Removes a policy.
    async fn delete_policy(&self, id: Uuid) -> Result<bool, StoreError>;
}
