//! Alerts and incidents: per-server rules with hysteresis, grouped incidents, silences,
//! maintenance windows, escalation, and an outbox that delivers each notice exactly once.
//!
//! The decisions are pure state machines: [`ServerRules`] turns results into alert changes,
//! [`Engine`] turns alert changes and time into incident effects. [`AlertService`] is the thin
//! shell: it subscribes to the engine's result events, writes effects through an
//! [`AlertStore`] (fleet-pg, or [`MemoryAlertStore`]) and sends through a [`Notifier`]
//! (fleet-http). This crate knows no database driver and no HTTP client.
//!
//! # Example
//!
//! Two critical checks in a row make a `server_critical` alert:
//!
//! ```
//! use fleet_alerts::{AlertConfig, Observation, Rule, ServerRules};
//! use fleet_core::{HealthStatus, ServerId};
//! use time::macros::datetime;
//!
//! let cfg = AlertConfig::default(); // critical after 2
//! let mut rules = ServerRules::new(ServerId::new());
//! let t = datetime!(2026-01-01 0:00 UTC);
//! assert!(rules.observe(Observation::Health(HealthStatus::Critical), t, &cfg).changes.is_empty());
//! let step = rules.observe(Observation::Health(HealthStatus::Critical), t, &cfg);
//! assert_eq!(step.changes[0].key.rule, Rule::ServerCritical);
//! assert!(step.changes[0].firing);
//! ```

mod config;
#[cfg(any(test, feature = "test-util"))]
pub mod conformance;
mod incidents;
mod memory;
mod model;
mod notify;
pub mod payload;
mod rules;
pub mod schedule;
mod service;
mod store;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;

pub use config::{AlertConfig, BadSetting};
pub use incidents::{ChannelRef, Context, Effect, Engine, Restored, ServerInfo, Snapshot};
pub use memory::MemoryAlertStore;
pub use model::{
    AlertKey, AlertTransition, Attempted, Backlog, Channel, ChannelConfig, Delivery, Incident,
    IncidentDetail, IncidentFilter, IncidentState, MaintenanceWindow, Matchers, Member, NoticeKind,
    PAGERDUTY_EVENTS_URL, Phase, Policy, Rule, Scope, Severity, Silence, SmtpTls, Step, Subject,
    TimelineEntry,
};
pub use notify::{MAX_ATTEMPTS, Notifier, RateLimits, SendClass, Sent, backoff, decide, limit_for};
pub use rules::{AlertChange, Observation, ServerRules, Step as RuleStep};
pub use schedule::{BadSchedule, Schedule, Weekly};
pub use service::{
    AckError, AlertCounters, AlertParts, AlertService, AlertStats, AlertsHandle, MAX_BACKLOG,
    ServerSource,
};
pub use store::{
    AlertStore, ChannelPatch, LedState, LoggedChange, OwnedWrite, PolicyPatch, StoredPhase,
    WindowPatch,
};
