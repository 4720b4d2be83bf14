//! The alert transports: webhook, Slack and PagerDuty over HTTP, email over SMTP, behind
//! fleet-alerts' [`Notifier`].
//!
//! The HTTP client follows no redirect, reads at most [`NOTIFY_BODY_LIMIT`] bytes of an answer
//! (and keeps none of it), resolves a name once and connects only to an address the
//! [`AddressGuard`] allows, as the probe does. Nothing it reports contains a URL, a key or a
//! password: those are the channel's secrets.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fleet_alerts::{
    ChannelConfig, Notifier, PAGERDUTY_EVENTS_URL, SendClass, Sent, SmtpTls, payload,
};
use reqwest::dns::Resolve;
use serde_json::Value;

use crate::guard::{self, AddressGuard, DnsError, Refused};
use crate::{BuildError, USER_AGENT, causes};

/// The most bytes of a receiver's answer read (and discarded).
pub const NOTIFY_BODY_LIMIT: usize = 64 * 1024;

/// Sends notices over HTTP and SMTP.
#[derive(Clone)]
pub struct AlertNotifier {
    http: reqwest::Client,
    guard: Arc<AddressGuard>,
    resolver: Option<Arc<dyn Resolve>>,
}

impl std::fmt::Debug for AlertNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertNotifier")
            .field("guard", &self.guard)
            .finish_non_exhaustive()
    }
}

impl AlertNotifier {
    /// A notifier refusing what `guard` refuses; `resolver` replaces the system's (tests).
    pub fn new(
        guard: AddressGuard,
        resolver: Option<Arc<dyn Resolve>>,
    ) -> Result<Self, BuildError> {
        let guard = Arc::new(guard);
        let http = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(1)
            .no_proxy()
            .dns_resolver(Arc::new(guard::GuardedResolver {
                inner: resolver.clone(),
                guard: guard.clone(),
            }))
            .build()?;
        Ok(Self {
            http,
            guard,
            resolver,
        })
    }

    async fn post(&self, url: &str, body: &Value, key: &str, timeout: Duration) -> Sent {
        let Ok(url) = reqwest::Url::parse(url) else {
            return Sent::failed(SendClass::Misconfigured, None, "the URL does not parse");
        };
        let literal = match url.host() {
            Some(url::Host::Ipv4(v4)) => Some(IpAddr::V4(v4)),
            Some(url::Host::Ipv6(v6)) => Some(IpAddr::V6(v6)),
            _ => None,
        };
        if let Some(addr) = literal
            && let Some(why) = self.guard.refuses(addr)
        {
            return Sent::failed(SendClass::Refused, None, Refused { addr, why }.to_string());
        }
        let request = self
            .http
            .post(url)
            .header("Idempotency-Key", key)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(serde_json::to_vec(body).unwrap_or_default())
            .send();
        let work = async {
            let mut response = match request.await {
                Ok(r) => r,
                Err(e) => return http_failure(&e),
            };
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            // Read (a capped amount of) the answer so the connection can be reused; keep none.
            let mut read = 0usize;
            while let Ok(Some(chunk)) = response.chunk().await {
                read += chunk.len();
                if read > NOTIFY_BODY_LIMIT {
                    break;
                }
            }
            let class = match status {
                200..=299 => return Sent::delivered(Some(status)),
                300..=399 => SendClass::Rejected,
                429 => SendClass::RateLimited,
                400..=499 => SendClass::Rejected,
                _ => SendClass::ServerError,
            };
            let mut sent = Sent::failed(class, Some(status), format!("answered {status}"));
            sent.retry_after = retry_after;
            sent
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(sent) => sent,
            Err(_) => Sent::failed(
                SendClass::Timeout,
                None,
                format!("no answer within {} ms", timeout.as_millis()),
            ),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn email(
        &self,
        notice: &Value,
        key: &str,
        to: &[String],
        from: &str,
        host: &str,
        port: u16,
        tls: SmtpTls,
        username: Option<&str>,
        password: Option<&str>,
        timeout: Duration,
    ) -> Sent {
        use lettre::message::{Mailbox, header::ContentType};
        use lettre::transport::smtp::authentication::Credentials;
        use lettre::transport::smtp::client::{Tls, TlsParameters};
        use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

        let Ok(from) = from.parse::<Mailbox>() else {
            return Sent::failed(SendClass::Misconfigured, None, "`from` is not an address");
        };
        let (subject, body) = payload::email(notice);
        let mut message = Message::builder()
            .from(from)
            .subject(subject)
            .message_id(Some(format!("<{key}@fleet>")))
            .header(ContentType::TEXT_PLAIN);
        for t in to {
            let Ok(mb) = t.parse::<Mailbox>() else {
                return Sent::failed(
                    SendClass::Misconfigured,
                    None,
                    "a recipient is not an address",
                );
            };
            message = message.to(mb);
        }
        let Ok(message) = message.body(body) else {
            return Sent::failed(
                SendClass::Misconfigured,
                None,
                "the message cannot be built",
            );
        };
        let work = async {
            // Resolved once, checked, and connected to by address; TLS still names the host.
            let addr = match self.resolve(host, port).await {
                Ok(a) => a,
                Err(sent) => return sent,
            };
            let params = match tls {
                SmtpTls::None => None,
                _ => match TlsParameters::new(host.to_owned()) {
                    Ok(p) => Some(p),
                    Err(_) => {
                        return Sent::failed(
                            SendClass::Misconfigured,
                            None,
                            "TLS cannot be set up for the SMTP host",
                        );
                    }
                },
            };
            let mut builder =
                AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(addr.ip().to_string())
                    .port(addr.port())
                    .timeout(Some(timeout));
            builder = match (tls, params) {
                (SmtpTls::Starttls, Some(p)) => builder.tls(Tls::Required(p)),
                (SmtpTls::Tls, Some(p)) => builder.tls(Tls::Wrapper(p)),
                _ => builder.tls(Tls::None),
            };
            if let (Some(u), Some(p)) = (username, password) {
                builder = builder.credentials(Credentials::new(u.to_owned(), p.to_owned()));
            }
            let transport = builder.build();
            match transport.send(message).await {
                Ok(r) => Sent::delivered(Some(u16::from(r.code()))),
                Err(e) => {
                    let status = e.status().map(u16::from);
                    let class = if e.is_permanent() {
                        SendClass::Rejected
                    } else if e.is_transient() {
                        SendClass::ServerError
                    } else if e.is_timeout() {
                        SendClass::Timeout
                    } else {
                        SendClass::Connect
                    };
                    // lettre's messages carry the server's reply, never our password.
                    Sent::failed(class, status, fleet_wire::truncate(&e.to_string(), 200))
                }
            }
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(s) => s,
            Err(_) => Sent::failed(
                SendClass::Timeout,
                None,
                format!("no answer within {} ms", timeout.as_millis()),
            ),
        }
    }

    async fn resolve(&self, host: &str, port: u16) -> Result<SocketAddr, Sent> {
        let candidates: Vec<SocketAddr> = if let Ok(ip) = host.parse::<IpAddr>() {
            vec![SocketAddr::new(ip, port)]
        } else if let Some(r) = &self.resolver {
            let name = host
                .parse::<reqwest::dns::Name>()
                .map_err(|_| Sent::failed(SendClass::Misconfigured, None, "bad SMTP host name"))?;
            r.resolve(name)
                .await
                .map_err(|e| Sent::failed(SendClass::Connect, None, e.to_string()))?
                .map(|a| SocketAddr::new(a.ip(), port))
                .collect()
        } else {
            tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| {
                    Sent::failed(
                        SendClass::Connect,
                        None,
                        DnsError(e.to_string()).to_string(),
                    )
                })?
                .collect()
        };
        let mut refused = None;
        for addr in candidates {
            match self.guard.refuses(addr.ip()) {
                None => return Ok(addr),
                Some(why) => {
                    refused = Some(Refused {
                        addr: addr.ip(),
                        why,
                    })
                }
            }
        }
        Err(match refused {
            Some(r) => Sent::failed(SendClass::Refused, None, r.to_string()),
            None => Sent::failed(SendClass::Connect, None, "the SMTP host has no address"),
        })
    }
}

/// Classifies a failed HTTP send by the types in its chain; never the URL.
fn http_failure(e: &reqwest::Error) -> Sent {
    for cause in causes(e) {
        if let Some(r) = cause.downcast_ref::<Refused>() {
            return Sent::failed(SendClass::Refused, None, r.to_string());
        }
        if cause.downcast_ref::<DnsError>().is_some() {
            return Sent::failed(SendClass::Connect, None, "the name does not resolve");
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            let what = match io.kind() {
                std::io::ErrorKind::ConnectionRefused => "connection refused",
                std::io::ErrorKind::TimedOut => "connection timed out",
                _ => "connection failed",
            };
            return Sent::failed(SendClass::Connect, None, what);
        }
    }
    if e.is_timeout() {
        return Sent::failed(SendClass::Timeout, None, "timed out");
    }
    Sent::failed(SendClass::Connect, None, "connection failed")
}

#[async_trait]
impl Notifier for AlertNotifier {
    async fn send(
        &self,
        channel: &ChannelConfig,
        notice: &Value,
        idempotency_key: &str,
        timeout: Duration,
    ) -> Sent {
        match channel {
            ChannelConfig::Webhook { url, .. } => {
                self.post(url, notice, idempotency_key, timeout).await
            }
            ChannelConfig::Slack { url } => {
                self.post(url, &payload::slack(notice), idempotency_key, timeout)
                    .await
            }
            ChannelConfig::Pagerduty { routing_key, url } => {
                let url = url.as_deref().unwrap_or(PAGERDUTY_EVENTS_URL);
                self.post(
                    url,
                    &payload::pagerduty(notice, routing_key),
                    idempotency_key,
                    timeout,
                )
                .await
            }
            ChannelConfig::Email {
                to,
                from,
                smtp_host,
                smtp_port,
                smtp_tls,
                smtp_username,
                smtp_password,
            } => {
                self.email(
                    notice,
                    idempotency_key,
                    to,
                    from,
                    smtp_host,
                    *smtp_port,
                    *smtp_tls,
                    smtp_username.as_deref(),
                    smtp_password.as_deref(),
                    timeout,
                )
                .await
            }
        }
    }
}
