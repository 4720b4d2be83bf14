//! Per-server rule state: a pure function of observations and time.
//!
//! Each server has one [`ServerRules`]. Every health check or metrics collection is an
//! [`Observation`]; [`ServerRules::observe`] moves each rule through pending → firing →
//! recovering → resolved and returns the [`Step`]: the phase transitions to persist (never
//! per-check counters) and the alert changes the incident engine should see.

use std::collections::VecDeque;

use fleet_core::{HealthStatus, MetricValues, ServerId};
use time::OffsetDateTime;

use crate::config::AlertConfig;
use crate::model::{AlertKey, AlertTransition, Phase, Rule};

/// What one result says about a server.
#[derive(Clone, Copy, Debug)]
pub enum Observation<'a> {
    /// A health check's classification.
    Health(HealthStatus),
    /// A metrics collection: its values, or `None` when it failed.
    Metrics(Option<&'a MetricValues>),
}

/// An alert starting or stopping, as the incident engine sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct AlertChange {
    /// The alert.
    pub key: AlertKey,
    /// Firing now (true) or resolved (false).
    pub firing: bool,
    /// When.
    pub at: OffsetDateTime,
    /// When its episode began.
    pub since: OffsetDateTime,
}

/// What an observation changed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Step {
    /// Phase transitions, to persist.
    pub transitions: Vec<AlertTransition>,
    /// Alerts that started or stopped, for the incident engine.
    pub changes: Vec<AlertChange>,
}

#[derive(Clone, Debug, PartialEq)]
struct AlertState {
    phase: Phase,
    since: OffsetDateTime,
    /// Consecutive bad observations while pending.
    bad: u32,
    /// Consecutive good observations while recovering.
    good: u32,
    /// Whether the incident engine was told it fires.
    announced: bool,
}

/// How a rule decides: a count of consecutive bad observations, or a duration.
#[derive(Clone, Copy, Debug)]
enum Threshold {
    Count(u32),
    For(std::time::Duration),
}

impl Threshold {
    fn off(self) -> bool {
        match self {
            Threshold::Count(n) => n == 0,
            Threshold::For(d) => d.is_zero(),
        }
    }

    fn reached(self, s: &AlertState, at: OffsetDateTime) -> bool {
        match self {
            Threshold::Count(n) => s.bad >= n,
            Threshold::For(d) => at - s.since >= d,
        }
    }
}

type RuleId = (Rule, &'static str);

/// One server's rule states, sorted by rule: a handful at most, and none for most servers. A
/// vector sized to its entries, not a map, whose first node costs 0.6 KB however few it
/// holds (38 MB of the heap at 100,000 servers, by heaptrack); boxed, so that a server with
/// none costs one pointer in the evaluator's map, not a vector's three words.
#[derive(Clone, Debug, Default)]
#[expect(
    clippy::box_collection,
    reason = "the box makes an empty state one word; the vector inside is sized to its entries"
)]
struct RuleStates(Option<Box<Vec<(RuleId, AlertState)>>>);

impl RuleStates {
    fn slice(&self) -> &[(RuleId, AlertState)] {
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }

    fn position(&self, id: &RuleId) -> Result<usize, usize> {
        self.slice().binary_search_by(|(k, _)| k.cmp(id))
    }

    fn get(&self, id: &RuleId) -> Option<&AlertState> {
        self.position(id).ok().map(|i| &self.slice()[i].1)
    }

    fn get_mut(&mut self, id: &RuleId) -> Option<&mut AlertState> {
        let i = self.position(id).ok()?;
        self.0.as_mut().map(|v| &mut v[i].1)
    }

    fn insert(&mut self, id: RuleId, state: AlertState) {
        match self.position(&id) {
            Ok(i) => {
                if let Some(v) = self.0.as_mut() {
                    v[i].1 = state;
                }
            }
            Err(i) => {
                let v = self.0.get_or_insert_with(Box::default);
                v.reserve_exact(1);
                v.insert(i, (id, state));
            }
        }
    }

    fn remove(&mut self, id: &RuleId) {
        if let Ok(i) = self.position(id)
            && let Some(v) = self.0.as_mut()
        {
            v.remove(i);
            if v.is_empty() {
                // Most servers go back to no state at all: hold nothing for them.
                self.0 = None;
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = (&RuleId, &AlertState)> {
        self.slice().iter().map(|(id, s)| (id, s))
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = (&RuleId, &mut AlertState)> {
        self.0
            .iter_mut()
            .flat_map(|v| v.iter_mut())
            .map(|(id, s)| (&*id, s))
    }
}

/// One server's rule state.
#[derive(Clone, Debug)]
pub struct ServerRules {
    server: ServerId,
    health: Option<HealthStatus>,
    alerts: RuleStates,
    /// When its health changed within the flapping window; `None` when never (most servers),
    /// so that a steady server holds no queue.
    #[expect(
        clippy::box_collection,
        reason = "the box makes a steady server's queue one word"
    )]
    changes: Option<Box<VecDeque<OffsetDateTime>>>,
}

const RESOURCES: [&str; 3] = ["cpu", "memory", "disk"];

fn detail_static(detail: &str) -> &'static str {
    RESOURCES
        .into_iter()
        .find(|r| *r == detail)
        .unwrap_or_default()
}

impl ServerRules {
    /// A server with nothing known.
    pub fn new(server: ServerId) -> Self {
        Self {
            server,
            health: None,
            alerts: RuleStates::default(),
            changes: None,
        }
    }

    /// A server as its persisted transitions left it, after a restart or a takeover. Counters
    /// start again: a pending count-rule needs its full count anew.
    pub fn restore(
        server: ServerId,
        health: Option<HealthStatus>,
        states: impl IntoIterator<Item = (Rule, String, Phase, OffsetDateTime)>,
    ) -> Self {
        let mut r = Self::new(server);
        r.health = health;
        for (rule, detail, phase, since) in states {
            if phase == Phase::Inactive {
                continue;
            }
            r.alerts.insert(
                (rule, detail_static(&detail)),
                AlertState {
                    phase,
                    since,
                    bad: u32::from(phase == Phase::Pending),
                    good: 0,
                    announced: matches!(phase, Phase::Firing | Phase::Recovering),
                },
            );
        }
        r
    }

    /// Rebuilds the per-check counters of pending and recovering health alerts from the
    /// server's recent checks, newest first: only transitions are stored, so a restart or an
    /// instance taking the server over counts from its history, not from zero.
    pub fn rebuild(&mut self, recent: &[HealthStatus]) {
        if let Some(h) = recent.first() {
            self.health = Some(*h);
        }
        for ((rule, _), s) in self.alerts.iter_mut() {
            let wrong = match rule {
                Rule::ServerCritical => HealthStatus::Critical,
                Rule::ServerUnreachable => HealthStatus::Unreachable,
                Rule::ServerDegraded => HealthStatus::Degraded,
                _ => continue,
            };
            match s.phase {
                Phase::Pending => {
                    let n = recent.iter().take_while(|h| **h == wrong).count();
                    s.bad = (n as u32).max(1);
                }
                Phase::Recovering => {
                    s.good = recent.iter().take_while(|h| **h != wrong).count() as u32;
                }
                _ => {}
            }
        }
    }

    /// Whether a pending or recovering health alert counts checks (and so wants
    /// [`ServerRules::rebuild`] after a restore).
    pub fn counting(&self) -> bool {
        self.alerts.iter().any(|((rule, _), s)| {
            matches!(
                rule,
                Rule::ServerCritical | Rule::ServerUnreachable | Rule::ServerDegraded
            ) && matches!(s.phase, Phase::Pending | Phase::Recovering)
        })
    }

    /// Its last known health.
    pub fn health(&self) -> Option<HealthStatus> {
        self.health
    }

    /// Whether it is flapping.
    pub fn flapping(&self) -> bool {
        self.alerts
            .get(&(Rule::ServerFlapping, ""))
            .is_some_and(|s| s.phase == Phase::Firing)
    }

    /// Alerts firing now (announced or held back), with when they began.
    pub fn firing(&self) -> impl Iterator<Item = (AlertKey, OffsetDateTime)> + '_ {
        self.alerts
            .iter()
            .filter(|(_, s)| matches!(s.phase, Phase::Firing | Phase::Recovering))
            .map(|((rule, detail), s)| (self.key(*rule, detail), s.since))
    }

    fn key(&self, rule: Rule, detail: &str) -> AlertKey {
        AlertKey {
            rule,
            server: Some(self.server),
            detail: detail.to_owned(),
        }
    }

    /// Feeds one observation made at `at`.
    pub fn observe(&mut self, obs: Observation<'_>, at: OffsetDateTime, cfg: &AlertConfig) -> Step {
        let mut step = Step::default();
        match obs {
            Observation::Health(status) => {
                let changed = self.health.is_some_and(|h| h != status);
                self.health = Some(status);
                self.judge(
                    (Rule::ServerCritical, ""),
                    status == HealthStatus::Critical,
                    Threshold::Count(cfg.critical_after),
                    at,
                    cfg,
                    &mut step,
                );
                self.judge(
                    (Rule::ServerUnreachable, ""),
                    status == HealthStatus::Unreachable,
                    Threshold::For(cfg.unreachable_for),
                    at,
                    cfg,
                    &mut step,
                );
                self.judge(
                    (Rule::ServerDegraded, ""),
                    status == HealthStatus::Degraded,
                    Threshold::For(cfg.degraded_for),
                    at,
                    cfg,
                    &mut step,
                );
                self.flap(changed, at, cfg, &mut step);
            }
            Observation::Metrics(values) => {
                self.judge(
                    (Rule::MetricsFailing, ""),
                    values.is_none(),
                    Threshold::Count(cfg.metrics_failures),
                    at,
                    cfg,
                    &mut step,
                );
                if let Some(v) = values {
                    let readings = [
                        ("cpu", v.cpu_percent, cfg.cpu_percent),
                        ("memory", v.memory_percent, cfg.memory_percent),
                        ("disk", v.disk_percent, cfg.disk_percent),
                    ];
                    for (detail, value, limit) in readings {
                        let Some(value) = value else { continue };
                        let threshold = if limit > 0.0 {
                            Threshold::For(cfg.resource_for)
                        } else {
                            Threshold::Count(0)
                        };
                        self.judge(
                            (Rule::ResourceHigh, detail),
                            value > limit,
                            threshold,
                            at,
                            cfg,
                            &mut step,
                        );
                    }
                }
            }
        }
        self.announce(at, &mut step);
        step
    }

    /// Moves one rule on a good or bad observation.
    fn judge(
        &mut self,
        id: (Rule, &'static str),
        bad: bool,
        threshold: Threshold,
        at: OffsetDateTime,
        cfg: &AlertConfig,
        step: &mut Step,
    ) {
        let current = self.alerts.get(&id).cloned();
        let from = current.as_ref().map_or(Phase::Inactive, |s| s.phase);
        if threshold.off() {
            // A rule turned off resolves what it had raised.
            if from != Phase::Inactive {
                self.set(id, from, Phase::Inactive, at, at, step);
            }
            return;
        }
        let mut s = current.unwrap_or(AlertState {
            phase: Phase::Inactive,
            since: at,
            bad: 0,
            good: 0,
            announced: false,
        });
        let to = match (from, bad) {
            (Phase::Inactive, true) => {
                s.since = at;
                s.bad = 1;
                if threshold.reached(&s, at) {
                    Phase::Firing
                } else {
                    Phase::Pending
                }
            }
            (Phase::Inactive, false) => return,
            (Phase::Pending, true) => {
                s.bad += 1;
                if threshold.reached(&s, at) {
                    Phase::Firing
                } else {
                    Phase::Pending
                }
            }
            (Phase::Pending, false) => Phase::Inactive,
            (Phase::Firing, true) => Phase::Firing,
            (Phase::Firing, false) | (Phase::Recovering, false) => {
                s.good = if from == Phase::Firing { 1 } else { s.good + 1 };
                if s.good >= cfg.resolve_after.max(1) {
                    Phase::Inactive
                } else {
                    Phase::Recovering
                }
            }
            (Phase::Recovering, true) => {
                s.good = 0;
                Phase::Firing
            }
        };
        let since = s.since;
        if to == Phase::Inactive && !s.announced {
            self.alerts.remove(&id);
        } else {
            self.alerts.insert(id, s);
        }
        if to != from {
            self.set(id, from, to, at, since, step);
        }
    }

    fn set(
        &mut self,
        id: (Rule, &'static str),
        from: Phase,
        to: Phase,
        at: OffsetDateTime,
        since: OffsetDateTime,
        step: &mut Step,
    ) {
        if let Some(s) = self.alerts.get_mut(&id) {
            s.phase = to;
        }
        step.transitions.push(AlertTransition {
            key: self.key(id.0, id.1),
            from,
            to,
            at,
            since,
        });
    }

    /// Flapping: too many changes of health within the window. It clears, with hysteresis,
    /// when the changes within the window fall to half the threshold.
    fn flap(&mut self, changed: bool, at: OffsetDateTime, cfg: &AlertConfig, step: &mut Step) {
        let id = (Rule::ServerFlapping, "");
        if cfg.flap_changes == 0 || cfg.flap_window.is_zero() {
            self.changes = None;
            if let Some(s) = self.alerts.get(&id).cloned() {
                self.set(id, s.phase, Phase::Inactive, at, s.since, step);
            }
            return;
        }
        if changed {
            self.changes.get_or_insert_with(Box::default).push_back(at);
        }
        let mut n = 0;
        if let Some(changes) = self.changes.as_mut() {
            while changes.front().is_some_and(|t| at - *t > cfg.flap_window) {
                changes.pop_front();
            }
            n = changes.len() as u32;
            if changes.is_empty() {
                self.changes = None;
            }
        }
        let flapping = self.flapping();
        if !flapping && n >= cfg.flap_changes {
            self.alerts.insert(
                id,
                AlertState {
                    phase: Phase::Inactive,
                    since: at,
                    bad: n,
                    good: 0,
                    announced: false,
                },
            );
            self.set(id, Phase::Inactive, Phase::Firing, at, at, step);
        } else if flapping && n <= cfg.flap_changes / 2 {
            let since = self.alerts.get(&id).map_or(at, |s| s.since);
            self.set(id, Phase::Firing, Phase::Inactive, at, since, step);
        }
    }

    /// Tells the incident engine what started or stopped. While a server flaps, its other
    /// alerts that were not yet announced are held back: the flapping notice stands for them.
    fn announce(&mut self, at: OffsetDateTime, step: &mut Step) {
        let flapping = self.flapping();
        let server = self.server;
        let mut gone = Vec::new();
        for (&(rule, detail), s) in self.alerts.iter_mut() {
            let firing = matches!(s.phase, Phase::Firing | Phase::Recovering);
            let held = flapping && rule != Rule::ServerFlapping && !s.announced;
            if firing && !s.announced && !held {
                s.announced = true;
                step.changes.push(AlertChange {
                    key: AlertKey {
                        rule,
                        server: Some(server),
                        detail: detail.to_owned(),
                    },
                    firing: true,
                    at,
                    since: s.since,
                });
            } else if !firing && s.announced {
                s.announced = false;
                step.changes.push(AlertChange {
                    key: AlertKey {
                        rule,
                        server: Some(server),
                        detail: detail.to_owned(),
                    },
                    firing: false,
                    at,
                    since: s.since,
                });
            }
            if s.phase == Phase::Inactive && !s.announced {
                gone.push((rule, detail));
            }
        }
        for id in gone {
            self.alerts.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use time::macros::datetime;

    use HealthStatus::*;

    fn cfg() -> AlertConfig {
        AlertConfig {
            unreachable_for: Duration::from_secs(60),
            degraded_for: Duration::from_secs(60),
            flap_changes: 4,
            flap_window: Duration::from_secs(600),
            ..AlertConfig::default()
        }
    }

    /// Feeds health statuses 30 s apart; returns each step's (rule, to) transitions and
    /// (rule, firing) changes.
    type Seen = (Vec<(Rule, Phase)>, Vec<(Rule, bool)>);

    fn run(statuses: &[HealthStatus], cfg: &AlertConfig) -> Vec<Seen> {
        let mut r = ServerRules::new(ServerId::new());
        let t0 = datetime!(2026-01-01 0:00 UTC);
        statuses
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let step = r.observe(
                    Observation::Health(*s),
                    t0 + Duration::from_secs(30 * i as u64),
                    cfg,
                );
                (
                    step.transitions
                        .iter()
                        .map(|t| (t.key.rule, t.to))
                        .collect(),
                    step.changes
                        .iter()
                        .map(|c| (c.key.rule, c.firing))
                        .collect(),
                )
            })
            .collect()
    }

    #[test]
    fn a_steady_server_costs_a_few_words() {
        // One per server of the fleet sits in the evaluator's map: 80 bytes before the
        // rule states and the flapping window were boxed.
        assert!(std::mem::size_of::<ServerRules>() <= 40);
    }

    #[test]
    fn critical_goes_pending_firing_recovering_resolved() {
        let steps = run(&[Critical, Critical, Critical, Healthy, Healthy], &cfg());
        use Phase::*;
        use Rule::ServerCritical as C;
        assert_eq!(steps[0], (vec![(C, Pending)], vec![]));
        assert_eq!(steps[1], (vec![(C, Firing)], vec![(C, true)]));
        assert_eq!(steps[2], (vec![], vec![]));
        assert_eq!(steps[3], (vec![(C, Recovering)], vec![]));
        assert_eq!(steps[4], (vec![(C, Inactive)], vec![(C, false)]));
    }

    #[test]
    fn one_bad_check_is_not_an_alert_and_a_relapse_keeps_firing() {
        use Phase::*;
        use Rule::ServerCritical as C;
        let steps = run(&[Critical, Healthy, Critical, Critical], &cfg());
        assert_eq!(steps[1], (vec![(C, Inactive)], vec![]));
        assert_eq!(steps[3].1, vec![(C, true)]);
        // Recovering then bad again: back to firing, no second announcement.
        let steps = run(
            &[Critical, Critical, Healthy, Critical, Healthy, Healthy],
            &cfg(),
        );
        assert_eq!(steps[3], (vec![(C, Firing)], vec![]));
        assert_eq!(steps[5].1, vec![(C, false)]);
    }

    #[test]
    fn unreachable_fires_after_its_duration_not_its_count() {
        use Phase::*;
        use Rule::ServerUnreachable as U;
        let steps = run(&[Unreachable, Unreachable, Unreachable], &cfg());
        assert_eq!(steps[0].0, vec![(U, Pending)]);
        assert_eq!(steps[1].0, vec![]); // 30 s < 60 s
        assert_eq!(steps[2], (vec![(U, Firing)], vec![(U, true)]));
    }

    #[test]
    fn a_rule_set_to_zero_is_off() {
        let off = AlertConfig {
            critical_after: 0,
            ..cfg()
        };
        let steps = run(&[Critical; 5], &off);
        assert!(steps.iter().all(|s| s == &(vec![], vec![])), "{steps:?}");
    }

    #[test]
    fn flapping_sends_one_notice_and_holds_the_others_until_it_is_stable() {
        // Healthy/critical alternating: 4 changes within 10 minutes mark it flapping.
        let mut seq = vec![Healthy, Critical, Critical, Healthy, Critical, Healthy];
        let steps = run(&seq, &cfg());
        let fired: Vec<_> = steps.iter().flat_map(|s| s.1.clone()).collect();
        // Critical fired once (two in a row), resolved never (no two good in a row), and the
        // flapping notice came once.
        assert_eq!(
            fired,
            vec![(Rule::ServerCritical, true), (Rule::ServerFlapping, true)]
        );
        // It goes on flapping: nothing new is announced; then stable for the window: it clears.
        seq.extend([Critical, Critical, Healthy, Healthy]);
        seq.extend(std::iter::repeat_n(Healthy, 25));
        let steps = run(&seq, &cfg());
        let fired: Vec<_> = steps.iter().flat_map(|s| s.1.clone()).collect();
        assert_eq!(
            fired,
            vec![
                (Rule::ServerCritical, true),
                (Rule::ServerFlapping, true),
                (Rule::ServerCritical, false),
                (Rule::ServerFlapping, false),
            ]
        );
    }

    #[test]
    fn an_alert_raised_while_flapping_is_announced_when_the_flapping_ends_if_still_firing() {
        let cfg = AlertConfig {
            critical_after: 2,
            ..cfg()
        };
        // Degraded/healthy flapping, then unreachable for good.
        let mut seq = vec![Healthy, Degraded, Healthy, Degraded, Healthy];
        seq.extend(std::iter::repeat_n(Unreachable, 30));
        let steps = run(&seq, &cfg);
        let fired: Vec<_> = steps.iter().flat_map(|s| s.1.clone()).collect();
        assert_eq!(
            fired,
            vec![
                (Rule::ServerFlapping, true),
                // Held back while it flapped, announced as the flapping ends.
                (Rule::ServerUnreachable, true),
                (Rule::ServerFlapping, false),
            ]
        );
    }

    #[test]
    fn resources_and_metrics_failures() {
        let cfg = AlertConfig {
            resource_for: Duration::from_secs(60),
            ..cfg()
        };
        let mut r = ServerRules::new(ServerId::new());
        let t0 = datetime!(2026-01-01 0:00 UTC);
        let hot = MetricValues {
            cpu_percent: Some(95.0),
            disk_percent: Some(10.0),
            ..Default::default()
        };
        let mut fired = Vec::new();
        for i in 0..3 {
            let s = r.observe(
                Observation::Metrics(Some(&hot)),
                t0 + Duration::from_secs(60 * i),
                &cfg,
            );
            fired.extend(
                s.changes
                    .into_iter()
                    .map(|c| (c.key.rule, c.key.detail, c.firing)),
            );
        }
        assert_eq!(fired, vec![(Rule::ResourceHigh, "cpu".into(), true)]);
        fired.clear();
        for i in 3..6 {
            let s = r.observe(
                Observation::Metrics(None),
                t0 + Duration::from_secs(60 * i),
                &cfg,
            );
            fired.extend(
                s.changes
                    .into_iter()
                    .map(|c| (c.key.rule, c.key.detail, c.firing)),
            );
        }
        assert_eq!(fired, vec![(Rule::MetricsFailing, String::new(), true)]);
    }

    #[test]
    fn counters_are_rebuilt_from_recent_checks_after_a_restore() {
        let id = ServerId::new();
        let t0 = datetime!(2026-01-01 0:00 UTC);
        let cfg = AlertConfig {
            critical_after: 3,
            ..cfg()
        };
        // Pending with two critical checks stored in history: one more fires it.
        let mut r = ServerRules::restore(
            id,
            None,
            [(Rule::ServerCritical, String::new(), Phase::Pending, t0)],
        );
        assert!(r.counting());
        r.rebuild(&[Critical, Critical, Healthy]);
        let s = r.observe(Observation::Health(Critical), t0, &cfg);
        assert_eq!(s.changes.len(), 1, "{s:?}");
        // Without the rebuild it would need three more.
        let mut cold = ServerRules::restore(
            id,
            None,
            [(Rule::ServerCritical, String::new(), Phase::Pending, t0)],
        );
        assert!(
            cold.observe(Observation::Health(Critical), t0, &cfg)
                .changes
                .is_empty()
        );
        // Recovering with one good check stored: one more resolves it.
        let mut rec = ServerRules::restore(
            id,
            Some(Healthy),
            [(Rule::ServerCritical, String::new(), Phase::Recovering, t0)],
        );
        rec.rebuild(&[Healthy, Critical]);
        let s = rec.observe(Observation::Health(Healthy), t0, &cfg);
        assert_eq!(s.changes.iter().filter(|c| !c.firing).count(), 1, "{s:?}");
    }

    #[test]
    fn restored_firing_state_is_not_announced_again_but_resolves() {
        let id = ServerId::new();
        let t0 = datetime!(2026-01-01 0:00 UTC);
        let mut r = ServerRules::restore(
            id,
            Some(Critical),
            [(Rule::ServerCritical, String::new(), Phase::Firing, t0)],
        );
        let s = r.observe(Observation::Health(Critical), t0, &cfg());
        assert_eq!(s, Step::default());
        r.observe(Observation::Health(Healthy), t0, &cfg());
        let s = r.observe(Observation::Health(Healthy), t0, &cfg());
        assert_eq!(s.changes.len(), 1);
        assert!(!s.changes[0].firing);
    }
}
