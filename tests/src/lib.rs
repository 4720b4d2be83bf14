//! Helpers for the end-to-end tests and the load benchmark: find and run the real binaries,
//! read their CPU time and memory, stop them, talk to them over loopback, wait on conditions
//! with a bound.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A binary of the workspace. A `tests/` crate cannot see other packages' binaries through
/// `CARGO_BIN_EXE_*`, so it looks in the target folder it was built into; scripts/test builds
/// the binaries first.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target folder");
    binary_in(dir, name, "cargo build --workspace --bins")
}

/// The binary `name` in the profile folder `dir`, which `build` makes.
pub fn binary_in(dir: &Path, name: &str, build: &str) -> PathBuf {
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `{build}` first",
        path.display()
    );
    path
}

/// Runs `fleet-server servers import` of `manifest` (a fleet-sim manifest) through `server`, a
/// fleet-server command with its environment set; panics with its error output if it fails.
pub fn import(mut server: Command, manifest: &Path) -> String {
    let out = server
        .args(["servers", "import"])
        .arg(manifest)
        .output()
        .expect("run fleet-server servers import");
    assert!(
        out.status.success(),
        "import failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A process's peak resident memory, in MiB (Linux; 0 when it cannot be read).
pub fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// A process's CPU time so far, user plus system, in seconds (Linux).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    // After the command name: state is field 3, utime 14, stime 15 (1-based in proc(5)).
    let ticks = |i: usize| {
        fields
            .get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(14) + ticks(15)) / 100.0
}

/// Sends SIGTERM and waits at most `limit` for the exit code; kills it past that.
pub fn terminate(child: &mut Child, limit: Duration) -> Option<i32> {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let code = wait_exit(child, limit);
    if code.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    code
}

/// Waits at most `limit` for `child` to exit; its exit code.
fn wait_exit(child: &mut Child, limit: Duration) -> Option<i32> {
    let end = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status.code();
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The secret key the end-to-end tests give fleet-server.
pub const SECRET_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// `fleet-server ARGS` with a clean environment: PATH, the database and the secret key.
pub fn server_cmd(db_url: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(binary("fleet-server"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    cmd.env("DATABASE_URL", db_url)
        .env("FLEET_SECRET_KEY", SECRET_KEY);
    cmd
}

/// A free port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running child process whose output is collected, killed when dropped.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    /// Everything it wrote to standard output so far.
    pub stdout: Arc<Mutex<String>>,
    /// Everything it wrote to standard error so far.
    pub stderr: Arc<Mutex<String>>,
}

fn collect(mut from: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let out = Arc::new(Mutex::new(String::new()));
    let sink = out.clone();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(&mut from);
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
            sink.lock().unwrap().push_str(&line);
            line.clear();
        }
    });
    out
}

impl Proc {
    /// Starts `cmd` with its output captured.
    pub fn start(mut cmd: Command) -> Self {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        let mut child = cmd.spawn().expect("start the binary");
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        Self {
            child,
            stdout,
            stderr,
        }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident memory so far, in MiB (Linux).
    pub fn peak_rss_mib(&self) -> f64 {
        peak_rss_mib(self.child.id())
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit, at most `limit`; its exit code.
    pub fn wait(&mut self, limit: Duration) -> Option<i32> {
        wait_exit(&mut self.child, limit)
    }

    /// What it wrote to standard error.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// What it wrote to standard output.
    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `cond` until it holds, at most `limit`, then panics naming `what`.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + limit;
    while !cond().await {
        assert!(Instant::now() < end, "waited {limit:?} for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client for the API at `base` with `token`.
#[derive(Debug)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    /// A client.
    pub fn new(base: impl Into<String>, token: Option<String>) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .no_proxy()
            .build()
            .unwrap();
        Self {
            http,
            base: base.into(),
            token,
        }
    }

    /// POSTs `body` as JSON to `path`; the status and the JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> Option<(u16, Value)> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    /// GETs `path`; the status and the JSON body (or the text as a string).
    pub async fn get(&self, path: &str) -> Option<(u16, Value)> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    async fn send(&self, mut req: reqwest::RequestBuilder) -> Option<(u16, Value)> {
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let res = req.send().await.ok()?;
        let status = res.status().as_u16();
        let text = res.text().await.ok()?;
        Some((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }
}
