//! Connection settings and the pool.

use std::fmt;
use std::time::Duration;

use deadpool_postgres::{ManagerConfig, Pool, PoolConfig, RecyclingMethod, Runtime, Timeouts};
use tokio_postgres::NoTls;

/// Where the database is: a URL, or the seed's separate settings. Plain data; the binary
/// fills it from `DATABASE_URL` or `POSTGRES_HOST`, `POSTGRES_PORT`, `POSTGRES_USER`,
/// `POSTGRES_PASSWORD` and `POSTGRES_DB`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PgSettings {
    /// A `postgres://` URL; when set, the separate settings fill only what it leaves out.
    pub url: Option<String>,
    /// Host name or address.
    pub host: Option<String>,
    /// Port.
    pub port: Option<u16>,
    /// User.
    pub user: Option<String>,
    /// Password.
    pub password: Option<String>,
    /// Database name.
    pub dbname: Option<String>,
    /// Connections in the pool. Default 16.
    pub pool_size: usize,
}

impl fmt::Debug for PgSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgSettings")
            .field("url", &self.url.as_ref().map(|_| "<set>"))
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dbname", &self.dbname)
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

/// The pool could not be built from the settings.
#[derive(Debug, thiserror::Error)]
#[error("invalid database settings: {0}")]
pub struct SettingsError(String);

impl PgSettings {
    /// Settings from a URL.
    pub fn from_url(url: impl Into<String>) -> Self {
        Self {
            url: Some(url.into()),
            pool_size: 16,
            ..Default::default()
        }
    }

    /// Whether any setting says where the database is.
    pub fn is_configured(&self) -> bool {
        self.url.is_some() || self.host.is_some()
    }

    /// Builds a pool. Connections are made on first use, so this fails only on bad settings.
    pub fn pool(&self) -> Result<Pool, SettingsError> {
        let mut cfg = deadpool_postgres::Config::new();
        cfg.url = self.url.clone();
        cfg.host = self.host.clone();
        cfg.port = self.port;
        cfg.user = self.user.clone();
        cfg.password = self.password.clone();
        cfg.dbname = self.dbname.clone();
        cfg.connect_timeout = Some(Duration::from_secs(5));
        cfg.application_name = Some("fleet".into());
        cfg.manager = Some(ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        });
        let mut pool = PoolConfig::new(self.pool_size.max(1));
        pool.timeouts = Timeouts {
            wait: Some(Duration::from_secs(10)),
            create: Some(Duration::from_secs(5)),
            recycle: Some(Duration::from_secs(5)),
        };
        cfg.pool = Some(pool);
        // The error would echo the URL, password included: say only what kind of error it is.
        cfg.create_pool(Some(Runtime::Tokio1), NoTls).map_err(|e| {
            let kind = match e {
                deadpool_postgres::CreatePoolError::Config(_) => {
                    "the connection settings do not parse"
                }
                deadpool_postgres::CreatePoolError::Build(_) => "the pool could not be built",
            };
            SettingsError(kind.to_owned())
        })
    }
}
