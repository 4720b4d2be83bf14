//! Which addresses a probe may connect to, checked on the address it will really use: a name
//! is resolved once, its addresses are checked, and only an allowed one is connected to.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// The addresses a probe refuses. Link-local (cloud metadata lives there), unspecified and
/// multicast addresses are always refused; `deny` adds networks (e.g. loopback or private
/// ranges, which are allowed by default because fleets live on private networks).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressGuard {
    /// Networks refused beside the built-in ones.
    pub deny: Vec<IpNet>,
}

impl AddressGuard {
    /// Why `ip` is refused, or `None` when it is allowed.
    pub fn refuses(&self, ip: IpAddr) -> Option<&'static str> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let link_local = match ip {
            IpAddr::V4(v4) => v4.is_link_local(),
            IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
        };
        if link_local {
            Some("link-local (where cloud metadata lives)")
        } else if ip.is_unspecified() {
            Some("unspecified")
        } else if ip.is_multicast() {
            Some("multicast")
        } else if self.deny.iter().any(|net| net.contains(&ip)) {
            Some("in FLEET_PROBE_DENY_NETS")
        } else {
            None
        }
    }
}

/// A refused address: the probe's recorded failure.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("address {addr} refused: {why}")]
pub struct Refused {
    /// The address.
    pub addr: IpAddr,
    /// Why.
    pub why: &'static str,
}

/// A name that did not resolve (to any address).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DnsError(pub String);

/// Resolves with `inner` (or the system's resolver) and keeps only the addresses the guard
/// allows; every failure is a typed [`DnsError`] or [`Refused`], so the probe can tell them
/// apart without reading messages.
pub(crate) struct GuardedResolver {
    pub(crate) inner: Option<Arc<dyn Resolve>>,
    pub(crate) guard: Arc<AddressGuard>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let inner = self.inner.clone();
        let guard = self.guard.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> = match inner {
                Some(inner) => inner
                    .resolve(name)
                    .await
                    .map_err(|e| Box::new(DnsError(e.to_string())) as BoxError)?
                    .collect(),
                None => tokio::net::lookup_host((host.as_str(), 0))
                    .await
                    .map_err(|e| Box::new(DnsError(format!("{host}: {e}"))) as BoxError)?
                    .collect(),
            };
            let mut refused = None;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| match guard.refuses(a.ip()) {
                    None => true,
                    Some(why) => {
                        refused.get_or_insert(Refused { addr: a.ip(), why });
                        false
                    }
                })
                .collect();
            match (allowed.is_empty(), refused) {
                (false, _) => Ok(Box::new(allowed.into_iter()) as Addrs),
                (true, Some(r)) => Err(Box::new(r) as BoxError),
                (true, None) => {
                    Err(Box::new(DnsError(format!("{host}: no addresses"))) as BoxError)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(guard: &AddressGuard, ip: &str, expected: Option<&str>) {
        assert_eq!(guard.refuses(ip.parse().unwrap()), expected, "{ip}");
    }

    #[test]
    fn metadata_unspecified_and_multicast_are_refused_private_ranges_are_not() {
        let g = AddressGuard::default();
        let link = Some("link-local (where cloud metadata lives)");
        check(&g, "169.254.169.254", link);
        check(&g, "fe80::1", link);
        check(&g, "::ffff:169.254.169.254", link);
        check(&g, "0.0.0.0", Some("unspecified"));
        check(&g, "::", Some("unspecified"));
        check(&g, "224.0.0.1", Some("multicast"));
        check(&g, "ff02::1", Some("multicast"));
        for ok in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.7",
            "172.16.0.1",
            "::1",
            "8.8.8.8",
        ] {
            check(&g, ok, None);
        }
    }

    #[test]
    fn denied_networks_are_refused() {
        let g = AddressGuard {
            deny: vec![
                "127.0.0.0/8".parse().unwrap(),
                "10.0.0.0/8".parse().unwrap(),
            ],
        };
        check(&g, "127.0.0.1", Some("in FLEET_PROBE_DENY_NETS"));
        check(&g, "10.200.0.1", Some("in FLEET_PROBE_DENY_NETS"));
        check(&g, "192.168.0.1", None);
    }
}
