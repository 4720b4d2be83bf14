//! Shared helpers for Fleet's benchmarks.

use std::time::Duration;

/// Formats a rate per second.
pub fn per_second(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}
