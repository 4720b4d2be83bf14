//! `fleet-sim`: run a simulated fleet on loopback.
//!
//! Large fleets are spread over several processes of its own (`--per-process`), since each
//! simulated server holds a listening socket plus one per open connection and a process may
//! hold only so many files, and over several loopback addresses (`--spread`, one per 16,000
//! servers by default), since one address has only so many ports. The children read their
//! standard input from the parent and exit when it closes: whenever the parent ends, even by
//! SIGKILL.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use fleet_sim::{Manifest, Mix, SimConfig, SimFleet};

/// A simulated fleet of managed servers on loopback, for tests, demos and load.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// How many servers.
    #[arg(long, default_value_t = 50)]
    count: usize,
    /// Behaviours by share, e.g. healthy=90,degraded=3,critical=2,http_error=1,unreachable=1,hang=1,slow=2.
    #[arg(long, default_value = "healthy=1")]
    mix: Mix,
    /// Seed for the mix, the tokens and the metrics.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Server names are PREFIX-00000, PREFIX-00001, ...
    #[arg(long, default_value = "sim")]
    prefix: String,
    /// Write the manifest (name, api_url, api_token per server) to this file.
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// Address of the control API (GET /servers, GET /manifest, PUT /servers/NAME/behavior).
    #[arg(long, default_value = "127.0.0.1:0")]
    control: SocketAddr,
    /// Most servers in one process; larger fleets start child processes.
    #[arg(long, default_value_t = 5000)]
    per_process: usize,
    /// Spread servers over this many loopback addresses (127.0.0.1, 127.0.0.2, ...)
    /// [default: one per 16,000 servers, since one address has about 28,000 ports to give].
    #[arg(long)]
    spread: Option<u8>,
    /// Latency range of slow servers, in milliseconds: MIN..MAX.
    #[arg(long, default_value = "200..2000")]
    slow_ms: String,
    /// Stop by itself after this many seconds (0: run until Ctrl-C or SIGTERM).
    #[arg(long, default_value_t = 0)]
    duration: u64,
    /// The first server index (set by the parent for its children).
    #[arg(long, default_value_t = 0, hide = true)]
    first_index: usize,
    /// Run as a child of another fleet-sim: stop when standard input closes.
    #[arg(long, hide = true)]
    child: bool,
}

/// Servers one loopback address is given: well under the ~28,000 ports of Linux's default
/// ephemeral range, which binding port 0 draws from.
const PER_ADDRESS: usize = 16_000;

/// The loopback addresses `count` servers need.
fn auto_spread(count: usize) -> anyhow::Result<u8> {
    let n = count.div_ceil(PER_ADDRESS).max(1);
    u8::try_from(n)
        .ok()
        .filter(|n| *n < 255)
        .with_context(|| format!("--count {count} needs {n} loopback addresses; at most 254"))
}

fn slow_range(text: &str) -> anyhow::Result<(Duration, Duration)> {
    let (lo, hi) = text
        .split_once("..")
        .with_context(|| format!("--slow-ms must be MIN..MAX, got `{text}`"))?;
    let lo: u64 = lo
        .trim()
        .parse()
        .with_context(|| format!("--slow-ms: `{lo}` is not a whole number"))?;
    let hi: u64 = hi
        .trim()
        .parse()
        .with_context(|| format!("--slow-ms: `{hi}` is not a whole number"))?;
    if lo > hi {
        bail!("--slow-ms: MIN {lo} is above MAX {hi}");
    }
    Ok((Duration::from_millis(lo), Duration::from_millis(hi)))
}

// One thread per process: a large fleet is spread over many processes already, and on the
// box that also runs Fleet and PostgreSQL a second runtime thread per process only added
// wake-ups across threads (at 100,000 servers the simulator used as much CPU as Fleet).
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let slow = slow_range(&args.slow_ms)?;
    if args.per_process == 0 {
        bail!("--per-process must be at least 1");
    }
    let spread = match args.spread {
        Some(0) => bail!("--spread must be at least 1"),
        Some(n) => n,
        None => auto_spread(args.count)?,
    };
    if args.count > args.per_process && !args.child {
        return run_parent(&args, spread).await;
    }
    let addresses = (1..=spread)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
        .collect();
    let config = SimConfig {
        count: args.count,
        mix: args.mix.clone(),
        seed: args.seed,
        prefix: args.prefix.clone(),
        first_index: args.first_index,
        slow,
        addresses,
        ..Default::default()
    };
    let fleet = Arc::new(
        SimFleet::start(config)
            .await
            .context("starting the simulated servers")?,
    );
    let control = fleet
        .serve_control(args.control)
        .await
        .with_context(|| format!("--control {}", args.control))?;
    let manifest = fleet.manifest();
    if let Some(path) = &args.manifest {
        write_manifest(path, &manifest)?;
    }
    let mut counts: HashMap<String, usize> = HashMap::new();
    for s in fleet.servers() {
        *counts.entry(s.behavior().as_str().to_owned()).or_default() += 1;
    }
    let mut counts: Vec<_> = counts.into_iter().collect();
    counts.sort();
    let mix = counts
        .iter()
        .map(|(b, n)| format!("{b}={n}"))
        .collect::<Vec<_>>()
        .join(",");
    let rss = fleet_sim::resident_bytes().map_or("unknown".to_owned(), |b| {
        format!("{:.1} MiB", b as f64 / 1048576.0)
    });
    // One machine-readable line that a parent or a benchmark waits for.
    println!(
        "ready control=http://{control} servers={} mix={mix} resident={rss}",
        args.count
    );

    wait_for_stop(args.duration, args.child).await;
    fleet.shutdown().await;
    Ok(())
}

fn write_manifest(path: &PathBuf, manifest: &Manifest) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(manifest)?;
    std::fs::write(path, text).with_context(|| format!("--manifest {}", path.display()))
}

async fn wait_for_stop(duration: u64, child: bool) {
    let limit = async {
        if duration == 0 {
            std::future::pending::<()>().await
        } else {
            tokio::time::sleep(Duration::from_secs(duration)).await
        }
    };
    let parent_gone = async {
        if child {
            // The parent holds our standard input; it closes when the parent exits.
            let _ = tokio::task::spawn_blocking(|| {
                let mut line = String::new();
                while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
                    line.clear();
                }
            })
            .await;
        } else {
            std::future::pending::<()>().await
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let sigterm = async {
        match term.as_mut() {
            Some(t) => {
                t.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = sigterm => {}
        () = limit => {}
        () = parent_gone => {}
    }
}

/// Starts one child process per `per_process` servers, merges their manifests and waits.
async fn run_parent(args: &Args, spread: u8) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the fleet-sim binary")?;
    let dir = std::env::temp_dir().join(format!("fleet-sim-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut children: Vec<(Child, PathBuf)> = Vec::new();
    let mut first = 0;
    let mut shard = 0;
    while first < args.count {
        let count = args.per_process.min(args.count - first);
        let part = dir.join(format!("manifest-{shard}.json"));
        let child = Command::new(&exe)
            .args(["--count", &count.to_string(), "--mix"])
            .arg(
                args.mix
                    .weights()
                    .iter()
                    .map(|(b, w)| format!("{b}={w}"))
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .args([
                "--seed",
                &(args.seed.wrapping_add(shard)).to_string(),
                "--prefix",
                &args.prefix,
            ])
            .args([
                "--first-index",
                &first.to_string(),
                "--spread",
                &spread.to_string(),
                "--slow-ms",
                &args.slow_ms,
            ])
            .arg("--manifest")
            .arg(&part)
            .args(["--per-process", &args.per_process.to_string(), "--child"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a fleet-sim child process")?;
        children.push((child, part));
        first += count;
        shard += 1;
    }
    let mut merged = Manifest::default();
    let mut lines = Vec::new();
    for (child, part) in &mut children {
        let stdout = child.stdout.take().context("child stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if !line.starts_with("ready") {
            bail!("a fleet-sim child failed to start");
        }
        lines.push(line.trim().to_owned());
        let text = std::fs::read_to_string(&*part)?;
        let m: Manifest = serde_json::from_str(&text)?;
        merged.servers.extend(m.servers);
    }
    if let Some(path) = &args.manifest {
        write_manifest(path, &merged)?;
    }
    let controls: Vec<&str> = lines
        .iter()
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("control="))
        })
        .collect();
    println!(
        "ready control={} servers={} processes={}",
        controls.join(","),
        args.count,
        children.len()
    );

    wait_for_stop(args.duration, args.child).await;
    for (mut child, _) in children {
        drop(child.stdin.take());
        let _ = child.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn large_fleets_spread_over_enough_loopback_addresses() {
        assert_eq!(super::auto_spread(1).unwrap(), 1);
        assert_eq!(super::auto_spread(16_000).unwrap(), 1);
        assert_eq!(super::auto_spread(16_001).unwrap(), 2);
        assert_eq!(super::auto_spread(100_000).unwrap(), 7);
        assert_eq!(super::auto_spread(250_000).unwrap(), 16);
        assert!(super::auto_spread(10_000_000).is_err());
    }
}
