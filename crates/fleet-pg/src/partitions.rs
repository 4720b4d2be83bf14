//! Monthly partitions: names, bounds (UTC), premaking, retention and the seed's health check.

use time::{Date, Month, OffsetDateTime, UtcOffset};

/// The partitioned tables: health history, metrics history and the state-change log.
pub const PARTITIONED: [&str; 3] = [
    "server_health_checks",
    "server_metrics_aggregated",
    "server_state_changes",
];

/// What the partition lifecycle keeps. Plain data with the documented defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionPolicy {
    /// Months made ahead of the current one. Default 3.
    pub premake_months: u32,
    /// Months of health checks kept before the current one; 0 keeps forever. Default 3.
    pub health_retention_months: u32,
    /// Months of metrics kept before the current one; 0 keeps forever. Default 13.
    pub metrics_retention_months: u32,
}

impl PartitionPolicy {
    /// Months of the state-change log kept: as long as the longest history tier, and forever
    /// when either tier is kept forever.
    pub fn change_log_retention_months(&self) -> u32 {
        if self.health_retention_months == 0 || self.metrics_retention_months == 0 {
            0
        } else {
            self.health_retention_months
                .max(self.metrics_retention_months)
        }
    }
}

impl Default for PartitionPolicy {
    fn default() -> Self {
        Self {
            premake_months: 3,
            health_retention_months: 3,
            metrics_retention_months: 13,
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

    /// The statement that makes this month's partition of `table`, if missing.
    pub fn create_sql(self, table: &str) -> String {
        let fmt =
            |t: OffsetDateTime| format!("{:04}-{:02}-01 00:00:00+00", t.year(), t.month() as u8);
        format!(
            "CREATE TABLE IF NOT EXISTS {} PARTITION OF {table} FOR VALUES FROM ('{}') TO ('{}')",
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
