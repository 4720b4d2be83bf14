//! History aggregated into a bounded number of buckets, for charts: a chart of 30 days shows
//! at most as many points as it has buckets, however many checks the range holds.

use serde::Serialize;
use time::{Duration, OffsetDateTime};

use crate::model::{HealthCheck, HealthStatus, MetricsSample};
use crate::store::health_rank;

/// The most buckets a series may ask for.
pub const MAX_BUCKETS: u32 = 1_000;

/// A time range cut into equal buckets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeriesWindow {
    /// Start, inclusive.
    pub from: OffsetDateTime,
    /// End, exclusive.
    pub to: OffsetDateTime,
    /// How many buckets, 1 to [`MAX_BUCKETS`].
    pub buckets: u32,
}

impl SeriesWindow {
    /// A window; `None` unless `from < to` and `buckets` is in `1..=MAX_BUCKETS`.
    pub fn new(from: OffsetDateTime, to: OffsetDateTime, buckets: u32) -> Option<Self> {
        (from < to && (1..=MAX_BUCKETS).contains(&buckets)).then_some(Self { from, to, buckets })
    }

    /// How long each bucket lasts.
    pub fn step(&self) -> Duration {
        (self.to - self.from) / self.buckets
    }

    /// The bucket holding `t`, if `t` is inside the window.
    pub fn bucket_of(&self, t: OffsetDateTime) -> Option<u32> {
        if t < self.from || t >= self.to {
            return None;
        }
        let offset = (t - self.from).whole_nanoseconds();
        let span = (self.to - self.from).whole_nanoseconds();
        Some(((offset * i128::from(self.buckets)) / span) as u32)
    }

    /// When bucket `i` starts.
    pub fn start_of(&self, i: u32) -> OffsetDateTime {
        let span = (self.to - self.from).whole_nanoseconds();
        self.from + Duration::nanoseconds((span * i128::from(i) / i128::from(self.buckets)) as i64)
    }
}

/// Health checks in one bucket.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HealthBucket {
    /// When the bucket starts.
    #[serde(with = "time::serde::rfc3339")]
    pub start: OffsetDateTime,
    /// Checks in it.
    pub checks: u32,
    /// Checks that were not successful.
    pub failures: u32,
    /// The worst health found.
    pub worst: HealthStatus,
    /// Mean response time of the checks that had one.
    pub avg_response_ms: Option<f64>,
    /// Longest response time.
    pub max_response_ms: Option<u32>,
}

/// Metrics samples in one bucket.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MetricsBucket {
    /// When the bucket starts.
    #[serde(with = "time::serde::rfc3339")]
    pub start: OffsetDateTime,
    /// Samples in it.
    pub samples: u32,
    /// Mean CPU use.
    pub cpu_percent: Option<f64>,
    /// Mean memory use.
    pub memory_percent: Option<f64>,
    /// Mean disk use.
    pub disk_percent: Option<f64>,
    /// The highest LLM request counter seen (a counter: charts show its increase).
    pub llm_requests: Option<i64>,
    /// The highest LLM cost counter seen.
    pub llm_cost_usd: Option<f64>,
}

#[derive(Default)]
struct Mean {
    sum: f64,
    n: u32,
}

impl Mean {
    fn add(&mut self, v: Option<f64>) {
        if let Some(v) = v {
            self.sum += v;
            self.n += 1;
        }
    }

    fn get(&self) -> Option<f64> {
        (self.n > 0).then(|| self.sum / f64::from(self.n))
    }
}

/// Aggregates checks into the window's buckets, the way a store without SQL does it.
pub fn health_buckets<'a>(
    window: &SeriesWindow,
    checks: impl IntoIterator<Item = &'a HealthCheck>,
) -> Vec<HealthBucket> {
    let mut acc: std::collections::BTreeMap<u32, (HealthBucket, Mean)> = Default::default();
    for c in checks {
        let Some(i) = window.bucket_of(c.timestamp) else {
            continue;
        };
        let (b, mean) = acc.entry(i).or_insert_with(|| {
            (
                HealthBucket {
                    start: window.start_of(i),
                    checks: 0,
                    failures: 0,
                    worst: c.status,
                    avg_response_ms: None,
                    max_response_ms: None,
                },
                Mean::default(),
            )
        });
        b.checks += 1;
        b.failures += u32::from(!c.successful);
        if health_rank(c.status) > health_rank(b.worst) {
            b.worst = c.status;
        }
        mean.add(c.response_time_ms.map(f64::from));
        b.max_response_ms = b.max_response_ms.max(c.response_time_ms);
    }
    acc.into_values()
        .map(|(mut b, mean)| {
            b.avg_response_ms = mean.get();
            b
        })
        .collect()
}

/// Aggregates samples into the window's buckets, the way a store without SQL does it.
pub fn metrics_buckets<'a>(
    window: &SeriesWindow,
    samples: impl IntoIterator<Item = &'a MetricsSample>,
) -> Vec<MetricsBucket> {
    type Acc = (MetricsBucket, [Mean; 3]);
    let mut acc: std::collections::BTreeMap<u32, Acc> = Default::default();
    for s in samples {
        let Some(i) = window.bucket_of(s.timestamp) else {
            continue;
        };
        let (b, means) = acc.entry(i).or_insert_with(|| {
            (
                MetricsBucket {
                    start: window.start_of(i),
                    samples: 0,
                    cpu_percent: None,
                    memory_percent: None,
                    disk_percent: None,
                    llm_requests: None,
                    llm_cost_usd: None,
                },
                Default::default(),
            )
        });
        b.samples += 1;
        means[0].add(s.values.cpu_percent);
        means[1].add(s.values.memory_percent);
        means[2].add(s.values.disk_percent);
        b.llm_requests = b.llm_requests.max(s.values.llm_requests);
        b.llm_cost_usd = match (b.llm_cost_usd, s.values.llm_cost_usd) {
            (Some(a), Some(v)) => Some(a.max(v)),
            (a, v) => a.or(v),
        };
    }
    acc.into_values()
        .map(|(mut b, means)| {
            b.cpu_percent = means[0].get();
            b.memory_percent = means[1].get();
            b.disk_percent = means[2].get();
            b
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_fall_into_equal_buckets_and_the_end_is_excluded() {
        let from = OffsetDateTime::UNIX_EPOCH;
        let w = SeriesWindow::new(from, from + Duration::hours(1), 4).unwrap();
        assert_eq!(w.step(), Duration::minutes(15));
        for (minutes, bucket) in [(0, Some(0)), (14, Some(0)), (15, Some(1)), (59, Some(3))] {
            assert_eq!(w.bucket_of(from + Duration::minutes(minutes)), bucket);
        }
        assert_eq!(w.bucket_of(from + Duration::hours(1)), None);
        assert_eq!(w.bucket_of(from - Duration::seconds(1)), None);
        assert_eq!(w.start_of(2), from + Duration::minutes(30));
        assert!(SeriesWindow::new(from, from, 4).is_none());
        assert!(SeriesWindow::new(from, from + Duration::hours(1), 0).is_none());
        assert!(SeriesWindow::new(from, from + Duration::hours(1), MAX_BUCKETS + 1).is_none());
    }

    #[test]
    fn a_bucket_keeps_the_worst_health_the_mean_and_the_longest_time() {
        let from = OffsetDateTime::UNIX_EPOCH;
        let w = SeriesWindow::new(from, from + Duration::minutes(10), 2).unwrap();
        let id = crate::model::ServerId::new();
        let check = |s: i64, status, ms| {
            let mut c = crate::conformance::check_at(id, from + Duration::seconds(s), status);
            c.response_time_ms = ms;
            c
        };
        let checks = [
            check(0, HealthStatus::Healthy, Some(10)),
            check(60, HealthStatus::Critical, Some(30)),
            check(120, HealthStatus::Degraded, None),
            check(400, HealthStatus::Healthy, Some(5)),
        ];
        let b = health_buckets(&w, &checks);
        assert_eq!(b.len(), 2);
        assert_eq!(
            (
                b[0].checks,
                b[0].worst,
                b[0].avg_response_ms,
                b[0].max_response_ms
            ),
            (3, HealthStatus::Critical, Some(20.0), Some(30))
        );
        assert_eq!(
            b[0].failures,
            checks[..3].iter().filter(|c| !c.successful).count() as u32
        );
        assert_eq!((b[1].start, b[1].checks), (from + Duration::minutes(5), 1));
    }
}
