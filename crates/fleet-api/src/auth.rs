//! Admin API tokens: made high-entropy, stored as SHA-256, compared in constant time, and a
//! limit on failed attempts per client address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Every token starts so; the rest is 32 random bytes in unpadded base64url.
pub const PREFIX: &str = "fleet_";

/// A fresh token.
pub fn generate() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!(
        "{PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// The stored form of a token.
pub fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Whether `token` has the shape of a token this server makes (or a bootstrap token:
/// printable ASCII without spaces, 16 to 256 characters).
pub fn well_formed(token: &str) -> bool {
    (16..=256).contains(&token.len()) && token.bytes().all(|b| b.is_ascii_graphic())
}

/// Refuses a bootstrap admin token that is easy to guess: shorter than 32 characters, or with
/// whitespace in it.
pub fn check_bootstrap(token: &str) -> Result<(), String> {
    let how = "make one with `openssl rand -base64 32` or `fleet-server token create`";
    if token.chars().count() < 32 {
        return Err(format!(
            "FLEET_ADMIN_TOKEN is {} characters; it must have at least 32: {how}",
            token.chars().count()
        ));
    }
    if token.chars().any(char::is_whitespace) {
        return Err(format!("FLEET_ADMIN_TOKEN contains whitespace: {how}"));
    }
    Ok(())
}

/// The token of an `Authorization` header: the `Bearer` scheme, matched in any case (RFC
/// 7235), then the token.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The client's address: the peer's, or, when the peer is a trusted proxy, the nearest address
/// in `X-Forwarded-For` that is not itself a trusted proxy.
pub fn client_addr(
    peer: Option<IpAddr>,
    forwarded_for: Option<&str>,
    trusted: &[ipnet::IpNet],
) -> Option<IpAddr> {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    let peer = peer?;
    if !is_trusted(&peer) {
        return Some(peer);
    }
    let Some(chain) = forwarded_for else {
        return Some(peer);
    };
    let mut nearest = peer;
    for hop in chain.rsplit(',') {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) => {
                nearest = ip;
                if !is_trusted(&ip) {
                    break;
                }
            }
            // A hop that is not an address ends what can be believed.
            Err(_) => break,
        }
    }
    Some(nearest)
}

/// The bootstrap admin token from `FLEET_ADMIN_TOKEN`, kept only as a hash.
#[derive(Clone, Default)]
pub struct Bootstrap(Option<[u8; 32]>);

impl std::fmt::Debug for Bootstrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Bootstrap(set)"
        } else {
            "Bootstrap(none)"
        })
    }
}

impl Bootstrap {
    /// From the setting.
    pub fn new(token: Option<&str>) -> Self {
        Self(token.filter(|t| !t.is_empty()).map(hash))
    }

    /// Whether `hashed` is the bootstrap token, in constant time.
    pub fn matches(&self, hashed: &[u8; 32]) -> bool {
        match &self.0 {
            Some(h) => bool::from(h.ct_eq(hashed)),
            None => false,
        }
    }
}

/// Counts failed authentications per client address in one-minute windows.
#[derive(Debug)]
pub struct FailureLimiter {
    limit: u32,
    window: Duration,
    seen: Mutex<HashMap<Option<IpAddr>, (Instant, u32)>>,
}

impl FailureLimiter {
    /// At most `limit` failures per minute per address; 0 disables the limit.
    pub fn new(limit: u32) -> Self {
        Self {
            limit,
            window: Duration::from_secs(60),
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// When `addr` is over its limit: how long until its window ends. Asked before a token
    /// is looked up, so a client over its limit costs no lookup, whatever token it sends.
    pub fn blocked(&self, addr: Option<IpAddr>) -> Option<Duration> {
        if self.limit == 0 {
            return None;
        }
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let (start, count) = seen.get(&addr)?;
        let left = self.window.checked_sub(start.elapsed())?;
        (*count > self.limit && !left.is_zero()).then_some(left)
    }

    /// Records a failure from `addr`; true when it is now over the limit.
    pub fn fail(&self, addr: Option<IpAddr>) -> bool {
        if self.limit == 0 {
            return false;
        }
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() > 10_000 {
            let window = self.window;
            seen.retain(|_, (start, _)| start.elapsed() < window);
        }
        let entry = seen.entry(addr).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= self.window {
            *entry = (Instant::now(), 0);
        }
        entry.1 += 1;
        entry.1 > self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_well_formed_and_hashed() {
        let a = generate();
        let b = generate();
        assert_ne!(a, b);
        assert!(a.starts_with(PREFIX) && a.len() == PREFIX.len() + 43);
        assert!(well_formed(&a));
        assert!(!well_formed("short"));
        assert!(!well_formed("has a space in it, long enough"));
        assert_eq!(hash(&a), hash(&a));
        assert_ne!(hash(&a), hash(&b));
    }

    #[test]
    fn bootstrap_matches_only_its_token() {
        let boot = Bootstrap::new(Some("bootstrap-token-123456"));
        assert!(boot.matches(&hash("bootstrap-token-123456")));
        assert!(!boot.matches(&hash("other")));
        assert!(!Bootstrap::new(None).matches(&hash("")));
        assert!(!format!("{boot:?}").contains("bootstrap-token"));
    }

    #[test]
    fn the_limiter_blocks_past_the_limit_per_address() {
        let l = FailureLimiter::new(2);
        let a = Some("127.0.0.2".parse().unwrap());
        assert!(!l.fail(a));
        assert!(!l.fail(a));
        assert!(l.fail(a), "the third failure is past a limit of 2");
        assert!(!l.fail(Some("127.0.0.3".parse().unwrap())));
        assert!(
            l.blocked(a)
                .is_some_and(|left| left <= Duration::from_secs(60))
        );
        assert_eq!(l.blocked(Some("127.0.0.3".parse().unwrap())), None);
        let off = FailureLimiter::new(0);
        assert!(!off.fail(a) && !off.fail(a) && !off.fail(a));
        assert_eq!(off.blocked(a), None);
    }

    #[test]
    fn the_bearer_scheme_is_matched_in_any_case() {
        for (header, token) in [
            ("Bearer abc", Some("abc")),
            ("bearer abc", Some("abc")),
            ("BEARER  abc ", Some("abc")),
            ("Basic abc", None),
            ("Bearer", None),
            ("Bearer ", None),
            ("abc", None),
        ] {
            assert_eq!(bearer(header), token, "{header:?}");
        }
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let proxies: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let xff = Some("1.2.3.4, 10.0.0.9");
        // Nothing trusted by default: the peer is the client.
        assert_eq!(
            client_addr(Some(ip("10.0.0.1")), xff, &[]),
            Some(ip("10.0.0.1"))
        );
        // An untrusted peer cannot claim another address.
        assert_eq!(
            client_addr(Some(ip("5.6.7.8")), xff, &proxies),
            Some(ip("5.6.7.8"))
        );
        // Through trusted proxies, the nearest untrusted hop.
        assert_eq!(
            client_addr(Some(ip("10.0.0.1")), xff, &proxies),
            Some(ip("1.2.3.4"))
        );
        assert_eq!(
            client_addr(Some(ip("10.0.0.1")), Some("9.9.9.9, 1.2.3.4"), &proxies),
            Some(ip("1.2.3.4")),
            "a client cannot push its own claim past the proxy's"
        );
        assert_eq!(
            client_addr(Some(ip("10.0.0.1")), Some("garbage"), &proxies),
            Some(ip("10.0.0.1"))
        );
    }

    #[test]
    fn a_weak_bootstrap_token_is_refused_with_advice() {
        assert!(
            check_bootstrap("short")
                .unwrap_err()
                .contains("at least 32")
        );
        assert!(
            check_bootstrap("0123456789 0123456789 0123456789")
                .unwrap_err()
                .contains("whitespace")
        );
        assert!(check_bootstrap(&generate()).is_ok());
    }
}
