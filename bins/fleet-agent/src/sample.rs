//! The host's figures, sampled in the background: a request only reads the last sample, so a
//! hung mount or a slow `systemctl` can never hang a scrape.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleet_wire::host::{HostHealth, NOT_DISKS, Thresholds};
use fleet_wire::{HealthReport, MetricValues};
use sysinfo::{Disks, Networks, System};

/// What the agent serves until the next sample.
#[derive(Clone, Debug)]
pub struct Sample {
    /// `/health`.
    pub report: HealthReport,
    /// `/api/v1/metrics/current`.
    pub values: MetricValues,
}

/// systemd's services, when the host runs systemd.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Units {
    /// Every service unit listed.
    pub total: u64,
    /// Those active.
    pub active: u64,
    /// Those failed, by name.
    pub failed: Vec<String>,
}

/// Reads `systemctl list-units --type=service --all --no-legend --plain` output.
pub fn parse_units(out: &str) -> Units {
    let mut u = Units::default();
    for line in out.lines() {
        let mut cols = line.split_whitespace();
        let (Some(name), Some(_load), Some(active)) = (cols.next(), cols.next(), cols.next())
        else {
            continue;
        };
        u.total += 1;
        match active {
            "active" => u.active += 1,
            "failed" => u.failed.push(name.to_owned()),
            _ => {}
        }
    }
    u
}

/// What to sample and how to judge it.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Only these mount points count as disks; every real file system when empty.
    pub mounts: Vec<PathBuf>,
    /// A failed unit among these makes the host critical.
    pub watch_units: Vec<String>,
    /// Memory and disk thresholds.
    pub thresholds: Thresholds,
}

/// Holds the handles sysinfo refreshes in place.
pub struct Sampler {
    settings: Settings,
    system: System,
    disks: Disks,
    networks: Networks,
    first: bool,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Sampler {
    /// A sampler; the first sample has no CPU use yet (it needs two readings).
    pub fn new(settings: Settings) -> Self {
        let mut system = System::new();
        system.refresh_cpu_usage();
        Self {
            settings,
            system,
            disks: Disks::new_with_refreshed_list(),
            networks: Networks::new_with_refreshed_list(),
            first: true,
        }
    }

    fn counts(&self, mount: &Path, fs: &str) -> bool {
        if self.settings.mounts.is_empty() {
            !NOT_DISKS.contains(&fs)
        } else {
            self.settings.mounts.iter().any(|m| m == mount)
        }
    }

    /// Reads the host now; `units` is systemd's answer when the host runs it.
    pub fn sample(&mut self, units: Option<Units>) -> Sample {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        self.disks.refresh(true);
        self.networks.refresh(true);
        let cpu =
            (!self.first).then(|| f64::from(self.system.global_cpu_usage()).clamp(0.0, 100.0));
        self.first = false;
        let total = self.system.total_memory();
        let memory = (total > 0).then(|| {
            let used = total.saturating_sub(self.system.available_memory());
            100.0 * used as f64 / total as f64
        });
        let disks: Vec<(String, f64)> = self
            .disks
            .list()
            .iter()
            .filter(|d| self.counts(d.mount_point(), &d.file_system().to_string_lossy()))
            .filter(|d| d.total_space() > 0)
            .map(|d| {
                let used = d.total_space().saturating_sub(d.available_space());
                (
                    d.mount_point().display().to_string(),
                    100.0 * used as f64 / d.total_space() as f64,
                )
            })
            .collect();
        let fullest = disks.iter().map(|d| d.1).reduce(f64::max);
        let (mut rx, mut tx) = (0u64, 0u64);
        for (name, data) in self.networks.list() {
            if name != "lo" {
                rx = rx.saturating_add(data.total_received());
                tx = tx.saturating_add(data.total_transmitted());
            }
        }
        let failed_watched: Vec<String> = units
            .as_ref()
            .map(|u| {
                u.failed
                    .iter()
                    .filter(|f| {
                        self.settings
                            .watch_units
                            .iter()
                            .any(|w| *f == w || f.strip_suffix(".service") == Some(w.as_str()))
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let report = HostHealth {
            memory_percent: memory,
            disks,
            failed_units: failed_watched,
        }
        .report(self.settings.thresholds);
        let count = |n: u64| i64::try_from(n).ok();
        let values = MetricValues {
            cpu_percent: cpu,
            memory_percent: memory,
            disk_percent: fullest,
            network_rx_bytes: i64::try_from(rx).ok(),
            network_tx_bytes: i64::try_from(tx).ok(),
            total_services: units.as_ref().and_then(|u| count(u.total)),
            active_services: units.as_ref().and_then(|u| count(u.active)),
            failed_services: units.as_ref().and_then(|u| count(u.failed.len() as u64)),
            ..Default::default()
        };
        Sample { report, values }
    }
}

/// systemd's service units, asked in the background with a deadline; `None` without systemd
/// or when it does not answer in time.
pub async fn systemd_units(limit: Duration) -> Option<Units> {
    if !Path::new("/run/systemd/system").exists() {
        return None;
    }
    let run = tokio::process::Command::new("systemctl")
        .args([
            "list-units",
            "--type=service",
            "--all",
            "--no-legend",
            "--plain",
            "--no-pager",
        ])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(limit, run).await.ok()?.ok()?;
    out.status
        .success()
        .then(|| parse_units(&String::from_utf8_lossy(&out.stdout)))
}

#[cfg(test)]
mod tests {
    use fleet_wire::Declared;

    use super::*;

    #[test]
    fn units_are_counted_and_failed_ones_named() {
        let out = "cron.service loaded active running Regular background program\n\
                   db.service loaded failed failed Database\n\
                   old.service not-found inactive dead old.service\n\
                   \n";
        assert_eq!(
            parse_units(out),
            Units {
                total: 3,
                active: 1,
                failed: vec!["db.service".into()]
            }
        );
    }

    #[test]
    fn a_sample_of_this_host_has_memory_and_no_cpu_use_at_first() {
        let mut s = Sampler::new(Settings {
            mounts: Vec::new(),
            watch_units: vec!["db".into()],
            thresholds: Thresholds::default(),
        });
        let units = Units {
            total: 2,
            active: 1,
            failed: vec!["db.service".into()],
        };
        let first = s.sample(Some(units.clone()));
        assert_eq!(
            first.values.cpu_percent, None,
            "no CPU use from one reading"
        );
        assert!(
            first
                .values
                .memory_percent
                .is_some_and(|m| (0.0..=100.0).contains(&m))
        );
        assert_eq!(first.values.failed_services, Some(1));
        // A watched unit that failed: critical, and named.
        assert_eq!(first.report.declared, Some(Declared::Critical));
        assert!(
            first
                .report
                .components
                .iter()
                .any(|(n, _)| n == "db.service")
        );
        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
        let second = s.sample(None);
        assert!(second.values.cpu_percent.is_some());
        assert_eq!(
            second.values.total_services, None,
            "no systemd: absent, not zero"
        );
    }
}
