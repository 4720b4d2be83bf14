//! Prometheus's node_exporter as a source: its `/metrics` page read into a health report and
//! metric values. Core never sees the format: the probe hands it a [`HealthReport`] whose
//! declared status comes from the same thresholds as fleet-agent's, and the collector hands it
//! [`MetricValues`].
//!
//! The page is parsed with `prometheus-parse`, which skips lines it cannot read; a page without
//! node_exporter's memory series is not an exposition of a host, and is refused.

use std::collections::HashMap;

use fleet_wire::host::{HostHealth, NOT_DISKS, Thresholds};
use fleet_wire::{HealthReport, MetricValues};
use prometheus_parse::{Sample, Scrape, Value};

/// The CPU counters of one scrape: seconds idle and seconds in all, over every CPU.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuTimes {
    /// `mode="idle"` plus `mode="iowait"`.
    pub idle: f64,
    /// Every mode.
    pub total: f64,
}

/// What Fleet reads off one node_exporter page.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeFigures {
    /// The CPU counters, when exported.
    pub cpu: Option<CpuTimes>,
    /// `node_memory_MemAvailable_bytes`.
    pub mem_available: Option<f64>,
    /// `node_memory_MemTotal_bytes`.
    pub mem_total: Option<f64>,
    /// The fullest real file system: (mount point, percent used).
    pub fullest_disk: Option<(String, f64)>,
    /// Bytes received over every interface but `lo`.
    pub rx_bytes: Option<f64>,
    /// Bytes sent over every interface but `lo`.
    pub tx_bytes: Option<f64>,
    /// systemd units exported, and those failed, when `node_systemd_unit_state` is exported.
    pub units: Option<(u64, u64, Vec<String>)>,
}

/// Why a page is not a node_exporter exposition.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExpositionError {
    /// Not UTF-8.
    #[error("the page is not UTF-8 text")]
    NotText,
    /// No memory series: an error page, or another exporter.
    #[error("the page has no node_memory_MemTotal_bytes: not a node_exporter exposition")]
    NotNodeExporter,
}

fn value(s: &Sample) -> Option<f64> {
    match s.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) if v.is_finite() => Some(v),
        _ => None,
    }
}

/// The first finite value of an unlabelled series (duplicates after it are ignored).
fn single(samples: &[Sample], name: &str) -> Option<f64> {
    samples.iter().filter(|s| s.metric == name).find_map(value)
}

/// Reads a page.
pub fn parse(body: &[u8]) -> Result<NodeFigures, ExpositionError> {
    let text = std::str::from_utf8(body).map_err(|_| ExpositionError::NotText)?;
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = Scrape::parse(lines).map_err(|_| ExpositionError::NotText)?;
    let samples = &scrape.samples;
    let mem_total = single(samples, "node_memory_MemTotal_bytes");
    if mem_total.is_none() {
        return Err(ExpositionError::NotNodeExporter);
    }

    let mut cpu: Option<CpuTimes> = None;
    for s in samples
        .iter()
        .filter(|s| s.metric == "node_cpu_seconds_total")
    {
        let Some(v) = value(s) else { continue };
        let c = cpu.get_or_insert(CpuTimes {
            idle: 0.0,
            total: 0.0,
        });
        c.total += v;
        if matches!(s.labels.get("mode"), Some("idle" | "iowait")) {
            c.idle += v;
        }
    }

    // Per mount point, the first sample of each series wins; duplicates are ignored.
    let mut sizes: HashMap<&str, f64> = HashMap::new();
    let mut avail: HashMap<&str, f64> = HashMap::new();
    for s in samples {
        let map = match s.metric.as_str() {
            "node_filesystem_size_bytes" => &mut sizes,
            "node_filesystem_avail_bytes" => &mut avail,
            _ => continue,
        };
        let fstype = s.labels.get("fstype").unwrap_or_default();
        let Some(mount) = s.labels.get("mountpoint") else {
            continue;
        };
        if NOT_DISKS.contains(&fstype) {
            continue;
        }
        if let Some(v) = value(s) {
            map.entry(mount).or_insert(v);
        }
    }
    let fullest_disk = sizes
        .iter()
        .filter(|(_, size)| **size > 0.0)
        .filter_map(|(mount, size)| {
            let free = avail.get(mount)?;
            Some((
                (*mount).to_owned(),
                (100.0 * (1.0 - free / size)).clamp(0.0, 100.0),
            ))
        })
        .max_by(|a, b| a.1.total_cmp(&b.1).then_with(|| b.0.cmp(&a.0)));

    let network = |name: &str| -> Option<f64> {
        let mut sum: Option<f64> = None;
        for s in samples.iter().filter(|s| s.metric == name) {
            if s.labels.get("device") == Some("lo") {
                continue;
            }
            if let Some(v) = value(s) {
                *sum.get_or_insert(0.0) += v;
            }
        }
        sum
    };

    let mut units: Option<(u64, u64, Vec<String>)> = None;
    for s in samples
        .iter()
        .filter(|s| s.metric == "node_systemd_unit_state")
    {
        let (Some(name), Some(state)) = (s.labels.get("name"), s.labels.get("state")) else {
            continue;
        };
        if value(s) != Some(1.0) {
            continue;
        }
        let u = units.get_or_insert((0, 0, Vec::new()));
        u.0 += 1;
        match state {
            "active" => u.1 += 1,
            "failed" => u.2.push(name.to_owned()),
            _ => {}
        }
    }

    Ok(NodeFigures {
        cpu,
        mem_available: single(samples, "node_memory_MemAvailable_bytes"),
        mem_total,
        fullest_disk,
        rx_bytes: network("node_network_receive_bytes_total"),
        tx_bytes: network("node_network_transmit_bytes_total"),
        units,
    })
}

impl NodeFigures {
    /// Memory in use, in percent: total minus available.
    pub fn memory_percent(&self) -> Option<f64> {
        let (avail, total) = (self.mem_available?, self.mem_total?);
        (total > 0.0).then(|| (100.0 * (1.0 - avail / total)).clamp(0.0, 100.0))
    }

    /// The health report of this page: the thresholds on memory and disk (fleet-agent's), and
    /// failed units.
    pub fn health(&self) -> HealthReport {
        HostHealth {
            memory_percent: self.memory_percent(),
            disks: self.fullest_disk.iter().cloned().collect(),
            failed_units: self.units.as_ref().map(|u| u.2.clone()).unwrap_or_default(),
        }
        .report(Thresholds::default())
    }

    /// The metric values, with CPU use since `previous` (`None` on a first scrape, never 0).
    pub fn values(&self, previous: Option<CpuTimes>) -> MetricValues {
        let cpu_percent = match (previous, self.cpu) {
            (Some(before), Some(now)) if now.total > before.total => {
                let busy = (now.total - before.total) - (now.idle - before.idle);
                Some((100.0 * busy / (now.total - before.total)).clamp(0.0, 100.0))
            }
            _ => None,
        };
        let count = |n: u64| i64::try_from(n).ok();
        MetricValues {
            cpu_percent,
            memory_percent: self.memory_percent(),
            disk_percent: self.fullest_disk.as_ref().map(|d| d.1),
            network_rx_bytes: self.rx_bytes.map(|v| v as i64),
            network_tx_bytes: self.tx_bytes.map(|v| v as i64),
            total_services: self.units.as_ref().and_then(|u| count(u.0)),
            active_services: self.units.as_ref().and_then(|u| count(u.1)),
            failed_services: self.units.as_ref().and_then(|u| count(u.2.len() as u64)),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use fleet_wire::{ComponentHealth, Declared};

    use super::*;

    const PAGE: &str = r#"# HELP node_cpu_seconds_total Seconds the CPUs spent in each mode.
# TYPE node_cpu_seconds_total counter
node_cpu_seconds_total{cpu="0",mode="idle"} 800
node_cpu_seconds_total{cpu="0",mode="iowait"} 20
node_cpu_seconds_total{cpu="0",mode="system"} 80
node_cpu_seconds_total{cpu="0",mode="user"} 100
# TYPE node_memory_MemAvailable_bytes gauge
node_memory_MemAvailable_bytes 2.5e+09
# TYPE node_memory_MemTotal_bytes gauge
node_memory_MemTotal_bytes 1e+10
# TYPE node_filesystem_avail_bytes gauge
node_filesystem_avail_bytes{device="/dev/sda1",fstype="ext4",mountpoint="/"} 4e+10
node_filesystem_avail_bytes{device="/dev/sdb1",fstype="xfs",mountpoint="/data"} 5e+09
node_filesystem_avail_bytes{device="tmpfs",fstype="tmpfs",mountpoint="/run"} 0
# TYPE node_filesystem_size_bytes gauge
node_filesystem_size_bytes{device="/dev/sda1",fstype="ext4",mountpoint="/"} 1e+11
node_filesystem_size_bytes{device="/dev/sdb1",fstype="xfs",mountpoint="/data"} 1e+11
node_filesystem_size_bytes{device="tmpfs",fstype="tmpfs",mountpoint="/run"} 1e+09
# TYPE node_network_receive_bytes_total counter
node_network_receive_bytes_total{device="eth0"} 1000
node_network_receive_bytes_total{device="lo"} 999999
node_network_receive_bytes_total{device="eth1"} 500
# TYPE node_network_transmit_bytes_total counter
node_network_transmit_bytes_total{device="eth0"} 2000
"#;

    #[test]
    fn a_page_gives_memory_the_fullest_real_disk_and_network_without_lo() {
        let f = parse(PAGE.as_bytes()).unwrap();
        assert_eq!(f.memory_percent(), Some(75.0));
        assert_eq!(f.fullest_disk, Some(("/data".to_owned(), 95.0)));
        assert_eq!((f.rx_bytes, f.tx_bytes), (Some(1500.0), Some(2000.0)));
        assert_eq!(
            f.cpu,
            Some(CpuTimes {
                idle: 820.0,
                total: 1000.0
            })
        );
        assert_eq!(f.units, None, "no systemd series: absent, not zero");
        let first = f.values(None);
        assert_eq!(first.cpu_percent, None, "a first scrape has no CPU use");
        assert_eq!(first.total_services, None);
        let later = f.values(Some(CpuTimes {
            idle: 720.0,
            total: 800.0,
        }));
        // 200 s more in all, 100 s more idle: half busy.
        assert_eq!(later.cpu_percent, Some(50.0));
        // The /data disk at 95 % makes the host degraded, and names it.
        let h = f.health();
        assert_eq!(h.declared, Some(Declared::Degraded));
        assert_eq!(
            h.components,
            [(
                "disk /data".to_owned(),
                ComponentHealth::Unhealthy("95% used".into())
            )]
        );
    }

    #[test]
    fn a_failed_unit_is_critical_and_units_are_counted() {
        let page = format!(
            "{PAGE}node_systemd_unit_state{{name=\"a.service\",state=\"active\"}} 1\n\
             node_systemd_unit_state{{name=\"a.service\",state=\"failed\"}} 0\n\
             node_systemd_unit_state{{name=\"b.service\",state=\"failed\"}} 1\n"
        );
        let f = parse(page.as_bytes()).unwrap();
        assert_eq!(f.units, Some((2, 1, vec!["b.service".to_owned()])));
        assert_eq!(f.health().declared, Some(Declared::Critical));
        let v = f.values(None);
        assert_eq!(
            (v.total_services, v.active_services, v.failed_services),
            (Some(2), Some(1), Some(1))
        );
    }

    #[test]
    fn bad_pages_are_refused_or_read_safely() {
        for page in [
            "<html><body>502 Bad Gateway</body></html>",
            "",
            "node_cpu_seconds_total{cpu=\"0\",mode=\"idle\"} 1",
            "node_memory_MemTotal_bytes NaN",
            "node_memory_MemTotal_bytes +Inf",
        ] {
            assert_eq!(
                parse(page.as_bytes()),
                Err(ExpositionError::NotNodeExporter),
                "{page}"
            );
        }
        assert_eq!(parse(&[0xff, 0xfe]), Err(ExpositionError::NotText));
        // Truncated mid-line, and duplicate series: what can be read is read, the first wins.
        let cut = &PAGE[..PAGE.find("node_network_transmit").unwrap() + 10];
        let f = parse(cut.as_bytes()).unwrap();
        assert_eq!(f.tx_bytes, None);
        let dup = format!("{PAGE}node_memory_MemTotal_bytes 5e+09\n");
        assert_eq!(parse(dup.as_bytes()).unwrap().mem_total, Some(1e10));
    }

    proptest::proptest! {
        #[test]
        fn no_page_panics(page in ".{0,400}", lines in proptest::collection::vec("[a-z_{}=\",. 0-9+-]{0,60}", 0..20)) {
            let _ = parse(page.as_bytes());
            let joined = format!("node_memory_MemTotal_bytes 1\n{}", lines.join("\n"));
            let f = parse(joined.as_bytes()).unwrap();
            let _ = f.health();
            let _ = f.values(Some(CpuTimes { idle: 1.0, total: 2.0 }));
        }
    }
}
