//! How a plain host's figures become a health report: the thresholds fleet-agent declares its
//! status by, and by which Fleet judges a node_exporter page, so that both kinds of host mean
//! the same by `degraded` and `critical`.

use crate::health::{ComponentHealth, Declared, HealthReport};

/// File system types that are not disks: left out when judging how full a host's disks are
/// (unless an agent is told to watch such a mount).
pub const NOT_DISKS: &[&str] = &[
    "tmpfs",
    "devtmpfs",
    "overlay",
    "squashfs",
    "ramfs",
    "proc",
    "sysfs",
    "cgroup",
    "cgroup2",
    "autofs",
    "nsfs",
    "tracefs",
    "debugfs",
    "fuse.lxcfs",
    "efivarfs",
];

/// Where a host turns degraded and critical, in percent of memory or disk used.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Thresholds {
    /// Degraded from here. Default 90.
    pub degraded_at: f64,
    /// Critical from here. Default 98.
    pub critical_at: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            degraded_at: 90.0,
            critical_at: 98.0,
        }
    }
}

/// What a host's health is judged on.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostHealth {
    /// Memory used, in percent.
    pub memory_percent: Option<f64>,
    /// Each disk judged: its name (a mount point) and percent used.
    pub disks: Vec<(String, f64)>,
    /// Units that failed and make the host critical.
    pub failed_units: Vec<String>,
}

impl HostHealth {
    /// The report: a declared status (the worst threshold crossed, critical for a failed
    /// unit) and a component naming each thing that is wrong.
    pub fn report(&self, t: Thresholds) -> HealthReport {
        let mut components = Vec::new();
        let mut worst = Declared::Healthy;
        let mut judge = |name: String, used: f64| {
            let state = if used >= t.critical_at {
                Declared::Critical
            } else if used >= t.degraded_at {
                Declared::Degraded
            } else {
                return;
            };
            worst = worst.max(state);
            components.push((name, ComponentHealth::Unhealthy(format!("{used:.0}% used"))));
        };
        if let Some(m) = self.memory_percent {
            judge("memory".to_owned(), m);
        }
        for (mount, used) in &self.disks {
            judge(format!("disk {mount}"), *used);
        }
        for unit in self.failed_units.iter().take(10) {
            worst = Declared::Critical;
            components.push((unit.clone(), ComponentHealth::Unhealthy("failed".into())));
        }
        HealthReport {
            declared: Some(worst),
            components,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worst_threshold_crossed_is_declared_and_named() {
        let t = Thresholds::default();
        let h = |memory, disk, units: &[&str]| HostHealth {
            memory_percent: Some(memory),
            disks: vec![("/".into(), disk)],
            failed_units: units.iter().map(|u| (*u).to_owned()).collect(),
        };
        for (host, declared, named) in [
            (h(50.0, 50.0, &[]), Declared::Healthy, vec![]),
            (h(91.0, 50.0, &[]), Declared::Degraded, vec!["memory"]),
            (h(50.0, 98.0, &[]), Declared::Critical, vec!["disk /"]),
            (
                h(92.0, 99.5, &[]),
                Declared::Critical,
                vec!["memory", "disk /"],
            ),
            (
                h(10.0, 10.0, &["db.service"]),
                Declared::Critical,
                vec!["db.service"],
            ),
        ] {
            let r = host.report(t);
            assert_eq!(r.declared, Some(declared), "{host:?}");
            let names: Vec<&str> = r.components.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, named, "{host:?}");
        }
        assert_eq!(
            HostHealth::default().report(t).declared,
            Some(Declared::Healthy)
        );
    }
}
