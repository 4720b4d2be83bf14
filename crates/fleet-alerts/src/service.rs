//! The thin async shell around the pure rule and incident machines: it subscribes to the
//! result events, feeds the machines, writes their effects in one transaction per batch, and
//! runs the senders that drain the outbox.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use fleet_core::cluster::Fence;
use fleet_core::{
    CancellationToken, Clock, Counts, Event, Events, Groups, HealthStatus, History, ManagedServer,
    MetricsRecord, Problem, Received, Registry, ServerFilter, ServerId, ServerStatus, StoreError,
    WorkerKind,
};
use time::OffsetDateTime;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::config::AlertConfig;
use crate::incidents::{ChannelRef, Context, Effect, Engine, ServerInfo};
use crate::model::{
    AlertKey, AlertTransition, Attempted, Channel, Incident, IncidentState, MaintenanceWindow,
    Policy, Rule, Silence,
};
use crate::notify::{Notifier, RateLimits, SendClass, decide};
use crate::rules::{AlertChange, Observation, ServerRules};
use crate::store::{AlertStore, LoggedChange, OwnedWrite};

/// Pending notices per channel past which new ones are dropped (and counted).
pub const MAX_BACKLOG: u64 = 1_000;
/// Channels sent to at once; one send at a time per channel.
pub const MAX_SENDS: usize = 16;
/// The result events the evaluator may fall behind by before it is told it lagged: about 3 s
/// of a 100,000-server fleet's results, and 16,384 x ~300 bytes = 5 MB when full. A longer
/// queue only holds more memory through an overload that it cannot outlast (65,536 held
/// 19 MB); what falls off is counted, and only delays a rule until the next check.
pub const EVENT_QUEUE: usize = 16_384;
/// The most servers the directory looks up one by one; more are found in one listing.
const DIRECTORY_LOOKUPS: usize = 256;

/// What the engine needs to know of the registry: names, regions, groups and region sizes.
#[async_trait]
pub trait ServerSource: Send + Sync {
    /// The servers among `ids` that are registered. Nothing is read when `ids` is empty.
    async fn directory(
        &self,
        ids: &BTreeSet<ServerId>,
    ) -> Result<HashMap<ServerId, ServerInfo>, StoreError>;
    /// One server.
    async fn server_info(&self, id: ServerId) -> Result<Option<ServerInfo>, StoreError>;
    /// Active servers per region.
    async fn region_sizes(&self) -> Result<HashMap<String, u64>, StoreError>;
    /// A server's most recent health checks' classifications, newest first.
    async fn recent_health(
        &self,
        id: ServerId,
        limit: usize,
    ) -> Result<Vec<HealthStatus>, StoreError>;
}

#[async_trait]
impl<T: Registry + Groups + Counts + History + ?Sized> ServerSource for T {
    async fn recent_health(
        &self,
        id: ServerId,
        limit: usize,
    ) -> Result<Vec<HealthStatus>, StoreError> {
        let query = fleet_core::HistoryQuery {
            limit,
            ..Default::default()
        };
        Ok(self
            .health_history(id, query)
            .await?
            .into_iter()
            .map(|c| c.status)
            .collect())
    }

    async fn directory(
        &self,
        ids: &BTreeSet<ServerId>,
    ) -> Result<HashMap<ServerId, ServerInfo>, StoreError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let mut member_of: HashMap<ServerId, Vec<(fleet_core::GroupId, String)>> = HashMap::new();
        for g in self.list_groups().await? {
            for m in g.members.iter().filter(|m| ids.contains(m)) {
                member_of
                    .entry(*m)
                    .or_default()
                    .push((g.id, g.name.clone()));
            }
        }
        let mut info = |s: ManagedServer| {
            let groups = member_of.remove(&s.id).unwrap_or_default();
            let info = ServerInfo {
                name: s.name,
                region: s.region,
                groups,
            };
            (s.id, info)
        };
        if ids.len() <= DIRECTORY_LOOKUPS {
            let mut found = HashMap::with_capacity(ids.len());
            for id in ids {
                if let Some(s) = self.get_server(*id).await? {
                    let (id, i) = info(s);
                    found.insert(id, i);
                }
            }
            return Ok(found);
        }
        // Many servers at once (an outage): one listing costs less than a lookup each.
        let servers = self.list_servers(&ServerFilter::default()).await?;
        Ok(servers
            .into_iter()
            .filter(|s| ids.contains(&s.id))
            .map(info)
            .collect())
    }

    async fn server_info(&self, id: ServerId) -> Result<Option<ServerInfo>, StoreError> {
        Ok(self.directory(&BTreeSet::from([id])).await?.remove(&id))
    }

    async fn region_sizes(&self) -> Result<HashMap<String, u64>, StoreError> {
        let mut sizes = HashMap::new();
        for t in self.server_tallies().await? {
            if t.status == ServerStatus::Active
                && let Some(r) = t.region
            {
                *sizes.entry(r).or_default() += t.count;
            }
        }
        Ok(sizes)
    }
}

/// The alert pipeline's counters.
#[derive(Debug, Default)]
pub struct AlertCounters {
    /// Results evaluated.
    pub results: AtomicU64,
    /// Events the evaluator missed because it fell behind.
    pub lagged: AtomicU64,
    /// Phase transitions written.
    pub transitions: AtomicU64,
    /// Incidents opened.
    pub opened: AtomicU64,
    /// Notices delivered.
    pub sent: AtomicU64,
    /// Attempts that failed and will be retried.
    pub retried: AtomicU64,
    /// Notices given up.
    pub failed: AtomicU64,
    /// Notices dropped because a channel's backlog was full.
    pub dropped: AtomicU64,
    /// Writes of alert state that failed (and were retried).
    pub write_errors: AtomicU64,
    /// Effects waiting to be written.
    pub unwritten: AtomicU64,
}

/// A plain copy of [`AlertCounters`].
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct AlertStats {
    /// Results evaluated.
    pub results: u64,
    /// Events missed by falling behind.
    pub lagged: u64,
    /// Phase transitions written.
    pub transitions: u64,
    /// Incidents opened.
    pub opened: u64,
    /// Notices delivered.
    pub sent: u64,
    /// Attempts that will be retried.
    pub retried: u64,
    /// Notices given up.
    pub failed: u64,
    /// Notices dropped at a full backlog.
    pub dropped: u64,
    /// Failed writes of alert state.
    pub write_errors: u64,
    /// Effects waiting to be written.
    pub unwritten: u64,
}

impl AlertCounters {
    /// A snapshot.
    pub fn snapshot(&self) -> AlertStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        AlertStats {
            results: g(&self.results),
            lagged: g(&self.lagged),
            transitions: g(&self.transitions),
            opened: g(&self.opened),
            sent: g(&self.sent),
            retried: g(&self.retried),
            failed: g(&self.failed),
            dropped: g(&self.dropped),
            write_errors: g(&self.write_errors),
            unwritten: g(&self.unwritten),
        }
    }
}

/// Why an acknowledgement was refused.
#[derive(Debug, thiserror::Error)]
pub enum AckError {
    /// No such incident.
    #[error("incident not found")]
    NotFound,
    /// It is resolved.
    #[error("the incident is resolved")]
    Resolved,
    /// The alert pipeline is not running.
    #[error("the alert pipeline is not running")]
    Stopped,
    /// Another instance leads: incidents are decided there, so the acknowledgement must be
    /// made there.
    #[error("another instance leads alert evaluation")]
    NotLeader,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

enum Command {
    Ack {
        id: Uuid,
        by: String,
        reason: String,
        reply: oneshot::Sender<Result<Incident, AckError>>,
    },
}

/// What the pipeline is built from.
pub struct AlertParts {
    /// Alert state.
    pub store: Arc<dyn AlertStore>,
    /// The registry, for names, regions and groups.
    pub servers: Arc<dyn ServerSource>,
    /// The transports.
    pub notifier: Arc<dyn Notifier>,
    /// The rules' settings.
    pub config: AlertConfig,
    /// Wall-clock time.
    pub clock: Arc<dyn Clock>,
    /// The workers' result events.
    pub events: Events,
    /// The health worker's interval (writes failing for two of them raise the storage rule).
    pub health_interval: Duration,
    /// When the fleet is shared among instances: this instance's share. Every instance judges
    /// the rules of the servers it checks and logs what changed under the buckets' fences;
    /// the one whose share says it leads decides incidents from that log, under the leader's
    /// fence (see docs/scaling.md). `None`: this process does both with every result.
    pub leads: Option<fleet_core::cluster::ClusterStats>,
}

impl std::fmt::Debug for AlertParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertParts")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A handle on the running pipeline: acknowledge, test a channel, read counters.
#[derive(Clone)]
pub struct AlertsHandle {
    commands: mpsc::Sender<Command>,
    store: Arc<dyn AlertStore>,
    notifier: Arc<dyn Notifier>,
    counters: Arc<AlertCounters>,
    wake: Arc<Notify>,
    reload: Arc<Notify>,
    config: Arc<AlertConfig>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for AlertsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertsHandle").finish_non_exhaustive()
    }
}

impl AlertsHandle {
    /// The store.
    pub fn store(&self) -> &Arc<dyn AlertStore> {
        &self.store
    }

    /// The counters.
    pub fn stats(&self) -> AlertStats {
        self.counters.snapshot()
    }

    /// The settings.
    pub fn config(&self) -> &AlertConfig {
        &self.config
    }

    /// Says that channels, policies, silences or windows changed: they are read again now,
    /// not at the next periodic reading.
    pub fn reload(&self) {
        self.reload.notify_one();
    }

    /// Acknowledges an open incident: reminders and escalation stop, channels that were told
    /// of it are told of the acknowledgement.
    pub async fn acknowledge(
        &self,
        id: Uuid,
        by: &str,
        reason: &str,
    ) -> Result<Incident, AckError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Ack {
                id,
                by: by.to_owned(),
                reason: reason.to_owned(),
                reply,
            })
            .await
            .map_err(|_| AckError::Stopped)?;
        let result = rx.await.map_err(|_| AckError::Stopped)?;
        self.wake.notify_one();
        result
    }

    /// Sends a test notice to a channel now: its outcome class and latency, never the
    /// receiver's body.
    pub async fn test(&self, channel: &Channel) -> (SendClass, Option<u16>, Duration) {
        let notice =
            crate::payload::test_notice(&channel.name, &self.config.public_url, self.clock.now());
        let started = Instant::now();
        let key = format!("test-{}", Uuid::new_v4());
        let sent = self
            .notifier
            .send(&channel.config, &notice, &key, self.config.send_timeout)
            .await;
        (sent.class, sent.status, started.elapsed())
    }
}

/// The running pipeline.
#[derive(Debug)]
pub struct AlertService;

impl AlertService {
    /// Starts the evaluator and the senders; both stop when `cancel` fires.
    pub fn spawn(
        parts: AlertParts,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) -> AlertsHandle {
        let counters = Arc::new(AlertCounters::default());
        let wake = Arc::new(Notify::new());
        let reload = Arc::new(Notify::new());
        let (tx, rx) = mpsc::channel(64);
        let config = Arc::new(parts.config.clone());
        let handle = AlertsHandle {
            commands: tx,
            store: parts.store.clone(),
            notifier: parts.notifier.clone(),
            counters: counters.clone(),
            wake: wake.clone(),
            reload: reload.clone(),
            config: config.clone(),
            clock: parts.clock.clone(),
        };
        let subscription = parts.events.subscribe("alerts", EVENT_QUEUE);
        let sender = Sender {
            timeout: parts.config.send_timeout,
            lease: parts.config.claim_lease(),
            store: parts.store.clone(),
            notifier: parts.notifier.clone(),
            clock: parts.clock.clone(),
            counters: counters.clone(),
            wake: wake.clone(),
            busy: Arc::new(Mutex::new(HashSet::new())),
        };
        let evaluator = Evaluator {
            store: parts.store,
            servers: parts.servers,
            cfg: parts.config,
            clock: parts.clock,
            counters,
            wake,
            reload,
            health_interval: parts.health_interval,
            leads: parts.leads,
            rules: HashMap::new(),
            engine: Engine::new(),
            directory: HashMap::new(),
            region_sizes: HashMap::new(),
            routing: Routing::default(),
            signals: Signals::default(),
            transitions: Vec::new(),
            effects: Vec::new(),
            shared: Shared::default(),
        };
        let c = cancel.clone();
        tracker.spawn(async move { evaluator.run(subscription, rx, c).await });
        let tracker2 = tracker.clone();
        tracker.spawn(async move { sender.run(cancel, tracker2).await });
        handle
    }
}

#[derive(Debug, Default)]
struct Routing {
    channels: Vec<Channel>,
    policies: Vec<Policy>,
    silences: Vec<Silence>,
    windows: Vec<MaintenanceWindow>,
    full: HashSet<Uuid>,
}

/// Fleet-wide signals from worker problems and cycle ends.
#[derive(Debug, Default)]
struct Signals {
    writes_failing_since: Option<Instant>,
    last_drop: Option<Instant>,
    last_finding: Option<(Instant, String)>,
    overran: HashMap<WorkerKind, (bool, u32)>,
    not_checked: HashSet<&'static str>,
    all_unreachable_cycles: u32,
    unreachable: u64,
}

/// Servers whose alert counters are rebuilt from history at a restart.
const REBUILD_MAX: usize = 1_000;

/// How long after the last drop or storage finding its alert resolves.
const QUIET: Duration = Duration::from_secs(600);

struct Evaluator {
    store: Arc<dyn AlertStore>,
    servers: Arc<dyn ServerSource>,
    cfg: AlertConfig,
    clock: Arc<dyn Clock>,
    counters: Arc<AlertCounters>,
    wake: Arc<Notify>,
    reload: Arc<Notify>,
    health_interval: Duration,
    leads: Option<fleet_core::cluster::ClusterStats>,
    rules: HashMap<ServerId, ServerRules>,
    engine: Engine,
    directory: HashMap<ServerId, ServerInfo>,
    region_sizes: HashMap<String, u64>,
    routing: Routing,
    signals: Signals,
    transitions: Vec<AlertTransition>,
    effects: Vec<Effect>,
    shared: Shared,
}

/// What the evaluator keeps when the fleet is shared: the owner's rule stage and, while it
/// leads, the leader's position in the change log.
#[derive(Debug, Default)]
struct Shared {
    /// The owner's writes waiting for the store.
    owned: Vec<OwnedWrite>,
    /// The epoch under which each server's rules were restored.
    loaded: HashMap<ServerId, i64>,
    /// Per bucket: the epoch its stored phases were read at, and those not yet restored.
    fetched: HashMap<u16, (i64, HashMap<ServerId, Vec<RestoredPhase>>)>,
    /// Counters rebuilt from history in the current batch.
    rebuilt: usize,
    /// The leader's epoch while this process decides incidents.
    leading: Option<i64>,
    /// The last change decided and written.
    position: i64,
    /// Changes decided, waiting to be written with their effects.
    consumed: Vec<LoggedChange>,
    /// What this process last said of each fleet-wide signal.
    signalled: HashMap<String, bool>,
}

type RestoredPhase = (Rule, String, crate::model::Phase, OffsetDateTime);

/// Changes the leader reads from the log at once.
const TAIL_PAGE: usize = 1_000;

/// Decided changes waiting to be written past which the leader stops reading more.
const MAX_CONSUMED: usize = 20_000;

/// Effects waiting for the store past this many are dropped (and counted): the store has
/// been down for long, and the engine's memory still holds the current state.
const MAX_UNWRITTEN: usize = 200_000;

macro_rules! ctx {
    ($self:ident, $channels:ident) => {
        Context {
            now: $self.clock.now(),
            cfg: &$self.cfg,
            channels: &$channels,
            policies: &$self.routing.policies,
            silences: &$self.routing.silences,
            windows: &$self.routing.windows,
            servers: &$self.directory,
            region_sizes: &$self.region_sizes,
            fleet_unreachable: ($self.signals.all_unreachable_cycles >= 2)
                .then_some($self.signals.unreachable),
        }
    };
}

impl Evaluator {
    /// Evaluates results and ticks until cancelled. In a shared fleet every instance judges
    /// the rules of the servers it checks and writes their phases and changes under the
    /// buckets' fences; the leader alone tails the changes of all instances and decides
    /// incidents, writing under the leader's fence.
    async fn run(
        mut self,
        mut events: fleet_core::Subscription,
        mut commands: mpsc::Receiver<Command>,
        cancel: CancellationToken,
    ) {
        let shared = self.leads.is_some();
        // Start from what is stored: firing alerts and open incidents survive a restart.
        // (Shared: the leader loads its state when it comes to lead.)
        if !shared && !self.load(&cancel).await {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u64 = 0;
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                Some(cmd) = commands.recv() => self.command(cmd).await,
                () = self.reload.notified() => self.refresh_routing().await,
                received = events.recv() => {
                    let Some(received) = received else { break };
                    // Take what else is queued, then write it all in one transaction.
                    let mut batch = vec![received];
                    while batch.len() < 4_096 {
                        match events.try_recv() {
                            Some(r) => batch.push(r),
                            None => break,
                        }
                    }
                    if shared {
                        self.prepare(&batch).await;
                    }
                    for r in batch {
                        self.receive(r).await;
                    }
                    self.flush().await;
                }
                _ = tick.tick() => {
                    if shared {
                        self.follow_leader(&cancel).await;
                    }
                    self.signals_tick();
                    if shared && self.shared.leading.is_none() {
                        self.flush().await;
                        continue;
                    }
                    if ticks.is_multiple_of(5) {
                        self.refresh_routing().await;
                    }
                    if ticks.is_multiple_of(300) {
                        self.refresh_directory().await;
                    }
                    ticks += 1;
                    if shared {
                        self.tail().await;
                    }
                    let channels = self.channel_refs();
                    let ctx = ctx!(self, channels);
                    let fx = self.engine.tick(&ctx);
                    self.effects.extend(fx);
                    self.flush().await;
                }
            }
        }
        self.flush().await;
    }

    /// Starts deciding incidents when this instance has come to lead (from the stored
    /// incidents and the leader's position, never from what a former leader held in memory),
    /// and stops when it no longer does.
    async fn follow_leader(&mut self, cancel: &CancellationToken) {
        let epoch = self.leads.as_ref().and_then(|s| s.snapshot().leader_epoch);
        if epoch == self.shared.leading {
            return;
        }
        self.stop_leading();
        let Some(epoch) = epoch else {
            tracing::info!(target: "fleet::alerts", "another instance leads: incidents are decided there");
            return;
        };
        let mut delay = Duration::from_millis(200);
        loop {
            match self.load_led().await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(target: "fleet::alerts", error = %e, "cannot load the leader's alert state; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
        self.shared.leading = Some(epoch);
        tracing::info!(target: "fleet::alerts", epoch, position = self.shared.position, open_incidents = self.engine.open_count(), "this instance leads: deciding incidents from the change log");
    }

    fn stop_leading(&mut self) {
        self.shared.leading = None;
        self.shared.consumed.clear();
        self.effects.clear();
        self.engine = Engine::new();
    }

    async fn load_led(&mut self) -> Result<(), StoreError> {
        self.refresh_routing().await;
        let led = self.store.led_state().await?;
        let open = self.store.open_incidents().await?;
        self.engine = Engine::restore(open, led.firing);
        self.refresh_directory().await;
        self.shared.position = led.position;
        self.shared.consumed.clear();
        self.effects.clear();
        Ok(())
    }

    /// Restores the rules of the servers in buckets this batch shows at a new epoch: read
    /// once per bucket and epoch, after the lease was taken, so the former owner's last
    /// fenced write is in it.
    async fn prepare(&mut self, batch: &[Received]) {
        let mut want: HashMap<u16, i64> = HashMap::new();
        for r in batch {
            if let Received::Event(e) = r
                && let Some(f) = fence_of(e)
                && self
                    .shared
                    .fetched
                    .get(&f.bucket)
                    .is_none_or(|(e, _)| *e < f.epoch)
            {
                let w = want.entry(f.bucket).or_insert(f.epoch);
                *w = (*w).max(f.epoch);
            }
        }
        self.shared.rebuilt = 0;
        if want.is_empty() {
            return;
        }
        let buckets: Vec<u16> = want.keys().copied().collect();
        match self.store.phases_in_buckets(&buckets).await {
            Ok(phases) => {
                for (b, epoch) in &want {
                    self.shared.fetched.insert(*b, (*epoch, HashMap::new()));
                }
                for p in phases {
                    let Some(server) = p.key.server else { continue };
                    if let Some((_, by_server)) = self
                        .shared
                        .fetched
                        .get_mut(&fleet_core::cluster::bucket_of(server))
                    {
                        by_server.entry(server).or_default().push((
                            p.key.rule,
                            p.key.detail,
                            p.phase,
                            p.since,
                        ));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(target: "fleet::alerts", error = %e, buckets = buckets.len(), "cannot read the alert phases of newly owned buckets; their results wait for the next checks");
            }
        }
    }

    /// Reads the changes every instance logged and decides incidents from them, a page at a
    /// time, each page written with its effects before the next is read.
    async fn tail(&mut self) {
        for _ in 0..8 {
            if self.shared.leading.is_none() || self.shared.consumed.len() >= MAX_CONSUMED {
                return;
            }
            let after = self
                .shared
                .consumed
                .last()
                .map_or(self.shared.position, |c| c.id);
            let page = match self.store.changes_after(after, TAIL_PAGE).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(target: "fleet::alerts", error = %e, "cannot read the alert change log");
                    return;
                }
            };
            let full = page.len() == TAIL_PAGE;
            for logged in page {
                if let Some(server) = logged.change.key.server
                    && logged.change.firing
                    && !self.directory.contains_key(&server)
                    && let Ok(Some(info)) = self.servers.server_info(server).await
                {
                    self.directory.insert(server, info);
                }
                let channels = self.channel_refs();
                let ctx = ctx!(self, channels);
                let fx = self.engine.change(&logged.change, &ctx);
                self.effects.extend(fx);
                self.shared.consumed.push(logged);
            }
            self.flush_led().await;
            if !full {
                return;
            }
        }
    }

    /// The owners' writes: phases and changes under the buckets' fences.
    async fn flush_owned(&mut self) {
        if self.shared.owned.is_empty() {
            return;
        }
        match self.store.record_owned(&self.shared.owned).await {
            Ok(refused) => {
                let written: usize = self.shared.owned.iter().map(|w| w.transitions.len()).sum();
                self.counters
                    .transitions
                    .fetch_add(written as u64, Ordering::Relaxed);
                if refused > 0 {
                    tracing::info!(target: "fleet::alerts", refused, "alert writes refused: their buckets have moved on");
                }
                self.shared.owned.clear();
                if self.shared.leading.is_some() {
                    self.tail().await;
                }
            }
            Err(e) => {
                self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(target: "fleet::alerts", error = %e, waiting = self.shared.owned.len(), "writing alert phases failed; kept for the next try");
                let over = self.shared.owned.len().saturating_sub(MAX_UNWRITTEN);
                self.shared.owned.drain(..over);
            }
        }
        self.counters.unwritten.store(
            (self.effects.len() + self.shared.owned.len()) as u64,
            Ordering::Relaxed,
        );
    }

    /// The leader's write: effects, firing set and position, under the leader's fence.
    async fn flush_led(&mut self) {
        let Some(epoch) = self.shared.leading else {
            return;
        };
        if self.effects.is_empty() && self.shared.consumed.is_empty() {
            return;
        }
        let (opened, notices, dropped) = self.effect_counts();
        match self
            .store
            .apply_led(&self.effects, &self.shared.consumed, epoch)
            .await
        {
            Ok(true) => {
                self.counters.opened.fetch_add(opened, Ordering::Relaxed);
                self.counters.dropped.fetch_add(dropped, Ordering::Relaxed);
                if let Some(last) = self.shared.consumed.last() {
                    self.shared.position = last.id;
                }
                self.shared.consumed.clear();
                self.effects.clear();
                if notices {
                    self.wake.notify_one();
                }
            }
            Ok(false) => {
                tracing::info!(target: "fleet::alerts", epoch, "incident writes refused: another instance leads now");
                self.stop_leading();
            }
            Err(e) => {
                self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(target: "fleet::alerts", error = %e, "writing incidents failed; kept for the next try");
            }
        }
        self.counters.unwritten.store(
            (self.effects.len() + self.shared.owned.len()) as u64,
            Ordering::Relaxed,
        );
    }

    /// Incidents opened, whether a notice is among the effects, and notices dropped.
    fn effect_counts(&self) -> (u64, bool, u64) {
        let opened = self
            .effects
            .iter()
            .filter(|e| matches!(e, Effect::Timeline { kind: "opened", .. }))
            .count() as u64;
        let notices = self
            .effects
            .iter()
            .any(|e| matches!(e, Effect::Notify { .. }));
        let dropped = self
            .effects
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    Effect::Timeline {
                        kind: "dropped",
                        ..
                    }
                )
            })
            .count() as u64;
        (opened, notices, dropped)
    }

    /// Restores the stored state, retrying with backoff; false when cancelled first.
    async fn load(&mut self, cancel: &CancellationToken) -> bool {
        let mut delay = Duration::from_millis(200);
        loop {
            match self.restore().await {
                Ok(()) => return true,
                Err(e) => {
                    tracing::warn!(target: "fleet::alerts", error = %e, "cannot load alert state; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return false,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    async fn restore(&mut self) -> Result<(), StoreError> {
        self.rules.clear();
        self.refresh_routing().await;
        let phases = self.store.alert_phases().await?;
        let open = self.store.open_incidents().await?;
        let mut by_server: HashMap<ServerId, Vec<_>> = HashMap::new();
        let mut firing = Vec::new();
        for p in phases {
            if matches!(
                p.phase,
                crate::model::Phase::Firing | crate::model::Phase::Recovering
            ) {
                firing.push((p.key.clone(), p.since));
            }
            if let Some(s) = p.key.server {
                by_server
                    .entry(s)
                    .or_default()
                    .push((p.key.rule, p.key.detail, p.phase, p.since));
            }
        }
        // Counters are not stored; alerts counting checks rebuild them from history (for at
        // most REBUILD_MAX servers, so that a restart amid a storm stays quick; the others
        // count afresh).
        let window = self.cfg.critical_after.max(self.cfg.resolve_after) as usize + 1;
        let mut rebuilt = 0;
        for (server, states) in by_server {
            let mut rules = ServerRules::restore(server, None, states);
            if rules.counting() && rebuilt < REBUILD_MAX {
                rebuilt += 1;
                if let Ok(recent) = self.servers.recent_health(server, window).await {
                    rules.rebuild(&recent);
                }
            }
            self.rules.insert(server, rules);
        }
        let n = open.len();
        self.engine = Engine::restore(open, firing);
        self.refresh_directory().await;
        tracing::info!(target: "fleet::alerts", open_incidents = n, firing = self.engine.active_count(), "alert state loaded");
        Ok(())
    }

    /// Reads what routing needs of the servers the engine holds alerts or incidents for, and
    /// forgets the rest: the directory is the size of what is wrong, not of the fleet.
    /// Servers that start alerting between refreshes are looked up as they do.
    async fn refresh_directory(&mut self) {
        match self.servers.directory(&self.engine.servers()).await {
            Ok(d) => self.directory = d,
            Err(e) => {
                tracing::warn!(target: "fleet::alerts", error = %e, "cannot read the registry")
            }
        }
    }

    async fn refresh_routing(&mut self) {
        let now = self.clock.now();
        let loaded = async {
            Ok::<_, StoreError>(Routing {
                channels: self.store.list_channels().await?,
                policies: self.store.list_policies().await?,
                silences: self.store.list_silences(now).await?,
                windows: self.store.list_windows().await?,
                full: self
                    .store
                    .backlog()
                    .await?
                    .into_iter()
                    .filter(|b| b.pending >= MAX_BACKLOG)
                    .map(|b| b.channel_id)
                    .collect(),
            })
        }
        .await;
        match loaded {
            Ok(r) => self.routing = r,
            Err(e) => {
                tracing::warn!(target: "fleet::alerts", error = %e, "cannot read alert configuration")
            }
        }
        if let Ok(s) = self.servers.region_sizes().await {
            self.region_sizes = s;
        }
    }

    fn channel_refs(&self) -> Vec<ChannelRef> {
        self.routing
            .channels
            .iter()
            .map(|c| ChannelRef {
                id: c.id,
                name: c.name.clone(),
                send_resolved: c.config.send_resolved(),
                full: self.routing.full.contains(&c.id),
            })
            .collect()
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Ack {
                id,
                by,
                reason,
                reply,
            } => {
                let shared = self.leads.is_some();
                if shared && self.shared.leading.is_none() {
                    let _ = reply.send(Err(AckError::NotLeader));
                    return;
                }
                self.flush().await;
                let channels = self.channel_refs();
                let ctx = ctx!(self, channels);
                let result = match self.engine.acknowledge(id, &by, &reason, &ctx) {
                    Some((incident, fx)) => match self.apply_now(&fx).await {
                        Ok(()) => Ok(incident),
                        Err(AckError::Store(e)) => {
                            self.effects.extend(fx);
                            Err(AckError::Store(e))
                        }
                        Err(e) => Err(e),
                    },
                    None => match self.store.incident(id).await {
                        Ok(Some(d)) if d.incident.state == IncidentState::Resolved => {
                            Err(AckError::Resolved)
                        }
                        Ok(_) => Err(AckError::NotFound),
                        Err(e) => Err(AckError::Store(e)),
                    },
                };
                let _ = reply.send(result);
            }
        }
    }

    /// Writes effects now: under the leader's fence when the fleet is shared.
    async fn apply_now(&mut self, fx: &[Effect]) -> Result<(), AckError> {
        match self.shared.leading {
            None => self.store.apply(&[], fx).await.map_err(AckError::Store),
            Some(epoch) => match self.store.apply_led(fx, &[], epoch).await {
                Ok(true) => Ok(()),
                Ok(false) => {
                    self.stop_leading();
                    Err(AckError::NotLeader)
                }
                Err(e) => Err(AckError::Store(e)),
            },
        }
    }

    async fn receive(&mut self, received: Received) {
        let event = match received {
            Received::Event(e) => e,
            Received::Lagged { missed } => {
                // Missed results only delay a rule: the next check of each server moves it on.
                self.counters.lagged.fetch_add(missed, Ordering::Relaxed);
                tracing::warn!(target: "fleet::alerts", missed, "alert evaluation fell behind; results were skipped");
                return;
            }
        };
        match &*event {
            Event::Checked { check, .. } => {
                self.observe(
                    check.server_id,
                    check.fence,
                    Observation::Health(check.status),
                    check.timestamp,
                )
                .await;
            }
            Event::Collected { record, .. } => match record {
                MetricsRecord::Sample(s) => {
                    self.observe(
                        s.server_id,
                        s.fence,
                        Observation::Metrics(Some(&s.values)),
                        s.timestamp,
                    )
                    .await;
                }
                MetricsRecord::Failure(f) => {
                    self.observe(
                        f.server_id,
                        f.fence,
                        Observation::Metrics(None),
                        f.timestamp,
                    )
                    .await;
                }
            },
            Event::CycleFinished {
                worker, summary, ..
            } => {
                let s = &mut self.signals;
                let entry = s.overran.entry(*worker).or_default();
                entry.1 = if entry.0 { entry.1 + 1 } else { 0 };
                entry.0 = false;
                let streak = entry.1;
                self.fleet_signal(
                    &format!("{}_overrun", worker.as_str()),
                    self.cfg.fleet_self && streak >= 3,
                    Rule::FleetSelf,
                );
                if *worker == WorkerKind::Health {
                    let kinds: Vec<&'static str> =
                        self.signals.not_checked.iter().copied().collect();
                    for kind in kinds {
                        if !summary.not_checked.contains_key(kind) {
                            self.signals.not_checked.remove(kind);
                            self.fleet_signal(kind, false, Rule::FleetSelf);
                        }
                    }
                    let unreachable = summary.count(HealthStatus::Unreachable.as_str());
                    if summary.completed > 0 && unreachable == summary.completed {
                        self.signals.all_unreachable_cycles += 1;
                        self.signals.unreachable = unreachable;
                    } else {
                        self.signals.all_unreachable_cycles = 0;
                    }
                }
            }
            Event::Problem { worker, problem } => self.problem(*worker, problem),
        }
    }

    fn problem(&mut self, worker: WorkerKind, problem: &Problem) {
        match problem {
            Problem::Overrun { .. } => {
                self.signals.overran.entry(worker).or_default().0 = true;
            }
            Problem::WriteFailing { .. } => {
                self.signals
                    .writes_failing_since
                    .get_or_insert_with(Instant::now);
            }
            Problem::WriteRecovered => {
                self.signals.writes_failing_since = None;
                self.fleet_signal("writes_failing", false, Rule::Storage);
            }
            Problem::ResultsDropped { .. } => {
                self.signals.last_drop = Some(Instant::now());
                self.fleet_signal("results_dropped", self.cfg.storage, Rule::Storage);
            }
            Problem::StorageFinding(what) | Problem::StorageCheckFailed(what) => {
                self.signals.last_finding = Some((Instant::now(), what.clone()));
                self.fleet_signal("partitions", self.cfg.storage, Rule::Storage);
            }
            Problem::NotChecked { kind, .. } => {
                if self.cfg.fleet_self {
                    self.signals.not_checked.insert(kind);
                    self.fleet_signal(kind, true, Rule::FleetSelf);
                }
            }
        }
    }

    fn signals_tick(&mut self) {
        let failing = self
            .signals
            .writes_failing_since
            .is_some_and(|t| t.elapsed() > self.health_interval * 2);
        if failing {
            self.fleet_signal("writes_failing", self.cfg.storage, Rule::Storage);
        }
        if self.signals.last_drop.is_some_and(|t| t.elapsed() >= QUIET) {
            self.signals.last_drop = None;
            self.fleet_signal("results_dropped", false, Rule::Storage);
        }
        if self
            .signals
            .last_finding
            .as_ref()
            .is_some_and(|(t, _)| t.elapsed() >= QUIET)
        {
            self.signals.last_finding = None;
            self.fleet_signal("partitions", false, Rule::Storage);
        }
    }

    /// Raises or clears a fleet-wide alert (no server).
    fn fleet_signal(&mut self, detail: &str, firing: bool, rule: Rule) {
        if let Some(share) = &self.leads {
            // Shared: this process's own signal, named after the instance, goes to the log
            // (once per change of mind) for the leader to decide on.
            let detail = format!("{detail}@{}", share.snapshot().instance_id);
            if self.shared.signalled.insert(detail.clone(), firing) == Some(firing) {
                return;
            }
            let now = self.clock.now();
            self.shared.owned.push(OwnedWrite {
                fence: None,
                transitions: Vec::new(),
                changes: vec![AlertChange {
                    key: AlertKey {
                        rule,
                        server: None,
                        detail,
                    },
                    firing,
                    at: now,
                    since: now,
                }],
            });
            return;
        }
        let change = AlertChange {
            key: AlertKey {
                rule,
                server: None,
                detail: detail.to_owned(),
            },
            firing,
            at: self.clock.now(),
            since: self.clock.now(),
        };
        let channels = self.channel_refs();
        let ctx = ctx!(self, channels);
        let fx = self.engine.change(&change, &ctx);
        self.effects.extend(fx);
    }

    async fn observe(
        &mut self,
        server: ServerId,
        fence: Option<Fence>,
        obs: Observation<'_>,
        at: OffsetDateTime,
    ) {
        if self.leads.is_some() {
            return self.observe_owned(server, fence, obs, at).await;
        }
        self.counters.results.fetch_add(1, Ordering::Relaxed);
        let step = self
            .rules
            .entry(server)
            .or_insert_with(|| ServerRules::new(server))
            .observe(obs, at, &self.cfg);
        if step.transitions.is_empty() && step.changes.is_empty() {
            return;
        }
        self.transitions.extend(step.transitions);
        if !step.changes.is_empty() && !self.directory.contains_key(&server) {
            // A server registered since the last listing: look it up once.
            if let Ok(Some(info)) = self.servers.server_info(server).await {
                self.directory.insert(server, info);
            }
        }
        let channels = self.channel_refs();
        let ctx = ctx!(self, channels);
        for change in &step.changes {
            let fx = self.engine.change(change, &ctx);
            self.effects.extend(fx);
        }
    }

    /// A shared fleet's rule stage: the server's rules, restored at the fence's epoch, judge
    /// the result; what changed is written under the fence for the leader.
    async fn observe_owned(
        &mut self,
        server: ServerId,
        fence: Option<Fence>,
        obs: Observation<'_>,
        at: OffsetDateTime,
    ) {
        // A manual check is judged only by the server's owner, under the owner's fence; its
        // result elsewhere waits for the owner's next scheduled check.
        let Some(fence) = fence.or_else(|| {
            self.shared.loaded.get(&server).map(|epoch| Fence {
                bucket: fleet_core::cluster::bucket_of(server),
                epoch: *epoch,
            })
        }) else {
            return;
        };
        if self.shared.loaded.get(&server) != Some(&fence.epoch) {
            let f = fence;
            let Some((_, stash)) = self
                .shared
                .fetched
                .get_mut(&f.bucket)
                .filter(|(e, _)| *e == f.epoch)
            else {
                // Its bucket's phases could not be read (or the result is from an older
                // lease, whose writes are refused anyway): the next check moves it on.
                self.counters.lagged.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let states = stash.remove(&server).unwrap_or_default();
            let mut rules = ServerRules::restore(server, None, states);
            if rules.counting() && self.shared.rebuilt < 64 {
                self.shared.rebuilt += 1;
                let window = self.cfg.critical_after.max(self.cfg.resolve_after) as usize + 1;
                if let Ok(recent) = self.servers.recent_health(server, window).await {
                    rules.rebuild(&recent);
                }
            }
            self.rules.insert(server, rules);
            self.shared.loaded.insert(server, f.epoch);
        }
        self.counters.results.fetch_add(1, Ordering::Relaxed);
        let step = self
            .rules
            .entry(server)
            .or_insert_with(|| ServerRules::new(server))
            .observe(obs, at, &self.cfg);
        if step.transitions.is_empty() && step.changes.is_empty() {
            return;
        }
        self.shared.owned.push(OwnedWrite {
            fence: Some(fence),
            transitions: step.transitions,
            changes: step.changes,
        });
    }

    /// Writes what is waiting: shared, the owner's writes, then the leader's.
    async fn flush(&mut self) {
        if self.leads.is_some() {
            self.flush_owned().await;
            self.flush_led().await;
        } else {
            self.flush_single().await;
        }
    }

    /// Writes what is waiting, in one transaction. On failure it stays (bounded) and is
    /// retried with the next flush.
    async fn flush_single(&mut self) {
        if self.transitions.is_empty() && self.effects.is_empty() {
            return;
        }
        let (opened, notices, dropped) = self.effect_counts();
        match self.store.apply(&self.transitions, &self.effects).await {
            Ok(()) => {
                self.counters
                    .transitions
                    .fetch_add(self.transitions.len() as u64, Ordering::Relaxed);
                self.counters.opened.fetch_add(opened, Ordering::Relaxed);
                self.counters.dropped.fetch_add(dropped, Ordering::Relaxed);
                self.transitions.clear();
                self.effects.clear();
                if notices {
                    self.wake.notify_one();
                }
            }
            Err(e) => {
                self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(target: "fleet::alerts", error = %e, waiting = self.effects.len() + self.transitions.len(), "writing alert state failed; kept for the next try");
                let over =
                    (self.effects.len() + self.transitions.len()).saturating_sub(MAX_UNWRITTEN);
                if over > 0 {
                    // Phase transitions go first: the engine's memory still holds them.
                    let n = over.min(self.transitions.len());
                    self.transitions.drain(..n);
                }
            }
        }
        self.counters.unwritten.store(
            (self.effects.len() + self.transitions.len()) as u64,
            Ordering::Relaxed,
        );
    }
}

/// The fence of a scheduled result.
fn fence_of(event: &Event) -> Option<Fence> {
    match event {
        Event::Checked { check, .. } => check.fence,
        Event::Collected { record, .. } => match record {
            MetricsRecord::Sample(s) => s.fence,
            MetricsRecord::Failure(f) => f.fence,
        },
        _ => None,
    }
}

/// Drains the outbox: claims due rows, sends with no transaction open, marks them by claim.
struct Sender {
    timeout: Duration,
    lease: Duration,
    store: Arc<dyn AlertStore>,
    notifier: Arc<dyn Notifier>,
    clock: Arc<dyn Clock>,
    counters: Arc<AlertCounters>,
    wake: Arc<Notify>,
    busy: Arc<Mutex<HashSet<Uuid>>>,
}

impl Sender {
    async fn run(self, cancel: CancellationToken, tracker: TaskTracker) {
        let limits = Arc::new(tokio::sync::Mutex::new(RateLimits::default()));
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let busy: Vec<Uuid> = self
                .busy
                .lock()
                .map(|b| b.iter().copied().collect())
                .unwrap_or_default();
            if busy.len() >= MAX_SENDS {
                continue;
            }
            let rows = match self
                .store
                .claim(self.clock.now(), 200, self.lease, &busy)
                .await
            {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(target: "fleet::alerts", error = %e, "cannot claim notices");
                    continue;
                }
            };
            if rows.is_empty() {
                continue;
            }
            let channels = match self.store.list_channels().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(target: "fleet::alerts", error = %e, "cannot read channels");
                    continue;
                }
            };
            let mut by_channel: HashMap<Uuid, Vec<crate::model::Delivery>> = HashMap::new();
            for r in rows {
                by_channel.entry(r.channel_id).or_default().push(r);
            }
            for (channel_id, rows) in by_channel {
                let Some(channel) = channels.iter().find(|c| c.id == channel_id).cloned() else {
                    continue;
                };
                if let Ok(mut b) = self.busy.lock() {
                    b.insert(channel_id);
                }
                let job = Job {
                    timeout: self.timeout,
                    store: self.store.clone(),
                    notifier: self.notifier.clone(),
                    clock: self.clock.clone(),
                    counters: self.counters.clone(),
                    limits: limits.clone(),
                    busy: self.busy.clone(),
                    wake: self.wake.clone(),
                };
                tracker.spawn(job.send_all(channel, rows));
            }
        }
    }
}

struct Job {
    timeout: Duration,
    store: Arc<dyn AlertStore>,
    notifier: Arc<dyn Notifier>,
    clock: Arc<dyn Clock>,
    counters: Arc<AlertCounters>,
    limits: Arc<tokio::sync::Mutex<RateLimits>>,
    busy: Arc<Mutex<HashSet<Uuid>>>,
    wake: Arc<Notify>,
}

impl Job {
    /// Sends one channel's claimed rows in order, one at a time.
    async fn send_all(self, channel: Channel, rows: Vec<crate::model::Delivery>) {
        for row in rows {
            let wait = self.limits.lock().await.take(&channel.config);
            let outcome = match wait {
                Err(wait) => Attempted::Retry {
                    after: wait,
                    error: "rate limit".into(),
                    counts: false,
                },
                Ok(()) => {
                    let sent = self
                        .notifier
                        .send(
                            &channel.config,
                            &row.notice,
                            &row.idempotency_key(),
                            self.timeout,
                        )
                        .await;
                    let outcome = decide(&sent, row.attempts);
                    match &outcome {
                        Attempted::Sent => {
                            self.counters.sent.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(target: "fleet::alerts", channel = %channel.name, incident = %row.incident_id, kind = row.kind.as_str(), "notice delivered");
                        }
                        Attempted::Retry { error, after, .. } => {
                            self.counters.retried.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(target: "fleet::alerts", channel = %channel.name, incident = %row.incident_id, %error, retry_in_s = after.as_secs(), "notice not delivered; will retry");
                        }
                        Attempted::Failed { error } => {
                            self.counters.failed.fetch_add(1, Ordering::Relaxed);
                            tracing::error!(target: "fleet::alerts", channel = %channel.name, incident = %row.incident_id, %error, "notice given up");
                        }
                    }
                    outcome
                }
            };
            match self
                .store
                .finish(row.id, row.claim_token, &outcome, self.clock.now())
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(target: "fleet::alerts", channel = %channel.name, "a notice's claim expired before it was marked")
                }
                Err(e) => {
                    // The claim expires and the row is sent again, with the same key.
                    tracing::warn!(target: "fleet::alerts", error = %e, "cannot mark a notice")
                }
            }
        }
        if let Ok(mut b) = self.busy.lock() {
            b.remove(&channel.id);
        }
        self.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryAlertStore;
    use crate::testing::RecordingNotifier;
    use fleet_core::conformance::check_at;
    use fleet_core::testing::TokioClock;
    use fleet_core::{InMemoryStore, NewServer};
    use time::macros::datetime;

    struct Shell {
        events: Events,
        store: Arc<MemoryAlertStore>,
        notifier: Arc<RecordingNotifier>,
        clock: Arc<TokioClock>,
        handle: AlertsHandle,
        server: ServerId,
        _stop: tokio_util::sync::DropGuard,
    }

    /// An alert store with one webhook channel, a recording notifier and a paused clock.
    async fn hooked() -> (
        Arc<MemoryAlertStore>,
        Arc<RecordingNotifier>,
        Arc<TokioClock>,
    ) {
        let store = Arc::new(MemoryAlertStore::new());
        store
            .create_channel(
                "hook",
                crate::ChannelConfig::Webhook {
                    url: "http://127.0.0.1:9/h".into(),
                    send_resolved: true,
                },
                datetime!(2026-01-01 0:00 UTC),
            )
            .await
            .unwrap();
        let notifier = Arc::new(RecordingNotifier::new());
        let clock = Arc::new(TokioClock::new(datetime!(2026-01-01 0:00 UTC)));
        (store, notifier, clock)
    }

    async fn shell(cfg: AlertConfig) -> Shell {
        shell_shared(cfg, None).await
    }

    async fn shell_shared(
        cfg: AlertConfig,
        leads: Option<fleet_core::cluster::ClusterStats>,
    ) -> Shell {
        let registry = Arc::new(InMemoryStore::new());
        let mut new = NewServer::new("web-1", "http://127.0.0.1:9");
        new.region = Some("eu".into());
        let server = registry.create_server(new).await.unwrap().id;
        let (store, notifier, clock) = hooked().await;
        let events = Events::new();
        let cancel = CancellationToken::new();
        let handle = AlertService::spawn(
            AlertParts {
                leads,
                store: store.clone(),
                servers: registry,
                notifier: notifier.clone(),
                config: cfg,
                clock: clock.clone(),
                events: events.clone(),
                health_interval: Duration::from_secs(30),
            },
            cancel.clone(),
            &TaskTracker::new(),
        );
        // Let it load its (empty) state.
        tokio::time::sleep(Duration::from_millis(10)).await;
        Shell {
            events,
            store,
            notifier,
            clock,
            handle,
            server,
            _stop: cancel.drop_guard(),
        }
    }

    impl Shell {
        fn check(&self, status: HealthStatus) {
            let check = check_at(self.server, self.clock.now(), status);
            self.events.publish(Event::Checked {
                server: "web-1".into(),
                check,
                previous: None,
                manual: false,
            });
        }

        /// Checks every 30 s of paused time.
        async fn checks(&self, statuses: &[HealthStatus]) {
            for s in statuses {
                self.check(*s);
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        }

        fn kinds(&self) -> Vec<String> {
            notice_kinds(&self.notifier)
        }
    }

    /// The kind of each notice sent so far (`firing`, `resolved`, …), in order.
    fn notice_kinds(notifier: &RecordingNotifier) -> Vec<String> {
        notifier
            .received()
            .iter()
            .map(|r| {
                r.notice["incident"]["notice"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned()
            })
            .collect()
    }

    use HealthStatus::*;

    /// One instance of a shared fleet on a common store: its events, its share, its handle.
    struct Member {
        events: Events,
        share: fleet_core::cluster::ClusterStats,
        handle: AlertsHandle,
        _stop: tokio_util::sync::DropGuard,
    }

    fn member(
        id: &str,
        store: &Arc<MemoryAlertStore>,
        registry: &Arc<InMemoryStore>,
        notifier: &Arc<RecordingNotifier>,
        clock: &Arc<TokioClock>,
    ) -> Member {
        let events = Events::new();
        let share = fleet_core::cluster::ClusterStats::new(id);
        let cancel = CancellationToken::new();
        let handle = AlertService::spawn(
            AlertParts {
                leads: Some(share.clone()),
                store: store.clone(),
                servers: registry.clone(),
                notifier: notifier.clone(),
                config: AlertConfig::default(),
                clock: clock.clone(),
                events: events.clone(),
                health_interval: Duration::from_secs(30),
            },
            cancel.clone(),
            &TaskTracker::new(),
        );
        Member {
            events,
            share,
            handle,
            _stop: cancel.drop_guard(),
        }
    }

    impl Member {
        /// Checks `server` every 30 s of paused time, as the owner of its bucket at `epoch`.
        async fn checks(
            &self,
            clock: &TokioClock,
            server: ServerId,
            epoch: i64,
            statuses: &[HealthStatus],
        ) {
            for s in statuses {
                let mut check = check_at(server, clock.now(), *s);
                check.fence = Some(Fence {
                    bucket: fleet_core::cluster::bucket_of(server),
                    epoch,
                });
                self.events.publish(Event::Checked {
                    server: "web-1".into(),
                    check,
                    previous: None,
                    manual: false,
                });
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn in_a_shared_fleet_owners_judge_their_servers_and_the_leader_alone_decides_incidents() {
        let registry = Arc::new(InMemoryStore::new());
        let server = registry
            .create_server(NewServer::new("web-1", "http://127.0.0.1:9"))
            .await
            .unwrap()
            .id;
        let (store, notifier, clock) = hooked().await;
        let a = member("a:1", &store, &registry, &notifier, &clock);
        let b = member("b:1", &store, &registry, &notifier, &clock);
        let kinds = || notice_kinds(&notifier);
        a.share.set_leader(Some(1));
        tokio::time::sleep(Duration::from_secs(2)).await;

        // B owns the server's bucket: B judges the checks, A (the leader) opens the incident
        // from B's logged change.
        b.checks(&clock, server, 1, &[Critical, Critical, Critical])
            .await;
        assert_eq!(kinds(), ["firing"]);
        assert_eq!(
            a.handle.stats().results,
            0,
            "the leader judged a result it did not check"
        );
        assert_eq!(b.handle.stats().results, 3);
        let incident = store.open_incidents().await.unwrap()[0]
            .snapshot
            .incident
            .id;
        assert!(matches!(
            b.handle.acknowledge(incident, "ops", "looking").await,
            Err(AckError::NotLeader)
        ));

        // Leadership moves to B: it starts from the stored incidents and the log position, so
        // the firing change A decided on is not decided again. The bucket moves to A
        // (epoch 2) while the alert fires: A restores the server's rules from the stored
        // phase, so its recovery resolves the alert.
        a.share.set_leader(None);
        b.share.set_leader(Some(2));
        tokio::time::sleep(Duration::from_secs(2)).await;
        a.checks(&clock, server, 2, &[Healthy, Healthy, Healthy])
            .await;
        assert_eq!(kinds(), ["firing", "resolved"]);
        assert!(store.open_incidents().await.unwrap().is_empty());
        // Each notice sent once.
        let rows = store.outbox();
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(notifier.received().len(), 2);
    }

    #[tokio::test]
    async fn the_directory_reads_only_the_servers_asked_for_with_their_groups() {
        let registry = InMemoryStore::new();
        let mut ids = Vec::new();
        for i in 0..DIRECTORY_LOOKUPS + 10 {
            let mut new = NewServer::new(format!("s{i:03}"), "http://127.0.0.1:9");
            new.region = Some(if i % 2 == 0 { "eu" } else { "us" }.into());
            ids.push(registry.create_server(new).await.unwrap().id);
        }
        let group = registry
            .create_group(fleet_core::GroupFields {
                name: Some("db".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        registry.add_members(group.id, &ids[1..3]).await.unwrap();

        assert!(
            registry
                .directory(&BTreeSet::new())
                .await
                .unwrap()
                .is_empty()
        );
        // A few: looked up one by one; an unknown id is left out.
        let asked: BTreeSet<ServerId> = [ids[0], ids[1], ServerId::new()].into();
        let few = registry.directory(&asked).await.unwrap();
        assert_eq!(few.len(), 2);
        assert_eq!(few[&ids[0]].name, "s000");
        assert!(few[&ids[0]].groups.is_empty());
        assert_eq!(few[&ids[1]].region.as_deref(), Some("us"));
        assert_eq!(few[&ids[1]].groups, vec![(group.id, "db".to_owned())]);
        // More than DIRECTORY_LOOKUPS: one listing, the same answer for those asked.
        let asked: BTreeSet<ServerId> = ids[1..=DIRECTORY_LOOKUPS + 1].iter().copied().collect();
        let many = registry.directory(&asked).await.unwrap();
        assert_eq!(many.len(), DIRECTORY_LOOKUPS + 1);
        assert!(!many.contains_key(&ids[0]));
        assert_eq!(many[&ids[2]].groups, vec![(group.id, "db".to_owned())]);
        assert_eq!(
            many[&ids[DIRECTORY_LOOKUPS + 1]].name,
            format!("s{:03}", DIRECTORY_LOOKUPS + 1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn results_become_one_announced_and_one_resolved_notice() {
        let s = shell(AlertConfig::default()).await;
        s.checks(&[Healthy, Critical, Critical, Critical]).await;
        assert_eq!(s.kinds(), ["firing"]);
        let n = &s.notifier.received()[0];
        assert_eq!(n.notice["alerts"][0]["labels"]["server"], "web-1");
        assert_eq!(n.notice["alerts"][0]["labels"]["region"], "eu");
        s.checks(&[Healthy, Healthy, Healthy]).await;
        assert_eq!(s.kinds(), ["firing", "resolved"]);
        // Each row sent once, and marked.
        let rows = s.store.outbox();
        assert_eq!(rows.len(), 2);
        assert!(rows.iter().all(|r| r.4 == "sent"), "{rows:?}");
        let stats = s.handle.stats();
        assert_eq!((stats.sent, stats.opened, stats.failed), (2, 1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_receiver_is_retried_with_back_off_and_the_same_key() {
        let s = shell(AlertConfig::default()).await;
        s.notifier.answer([
            SendClass::ServerError,
            SendClass::Timeout,
            SendClass::ServerError,
        ]);
        s.checks(&[Critical, Critical]).await;
        // 2 + 4 + 8 s of back-off.
        tokio::time::sleep(Duration::from_secs(20)).await;
        let got = s.notifier.received();
        assert_eq!(got.len(), 4, "{got:?}");
        assert!(got.iter().all(|g| g.key == got[0].key));
        assert_eq!(got[3].class, SendClass::Delivered);
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(s.notifier.received().len(), 4);
        assert_eq!(s.handle.stats().retried, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejected_notice_is_not_retried() {
        let s = shell(AlertConfig::default()).await;
        s.notifier.answer([SendClass::Rejected]);
        s.checks(&[Critical, Critical]).await;
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(s.notifier.received().len(), 1);
        assert_eq!(s.store.outbox()[0].4, "failed");
        assert_eq!(s.handle.stats().failed, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_acknowledged_incident_gets_no_reminder_and_its_ack_is_told() {
        let s = shell(AlertConfig {
            repeat_interval: Duration::from_secs(120),
            ..AlertConfig::default()
        })
        .await;
        // Announced after 60 s, reminded 120 s later.
        s.checks(&[Critical; 8]).await;
        assert_eq!(s.kinds(), ["firing", "reminder"]);
        let id: Uuid = s.notifier.received()[0].notice["incident"]["id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let inc = s.handle.acknowledge(id, "ops", "on it").await.unwrap();
        assert_eq!(inc.state, IncidentState::Acknowledged);
        s.checks(&[Critical; 20]).await;
        assert_eq!(s.kinds(), ["firing", "reminder", "acknowledged"]);
        s.checks(&[Healthy, Healthy]).await;
        assert_eq!(
            s.kinds(),
            ["firing", "reminder", "acknowledged", "resolved"]
        );
        assert!(matches!(
            s.handle.acknowledge(id, "ops", "again").await,
            Err(AckError::Resolved)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn storage_and_self_problems_raise_fleet_incidents() {
        let s = shell(AlertConfig::default()).await;
        s.events.publish(Event::Problem {
            worker: WorkerKind::Health,
            problem: Problem::WriteFailing {
                error: "down".into(),
                pending: 10,
            },
        });
        // Failing for longer than two intervals (2 x 30 s), then the group wait.
        tokio::time::sleep(Duration::from_secs(100)).await;
        let got = s.notifier.received();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].notice["groupLabels"]["alertname"], "StorageProblem");
        s.events.publish(Event::Problem {
            worker: WorkerKind::Health,
            problem: Problem::WriteRecovered,
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(s.kinds(), ["firing", "resolved"]);
    }
}

#[cfg(test)]
mod storm {
    use super::*;
    use crate::MemoryAlertStore;
    use crate::testing::RecordingNotifier;
    use fleet_core::conformance::check_at;
    use fleet_core::testing::TokioClock;
    use fleet_core::{InMemoryStore, NewServer};
    use time::macros::datetime;

    #[tokio::test(start_paused = true)]
    async fn a_storm_across_regions_is_one_incident_per_region_and_channel() {
        let registry = Arc::new(InMemoryStore::new());
        let mut ids = Vec::new();
        for i in 0..1000 {
            let mut new = NewServer::new(format!("s{i:04}"), "http://127.0.0.1:9");
            new.region = Some(format!("r{}", i % 10));
            ids.push(registry.create_server(new).await.unwrap().id);
        }
        let store = Arc::new(MemoryAlertStore::new());
        for name in ["a", "b"] {
            store
                .create_channel(
                    name,
                    crate::ChannelConfig::Slack {
                        url: format!("http://127.0.0.1:9/{name}"),
                    },
                    datetime!(2026-01-01 0:00 UTC),
                )
                .await
                .unwrap();
        }
        let notifier = Arc::new(RecordingNotifier::new());
        let clock = Arc::new(TokioClock::new(datetime!(2026-01-01 0:00 UTC)));
        let events = Events::new();
        let cancel = CancellationToken::new();
        let _stop = cancel.clone().drop_guard();
        let handle = AlertService::spawn(
            AlertParts {
                leads: None,
                store: store.clone(),
                servers: registry,
                notifier: notifier.clone(),
                config: AlertConfig {
                    unreachable_for: Duration::from_secs(1),
                    ..AlertConfig::default()
                },
                clock: clock.clone(),
                events: events.clone(),
                health_interval: Duration::from_secs(30),
            },
            cancel,
            &TaskTracker::new(),
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        let publish = |id: ServerId, status: HealthStatus| {
            events.publish(Event::Checked {
                server: String::new(),
                check: check_at(id, clock.now(), status),
                previous: None,
                manual: false,
            })
        };
        for id in &ids {
            publish(*id, HealthStatus::Healthy);
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
        let storm = |picked: Vec<ServerId>| {
            let publish = &publish;
            async move {
                for round in 0..2 {
                    for id in &picked {
                        publish(*id, HealthStatus::Unreachable);
                    }
                    tokio::time::sleep(Duration::from_secs(if round == 0 { 2 } else { 60 })).await;
                }
            }
        };
        // A whole region at once: one regional incident, one notice per channel.
        storm(ids.iter().skip(1).step_by(10).copied().collect()).await;
        let firing = |region: Option<&str>| crate::IncidentFilter {
            region: region.map(str::to_owned),
            state: Some(IncidentState::Firing),
            limit: 100,
            ..Default::default()
        };
        let (list, _) = store.list_incidents(&firing(Some("r1"))).await.unwrap();
        assert_eq!(list.len(), 1, "{list:?}");
        assert_eq!(list[0].rule, crate::Rule::RegionUnreachable);
        assert_eq!(list[0].covers, 100);
        assert_eq!(notifier.received().len(), 2);
        // Then 10 % of the fleet, 10 % of each region: one incident for each other region.
        storm(
            (0..ids.len())
                .filter(|i| (i / 10).is_multiple_of(10))
                .map(|i| ids[i])
                .collect(),
        )
        .await;
        let (list, total) = store.list_incidents(&firing(None)).await.unwrap();
        let keys: Vec<&str> = list.iter().map(|i| i.group_key.as_str()).collect();
        assert_eq!(total, 10, "{keys:?}");
        assert!(
            list.iter()
                .all(|i| i.covers == 10 || i.rule == crate::Rule::RegionUnreachable),
            "{list:?}"
        );
        assert_eq!(notifier.received().len(), 20);
        assert_eq!(handle.stats().lagged, 0);
    }
}
