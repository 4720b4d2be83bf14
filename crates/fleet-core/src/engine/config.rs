//! Worker settings, validated in [`WorkerConfigBuilder::build`].

use std::time::Duration;

/// Which worker a configuration is for; it picks the defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WorkerKind {
    /// The health worker: every 30 s, batches of 10 started 0.5 s apart.
    Health,
    /// The metrics worker: every 60 s, batches of 5 started 1 s apart.
    Metrics,
}

impl WorkerKind {
    /// `health` or `metrics`.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerKind::Health => "health",
            WorkerKind::Metrics => "metrics",
        }
    }
}

/// A worker's settings. Build one with [`WorkerConfig::builder`].
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerConfig {
    /// Start-to-start time between cycles. Default 30 s (health), 60 s (metrics).
    pub interval: Duration,
    /// Time from the worker's start to its first cycle; the grid of cycle starts counts from
    /// there. Shorter than the interval. Default 0 (fleet-server sets the metrics worker's to
    /// a third of the health interval, so that the two workers' starts never meet).
    pub phase: Duration,
    /// Checks started together. Default 10 (health), 5 (metrics).
    pub batch_size: usize,
    /// Time between batch starts; an upper bound unless `fixed_batch_delay`. Default 0.5 s
    /// (health), 1 s (metrics).
    pub batch_delay: Duration,
    /// Hold `batch_delay` as given even when the batches then take longer than a quarter of
    /// the interval to start, as the seed design did. Default false.
    pub fixed_batch_delay: bool,
    /// Checks running at once, across batches, at least. Default 256 (health), 64
    /// (metrics). With a `file_budget` it rises with the fleet, so that a hung tenth of it
    /// holds no start back.
    pub max_in_flight: usize,
    /// Open files this worker's checks may hold at once (each check holds a connection): the
    /// most `max_in_flight` may rise to. `None` (the default): `max_in_flight` as given.
    pub file_budget: Option<usize>,
    /// Hard deadline of one check; shorter than the interval. Default 10 s.
    pub timeout: Duration,
    /// Time given at shutdown to in-flight checks and the final flush. Default 10 s.
    pub shutdown_grace: Duration,
    /// Results held while the store cannot take them; past it the oldest are dropped.
    /// Default 100,000.
    pub result_buffer: usize,
    /// The most bytes those results may take, by their estimated size; past it the oldest are
    /// dropped. Default 128 MiB.
    pub result_buffer_bytes: usize,
    /// Most results written in one store call. Default 1,000.
    pub write_batch_size: usize,
    /// Longest a result waits for its batch to fill before it is written. Default 200 ms.
    pub flush_interval: Duration,
}

impl WorkerConfig {
    /// The defaults for `kind`.
    pub fn defaults(kind: WorkerKind) -> Self {
        let (interval, batch_size, batch_delay, max_in_flight) = match kind {
            WorkerKind::Health => (30.0, 10, 0.5, 256),
            WorkerKind::Metrics => (60.0, 5, 1.0, 64),
        };
        Self {
            interval: Duration::from_secs_f64(interval),
            phase: Duration::ZERO,
            batch_size,
            batch_delay: Duration::from_secs_f64(batch_delay),
            fixed_batch_delay: false,
            max_in_flight,
            file_budget: None,
            timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            result_buffer: 100_000,
            result_buffer_bytes: 128 << 20,
            write_batch_size: 1_000,
            flush_interval: Duration::from_millis(200),
        }
    }

    /// A builder starting from the defaults for `kind`.
    pub fn builder(kind: WorkerKind) -> WorkerConfigBuilder {
        WorkerConfigBuilder {
            config: Self::defaults(kind),
        }
    }
}

/// A setting that cannot be used. The message names the setting and the value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid setting {setting}: {message}")]
pub struct ConfigError {
    /// The setting's name, as in [`WorkerConfig`].
    pub setting: &'static str,
    /// What is wrong with its value.
    pub message: String,
}

/// Builds a [`WorkerConfig`], refusing values the engine cannot run with.
#[derive(Clone, Debug)]
pub struct WorkerConfigBuilder {
    config: WorkerConfig,
}

macro_rules! setter {
    ($name:ident: $ty:ty) => {
        #[doc = concat!("Sets `", stringify!($name), "`; see [`WorkerConfig`].")]
        pub fn $name(mut self, value: $ty) -> Self {
            self.config.$name = value;
            self
        }
    };
}

impl WorkerConfigBuilder {
    setter!(interval: Duration);
    setter!(phase: Duration);
    setter!(batch_size: usize);
    setter!(batch_delay: Duration);
    setter!(fixed_batch_delay: bool);
    setter!(max_in_flight: usize);
    setter!(file_budget: Option<usize>);
    setter!(timeout: Duration);
    setter!(shutdown_grace: Duration);
    setter!(result_buffer: usize);
    setter!(result_buffer_bytes: usize);
    setter!(write_batch_size: usize);
    setter!(flush_interval: Duration);

    /// Validates and returns the configuration.
    pub fn build(self) -> Result<WorkerConfig, ConfigError> {
        let c = self.config;
        let fail = |setting, message: String| Err(ConfigError { setting, message });
        if c.interval.is_zero() {
            return fail("interval", "must be greater than 0".into());
        }
        for (setting, value) in [
            ("batch_size", c.batch_size),
            ("max_in_flight", c.max_in_flight),
            ("result_buffer", c.result_buffer),
            ("result_buffer_bytes", c.result_buffer_bytes),
            ("write_batch_size", c.write_batch_size),
        ] {
            if value == 0 {
                return fail(setting, "must be at least 1".into());
            }
        }
        if c.timeout.is_zero() {
            return fail("timeout", "must be greater than 0".into());
        }
        for (setting, value) in [("timeout", c.timeout), ("phase", c.phase)] {
            if value >= c.interval {
                return fail(
                    setting,
                    format!(
                        "{value:?} must be shorter than the interval ({:?})",
                        c.interval
                    ),
                );
            }
        }
        if c.shutdown_grace.is_zero() {
            return fail("shutdown_grace", "must be greater than 0".into());
        }
        if c.flush_interval.is_zero() {
            return fail("flush_interval", "must be greater than 0".into());
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn refused(builder: WorkerConfigBuilder, setting: &str, message: &str) {
        let err = builder.build().unwrap_err();
        assert_eq!(err.setting, setting);
        assert_eq!(
            err.to_string(),
            format!("invalid setting {setting}: {message}")
        );
    }

    #[test]
    fn defaults_are_the_seeds() {
        let h = WorkerConfig::builder(WorkerKind::Health).build().unwrap();
        assert_eq!(
            (h.interval, h.batch_size, h.batch_delay),
            (Duration::from_secs(30), 10, Duration::from_millis(500))
        );
        let m = WorkerConfig::builder(WorkerKind::Metrics).build().unwrap();
        assert_eq!(
            (m.interval, m.batch_size, m.batch_delay),
            (Duration::from_secs(60), 5, Duration::from_secs(1))
        );
        assert_eq!(m.timeout, Duration::from_secs(10));
        assert_eq!(m.result_buffer, 100_000);
    }

    #[test]
    fn invalid_settings_are_refused_by_name() {
        let b = || WorkerConfig::builder(WorkerKind::Health);
        refused(
            b().interval(Duration::ZERO),
            "interval",
            "must be greater than 0",
        );
        refused(b().batch_size(0), "batch_size", "must be at least 1");
        refused(b().max_in_flight(0), "max_in_flight", "must be at least 1");
        refused(b().result_buffer(0), "result_buffer", "must be at least 1");
        refused(
            b().write_batch_size(0),
            "write_batch_size",
            "must be at least 1",
        );
        refused(
            b().timeout(Duration::ZERO),
            "timeout",
            "must be greater than 0",
        );
        refused(
            b().timeout(Duration::from_secs(30)),
            "timeout",
            "30s must be shorter than the interval (30s)",
        );
        refused(
            b().shutdown_grace(Duration::ZERO),
            "shutdown_grace",
            "must be greater than 0",
        );
        refused(
            b().flush_interval(Duration::ZERO),
            "flush_interval",
            "must be greater than 0",
        );
    }
}
