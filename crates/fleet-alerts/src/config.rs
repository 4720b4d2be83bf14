//! The rules' settings: plain data with documented defaults. Only the binary reads them from
//! the environment.

use std::time::Duration;

/// Every rule's threshold and the grouping timers. A duration or count of 0 turns its rule off.
#[derive(Clone, Debug, PartialEq)]
pub struct AlertConfig {
    /// Consecutive critical checks before `server_critical` fires (2).
    pub critical_after: u32,
    /// Unreachable this long before `server_unreachable` fires (300 s).
    pub unreachable_for: Duration,
    /// Degraded this long before `server_degraded` fires (600 s).
    pub degraded_for: Duration,
    /// Consecutive failed collections before `metrics_failing` fires (3).
    pub metrics_failures: u32,
    /// CPU percent over which `resource_high` counts (90; 0 = off).
    pub cpu_percent: f64,
    /// Memory percent (90; 0 = off).
    pub memory_percent: f64,
    /// Disk percent (90; 0 = off).
    pub disk_percent: f64,
    /// How long a resource must stay over its threshold (600 s).
    pub resource_for: Duration,
    /// Consecutive good checks in recovering before resolved (2).
    pub resolve_after: u32,
    /// Health changes within the window that mark a server flapping (6).
    pub flap_changes: u32,
    /// The flapping window (1,800 s).
    pub flap_window: Duration,
    /// How long a new incident waits for more alerts before it is announced (30 s).
    pub group_wait: Duration,
    /// At most one announcement of additions per this long (300 s).
    pub group_interval: Duration,
    /// A still-firing incident is re-announced this often (14,400 s).
    pub repeat_interval: Duration,
    /// Percent of a region's servers unreachable at once that makes one regional incident (50).
    pub region_share: u32,
    /// The least servers a region must have for the regional rule (5).
    pub region_min: u32,
    /// The storage rule (true).
    pub storage: bool,
    /// The rule about Fleet itself (true).
    pub fleet_self: bool,
    /// One delivery attempt's deadline (10 s). A sender's claim on a notice lasts twice that
    /// and 5 s more, so a notice is marked before another sender may take it.
    pub send_timeout: Duration,
    /// The base of every link (`FLEET_PUBLIC_URL`).
    pub public_url: String,
}

impl Default for AlertConfig {
    fn default() -> Self {
        Self {
            critical_after: 2,
            unreachable_for: Duration::from_secs(300),
            degraded_for: Duration::from_secs(600),
            metrics_failures: 3,
            cpu_percent: 90.0,
            memory_percent: 90.0,
            disk_percent: 90.0,
            resource_for: Duration::from_secs(600),
            resolve_after: 2,
            flap_changes: 6,
            flap_window: Duration::from_secs(1800),
            group_wait: Duration::from_secs(30),
            group_interval: Duration::from_secs(300),
            repeat_interval: Duration::from_secs(14_400),
            region_share: 50,
            region_min: 5,
            storage: true,
            fleet_self: true,
            send_timeout: Duration::from_secs(10),
            public_url: "http://127.0.0.1:8080".into(),
        }
    }
}

/// A setting out of range: which one, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{setting}: {message}")]
pub struct BadSetting {
    /// The setting's name, as in the environment.
    pub setting: &'static str,
    /// What is wrong.
    pub message: String,
}

impl AlertConfig {
    /// How long a sender's claim on a notice lasts.
    pub fn claim_lease(&self) -> Duration {
        self.send_timeout * 2 + Duration::from_secs(5)
    }

    /// Checks the values that have a range.
    pub fn validate(&self) -> Result<(), BadSetting> {
        let pct = |setting, v: f64| {
            if (0.0..=100.0).contains(&v) {
                Ok(())
            } else {
                Err(BadSetting {
                    setting,
                    message: format!("{v} is not a percentage between 0 and 100"),
                })
            }
        };
        pct("FLEET_ALERT_CPU_PERCENT", self.cpu_percent)?;
        pct("FLEET_ALERT_MEMORY_PERCENT", self.memory_percent)?;
        pct("FLEET_ALERT_DISK_PERCENT", self.disk_percent)?;
        pct("FLEET_ALERT_REGION_SHARE", f64::from(self.region_share))?;
        if self.send_timeout.is_zero() || self.send_timeout > Duration::from_secs(300) {
            return Err(BadSetting {
                setting: "FLEET_ALERT_SEND_TIMEOUT",
                message: format!("{:?} must be between 0 and 300 seconds", self.send_timeout),
            });
        }
        if !(self.public_url.starts_with("http://") || self.public_url.starts_with("https://")) {
            return Err(BadSetting {
                setting: "FLEET_PUBLIC_URL",
                message: format!("`{}` is not an http(s) URL", self.public_url),
            });
        }
        Ok(())
    }
}
