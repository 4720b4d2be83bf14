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
        let off = FailureLimiter::new(0);
        assert!(!off.fail(a) && !off.fail(a) && !off.fail(a));
    }
}
