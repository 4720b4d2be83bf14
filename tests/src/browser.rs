//! A real headless Chromium, driven over WebDriver by Debian's chromedriver. scripts/test
//! installs both (`chromium`, `chromium-driver`); nothing is downloaded by a tool.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::{Proc, free_port};

/// The flags that keep Chromium from reaching outside hosts, and let it run as root.
pub const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
    "--disable-dev-shm-usage",
];

/// A browser session, with its driver and a fresh profile; everything goes when dropped.
pub struct Browser {
    /// The WebDriver session.
    pub client: Client,
    driver: Proc,
    profile: PathBuf,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser")
            .field("profile", &self.profile)
            .finish_non_exhaustive()
    }
}

fn executable(env: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(env).map_or_else(|| PathBuf::from(default), PathBuf::from);
    assert!(
        path.exists(),
        "{} is missing: scripts/test installs Debian's chromium and chromium-driver",
        path.display()
    );
    path
}

impl Browser {
    /// Starts chromedriver and a headless Chromium at `width`×`height`.
    pub async fn start(width: u32, height: u32) -> Self {
        let driver_path = executable("FLEET_CHROMEDRIVER", "/usr/bin/chromedriver");
        let chromium = executable("FLEET_CHROMIUM", "/usr/bin/chromium");
        let port = free_port();
        let mut cmd = Command::new(driver_path);
        cmd.arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1");
        let driver = Proc::start(cmd);
        let profile =
            std::env::temp_dir().join(format!("fleet-chromium-{}-{}", std::process::id(), port));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).expect("make a browser profile folder");
        let end = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < end,
                "chromedriver did not listen within 20 s: {}",
                driver.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|s| (*s).to_owned()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        args.push(format!("--window-size={width},{height}"));
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({"binary": chromium, "args": args}),
        );
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "start chromium through chromedriver: {e}\n{}",
                    driver.stderr()
                )
            });
        Self {
            client,
            driver,
            profile,
        }
    }

    /// Ends the session (Chromium quits) and the driver.
    pub async fn close(self) {
        let _ = self.client.clone().close().await;
    }

    /// Opens `url`.
    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect("navigate");
    }

    /// Runs `script` (a function body) in the page and returns its value.
    pub async fn js(&self, script: &str) -> Value {
        self.client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Runs `script` in the page with a `done` callback, and returns what it passes to it.
    pub async fn js_async(&self, script: &str) -> Value {
        let wrapped = format!("const done = arguments[arguments.length - 1]; {script}");
        self.client
            .execute_async(&wrapped, vec![])
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// The status of a `fetch` the page makes: same origin, its cookie, and `init`.
    pub async fn fetch_status(&self, url: &str, init: &str) -> Value {
        self.js_async(&format!(
            "fetch({}, {init}).then(r => done(r.status), e => done('failed: ' + e));",
            json!(url)
        ))
        .await
    }

    /// The page's visible text.
    pub async fn text(&self) -> String {
        self.js("return document.body.innerText;")
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// The text of the first element matching `css`, if any.
    pub async fn text_of(&self, css: &str) -> Option<String> {
        let v = self
            .js(&format!(
                "const e = document.querySelector({}); return e ? e.innerText : null;",
                json!(css)
            ))
            .await;
        v.as_str().map(str::to_owned)
    }

    /// Waits for `script` to return true, at most `limit`.
    pub async fn wait_until(&self, what: &str, limit: Duration, script: &str) {
        let end = Instant::now() + limit;
        loop {
            if self.js(script).await == Value::Bool(true) {
                return;
            }
            assert!(
                Instant::now() < end,
                "waited {limit:?} for {what}; the page says:\n{}",
                self.text().await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Fills the input named `name` in the form matching `form`.
    pub async fn fill(&self, css: &str, value: &str) {
        let el = self
            .client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("find {css}: {e}"));
        el.clear().await.ok();
        el.send_keys(value).await.expect("type");
    }

    /// Clicks the element matching `css`.
    pub async fn click(&self, css: &str) {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("find {css}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Resizes the window (its outer size).
    pub async fn resize(&self, width: u32, height: u32) {
        self.client
            .set_window_size(width, height)
            .await
            .expect("resize");
    }

    /// Saves a PNG of the viewport under `target/screenshots/{name}.png`; returns its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("screenshot");
        let dir = screenshots_dir();
        std::fs::create_dir_all(&dir).expect("make target/screenshots");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write screenshot");
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Chromium outlives a killed driver: end every process of this profile too.
        let _ = Command::new("pkill")
            .arg("-f")
            .arg(self.profile.display().to_string())
            .status();
        self.driver.terminate_quietly();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// `target/screenshots`, beside the test binaries' profile folder.
pub fn screenshots_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(|d| d.parent())
        .and_then(|d| d.parent())
        .map_or_else(|| PathBuf::from("screenshots"), |t| t.join("screenshots"))
}
