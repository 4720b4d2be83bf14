//! fleet-agent end to end: registered through its own CLI against the real fleet-server and
//! PostgreSQL, watched healthy with metrics stored, then turned degraded by filling a small
//! tmpfs the test mounts (CI runs as root) and names in `FLEET_AGENT_MOUNTS`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fleet_pg::testing::TestDb;
use fleet_tests::{Client, Proc, binary, free_port, wait_for};

const ADMIN: &str = "bootstrap-admin-token-agent-test-01";

/// A 4 MiB tmpfs, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount() -> Self {
        let dir = std::env::temp_dir().join(format!("fleet-agent-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
            .arg(&dir)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a tmpfs needs root (CI runs as root)"
        );
        Self(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn agent_cmd(token_file: &Path) -> Command {
    let mut cmd = Command::new(binary("fleet-agent"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("FLEET_AGENT_TOKEN_FILE", token_file);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_registers_itself_is_watched_and_turns_degraded_when_its_disk_fills() {
    let db = TestDb::create().await;
    let url = db.settings.url.clone().unwrap();
    let mut migrate = fleet_tests::server_cmd(&url, &["migrate"]);
    assert!(migrate.status().unwrap().success());
    let listen = format!("127.0.0.1:{}", free_port());
    let mut serve = fleet_tests::server_cmd(&url, &["serve"]);
    serve
        .env("FLEET_ADMIN_TOKEN", ADMIN)
        .env("FLEET_LISTEN", &listen)
        .env("FLEET_HEALTH_INTERVAL", "0.5")
        .env("FLEET_HEALTH_TIMEOUT", "0.4")
        .env("FLEET_METRICS_INTERVAL", "1")
        .env("FLEET_METRICS_TIMEOUT", "0.5");
    let server = Proc::start(serve);
    let base = format!("http://{listen}");
    let api = Client::new(base.clone(), Some(ADMIN.to_owned()));
    wait_for("the API", Duration::from_secs(30), || async {
        api.get("/healthz").await.is_some()
    })
    .await;

    let disk = Tmpfs::mount();
    let token_file = disk.0.with_extension("token");
    let agent_listen = format!("127.0.0.1:{}", free_port());
    let agent_url = format!("http://{agent_listen}");

    // Settings are checked and shown without the token.
    let out = agent_cmd(&token_file)
        .env("FLEET_AGENT_SAMPLE_INTERVAL", "0")
        .arg("--print-config")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("FLEET_AGENT_SAMPLE_INTERVAL"));

    // register: the admin token from the environment, a fresh token into the file.
    let out = agent_cmd(&token_file)
        .env("FLEET_ADMIN_TOKEN", ADMIN)
        .args([
            "register", "--server", &base, "--url", &agent_url, "--name", "host-1",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let token = std::fs::read_to_string(&token_file).unwrap();
    let (_, list) = api
        .get("/api/v1/fleet/servers?search=host-1")
        .await
        .unwrap();
    let host = &list["servers"][0];
    assert_eq!(host["kind"], "agent");
    let id = host["id"].as_str().unwrap().to_owned();

    let mut run = agent_cmd(&token_file);
    run.env("FLEET_AGENT_LISTEN", &agent_listen)
        .env("FLEET_AGENT_MOUNTS", &disk.0)
        .env("FLEET_AGENT_SAMPLE_INTERVAL", "1");
    let agent = Proc::start(run);

    // Without the token, nothing.
    wait_for("the agent", Duration::from_secs(20), || async {
        std::net::TcpStream::connect(&agent_listen).is_ok()
    })
    .await;
    let anonymous = reqwest::get(format!("{agent_url}/health")).await.unwrap();
    assert_eq!(anonymous.status(), 401);
    assert!(!token.trim().is_empty());

    let server_state = || async {
        api.get(&format!("/api/v1/fleet/servers/{id}"))
            .await
            .map(|(_, v)| v)
            .unwrap_or_default()
    };
    wait_for("the host healthy", Duration::from_secs(30), || async {
        server_state().await["health_status"] == "healthy"
    })
    .await;
    wait_for("its metrics stored", Duration::from_secs(30), || async {
        api.get(&format!("/api/v1/fleet/servers/{id}/metrics"))
            .await
            .is_some_and(|(_, v)| {
                v["metrics"].as_array().is_some_and(|m| {
                    m.iter()
                        .any(|s| s["memory_percent"].is_number() && s["disk_percent"].is_number())
                })
            })
    })
    .await;

    // Fill the disk past 90 %: degraded, and the report names it.
    std::fs::write(disk.0.join("fill"), vec![0u8; 3_700 * 1024]).unwrap();
    wait_for("the host degraded", Duration::from_secs(30), || async {
        let s = server_state().await;
        s["health_status"] == "degraded"
            && s["last_error"].as_str().is_some_and(|e| e.contains("disk"))
    })
    .await;
    agent.terminate();
    server.terminate();
    drop(server);
}

/// A CA and a certificate for 127.0.0.1 signed by it, made with Debian's openssl.
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=fleet-test-ca",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &[
            "-keyout",
            "agent.key",
            "-out",
            "agent.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    ]
    .concat());
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "agent.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "agent.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("agent.pem"),
        dir.join("agent.key"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_serving_tls_is_trusted_through_the_probe_ca_file() {
    let dir = std::env::temp_dir().join(format!("fleet-agent-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, cert, key) = certificates(&dir);
    let db = TestDb::create().await;
    let url = db.settings.url.clone().unwrap();
    assert!(
        fleet_tests::server_cmd(&url, &["migrate"])
            .status()
            .unwrap()
            .success()
    );
    // A CA file that holds no certificate is refused, naming the setting.
    std::fs::write(dir.join("empty.pem"), "not a certificate\n").unwrap();
    let out = fleet_tests::server_cmd(&url, &["serve"])
        .env("FLEET_PROBE_CA_FILE", dir.join("empty.pem"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("FLEET_PROBE_CA_FILE"));

    let listen = format!("127.0.0.1:{}", free_port());
    let serve = |ca_file: Option<&Path>| {
        let mut cmd = fleet_tests::server_cmd(&url, &["serve"]);
        cmd.env("FLEET_ADMIN_TOKEN", ADMIN)
            .env("FLEET_LISTEN", &listen)
            .env("FLEET_HEALTH_INTERVAL", "0.5")
            .env("FLEET_HEALTH_TIMEOUT", "0.4");
        if let Some(ca) = ca_file {
            cmd.env("FLEET_PROBE_CA_FILE", ca);
        }
        Proc::start(cmd)
    };
    // First without FLEET_PROBE_CA_FILE: only the server given its own ca_cert is trusted.
    let mut server = serve(None);
    let api = Client::new(format!("http://{listen}"), Some(ADMIN.to_owned()));
    wait_for("the API", Duration::from_secs(30), || async {
        api.get("/healthz").await.is_some()
    })
    .await;

    let token_file = dir.join("token");
    std::fs::write(&token_file, "tls-agent-token-0123456789\n").unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let agent_listen = format!("127.0.0.1:{}", free_port());
    let mut run = agent_cmd(&token_file);
    run.env("FLEET_AGENT_LISTEN", &agent_listen)
        .env("FLEET_AGENT_SAMPLE_INTERVAL", "1")
        .env("FLEET_AGENT_MOUNTS", "/nonexistent")
        .env("FLEET_AGENT_TLS_CERT", &cert)
        .env("FLEET_AGENT_TLS_KEY", &key);
    let agent = Proc::start(run);
    let register = |name: &str, ca_cert: Option<String>| {
        let mut body = serde_json::json!({"name": name, "api_url": format!("https://{agent_listen}"), "api_token": "tls-agent-token-0123456789", "kind": "agent"});
        if let Some(pem) = ca_cert {
            body["ca_cert"] = serde_json::json!(pem);
        }
        let api = &api;
        async move {
            let (status, v) = api.post("/api/v1/fleet/servers", &body).await.unwrap();
            assert_eq!(status, 201, "{v}");
            v["id"].as_str().unwrap().to_owned()
        }
    };
    let own = register("tls-own-ca", Some(std::fs::read_to_string(&ca).unwrap())).await;
    let plain = register("tls-system-roots", None).await;
    let state = |id: String| {
        let api = &api;
        async move {
            api.get(&format!("/api/v1/fleet/servers/{id}"))
                .await
                .map(|(_, v)| v)
                .unwrap_or_default()
        }
    };
    wait_for(
        "the agent trusted through its ca_cert",
        Duration::from_secs(30),
        || async { state(own.clone()).await["health_status"] == "healthy" },
    )
    .await;
    wait_for(
        "the same agent refused without it",
        Duration::from_secs(30),
        || async {
            let s = state(plain.clone()).await;
            s["health_status"].is_string()
                && s["health_status"] != "healthy"
                && s["last_error"]
                    .as_str()
                    .is_some_and(|e| e.to_lowercase().contains("tls") || e.contains("certificate"))
        },
    )
    .await;
    // With FLEET_PROBE_CA_FILE, every probe trusts the CA.
    server.terminate();
    server.wait(Duration::from_secs(10));
    let server = serve(Some(&ca));
    wait_for(
        "the agent trusted through FLEET_PROBE_CA_FILE",
        Duration::from_secs(30),
        || async { state(plain.clone()).await["health_status"] == "healthy" },
    )
    .await;
    // Plain HTTP to it gets nothing.
    let plain_http = reqwest::get(format!("http://{agent_listen}/health")).await;
    assert!(plain_http.is_err() || plain_http.is_ok_and(|r| !r.status().is_success()));
    agent.terminate();
    server.terminate();
    let _ = std::fs::remove_dir_all(&dir);
}
