//! The rollup job and the rollup reads. Each run rolls the closed 5-minute periods of raw
//! history (at most an hour of them) into `server_health_rollups` and
//! `server_metrics_rollups`, then the closed hours from the 5-minute rows, and moves
//! `rollup_progress` in the same transaction: a period is rolled up exactly once, whether a run
//! is cut short, retried or run by two processes at once. Never a re-scan of all history.

use std::collections::BTreeMap;

use fleet_core::rollup::{
    COUNTERS, GAUGES, Gauge, HealthRollup, MetricsRollup, RESPONSE_BUCKETS_MS, Resolution,
    ResponseTimes, StatusCounts, p95,
};
use fleet_core::{HistoryQuery, ServerId, StoreError};
use time::{Duration, OffsetDateTime};
use tokio_postgres::Row;

use crate::partitions::{TIER_1H, TIER_5M, YearMonth, day_create_sql, day_partition};
use crate::store::{PARTITION_LOCK, PgStore, db_error, relation_kinds};

/// How long after a period ends it is rolled up: results written later than this (after a
/// longer database outage) stay in the raw window but are not in the rollups.
pub const SETTLE: Duration = Duration::minutes(5);

/// What one run rolled up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RollupReport {
    /// 5-minute periods rolled up.
    pub five_minute_periods: u32,
    /// Hours rolled up.
    pub hours: u32,
    /// Everything before this is rolled up into 5-minute rows.
    pub rolled_5m: Option<OffsetDateTime>,
    /// Everything before this is rolled up into hourly rows.
    pub rolled_1h: Option<OffsetDateTime>,
}

/// Where the tiers stand.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RollupMarks {
    /// The first 5-minute period rolled up (the hourly tier starts there too).
    pub from_5m: Option<OffsetDateTime>,
    /// Everything before this (from `from_5m`) is in 5-minute rows.
    pub until_5m: Option<OffsetDateTime>,
    /// Everything before this (from `from_5m`) is in hourly rows.
    pub until_1h: Option<OffsetDateTime>,
}

/// The 5-minute tier's stored percentages are hundredths of a percent.
const PERCENT_GAUGES: [(&str, &str); 3] = [
    ("cpu_percent", "cpu"),
    ("memory_percent", "memory"),
    ("disk_percent", "disk"),
];

/// Gauges stored as they are, by their raw names.
const COUNT_GAUGES: [&str; 5] = [
    "active_services",
    "failed_services",
    "total_services",
    "active_users",
    "total_users",
];

const ORIGIN: &str = "TIMESTAMPTZ '2000-01-01 00:00:00+00'";

fn histogram_sql() -> String {
    let mut lower: Option<u32> = None;
    let mut parts = Vec::new();
    for upper in RESPONSE_BUCKETS_MS {
        parts.push(match lower {
            None => format!("count(*) FILTER (WHERE response_time_ms <= {upper})"),
            Some(l) => format!(
                "count(*) FILTER (WHERE response_time_ms > {l} AND response_time_ms <= {upper})"
            ),
        });
        lower = Some(upper);
    }
    parts.push(format!(
        "count(*) FILTER (WHERE response_time_ms > {})",
        lower.unwrap_or(0)
    ));
    parts.join(", ")
}

fn health_5m_sql() -> String {
    format!(
        "INSERT INTO server_health_rollups_5m (server_id, res, period_start, healthy, degraded, critical, \
             unreachable, rt_count, rt_min, rt_max, rt_sum, h0, h1, h2, h3, h4, h5, h6, h7, h8, h9, last_error) \
         SELECT server_id, 'm', date_bin('5 minutes', timestamp, {ORIGIN}), \
             count(*) FILTER (WHERE status = 'healthy'), count(*) FILTER (WHERE status = 'degraded'), \
             count(*) FILTER (WHERE status = 'critical'), count(*) FILTER (WHERE status = 'unreachable'), \
             count(response_time_ms), min(response_time_ms), max(response_time_ms), \
             coalesce(sum(response_time_ms), 0), {}, \
             (array_agg(error_message ORDER BY timestamp DESC) FILTER (WHERE error_message IS NOT NULL))[1] \
         FROM server_health_checks WHERE timestamp >= $1 AND timestamp < $2 \
         GROUP BY server_id, 3 \
         ON CONFLICT (server_id, period_start) DO NOTHING",
        histogram_sql()
    )
}

fn health_1h_sql() -> String {
    let hist: Vec<String> = (0..10)
        .map(|i| format!("least(sum(h{i}), 32767)"))
        .collect();
    format!(
        "INSERT INTO server_health_rollups_1h (server_id, res, period_start, healthy, degraded, critical, \
             unreachable, rt_count, rt_min, rt_max, rt_sum, h0, h1, h2, h3, h4, h5, h6, h7, h8, h9, last_error) \
         SELECT server_id, 'h', date_bin('1 hour', period_start, {ORIGIN}), \
             least(sum(healthy), 32767), least(sum(degraded), 32767), \
             least(sum(critical), 32767), least(sum(unreachable), 32767), \
             least(sum(rt_count), 32767), min(rt_min), max(rt_max), sum(rt_sum), {}, \
             (array_agg(last_error ORDER BY period_start DESC) FILTER (WHERE last_error IS NOT NULL))[1] \
         FROM server_health_rollups_5m WHERE period_start >= $1 AND period_start < $2 \
         GROUP BY server_id, 3 \
         ON CONFLICT (server_id, period_start) DO NOTHING",
        hist.join(", ")
    )
}

/// A counter's increase over consecutive samples: the step, or after a drop the new value
/// (a restart from zero); a first sample counts nothing but marks the counter as present.
fn increase_sql(c: &str) -> String {
    format!(
        "sum(CASE WHEN {c} IS NULL THEN NULL WHEN p_{c} IS NULL THEN 0 \
                  WHEN {c} >= p_{c} THEN {c} - p_{c} ELSE {c} END)"
    )
}

fn metrics_columns() -> Vec<String> {
    let mut cols = vec!["samples".to_owned()];
    for (_, short) in PERCENT_GAUGES {
        for stat in ["min", "mean", "max"] {
            cols.push(format!("{short}_{stat}"));
        }
    }
    for g in COUNT_GAUGES {
        for stat in ["min", "mean", "max"] {
            cols.push(format!("{g}_{stat}"));
        }
    }
    for c in COUNTERS {
        cols.push(format!("{c}_increase"));
    }
    cols
}

fn metrics_5m_sql() -> String {
    let pct = |e: String| format!("least(greatest(round({e} * 100), -32768), 32767)::int2");
    let mut select = vec!["count(*)".to_owned()];
    for (raw, _) in PERCENT_GAUGES {
        select.push(pct(format!("min({raw})")));
        select.push(pct(format!("avg({raw})")));
        select.push(pct(format!("max({raw})")));
    }
    for g in COUNT_GAUGES {
        let narrow = |e: String| {
            if g.ends_with("_services") {
                format!("least(greatest({e}, -32768), 32767)")
            } else {
                e
            }
        };
        select.push(narrow(format!("min({g})")));
        select.push(format!("avg({g})"));
        select.push(narrow(format!("max({g})")));
    }
    for c in COUNTERS {
        select.push(increase_sql(c));
    }
    let lags: Vec<String> = COUNTERS
        .iter()
        .map(|c| format!("lag({c}) OVER w AS p_{c}"))
        .collect();
    format!(
        "WITH s AS ( \
             SELECT *, {} FROM server_metrics_aggregated \
             WHERE period = 'raw' AND timestamp >= $1::timestamptz - interval '10 minutes' AND timestamp < $2 \
             WINDOW w AS (PARTITION BY server_id ORDER BY timestamp)) \
         INSERT INTO server_metrics_rollups_5m (server_id, res, period_start, {}) \
         SELECT server_id, 'm', date_bin('5 minutes', timestamp, {ORIGIN}), {} \
         FROM s WHERE timestamp >= $1 \
         GROUP BY server_id, 3 \
         ON CONFLICT (server_id, period_start) DO NOTHING",
        lags.join(", "),
        metrics_columns().join(", "),
        select.join(", ")
    )
}

fn metrics_1h_sql() -> String {
    let mut select = vec!["sum(samples)".to_owned()];
    let gauges = PERCENT_GAUGES
        .iter()
        .map(|(_, short)| (*short, true))
        .chain(COUNT_GAUGES.iter().map(|g| (*g, false)));
    for (g, percent) in gauges {
        let mean = format!(
            "sum({g}_mean::float8 * samples) / nullif(sum(samples) FILTER (WHERE {g}_mean IS NOT NULL), 0)"
        );
        select.push(format!("min({g}_min)"));
        select.push(if percent {
            format!("round({mean})::int2")
        } else {
            mean
        });
        select.push(format!("max({g}_max)"));
    }
    for c in COUNTERS {
        select.push(format!("sum({c}_increase)"));
    }
    format!(
        "INSERT INTO server_metrics_rollups_1h (server_id, res, period_start, {}) \
         SELECT server_id, 'h', date_bin('1 hour', period_start, {ORIGIN}), {} \
         FROM server_metrics_rollups_5m WHERE period_start >= $1 AND period_start < $2 \
         GROUP BY server_id, 3 \
         ON CONFLICT (server_id, period_start) DO NOTHING",
        metrics_columns().join(", "),
        select.join(", ")
    )
}

impl PgStore {
    /// One run of the rollup job: the closed 5-minute periods not yet rolled up (at most an
    /// hour of them), then the closed hours (at most a day), each written with its progress
    /// mark in one transaction. In a shared fleet only the leader rolls up, under its fence.
    pub async fn roll_up(&self) -> Result<RollupReport, StoreError> {
        let now = self.clock_now();
        let (marked_5m, marked_1h) = self.rolled_until().await?;
        // The first run starts at the oldest raw day holding rows (those are what the raw
        // window drops, and only once rolled up), or a raw window back.
        let first = match (marked_5m, marked_1h) {
            (Some(_), Some(_)) => now,
            _ => match self.oldest_raw_day().await? {
                Some(day) => day,
                None => Resolution::Hour
                    .floor(now - self.policy().raw_window().unwrap_or(Duration::hours(48))),
            },
        };
        let from_5m = marked_5m.unwrap_or(first);
        let to_5m = (from_5m + Duration::hours(1)).min(Resolution::FiveMinutes.floor(now - SETTLE));
        let from_1h = marked_1h.unwrap_or(first);
        let to_1h = (from_1h + Duration::days(1)).min(Resolution::Hour.floor(to_5m.max(from_5m)));
        if to_5m <= from_5m && to_1h <= from_1h {
            // No period has closed since the last run (four runs in five): no transaction.
            return Ok(RollupReport {
                rolled_5m: marked_5m,
                rolled_1h: marked_1h,
                ..RollupReport::default()
            });
        }
        // The tiers' partitions are made first, in a short transaction of their own: making
        // one locks its parent, which must not wait for (or hold up) the rollup itself.
        let days: Vec<time::Date> = std::iter::successors(Some(from_5m.date()), |d| d.next_day())
            .take_while(|d| d.midnight().assume_utc() < to_5m)
            .collect();
        let months: Vec<YearMonth> = if to_1h > from_1h {
            let (a, b) = (
                YearMonth::of(from_1h),
                YearMonth::of(to_1h - Duration::seconds(1)),
            );
            std::iter::successors(Some(a), |m| (*m < b).then(|| m.plus(1))).collect()
        } else {
            Vec::new()
        };
        self.ensure_tier_partitions(&days, &months).await?;
        self.roll_up_prepared(marked_5m, (from_5m, to_5m), marked_1h, (from_1h, to_1h))
            .await
    }

    /// The rollup transaction, once the partitions exist. The progress marks are read again
    /// under lock: another run may have moved them meanwhile.
    async fn roll_up_prepared(
        &self,
        marked_5m: Option<OffsetDateTime>,
        (from_5m, to_5m): (OffsetDateTime, OffsetDateTime),
        marked_1h: Option<OffsetDateTime>,
        (from_1h, to_1h): (OffsetDateTime, OffsetDateTime),
    ) -> Result<RollupReport, StoreError> {
        let mut report = RollupReport::default();
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        if !self.leader_fence(&tx).await? {
            return Ok(report);
        }
        let rows = tx
            .query(
                "SELECT tier, rolled_until FROM rollup_progress ORDER BY tier FOR UPDATE",
                &[],
            )
            .await
            .map_err(db_error)?;
        let marks: BTreeMap<String, Option<OffsetDateTime>> =
            rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let unchanged =
            |tier: &str, seen: Option<OffsetDateTime>| marks.get(tier).copied().flatten() == seen;
        if !unchanged("5m", marked_5m) || !unchanged("1h", marked_1h) {
            // Another run got there first: the next run goes on from its marks.
            return Ok(report);
        }
        if to_5m > from_5m {
            tx.execute(&health_5m_sql(), &[&from_5m, &to_5m])
                .await
                .map_err(db_error)?;
            tx.execute(&metrics_5m_sql(), &[&from_5m, &to_5m])
                .await
                .map_err(db_error)?;
            tx.execute(
                "UPDATE rollup_progress SET rolled_until = $1, rolled_from = coalesce(rolled_from, $2) \
                 WHERE tier = '5m'",
                &[&to_5m, &from_5m],
            )
            .await
            .map_err(db_error)?;
            report.five_minute_periods = ((to_5m - from_5m).whole_minutes() / 5) as u32;
        }
        let rolled_5m = to_5m.max(from_5m);
        let to_1h = to_1h.min(Resolution::Hour.floor(rolled_5m));
        if to_1h > from_1h {
            tx.execute(&health_1h_sql(), &[&from_1h, &to_1h])
                .await
                .map_err(db_error)?;
            tx.execute(&metrics_1h_sql(), &[&from_1h, &to_1h])
                .await
                .map_err(db_error)?;
            crate::llm::mark_hours(&tx, from_1h, to_1h).await?;
            tx.execute(
                "UPDATE rollup_progress SET rolled_until = $1, rolled_from = coalesce(rolled_from, $2) \
                 WHERE tier = '1h'",
                &[&to_1h, &from_1h],
            )
            .await
            .map_err(db_error)?;
            report.hours = (to_1h - from_1h).whole_hours() as u32;
        }
        tx.commit().await.map_err(db_error)?;
        report.rolled_5m = Some(rolled_5m);
        report.rolled_1h = Some(to_1h.max(from_1h));
        if report.five_minute_periods > 0 || report.hours > 0 {
            tracing::debug!(target: "fleet::pg", periods = report.five_minute_periods, hours = report.hours, "history rolled up");
        }
        Ok(report)
    }

    /// The start of the oldest day partition of raw history that holds a row.
    async fn oldest_raw_day(&self) -> Result<Option<OffsetDateTime>, StoreError> {
        let client = self.client().await?;
        let mut oldest: Option<time::Date> = None;
        for table in crate::partitions::SPLIT_BY_DAY {
            let rows = client
                .query(
                    "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
                     JOIN pg_inherits i2 ON i2.inhrelid = i.inhparent JOIN pg_class p ON p.oid = i2.inhparent \
                     WHERE p.relname = $1",
                    &[&table],
                )
                .await
                .map_err(db_error)?;
            let mut days: Vec<(time::Date, String)> = rows
                .iter()
                .filter_map(|r| {
                    let name: String = r.get(0);
                    crate::partitions::day_from_partition(table, &name).map(|d| (d, name))
                })
                .collect();
            days.sort();
            for (day, name) in days {
                if oldest.is_some_and(|o| o <= day) {
                    break;
                }
                let filled: bool = client
                    .query_one(&format!("SELECT EXISTS (SELECT 1 FROM {name})"), &[])
                    .await
                    .map_err(db_error)?
                    .get(0);
                if filled {
                    oldest = Some(day);
                    break;
                }
            }
        }
        Ok(oldest.map(|d| d.midnight().assume_utc()))
    }

    /// Makes the 5-minute tier's `days` and the hourly tier's `months`, if missing.
    async fn ensure_tier_partitions(
        &self,
        days: &[time::Date],
        months: &[YearMonth],
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK])
            .await
            .map_err(db_error)?;
        let kinds = relation_kinds(&tx).await?;
        for table in TIER_5M {
            for day in days {
                let name = day_partition(table, *day);
                if !kinds.contains_key(&name) {
                    tx.batch_execute(&day_create_sql(table, &name, *day))
                        .await
                        .map_err(db_error)?;
                }
            }
        }
        for table in TIER_1H {
            for month in months {
                if !kinds.contains_key(&month.partition(table)) {
                    tx.batch_execute(&month.create_sql(table))
                        .await
                        .map_err(db_error)?;
                }
            }
        }
        tx.commit().await.map_err(db_error)
    }

    /// How far each tier is rolled up: (5 minutes, hours).
    pub async fn rolled_until(
        &self,
    ) -> Result<(Option<OffsetDateTime>, Option<OffsetDateTime>), StoreError> {
        let m = self.rollup_marks().await?;
        Ok((m.until_5m, m.until_1h))
    }

    /// Where each tier's rollups start and end.
    pub(crate) async fn rollup_marks(&self) -> Result<RollupMarks, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT tier, rolled_from, rolled_until FROM rollup_progress",
                &[],
            )
            .await
            .map_err(db_error)?;
        let mark = |tier: &str, col: usize| {
            rows.iter()
                .find(|r| r.get::<_, String>(0) == tier)
                .and_then(|r| r.get::<_, Option<OffsetDateTime>>(col))
        };
        Ok(RollupMarks {
            from_5m: mark("5m", 1),
            until_5m: mark("5m", 2),
            until_1h: mark("1h", 2),
        })
    }

    pub(crate) async fn read_health_rollups(
        &self,
        id: ServerId,
        res: Resolution,
        query: HistoryQuery,
    ) -> Result<Vec<HealthRollup>, StoreError> {
        let Some(table) = tier_table("server_health_rollups", res) else {
            return Ok(Vec::new());
        };
        let counts: Vec<String> = ["healthy", "degraded", "critical", "unreachable", "rt_count"]
            .iter()
            .map(|c| format!("{c}::int4"))
            .collect();
        let hist: Vec<String> = (0..10).map(|i| format!("h{i}::int4")).collect();
        let columns = format!(
            "period_start, {}, rt_min, rt_max, rt_sum, {}, last_error",
            counts.join(", "),
            hist.join(", ")
        );
        let rows = self.read_tier(table, &columns, id, query).await?;
        Ok(rows.iter().map(health_rollup).collect())
    }

    pub(crate) async fn read_metrics_rollups(
        &self,
        id: ServerId,
        res: Resolution,
        query: HistoryQuery,
    ) -> Result<Vec<MetricsRollup>, StoreError> {
        let Some(table) = tier_table("server_metrics_rollups", res) else {
            return Ok(Vec::new());
        };
        // Service counts are stored narrow; read back as integers like the users'.
        let read: Vec<String> = metrics_columns()
            .into_iter()
            .map(|c| {
                let narrow = c.contains("_services_") && !c.ends_with("_mean");
                if narrow { format!("{c}::int4") } else { c }
            })
            .collect();
        let columns = format!("period_start, {}", read.join(", "));
        let rows = self.read_tier(table, &columns, id, query).await?;
        Ok(rows.iter().map(metrics_rollup).collect())
    }

    async fn read_tier(
        &self,
        table: &str,
        columns: &str,
        id: ServerId,
        query: HistoryQuery,
    ) -> Result<Vec<Row>, StoreError> {
        let client = self.client().await?;
        let lo = query.from.unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let hi = query
            .to
            .unwrap_or(time::macros::datetime!(9999-01-01 0:00 UTC));
        client
            .query(
                &format!(
                    "SELECT {columns} FROM {table} WHERE server_id = $1 AND period_start >= $2 \
                     AND period_start < $3 ORDER BY period_start DESC LIMIT $4"
                ),
                &[&id.0, &lo, &hi, &(query.limit as i64)],
            )
            .await
            .map_err(db_error)
    }
}

fn tier_table(base: &str, res: Resolution) -> Option<&'static str> {
    Some(match (base, res) {
        (_, Resolution::Raw) => return None,
        ("server_health_rollups", Resolution::FiveMinutes) => "server_health_rollups_5m",
        ("server_health_rollups", Resolution::Hour) => "server_health_rollups_1h",
        (_, Resolution::FiveMinutes) => "server_metrics_rollups_5m",
        (_, Resolution::Hour) => "server_metrics_rollups_1h",
    })
}

fn health_rollup(r: &Row) -> HealthRollup {
    let n = |i: usize| r.get::<_, i32>(i).max(0) as u32;
    let mut hist = [0u32; 10];
    for (k, h) in hist.iter_mut().enumerate() {
        *h = n(9 + k);
    }
    let rt_count = n(5);
    let rt_min: Option<i32> = r.get(6);
    let rt_max: Option<i32> = r.get(7);
    let rt_sum: i64 = r.get(8);
    HealthRollup {
        period_start: r.get(0),
        checks: StatusCounts {
            healthy: n(1),
            degraded: n(2),
            critical: n(3),
            unreachable: n(4),
        },
        response_time_ms: match (rt_min, rt_max) {
            (Some(min), Some(max)) if rt_count > 0 => Some(ResponseTimes {
                min: min.max(0) as u32,
                mean: rt_sum as f64 / f64::from(rt_count),
                p95: p95(&hist, max.max(0) as u32).unwrap_or(max.max(0) as u32),
                max: max.max(0) as u32,
            }),
            _ => None,
        },
        last_error: r.get(19),
    }
}

fn metrics_rollup(r: &Row) -> MetricsRollup {
    let mut out = MetricsRollup {
        period_start: r.get(0),
        samples: r.get::<_, i32>(1).max(0) as u32,
        ..Default::default()
    };
    let mut col = 2;
    for (raw, _) in PERCENT_GAUGES {
        let v = |i: usize| r.get::<_, Option<i16>>(i).map(|v| f64::from(v) / 100.0);
        if let (Some(min), Some(mean), Some(max)) = (v(col), v(col + 1), v(col + 2)) {
            out.gauges.insert(raw, Gauge { min, mean, max });
        }
        col += 3;
    }
    for g in COUNT_GAUGES {
        let min = r.get::<_, Option<i32>>(col).map(f64::from);
        let mean = r.get::<_, Option<f32>>(col + 1).map(f64::from);
        let max = r.get::<_, Option<i32>>(col + 2).map(f64::from);
        if let (Some(min), Some(mean), Some(max)) = (min, mean, max) {
            let name = GAUGES.iter().find(|n| **n == g).copied().unwrap_or(g);
            out.gauges.insert(name, Gauge { min, mean, max });
        }
        col += 3;
    }
    for c in COUNTERS {
        let v = if c == "llm_cost_usd" {
            r.get::<_, Option<f64>>(col)
        } else {
            r.get::<_, Option<i64>>(col).map(|v| v as f64)
        };
        if let Some(v) = v {
            out.counters.insert(c, v);
        }
        col += 1;
    }
    out
}
