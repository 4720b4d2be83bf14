//! Wall-clock time, behind a trait so that tests decide what time it is.
//!
//! Scheduling never reads this clock: it runs on `tokio::time`, which tests pause and advance.
//! Only the timestamps that are stored or shown come from a [`Clock`].

use std::fmt::Debug;
use std::sync::Arc;

use time::OffsetDateTime;

/// A source of wall-clock timestamps.
pub trait Clock: Send + Sync + Debug {
    /// The current time, in UTC.
    fn now(&self) -> OffsetDateTime;
}

/// The system's clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

impl<T: Clock + ?Sized> Clock for Arc<T> {
    fn now(&self) -> OffsetDateTime {
        (**self).now()
    }
}

impl<T: Clock + ?Sized> Clock for &T {
    fn now(&self) -> OffsetDateTime {
        (**self).now()
    }
}
