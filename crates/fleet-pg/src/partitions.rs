//! Partitions: names, bounds (UTC), premaking, retention and the seed's health check. Raw
//! history is partitioned by month and each month by day; the rollup tiers by day (5 minutes)
//! and by month (hours).

use time::{Date, Duration, Month, OffsetDateTime, UtcOffset};

/// The partitioned tables: health history, metrics history and the state-change log.
pub const PARTITIONED: [&str; 3] = [
    "server_health_checks",
    "server_metrics_aggregated",
    "server_state_changes",
];

/// The raw tables whose months are split by day, so that rows past the raw window go a day
/// at a time.
pub const SPLIT_BY_DAY: [&str; 2] = [PARTITIONED[0], PARTITIONED[1]];

/// The 5-minute rollup tier's tables, partitioned by day.
pub const TIER_5M: [&str; 2] = ["server_health_rollups_5m", "server_metrics_rollups_5m"];

/// The hourly rollup tier's tables, partitioned by month, and the running LLM totals kept
/// as long.
pub const TIER_1H: [&str; 3] = [
    "server_health_rollups_1h",
    "server_metrics_rollups_1h",
    "server_llm_marks",
];

/// A day's partition of `table`: `table_YYYY_MM_DD`.
pub fn day_partition(table: &str, day: Date) -> String {
    format!(
        "{table}_{:04}_{:02}_{:02}",
        day.year(),
        day.month() as u8,
        day.day()
    )
}

/// Reads the day back from a day partition's name.
pub fn day_from_partition(table: &str, name: &str) -> Option<Date> {
    let rest = name.strip_prefix(table)?.strip_prefix('_')?;
    let mut parts = rest.split('_');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return None;
    }
    let month = Month::try_from(m.parse::<u8>().ok()?).ok()?;
    Date::from_calendar_date(y.parse().ok()?, month, d.parse().ok()?).ok()
}

/// The statement that makes `day`'s partition `name` of `parent`, if missing.
pub fn day_create_sql(parent: &str, name: &str, day: Date) -> String {
    let fmt = |d: Date| {
        format!(
            "{:04}-{:02}-{:02} 00:00:00+00",
            d.year(),
            d.month() as u8,
            d.day()
        )
    };
    let next = day.next_day().expect("a day after any stored one");
    format!(
        "CREATE TABLE IF NOT EXISTS {name} PARTITION OF {parent} FOR VALUES FROM ('{}') TO ('{}')",
        fmt(day),
        fmt(next)
    )
}

/// Every day of a month.
pub fn days_of(month: YearMonth) -> impl Iterator<Item = Date> {
    let first = month.start().date();
    let next = month.plus(1).start().date();
    std::iter::successors(Some(first), |d| d.next_day()).take_while(move |d| *d < next)
}

/// What the partition lifecycle keeps. Plain data with the documented defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionPolicy {
    /// Months made ahead of the current one. Default 3.
    pub premake_months: u32,
    /// Months of health checks kept before the current one; 0 keeps forever. Default 3.
    pub health_retention_months: u32,
    /// Months of metrics kept before the current one; 0 keeps forever. Default 13.
    pub metrics_retention_months: u32,
    /// Hours of raw health checks and metrics samples kept, dropped a day partition at a
    /// time once rolled up; 0 keeps raw rows for the monthly retentions above. Default 48.
    pub raw_retention_hours: u32,
    /// Days of 5-minute rollups kept. Default 7.
    pub rollup_5m_retention_days: u32,
    /// Months of hourly rollups (and of the state-change log) kept before the current one;
    /// 0 keeps forever. Default 13.
    pub rollup_1h_retention_months: u32,
}

impl PartitionPolicy {
    /// Months of the state-change log kept: as long as the hourly tier, and never less than
    /// the raw history (forever when either is kept forever).
    pub fn change_log_retention_months(&self) -> u32 {
        let raw = if self.health_retention_months == 0 || self.metrics_retention_months == 0 {
            0
        } else {
            self.health_retention_months
                .max(self.metrics_retention_months)
        };
        if raw == 0 || self.rollup_1h_retention_months == 0 {
            0
        } else {
            raw.max(self.rollup_1h_retention_months)
        }
    }

    /// How long raw rows stay, `None` when they stay for the monthly retentions.
    pub fn raw_window(&self) -> Option<Duration> {
        (self.raw_retention_hours > 0).then(|| Duration::hours(i64::from(self.raw_retention_hours)))
    }
}

impl Default for PartitionPolicy {
    fn default() -> Self {
        Self {
            premake_months: 3,
            health_retention_months: 3,
            metrics_retention_months: 13,
            raw_retention_hours: 48,
            rollup_5m_retention_days: 7,
            rollup_1h_retention_months: 13,
        }
    }
}

/// A calendar month, in UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct YearMonth {
    /// The year.
    pub year: i32,
    /// 1 to 12.
    pub month: u8,
}

impl YearMonth {
    /// The month `at` falls in, in UTC.
    pub fn of(at: OffsetDateTime) -> Self {
        let at = at.to_offset(UtcOffset::UTC);
        Self {
            year: at.year(),
            month: at.month() as u8,
        }
    }

    /// `n` months later (or earlier, for negative `n`).
    pub fn plus(self, n: i32) -> Self {
        let index = self.year * 12 + i32::from(self.month) - 1 + n;
        Self {
            year: index.div_euclid(12),
            month: (index.rem_euclid(12) + 1) as u8,
        }
    }

    /// Midnight UTC on the month's first day.
    pub fn start(self) -> OffsetDateTime {
        let month = Month::try_from(self.month).expect("months are 1 to 12");
        Date::from_calendar_date(self.year, month, 1)
            .expect("the first of a month is a date")
            .midnight()
            .assume_utc()
    }

    /// The partition of `table` for this month: `table_YYYY_MM`.
    pub fn partition(self, table: &str) -> String {
        format!("{table}_{:04}_{:02}", self.year, self.month)
    }

    /// Reads the month back from a partition name of `table`.
    pub fn from_partition(table: &str, name: &str) -> Option<Self> {
        let rest = name.strip_prefix(table)?.strip_prefix('_')?;
        let (y, m) = rest.split_once('_')?;
        if y.len() != 4 || m.len() != 2 {
            return None;
        }
        let ym = Self {
            year: y.parse().ok()?,
            month: m.parse().ok()?,
        };
        (1..=12).contains(&ym.month).then_some(ym)
    }

    /// The statement that makes this month's partition of `table`, if missing; split by day
    /// for the raw tables of [`SPLIT_BY_DAY`].
    pub fn create_sql(self, table: &str) -> String {
        let fmt =
            |t: OffsetDateTime| format!("{:04}-{:02}-01 00:00:00+00", t.year(), t.month() as u8);
        let split = if SPLIT_BY_DAY.contains(&table) {
            " PARTITION BY RANGE (timestamp)"
        } else {
            ""
        };
        format!(
            "CREATE TABLE IF NOT EXISTS {} PARTITION OF {table} FOR VALUES FROM ('{}') TO ('{}'){split}",
            self.partition(table),
            fmt(self.start()),
            fmt(self.plus(1).start()),
        )
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    #[test]
    fn months_roll_over_years() {
        let dec = YearMonth {
            year: 2026,
            month: 12,
        };
        assert_eq!(
            dec.plus(1),
            YearMonth {
                year: 2027,
                month: 1
            }
        );
        assert_eq!(
            dec.plus(-12),
            YearMonth {
                year: 2025,
                month: 12
            }
        );
        assert_eq!(
            YearMonth {
                year: 2026,
                month: 1
            }
            .plus(-1),
            YearMonth {
                year: 2025,
                month: 12
            }
        );
        assert_eq!(dec.plus(1).start(), datetime!(2027-01-01 00:00 UTC));
    }

    #[test]
    fn day_partitions_are_named_bounded_and_read_back() {
        let day = time::macros::date!(2026 - 02 - 28);
        let name = day_partition("server_health_checks", day);
        assert_eq!(name, "server_health_checks_2026_02_28");
        assert_eq!(day_from_partition("server_health_checks", &name), Some(day));
        assert_eq!(
            day_from_partition("server_health_checks", "server_health_checks_2026_02"),
            None
        );
        assert_eq!(
            day_from_partition("server_health_checks", "server_health_checks_2026_02_30"),
            None
        );
        assert_eq!(
            day_create_sql("t_2026_02", "t_2026_02_28", day),
            "CREATE TABLE IF NOT EXISTS t_2026_02_28 PARTITION OF t_2026_02 FOR VALUES FROM ('2026-02-28 00:00:00+00') TO ('2026-03-01 00:00:00+00')"
        );
        let feb = YearMonth {
            year: 2028,
            month: 2,
        };
        assert_eq!(days_of(feb).count(), 29, "a leap year");
        assert!(
            feb.create_sql("server_metrics_aggregated")
                .ends_with("PARTITION BY RANGE (timestamp)")
        );
    }

    #[test]
    fn month_is_taken_in_utc() {
        let late = datetime!(2026-01-31 23:30 -02:00);
        assert_eq!(
            YearMonth::of(late),
            YearMonth {
                year: 2026,
                month: 2
            }
        );
    }

    #[test]
    fn partition_names_round_trip() {
        let ym = YearMonth {
            year: 2026,
            month: 2,
        };
        let name = ym.partition("server_metrics_aggregated");
        assert_eq!(name, "server_metrics_aggregated_2026_02");
        assert_eq!(
            YearMonth::from_partition("server_metrics_aggregated", &name),
            Some(ym)
        );
        assert_eq!(
            YearMonth::from_partition(
                "server_metrics_aggregated",
                "server_metrics_aggregated_2026_13"
            ),
            None
        );
        assert_eq!(
            YearMonth::from_partition("server_health_checks", &name),
            None
        );
        assert_eq!(
            ym.create_sql("t"),
            "CREATE TABLE IF NOT EXISTS t_2026_02 PARTITION OF t FOR VALUES FROM ('2026-02-01 00:00:00+00') TO ('2026-03-01 00:00:00+00')"
        );
    }
}
