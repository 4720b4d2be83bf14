//! Sending: the [`Notifier`] trait the transports implement (HTTP and SMTP live in
//! fleet-http), and the delivery policy around it: which failures are retried, how long to
//! back off, and each receiver's rate limit.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio::time::Instant;

use crate::model::{Attempted, ChannelConfig};

/// What one attempt to reach a receiver came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SendClass {
    /// The receiver accepted it (2xx, or SMTP 250).
    Delivered,
    /// 429: slow down.
    RateLimited,
    /// Another 4xx, or a permanent SMTP reply: retrying will not help.
    Rejected,
    /// 5xx, or a transient SMTP reply.
    ServerError,
    /// No answer in time.
    Timeout,
    /// No connection (refused, reset, TLS).
    Connect,
    /// Fleet refused the address (link-local, metadata, unspecified) or a redirect.
    Refused,
    /// The channel's configuration cannot be used (a bad URL or address).
    Misconfigured,
}

impl SendClass {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            SendClass::Delivered => "delivered",
            SendClass::RateLimited => "rate_limited",
            SendClass::Rejected => "rejected",
            SendClass::ServerError => "server_error",
            SendClass::Timeout => "timeout",
            SendClass::Connect => "connect",
            SendClass::Refused => "refused",
            SendClass::Misconfigured => "misconfigured",
        }
    }
}

/// One attempt's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sent {
    /// Its class.
    pub class: SendClass,
    /// The HTTP status or SMTP code, when there was one.
    pub status: Option<u16>,
    /// A `Retry-After` the receiver asked for.
    pub retry_after: Option<Duration>,
    /// What went wrong, for the log and the outbox row; never the receiver's body or a secret.
    pub detail: String,
}

impl Sent {
    /// A delivery.
    pub fn delivered(status: Option<u16>) -> Self {
        Self {
            class: SendClass::Delivered,
            status,
            retry_after: None,
            detail: String::new(),
        }
    }

    /// A failure of some class.
    pub fn failed(class: SendClass, status: Option<u16>, detail: impl Into<String>) -> Self {
        Self {
            class,
            status,
            retry_after: None,
            detail: detail.into(),
        }
    }
}

/// A transport: sends one notice to one channel, within `timeout`, with the idempotency key.
/// It renders the channel's form from the notice ([`crate::payload`]) and never panics: every
/// failure is a [`Sent`] of some class.
#[async_trait]
pub trait Notifier: Send + Sync {
    /// Sends a notice.
    async fn send(
        &self,
        channel: &ChannelConfig,
        notice: &Value,
        idempotency_key: &str,
        timeout: Duration,
    ) -> Sent;
}

/// Attempts before a notice is given up.
pub const MAX_ATTEMPTS: u32 = 10;

/// The longest back-off between attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(600);

/// Back-off after `attempts` failures: 2, 4, 8 … seconds, at most [`MAX_BACKOFF`].
pub fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(2u64.saturating_pow(attempts.clamp(1, 20))).min(MAX_BACKOFF)
}

/// What to do after an attempt, the `attempts` before it included. 4xx is not retried, except
/// 429; 5xx, timeouts and connection failures are, with exponential back-off.
pub fn decide(sent: &Sent, attempts_before: u32) -> Attempted {
    let attempts = attempts_before + 1;
    let error = || match sent.status {
        Some(s) => format!("{} ({s}): {}", sent.class.as_str(), sent.detail),
        None => format!("{}: {}", sent.class.as_str(), sent.detail),
    };
    match sent.class {
        SendClass::Delivered => Attempted::Sent,
        SendClass::Rejected | SendClass::Refused | SendClass::Misconfigured => {
            Attempted::Failed { error: error() }
        }
        _ if attempts >= MAX_ATTEMPTS => Attempted::Failed {
            error: format!("gave up after {attempts} attempts: {}", error()),
        },
        SendClass::RateLimited => Attempted::Retry {
            after: sent
                .retry_after
                .unwrap_or_else(|| backoff(attempts))
                .min(MAX_BACKOFF),
            error: error(),
            counts: true,
        },
        SendClass::ServerError | SendClass::Timeout | SendClass::Connect => Attempted::Retry {
            after: backoff(attempts),
            error: error(),
            counts: true,
        },
    }
}

/// Each receiver's own limit: Slack takes one message a second per webhook, PagerDuty 120
/// events a minute per routing key.
pub fn limit_for(config: &ChannelConfig) -> Option<(u32, Duration)> {
    match config {
        ChannelConfig::Slack { .. } => Some((1, Duration::from_secs(1))),
        ChannelConfig::Pagerduty { .. } => Some((120, Duration::from_secs(60))),
        _ => None,
    }
}

/// What a limit is keyed by: the webhook or routing key itself, hashed, so that two channels
/// sharing one share its limit.
fn limit_key(config: &ChannelConfig) -> Option<[u8; 32]> {
    use sha2::Digest;
    let secret = match config {
        ChannelConfig::Slack { url } => url.as_str(),
        ChannelConfig::Pagerduty { routing_key, .. } => routing_key.as_str(),
        _ => return None,
    };
    Some(sha2::Sha256::digest(secret.as_bytes()).into())
}

/// Sliding-window rate limits per receiver, on tokio time.
#[derive(Debug, Default)]
pub struct RateLimits {
    sent: HashMap<[u8; 32], VecDeque<Instant>>,
}

impl RateLimits {
    /// Whether a message may go to this channel now; if not, how long to wait. Taking a slot
    /// records it.
    pub fn take(&mut self, config: &ChannelConfig) -> Result<(), Duration> {
        let (Some((max, per)), Some(key)) = (limit_for(config), limit_key(config)) else {
            return Ok(());
        };
        let now = Instant::now();
        let q = self.sent.entry(key).or_default();
        while q.front().is_some_and(|t| now.duration_since(*t) >= per) {
            q.pop_front();
        }
        if q.len() as u32 >= max {
            let oldest = q.front().copied().unwrap_or(now);
            return Err(per.saturating_sub(now.duration_since(oldest)));
        }
        q.push_back(now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_hundreds_are_final_except_429_and_five_hundreds_back_off() {
        let s = |class, status| Sent::failed(class, Some(status), "x");
        assert!(matches!(
            decide(&s(SendClass::Rejected, 400), 0),
            Attempted::Failed { .. }
        ));
        assert!(matches!(
            decide(&s(SendClass::RateLimited, 429), 0),
            Attempted::Retry { counts: true, .. }
        ));
        let Attempted::Retry { after, .. } = decide(&s(SendClass::ServerError, 503), 2) else {
            panic!()
        };
        assert_eq!(after, Duration::from_secs(8));
        assert!(matches!(
            decide(&s(SendClass::ServerError, 503), MAX_ATTEMPTS - 1),
            Attempted::Failed { .. }
        ));
        assert_eq!(backoff(30), MAX_BACKOFF);
        let mut slow = s(SendClass::RateLimited, 429);
        slow.retry_after = Some(Duration::from_secs(7));
        assert!(
            matches!(decide(&slow, 0), Attempted::Retry { after, .. } if after == Duration::from_secs(7))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn slack_gets_one_message_a_second_per_webhook() {
        let slack = ChannelConfig::Slack {
            url: "http://127.0.0.1:1/hook".into(),
        };
        let other = ChannelConfig::Slack {
            url: "http://127.0.0.1:1/other".into(),
        };
        let mut limits = RateLimits::default();
        assert!(limits.take(&slack).is_ok());
        assert_eq!(limits.take(&slack), Err(Duration::from_secs(1)));
        assert!(limits.take(&other).is_ok());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(limits.take(&slack).is_ok());
        let pd = ChannelConfig::Pagerduty {
            routing_key: "k".into(),
            url: None,
        };
        for _ in 0..120 {
            assert!(limits.take(&pd).is_ok());
        }
        assert!(limits.take(&pd).is_err());
    }
}
