//! Test support: a fresh database per test on the shared cluster, and private clusters for
//! tests that stop or restart PostgreSQL.
//!
//! The shared cluster is the one `DATABASE_URL` names (scripts/test starts one). Private
//! clusters use the binaries in `FLEET_PG_BINDIR` and, when running as root, the OS user in
//! `FLEET_PG_OS_USER` (scripts/test sets both).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use rand::Rng;
use tokio_postgres::NoTls;

use crate::{PartitionPolicy, PgSettings, PgStore, SecretKey, TokenVault, migrate};

/// The shared cluster's URL, or a panic that says how to get one.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .expect("DATABASE_URL is not set: run the tests through scripts/test, which starts a throwaway PostgreSQL")
}

fn with_dbname(url: &str, db: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// A database of its own on the shared cluster, dropped when this value is.
#[derive(Debug)]
pub struct TestDb {
    admin_url: String,
    name: String,
    /// Settings that reach the database.
    pub settings: PgSettings,
}

impl TestDb {
    /// Creates a fresh, empty database.
    pub async fn create() -> Self {
        Self::create_on(&database_url()).await
    }

    /// Creates a fresh, empty database on the cluster `admin_url` names.
    pub async fn create_on(admin_url: &str) -> Self {
        let name = format!("fleet_t_{:016x}", rand::rng().random::<u64>());
        let (client, conn) = tokio_postgres::connect(admin_url, NoTls)
            .await
            .expect("connect to the test cluster");
        let conn = tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create the test database");
        drop(client);
        let _ = conn.await;
        let settings = PgSettings::from_url(with_dbname(admin_url, &name));
        Self {
            admin_url: admin_url.to_owned(),
            name,
            settings,
        }
    }

    /// A migrated store on this database with a fresh key.
    pub async fn store(&self, clock: Arc<dyn fleet_core::Clock>) -> PgStore {
        self.store_with_pool(clock, self.settings.pool_size).await
    }

    /// As [`store`](Self::store), on a pool of `pool_size` connections.
    pub async fn store_with_pool(
        &self,
        clock: Arc<dyn fleet_core::Clock>,
        pool_size: usize,
    ) -> PgStore {
        let settings = PgSettings {
            pool_size,
            ..self.settings.clone()
        };
        let pool = settings.pool().expect("pool");
        migrate(&pool).await.expect("migrate");
        PgStore::new(
            pool,
            TokenVault::new(Some(SecretKey::generate())),
            clock,
            PartitionPolicy::default(),
        )
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Best effort, on a thread of its own: Drop cannot await, and the test's runtime may
        // be shutting down.
        let url = self.admin_url.clone();
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok((client, conn)) = tokio_postgres::connect(&url, NoTls).await {
                    tokio::spawn(conn);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// A PostgreSQL cluster of a test's own, which it may stop and start at will.
#[derive(Debug)]
pub struct PrivateCluster {
    dir: PathBuf,
    bindir: PathBuf,
    os_user: Option<String>,
    /// The port it listens on, on 127.0.0.1.
    pub port: u16,
}

impl PrivateCluster {
    /// Initializes and starts a cluster in a fresh folder.
    pub fn start() -> Self {
        let bindir = std::env::var("FLEET_PG_BINDIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                let out = Command::new("pg_config")
                    .arg("--bindir")
                    .output()
                    .expect("FLEET_PG_BINDIR unset and no pg_config");
                PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
            });
        let os_user = std::env::var("FLEET_PG_OS_USER")
            .ok()
            .filter(|u| !u.is_empty());
        let dir = std::env::temp_dir().join(format!(
            "fleet-private-pg-{:016x}",
            rand::rng().random::<u64>()
        ));
        std::fs::create_dir_all(&dir).expect("cluster folder");
        if let Some(user) = &os_user {
            // The postgres user must own the folder it runs in.
            run(Command::new("chown").arg(user).arg(&dir));
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("a free port")
            .local_addr()
            .unwrap()
            .port();
        let cluster = Self {
            dir,
            bindir,
            os_user,
            port,
        };
        cluster.pg(&[
            "initdb",
            "-D",
            &cluster.data(),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        cluster.start_again();
        cluster
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    /// A PostgreSQL tool, run as the OS user that owns the cluster.
    fn tool(&self, args: &[&str]) -> Command {
        let tool = self.bindir.join(args[0]);
        let mut cmd = match &self.os_user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&tool);
                c
            }
            None => Command::new(&tool),
        };
        cmd.args(&args[1..]);
        cmd
    }

    fn pg(&self, args: &[&str]) {
        run(&mut self.tool(args));
    }

    /// Starts the (stopped) cluster again on the same port.
    pub fn start_again(&self) {
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c synchronous_commit=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("server.log").display().to_string();
        self.pg(&[
            "pg_ctl",
            "-D",
            &self.data(),
            "-l",
            &log,
            "-o",
            &opts,
            "-w",
            "-t",
            "30",
            "start",
        ]);
    }

    /// Turns TLS on with this certificate and key (PEM), and restarts. Plain connections are
    /// still accepted, so every `sslmode` can be tried against it.
    pub fn enable_ssl(&self, cert_pem: &str, key_pem: &str) {
        let data = self.dir.join("data");
        let (cert, key) = (data.join("server.crt"), data.join("server.key"));
        std::fs::write(&cert, cert_pem).expect("write server.crt");
        std::fs::write(&key, key_pem).expect("write server.key");
        run(Command::new("chmod").arg("600").arg(&key));
        if let Some(user) = &self.os_user {
            run(Command::new("chown").arg(user).arg(&cert).arg(&key));
        }
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).expect("read postgresql.conf");
        text.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        std::fs::write(&conf, text).expect("write postgresql.conf");
        self.stop();
        self.start_again();
    }

    /// Stops the cluster at once (connections are cut).
    pub fn stop(&self) {
        self.pg(&["pg_ctl", "-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }

    /// The URL of its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The folder it lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = self
            .tool(&[
                "pg_ctl",
                "-D",
                &self.data(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[cfg(test)]
mod tests {
    use super::with_dbname;

    #[test]
    fn database_names_are_swapped_in_urls() {
        assert_eq!(
            with_dbname("postgres://u@h:1/postgres", "x"),
            "postgres://u@h:1/x"
        );
        assert_eq!(with_dbname("postgres://u@h:1", "x"), "postgres://u@h:1/x");
        assert_eq!(
            with_dbname("postgres://u@h:1/db?sslmode=disable", "x"),
            "postgres://u@h:1/x?sslmode=disable"
        );
    }
}
