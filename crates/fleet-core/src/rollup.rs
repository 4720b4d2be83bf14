//! History tiers: raw rows for a short window, then 5-minute and hourly rollups. The types a
//! store returns for a rollup, the response-time histogram behind a rollup's p95, which tier
//! covers a range, and the aggregation a store without SQL uses.

use std::collections::BTreeMap;

use serde::Serialize;
use time::{Duration, OffsetDateTime};

use crate::model::{HealthCheck, HealthStatus, MetricsSample};

/// A history source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Resolution {
    /// Every check or sample as written.
    #[serde(rename = "raw")]
    Raw,
    /// 5-minute rollups.
    #[serde(rename = "5m")]
    FiveMinutes,
    /// Hourly rollups.
    #[serde(rename = "1h")]
    Hour,
}

impl Resolution {
    /// Its name in the API: `raw`, `5m` or `1h`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::FiveMinutes => "5m",
            Self::Hour => "1h",
        }
    }

    /// Reads a name back.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "raw" => Some(Self::Raw),
            "5m" => Some(Self::FiveMinutes),
            "1h" => Some(Self::Hour),
            _ => None,
        }
    }

    /// How long one of its periods lasts; `None` for raw rows.
    pub fn period(self) -> Option<Duration> {
        match self {
            Self::Raw => None,
            Self::FiveMinutes => Some(Duration::minutes(5)),
            Self::Hour => Some(Duration::hours(1)),
        }
    }

    /// The start of the period holding `t`.
    pub fn floor(self, t: OffsetDateTime) -> OffsetDateTime {
        let Some(p) = self.period() else { return t };
        let secs = p.whole_seconds();
        let ts = t.unix_timestamp();
        OffsetDateTime::from_unix_timestamp(ts - ts.rem_euclid(secs)).unwrap_or(t)
    }
}

/// How long each tier is kept, to tell which one covers a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiers {
    /// Raw rows; `None` when kept for months (no raw window).
    pub raw: Option<Duration>,
    /// 5-minute rollups.
    pub five_minutes: Duration,
}

impl Default for Tiers {
    fn default() -> Self {
        Self {
            raw: Some(Duration::hours(48)),
            five_minutes: Duration::days(7),
        }
    }
}

impl Tiers {
    /// The finest source still holding history from `from` on, at `now`.
    pub fn finest(&self, from: Option<OffsetDateTime>, now: OffsetDateTime) -> Resolution {
        let Some(from) = from else {
            return Resolution::Raw;
        };
        match self.raw {
            None => Resolution::Raw,
            Some(raw) if from >= now - raw => Resolution::Raw,
            Some(_) if from >= now - self.five_minutes => Resolution::FiveMinutes,
            Some(_) => Resolution::Hour,
        }
    }
}

/// Upper bounds of the response-time histogram a health rollup keeps, in ms; a tenth bucket
/// holds what is slower.
pub const RESPONSE_BUCKETS_MS: [u32; 9] = [25, 50, 100, 200, 400, 800, 1_600, 3_200, 6_400];

/// The bucket of the histogram a response time falls in.
pub fn response_bucket(ms: u32) -> usize {
    RESPONSE_BUCKETS_MS
        .iter()
        .position(|b| ms <= *b)
        .unwrap_or(RESPONSE_BUCKETS_MS.len())
}

/// The 95th percentile read from a histogram: the upper bound of the bucket holding it,
/// never above the largest time seen.
pub fn p95(histogram: &[u32; 10], max: u32) -> Option<u32> {
    let total: u64 = histogram.iter().map(|n| u64::from(*n)).sum();
    if total == 0 {
        return None;
    }
    let rank = (total * 95).div_ceil(100);
    let mut seen = 0u64;
    for (i, n) in histogram.iter().enumerate() {
        seen += u64::from(*n);
        if seen >= rank {
            let bound = RESPONSE_BUCKETS_MS.get(i).copied().unwrap_or(max);
            return Some(bound.min(max));
        }
    }
    Some(max)
}

/// Checks by classification.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StatusCounts {
    /// Healthy.
    pub healthy: u32,
    /// Degraded.
    pub degraded: u32,
    /// Critical.
    pub critical: u32,
    /// Unreachable.
    pub unreachable: u32,
}

impl StatusCounts {
    /// Counts one check.
    pub fn add(&mut self, status: HealthStatus) {
        match status {
            HealthStatus::Healthy => self.healthy += 1,
            HealthStatus::Degraded => self.degraded += 1,
            HealthStatus::Critical => self.critical += 1,
            HealthStatus::Unreachable => self.unreachable += 1,
        }
    }

    /// Every check.
    pub fn total(&self) -> u32 {
        self.healthy + self.degraded + self.critical + self.unreachable
    }
}

/// Response times of a period.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ResponseTimes {
    /// Fastest.
    pub min: u32,
    /// Mean.
    pub mean: f64,
    /// 95th percentile, from the histogram.
    pub p95: u32,
    /// Slowest.
    pub max: u32,
}

/// One server's health over one period.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthRollup {
    /// When the period starts.
    pub period_start: OffsetDateTime,
    /// Checks by classification.
    pub checks: StatusCounts,
    /// Response times, when any check had one.
    pub response_time_ms: Option<ResponseTimes>,
    /// The period's last error.
    pub last_error: Option<String>,
}

/// Min, mean and max of a gauge over a period.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Gauge {
    /// Lowest.
    pub min: f64,
    /// Mean.
    pub mean: f64,
    /// Highest.
    pub max: f64,
}

/// One server's metrics over one period: every gauge's min, mean and max, every counter's
/// increase (a drop counts as a restart from zero).
#[derive(Clone, Debug, PartialEq)]
pub struct MetricsRollup {
    /// When the period starts.
    pub period_start: OffsetDateTime,
    /// Samples in it.
    pub samples: u32,
    /// Gauges, by name as in a raw sample.
    pub gauges: BTreeMap<&'static str, Gauge>,
    /// Counters' increases, by name as in a raw sample.
    pub counters: BTreeMap<&'static str, f64>,
}

impl Default for MetricsRollup {
    fn default() -> Self {
        Self {
            period_start: OffsetDateTime::UNIX_EPOCH,
            samples: 0,
            gauges: BTreeMap::new(),
            counters: BTreeMap::new(),
        }
    }
}

impl Default for HealthRollup {
    fn default() -> Self {
        Self {
            period_start: OffsetDateTime::UNIX_EPOCH,
            checks: StatusCounts::default(),
            response_time_ms: None,
            last_error: None,
        }
    }
}

/// The gauges a metrics rollup keeps, by their raw names.
pub const GAUGES: [&str; 8] = [
    "cpu_percent",
    "memory_percent",
    "disk_percent",
    "active_services",
    "failed_services",
    "total_services",
    "active_users",
    "total_users",
];

/// The counters a metrics rollup keeps the increase of.
pub const COUNTERS: [&str; 4] = [
    "llm_requests",
    "llm_cost_usd",
    "network_rx_bytes",
    "network_tx_bytes",
];

fn gauge_values(s: &MetricsSample) -> [Option<f64>; 8] {
    let v = &s.values;
    let i = |x: Option<i64>| x.map(|x| x as f64);
    [
        v.cpu_percent,
        v.memory_percent,
        v.disk_percent,
        i(v.active_services),
        i(v.failed_services),
        i(v.total_services),
        i(v.active_users),
        i(v.total_users),
    ]
}

fn counter_values(s: &MetricsSample) -> [Option<f64>; 4] {
    let v = &s.values;
    let i = |x: Option<i64>| x.map(|x| x as f64);
    [
        i(v.llm_requests),
        v.llm_cost_usd,
        i(v.network_rx_bytes),
        i(v.network_tx_bytes),
    ]
}

/// A counter's increase from `prev` to `cur`: the difference, or `cur` after a reset.
pub fn increase(prev: f64, cur: f64) -> f64 {
    if cur >= prev { cur - prev } else { cur }
}

/// Rolls raw checks up into `res` periods, as a store without SQL does: every period with a
/// check that ended by `closed`, newest first.
pub fn health_rollups<'a>(
    res: Resolution,
    checks: impl IntoIterator<Item = &'a HealthCheck>,
    closed: OffsetDateTime,
) -> Vec<HealthRollup> {
    #[derive(Default)]
    struct Acc {
        rollup: HealthRollup,
        hist: [u32; 10],
        rt: Option<(u32, u32, u64, u32)>,
        last_error_at: Option<OffsetDateTime>,
    }
    let period = res.period().unwrap_or(Duration::minutes(5));
    let mut acc: BTreeMap<OffsetDateTime, Acc> = BTreeMap::new();
    for c in checks {
        let start = res.floor(c.timestamp);
        if start + period > closed {
            continue;
        }
        let a = acc.entry(start).or_default();
        a.rollup.period_start = start;
        a.rollup.checks.add(c.status);
        if let Some(ms) = c.response_time_ms {
            a.hist[response_bucket(ms)] += 1;
            let (min, max, sum, n) = a.rt.unwrap_or((u32::MAX, 0, 0, 0));
            a.rt = Some((min.min(ms), max.max(ms), sum + u64::from(ms), n + 1));
        }
        if let Some(e) = &c.error_message
            && a.last_error_at.is_none_or(|t| c.timestamp >= t)
        {
            a.last_error_at = Some(c.timestamp);
            a.rollup.last_error = Some(e.clone());
        }
    }
    acc.into_values()
        .rev()
        .map(|mut a| {
            a.rollup.response_time_ms = a.rt.map(|(min, max, sum, n)| ResponseTimes {
                min,
                mean: sum as f64 / f64::from(n),
                p95: p95(&a.hist, max).unwrap_or(max),
                max,
            });
            a.rollup
        })
        .collect()
}

/// Rolls raw samples up into `res` periods, as a store without SQL does: every period with a
/// sample that ended by `closed`, newest first. A counter's step into a period counts in it.
pub fn metrics_rollups<'a>(
    res: Resolution,
    samples: impl IntoIterator<Item = &'a MetricsSample>,
    closed: OffsetDateTime,
) -> Vec<MetricsRollup> {
    let period = res.period().unwrap_or(Duration::minutes(5));
    let mut sorted: Vec<&MetricsSample> = samples.into_iter().collect();
    sorted.sort_by_key(|s| s.timestamp);
    let mut acc: BTreeMap<OffsetDateTime, (MetricsRollup, [(f64, u32); 8])> = BTreeMap::new();
    let mut prev: [Option<f64>; 4] = [None; 4];
    for s in sorted {
        let start = res.floor(s.timestamp);
        let counters = counter_values(s);
        let steps: Vec<Option<f64>> = counters
            .iter()
            .zip(prev)
            .map(|(c, p)| Some(increase(p?, (*c)?)))
            .collect();
        // The step is from the previous sample, as SQL's lag() takes it.
        prev = counters;
        if start + period > closed {
            continue;
        }
        let (r, sums) = acc.entry(start).or_default();
        r.period_start = start;
        r.samples += 1;
        for ((name, value), (sum, n)) in GAUGES.iter().zip(gauge_values(s)).zip(sums.iter_mut()) {
            let Some(v) = value else { continue };
            *sum += v;
            *n += 1;
            let g = r.gauges.entry(name).or_insert(Gauge {
                min: v,
                mean: v,
                max: v,
            });
            g.min = g.min.min(v);
            g.max = g.max.max(v);
            g.mean = *sum / f64::from(*n);
        }
        for ((name, step), cur) in COUNTERS.iter().zip(steps).zip(counters) {
            if cur.is_some() {
                *r.counters.entry(name).or_insert(0.0) += step.unwrap_or(0.0);
            }
        }
    }
    acc.into_values().rev().map(|(r, _)| r).collect()
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;
    use crate::conformance::check_at;
    use crate::model::{MetricValues, Period, ServerId};

    #[test]
    fn the_finest_tier_covering_a_range_is_chosen() {
        let now = datetime!(2026-11-29 12:00 UTC);
        let t = Tiers::default();
        assert_eq!(t.finest(None, now), Resolution::Raw);
        assert_eq!(
            t.finest(Some(now - Duration::hours(47)), now),
            Resolution::Raw
        );
        assert_eq!(
            t.finest(Some(now - Duration::hours(49)), now),
            Resolution::FiveMinutes
        );
        assert_eq!(
            t.finest(Some(now - Duration::days(8)), now),
            Resolution::Hour
        );
        let keep_raw = Tiers { raw: None, ..t };
        assert_eq!(
            keep_raw.finest(Some(now - Duration::days(80)), now),
            Resolution::Raw
        );
        assert_eq!(
            Resolution::Hour.floor(datetime!(2026-11-29 12:59:59 UTC)),
            datetime!(2026-11-29 12:00 UTC)
        );
        assert_eq!(
            Resolution::FiveMinutes.floor(datetime!(2026-11-29 12:04:59 UTC)),
            datetime!(2026-11-29 12:00 UTC)
        );
    }

    #[test]
    fn the_p95_comes_from_the_histogram_and_never_exceeds_the_slowest() {
        let mut h = [0u32; 10];
        for ms in (1..=100).map(|i| i * 10) {
            h[response_bucket(ms)] += 1;
        }
        // 95 of 100 times are at most 950 ms: the bucket up to 1,600 ms holds the 95th.
        assert_eq!(p95(&h, 1_000), Some(1_000));
        assert_eq!(p95(&[0; 10], 0), None);
        let mut fast = [0u32; 10];
        fast[0] = 99;
        fast[9] = 1;
        assert_eq!(p95(&fast, 9_000), Some(25));
    }

    fn sample(at: OffsetDateTime, requests: i64, cpu: f64) -> MetricsSample {
        MetricsSample {
            server_id: ServerId(uuid::Uuid::nil()),
            timestamp: at,
            period: Period::Raw,
            values: MetricValues {
                llm_requests: Some(requests),
                cpu_percent: Some(cpu),
                ..Default::default()
            },
            fence: None,
        }
    }

    #[test]
    fn counters_increase_across_a_reset_and_gauges_keep_min_mean_max() {
        let t0 = datetime!(2026-11-29 10:00 UTC);
        let m = |i: i64| t0 + Duration::minutes(i);
        // 100 → 130 → (restart) 5 → 25 within the hour; then 40 in the next.
        let samples = [
            sample(m(1), 100, 10.0),
            sample(m(20), 130, 30.0),
            sample(m(40), 5, 20.0),
            sample(m(50), 25, 40.0),
            sample(m(61), 40, 50.0),
        ];
        let hours = metrics_rollups(Resolution::Hour, &samples, m(120));
        assert_eq!(hours.len(), 2);
        let (next, first) = (&hours[0], &hours[1]);
        assert_eq!(first.counters["llm_requests"], 30.0 + 5.0 + 20.0);
        assert_eq!(
            next.counters["llm_requests"], 15.0,
            "the step into the hour"
        );
        let cpu = first.gauges["cpu_percent"];
        assert_eq!((cpu.min, cpu.mean, cpu.max), (10.0, 25.0, 40.0));
        // An open period is not rolled up.
        assert_eq!(metrics_rollups(Resolution::Hour, &samples, m(90)).len(), 1);
    }

    #[test]
    fn checks_roll_up_by_status_with_times_and_the_last_error() {
        let t0 = datetime!(2026-11-29 10:00 UTC);
        let id = ServerId(uuid::Uuid::nil());
        let mut checks = Vec::new();
        for (i, status) in [
            HealthStatus::Healthy,
            HealthStatus::Critical,
            HealthStatus::Unreachable,
        ]
        .into_iter()
        .enumerate()
        {
            let mut c = check_at(id, t0 + Duration::seconds(30 * i as i64), status);
            c.response_time_ms = Some(100 * (i as u32 + 1));
            checks.push(c);
        }
        let r = &health_rollups(Resolution::FiveMinutes, &checks, t0 + Duration::minutes(5))[0];
        assert_eq!(r.checks.total(), 3);
        assert_eq!((r.checks.critical, r.checks.unreachable), (1, 1));
        let rt = r.response_time_ms.unwrap();
        assert_eq!((rt.min, rt.max, rt.mean), (100, 300, 200.0));
        assert_eq!(r.last_error, checks[2].error_message);
    }
}
