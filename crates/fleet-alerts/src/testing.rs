//! A recording notifier for tests: it answers as scripted and keeps every notice it was given.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use crate::model::ChannelConfig;
use crate::notify::{Notifier, SendClass, Sent};

/// One notice as the notifier got it.
#[derive(Clone, Debug, PartialEq)]
pub struct Received {
    /// The channel's kind.
    pub kind: &'static str,
    /// The notice.
    pub notice: Value,
    /// Its idempotency key.
    pub key: String,
    /// The answer given.
    pub class: SendClass,
}

/// Delivers everything unless told otherwise, and records what it got.
#[derive(Debug, Default)]
pub struct RecordingNotifier {
    script: Mutex<VecDeque<SendClass>>,
    got: Mutex<Vec<Received>>,
}

impl RecordingNotifier {
    /// A notifier that delivers everything.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next answers, in order; then it delivers again.
    pub fn answer(&self, classes: impl IntoIterator<Item = SendClass>) {
        self.script
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(classes);
    }

    /// What it got so far.
    pub fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[async_trait]
impl Notifier for RecordingNotifier {
    async fn send(&self, channel: &ChannelConfig, notice: &Value, key: &str, _: Duration) -> Sent {
        let class = self
            .script
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
            .unwrap_or(SendClass::Delivered);
        self.got
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Received {
                kind: channel.kind(),
                notice: notice.clone(),
                key: key.to_owned(),
                class,
            });
        match class {
            SendClass::Delivered => Sent::delivered(Some(200)),
            other => Sent::failed(other, Some(503), "scripted"),
        }
    }
}
