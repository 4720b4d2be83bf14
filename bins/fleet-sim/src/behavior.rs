//! Behaviours and mixes.

use std::fmt;
use std::str::FromStr;

use rand::Rng;
use rand::seq::SliceRandom;

macro_rules! behaviors {
    ($($(#[$doc:meta])* $v:ident => $s:literal),+ $(,)?) => {
        /// How a simulated server answers.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum Behavior { $($(#[$doc])* $v),+ }

        impl Behavior {
            /// Every behaviour.
            pub const ALL: &'static [Behavior] = &[$(Behavior::$v),+];

            /// Its name in mixes and on the control API.
            pub fn as_str(self) -> &'static str {
                match self { $(Behavior::$v => $s),+ }
            }

            pub(crate) fn from_u8(n: u8) -> Self {
                Self::ALL.get(usize::from(n)).copied().unwrap_or(Behavior::Healthy)
            }
        }

        impl FromStr for Behavior {
            type Err = MixError;
            fn from_str(s: &str) -> Result<Self, MixError> {
                match s.trim() {
                    $($s => Ok(Behavior::$v),)+
                    other => Err(MixError(format!(
                        "unknown behaviour `{other}`, expected one of: {}",
                        Self::ALL.iter().map(|b| b.as_str()).collect::<Vec<_>>().join(", ")
                    ))),
                }
            }
        }
    };
}

behaviors! {
    /// All components ok.
    Healthy => "healthy",
    /// `services.healthy` false and a degraded component.
    Degraded => "degraded",
    /// The database (or redis) is down.
    Critical => "critical",
    /// 500 or 503.
    HttpError => "http_error",
    /// 429 with `Retry-After`.
    RateLimited => "rate_limited",
    /// Nothing listens.
    Unreachable => "unreachable",
    /// Accepts and never answers.
    Hang => "hang",
    /// Healthy after a latency drawn from the slow range.
    Slow => "slow",
    /// A share of answers are 503.
    Flaky => "flaky",
    /// 200 with invalid JSON.
    Garbage => "garbage",
    /// 200 with a 10 MiB body.
    Huge => "huge",
    /// The connection is reset before any answer.
    Reset => "reset",
    /// The head is sent, then the connection is dropped mid-body.
    Cut => "cut",
    /// Rejects every token with 401 (its token was changed behind Fleet's back).
    Auth => "auth",
    /// 302 to another address.
    Redirect => "redirect",
    /// The head, then one byte of body every 200 ms.
    Drip => "drip",
    /// A gzip body that inflates to 10 MiB.
    GzipBomb => "gzip_bomb",
    /// 200 with JSON nested 100,000 deep.
    Nested => "nested",
    /// A plain host (no database, no redis) that declares itself critical: its disk is full.
    HostCritical => "host_critical",
}

impl fmt::Display for Behavior {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A bad mix or behaviour name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MixError(String);

/// Behaviours by share, as in `healthy=90,degraded=3,critical=2`.
#[derive(Clone, Debug, PartialEq)]
pub struct Mix(Vec<(Behavior, u32)>);

impl Mix {
    /// Every server behaves the same.
    pub fn all(b: Behavior) -> Self {
        Self(vec![(b, 1)])
    }

    /// The weights.
    pub fn weights(&self) -> &[(Behavior, u32)] {
        &self.0
    }

    /// Deals behaviours to `count` servers: exact shares (largest remainders), in a shuffled
    /// order, so a mix of `healthy=95,hang=5` over 100 servers has exactly 5 hanging.
    pub fn assign(&self, count: usize, rng: &mut impl Rng) -> Vec<Behavior> {
        let total: u64 = self.0.iter().map(|(_, w)| u64::from(*w)).sum();
        let mut out = Vec::with_capacity(count);
        let mut remainders = Vec::new();
        for (b, w) in &self.0 {
            let exact = count as u64 * u64::from(*w);
            out.extend(std::iter::repeat_n(*b, (exact / total) as usize));
            remainders.push((exact % total, *b));
        }
        remainders.sort_by_key(|r| std::cmp::Reverse(r.0));
        for (_, b) in remainders.into_iter().take(count - out.len()) {
            out.push(b);
        }
        out.shuffle(rng);
        out
    }
}

impl FromStr for Mix {
    type Err = MixError;

    fn from_str(s: &str) -> Result<Self, MixError> {
        let mut parts = Vec::new();
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let (name, weight) = part
                .split_once('=')
                .ok_or_else(|| MixError(format!("`{part}` is not name=weight")))?;
            let weight: u32 = weight.trim().parse().map_err(|_| {
                MixError(format!(
                    "weight of `{}` is not a whole number: `{weight}`",
                    name.trim()
                ))
            })?;
            parts.push((name.parse()?, weight));
        }
        if parts.iter().map(|(_, w)| *w).sum::<u32>() == 0 {
            return Err(MixError(
                "the mix has no weight: give at least one behaviour a weight above 0".into(),
            ));
        }
        Ok(Self(parts))
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn mixes_parse_and_deal_exact_shares() {
        let mix: Mix = "healthy=95,degraded=2,critical=1,unreachable=1,slow=1"
            .parse()
            .unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let dealt = mix.assign(1000, &mut rng);
        assert_eq!(dealt.len(), 1000);
        assert_eq!(
            dealt.iter().filter(|b| **b == Behavior::Healthy).count(),
            950
        );
        assert_eq!(dealt.iter().filter(|b| **b == Behavior::Slow).count(), 10);
        let small = mix.assign(3, &mut rng);
        assert_eq!(small.len(), 3);
    }

    #[test]
    fn bad_mixes_say_why() {
        assert!(
            "healthy=x"
                .parse::<Mix>()
                .unwrap_err()
                .to_string()
                .contains("not a whole number")
        );
        assert!(
            "sick=1"
                .parse::<Mix>()
                .unwrap_err()
                .to_string()
                .starts_with("unknown behaviour `sick`")
        );
        assert!(
            "healthy"
                .parse::<Mix>()
                .unwrap_err()
                .to_string()
                .contains("name=weight")
        );
        assert!("healthy=0".parse::<Mix>().is_err());
    }

    #[test]
    fn names_round_trip() {
        for b in Behavior::ALL {
            assert_eq!(b.as_str().parse::<Behavior>().unwrap(), *b);
            assert_eq!(Behavior::from_u8(*b as u8), *b);
        }
    }
}
