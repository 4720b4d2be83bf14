//! Helpers for the end-to-end tests and the load benchmark: find and run the real binaries,
//! read their CPU time and memory, stop them, talk to them over loopback, wait on conditions
//! with a bound.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod browser;

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

    /// Sends SIGTERM, ignoring a process already gone.
    pub fn terminate_quietly(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
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

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
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

/// How a [`Receiver`] answers one delivery.
#[derive(Clone, Debug)]
pub enum Answer {
    /// With this status.
    Status(u16),
    /// Never: the request hangs until the sender gives up.
    Hang,
}

/// One delivery a [`Receiver`] got.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// The request path.
    pub path: String,
    /// Its `Idempotency-Key` header.
    pub key: String,
    /// Its JSON body.
    pub body: Value,
    /// How it was answered.
    pub answer: u16,
}

/// A real HTTP receiver on loopback (webhook, Slack or PagerDuty alike): it records every
/// delivery, and answers as scripted (200 once the script is used up).
#[derive(Clone, Debug)]
pub struct Receiver {
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    got: Arc<Mutex<Vec<Delivery>>>,
    script: Arc<Mutex<std::collections::VecDeque<Answer>>>,
}

impl Receiver {
    /// Starts one on 127.0.0.1.
    pub async fn start() -> Self {
        use axum::extract::{Request, State};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let r = Self {
            addr,
            got: Arc::default(),
            script: Arc::default(),
        };
        async fn take(State(r): State<Receiver>, req: Request) -> axum::http::StatusCode {
            let path = req.uri().path().to_owned();
            let key = req
                .headers()
                .get("idempotency-key")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let bytes = axum::body::to_bytes(req.into_body(), 1 << 20)
                .await
                .unwrap_or_default();
            let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let answer = r
                .script
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or(Answer::Status(200));
            let code = match answer {
                Answer::Status(c) => c,
                Answer::Hang => 0,
            };
            r.got.lock().unwrap().push(Delivery {
                path,
                key,
                body,
                answer: code,
            });
            if code == 0 {
                std::future::pending::<()>().await;
            }
            axum::http::StatusCode::from_u16(code).unwrap()
        }
        let app = axum::Router::new().fallback(take).with_state(r.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        r
    }

    /// Its URL for `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The next answers, in order.
    pub fn answer(&self, answers: impl IntoIterator<Item = Answer>) {
        self.script.lock().unwrap().extend(answers);
    }

    /// Every delivery so far, in order.
    pub fn got(&self) -> Vec<Delivery> {
        self.got.lock().unwrap().clone()
    }

    /// Deliveries to `path`.
    pub fn at(&self, path: &str) -> Vec<Delivery> {
        self.got().into_iter().filter(|d| d.path == path).collect()
    }
}

/// A message a sink got: its recipients and its text.
pub type Mail = (Vec<String>, String);

/// A real SMTP sink on loopback: it speaks enough SMTP for a client to deliver, and keeps
/// each message's recipients and text.
#[derive(Clone, Debug)]
pub struct SmtpSink {
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    mail: Arc<Mutex<Vec<Mail>>>,
}

impl SmtpSink {
    /// Starts one on 127.0.0.1.
    pub async fn start() -> Self {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mail: Arc<Mutex<Vec<Mail>>> = Arc::default();
        let sink = mail.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let sink = sink.clone();
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut lines = tokio::io::BufReader::new(read).lines();
                    let _ = write.write_all(b"220 sink ESMTP\r\n").await;
                    let mut to = Vec::new();
                    // Bounded: a session ends at QUIT, at EOF, or after 10,000 lines.
                    for _ in 0..10_000 {
                        let Ok(Some(line)) = lines.next_line().await else {
                            return;
                        };
                        let verb = line.split_whitespace().next().unwrap_or("").to_uppercase();
                        let reply: &[u8] = match verb.as_str() {
                            "EHLO" => b"250-sink\r\n250 8BITMIME\r\n",
                            "RCPT" => {
                                to.push(
                                    line[line.find(':').map_or(0, |i| i + 1)..]
                                        .trim()
                                        .to_owned(),
                                );
                                b"250 ok\r\n"
                            }
                            "DATA" => {
                                let _ = write.write_all(b"354 go ahead\r\n").await;
                                let mut text = String::new();
                                for _ in 0..10_000 {
                                    let Ok(Some(l)) = lines.next_line().await else {
                                        return;
                                    };
                                    if l == "." {
                                        break;
                                    }
                                    text.push_str(&l);
                                    text.push('\n');
                                }
                                sink.lock().unwrap().push((std::mem::take(&mut to), text));
                                b"250 queued\r\n"
                            }
                            "QUIT" => {
                                let _ = write.write_all(b"221 bye\r\n").await;
                                return;
                            }
                            _ => b"250 ok\r\n",
                        };
                        if write.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self { addr, mail }
    }

    /// Every message so far: its recipients and text.
    pub fn mail(&self) -> Vec<Mail> {
        self.mail.lock().unwrap().clone()
    }
}
