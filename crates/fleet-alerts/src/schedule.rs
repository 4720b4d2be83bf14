//! When a maintenance window is open: once, or weekly at a local time in an IANA zone.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// A weekly window may last at most a week.
pub const MAX_DURATION_SECONDS: u64 = 7 * 24 * 3600;

/// A window's times.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Schedule {
    /// From one time to another.
    Once {
        /// From.
        #[serde(with = "time::serde::rfc3339")]
        starts_at: OffsetDateTime,
        /// Until (exclusive).
        #[serde(with = "time::serde::rfc3339")]
        ends_at: OffsetDateTime,
    },
    /// On these weekdays at a local time, for a duration.
    Weekly(Weekly),
}

/// A weekly window, e.g. Saturdays 02:00 for two hours, Berlin time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Weekly {
    /// `mon` … `sun`.
    pub weekdays: Vec<String>,
    /// `HH:MM`, local time.
    pub start_time: String,
    /// How long, in seconds.
    pub duration_seconds: u64,
    /// An IANA zone, e.g. `Europe/Berlin`.
    pub time_zone: String,
}

/// Why a schedule is refused: the field, and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct BadSchedule {
    /// The field.
    pub field: &'static str,
    /// What is wrong.
    pub message: String,
}

fn bad(field: &'static str, message: impl Into<String>) -> BadSchedule {
    BadSchedule {
        field,
        message: message.into(),
    }
}

const DAYS: [(&str, jiff::civil::Weekday); 7] = [
    ("mon", jiff::civil::Weekday::Monday),
    ("tue", jiff::civil::Weekday::Tuesday),
    ("wed", jiff::civil::Weekday::Wednesday),
    ("thu", jiff::civil::Weekday::Thursday),
    ("fri", jiff::civil::Weekday::Friday),
    ("sat", jiff::civil::Weekday::Saturday),
    ("sun", jiff::civil::Weekday::Sunday),
];

/// A checked weekly window, ready to evaluate.
#[derive(Clone, Debug)]
struct Parsed {
    days: Vec<jiff::civil::Weekday>,
    start: jiff::civil::Time,
    duration: i64,
    zone: jiff::tz::TimeZone,
}

impl Weekly {
    /// Checks every field.
    pub fn validate(&self) -> Result<(), BadSchedule> {
        self.parse().map(|_| ())
    }

    fn parse(&self) -> Result<Parsed, BadSchedule> {
        if self.weekdays.is_empty() {
            return Err(bad("weekdays", "name at least one day (mon … sun)"));
        }
        let mut days = Vec::new();
        for d in &self.weekdays {
            let Some((_, w)) = DAYS.iter().find(|(n, _)| n.eq_ignore_ascii_case(d)) else {
                return Err(bad(
                    "weekdays",
                    format!("unknown day `{d}`, expected mon, tue, wed, thu, fri, sat or sun"),
                ));
            };
            days.push(*w);
        }
        let start = parse_hhmm(&self.start_time)
            .ok_or_else(|| bad("start_time", "expected HH:MM, e.g. 02:00"))?;
        if self.duration_seconds == 0 || self.duration_seconds > MAX_DURATION_SECONDS {
            return Err(bad(
                "duration_seconds",
                format!("must be between 1 and {MAX_DURATION_SECONDS}"),
            ));
        }
        let zone = jiff::tz::TimeZone::get(&self.time_zone).map_err(|_| {
            bad(
                "time_zone",
                format!("unknown time zone `{}`", self.time_zone),
            )
        })?;
        Ok(Parsed {
            days,
            start,
            duration: self.duration_seconds as i64,
            zone,
        })
    }
}

fn parse_hhmm(s: &str) -> Option<jiff::civil::Time> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let h: i8 = h.parse().ok()?;
    let m: i8 = m.parse().ok()?;
    jiff::civil::Time::new(h, m, 0, 0).ok()
}

impl Schedule {
    /// Checks the schedule.
    pub fn validate(&self) -> Result<(), BadSchedule> {
        match self {
            Schedule::Once { starts_at, ends_at } if ends_at <= starts_at => {
                Err(bad("ends_at", "must be after starts_at"))
            }
            Schedule::Once { .. } => Ok(()),
            Schedule::Weekly(w) => w.validate(),
        }
    }

    /// Whether the window is open at `now`.
    pub fn contains(&self, now: OffsetDateTime) -> bool {
        self.open_at(now).is_some()
    }

    /// When the window open at `now` ends, if one is.
    pub fn open_at(&self, now: OffsetDateTime) -> Option<OffsetDateTime> {
        match self {
            Schedule::Once { starts_at, ends_at } => {
                (*starts_at <= now && now < *ends_at).then_some(*ends_at)
            }
            Schedule::Weekly(w) => {
                let p = w.parse().ok()?;
                let ts = jiff::Timestamp::from_second(now.unix_timestamp()).ok()?;
                let today = ts.to_zoned(p.zone.clone()).date();
                // A window that started up to its duration ago may still be open.
                let back = p.duration / 86_400 + 1;
                for days_ago in 0..=back {
                    let date = today.checked_sub(jiff::Span::new().days(days_ago)).ok()?;
                    if !p.days.contains(&date.weekday()) {
                        continue;
                    }
                    // A local start time skipped by a daylight-saving change starts at the
                    // first instant after the gap; a repeated one at its first occurrence.
                    let start = date.to_datetime(p.start).to_zoned(p.zone.clone()).ok()?;
                    let start = start.timestamp().as_second();
                    let end = start + p.duration;
                    let now_s = now.unix_timestamp();
                    if start <= now_s && now_s < end {
                        return OffsetDateTime::from_unix_timestamp(end).ok();
                    }
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn weekly(days: &[&str], start: &str, secs: u64, tz: &str) -> Schedule {
        Schedule::Weekly(Weekly {
            weekdays: days.iter().map(|d| d.to_string()).collect(),
            start_time: start.into(),
            duration_seconds: secs,
            time_zone: tz.into(),
        })
    }

    #[test]
    fn weekly_windows_follow_local_time_across_daylight_saving() {
        let w = weekly(&["sat"], "02:00", 7200, "Europe/Berlin");
        // Winter: 02:00 in Berlin is 01:00 UTC.
        assert!(w.contains(datetime!(2026-01-10 01:30 UTC)));
        assert!(!w.contains(datetime!(2026-01-10 00:59 UTC)));
        assert!(!w.contains(datetime!(2026-01-10 03:00 UTC)));
        // Summer: 02:00 in Berlin is 00:00 UTC.
        assert!(w.contains(datetime!(2026-07-11 00:30 UTC)));
        assert!(!w.contains(datetime!(2026-07-11 02:00 UTC)));
        // Not on a Friday.
        assert!(!w.contains(datetime!(2026-07-10 00:30 UTC)));
        // A window crossing midnight is open on the next day too.
        let late = weekly(&["sun"], "23:00", 7200, "UTC");
        assert!(late.contains(datetime!(2026-07-13 00:30 UTC)));
    }

    #[test]
    fn a_start_time_inside_the_spring_gap_still_opens_the_window() {
        // 2026-03-29 02:30 does not exist in Berlin: the clocks jump from 02:00 to 03:00.
        let w = weekly(&["sun"], "02:30", 3600, "Europe/Berlin");
        assert!(w.contains(datetime!(2026-03-29 01:30 UTC)));
        assert!(!w.contains(datetime!(2026-03-29 02:30 UTC)));
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (weekly(&[], "02:00", 60, "UTC"), "weekdays"),
            (weekly(&["someday"], "02:00", 60, "UTC"), "weekdays"),
            (weekly(&["sat"], "2am", 60, "UTC"), "start_time"),
            (weekly(&["sat"], "25:00", 60, "UTC"), "start_time"),
            (weekly(&["sat"], "02:00", 0, "UTC"), "duration_seconds"),
            (weekly(&["sat"], "02:00", 60, "Mars/Olympus"), "time_zone"),
            (
                Schedule::Once {
                    starts_at: datetime!(2026-01-02 0:00 UTC),
                    ends_at: datetime!(2026-01-01 0:00 UTC),
                },
                "ends_at",
            ),
        ];
        for (s, field) in cases {
            assert_eq!(s.validate().unwrap_err().field, field, "{s:?}");
        }
    }
}
