//! Connection settings, TLS, and the pool.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_postgres::config::{Host, SslMode as PgSslMode};

/// How to use TLS, as libpq's `sslmode` (only the modes that mean something here).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SslMode {
    /// Never.
    Disable,
    /// When the server offers it, without checking its certificate (libpq's default).
    #[default]
    Prefer,
    /// Always, without checking the certificate, as libpq does.
    Require,
    /// Always, with the certificate checked against the system's roots (or `sslrootcert`)
    /// and the host name.
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "disable" => Ok(SslMode::Disable),
            "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-full" => Ok(SslMode::VerifyFull),
            other => Err(format!(
                "sslmode `{other}` is not one of disable, prefer, require, verify-full"
            )),
        }
    }
}

/// Where the database is: a URL, or the seed's separate settings. Plain data; the binary
/// fills it from `DATABASE_URL` or `POSTGRES_HOST`, `POSTGRES_PORT`, `POSTGRES_USER`,
/// `POSTGRES_PASSWORD` and `POSTGRES_DB`, and `POSTGRES_SSLMODE`, `POSTGRES_SSLROOTCERT`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PgSettings {
    /// A `postgres://` URL; when set, the separate settings fill only what it leaves out. Its
    /// `sslmode` and `sslrootcert` parameters are read here, not by the driver.
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
    /// TLS; the URL's `sslmode` wins over it. Default prefer.
    pub sslmode: Option<SslMode>,
    /// A PEM file of the roots that verify-full trusts instead of the system's; the URL's
    /// `sslrootcert` wins over it.
    pub sslrootcert: Option<PathBuf>,
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
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .finish()
    }
}

/// The pool could not be built from the settings.
#[derive(Debug, thiserror::Error)]
#[error("invalid database settings: {0}")]
pub struct SettingsError(String);

/// What [`PgSettings`] resolve to: the driver's config, the TLS mode and roots.
struct Resolved {
    config: tokio_postgres::Config,
    mode: SslMode,
    rootcert: Option<PathBuf>,
}

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

    fn resolve(&self) -> Result<Resolved, SettingsError> {
        let mut mode = self.sslmode;
        let mut rootcert = self.sslrootcert.clone();
        let mut config = match &self.url {
            Some(raw) => {
                // tokio-postgres knows only some sslmodes and no sslrootcert: take both out.
                let mut url = url::Url::parse(raw).map_err(|_| {
                    SettingsError("the database URL does not parse as a URL".into())
                })?;
                let mut kept = Vec::new();
                for (k, v) in url.query_pairs() {
                    match &*k {
                        "sslmode" => mode = Some(v.parse().map_err(SettingsError)?),
                        "sslrootcert" => rootcert = Some(PathBuf::from(&*v)),
                        _ => kept.push((k.into_owned(), v.into_owned())),
                    }
                }
                url.set_query(None);
                if !kept.is_empty() {
                    url.query_pairs_mut().extend_pairs(kept);
                }
                // The error would echo the URL, password included: say only what is wrong.
                tokio_postgres::Config::from_str(url.as_str()).map_err(|_| {
                    SettingsError("the database URL's connection settings do not parse".into())
                })?
            }
            None => tokio_postgres::Config::new(),
        };
        if let Some(h) = &self.host
            && config.get_hosts().is_empty()
        {
            config.host(h);
        }
        if let Some(p) = self.port
            && config.get_ports().is_empty()
        {
            config.port(p);
        }
        if let Some(u) = &self.user
            && config.get_user().is_none()
        {
            config.user(u);
        }
        if let Some(p) = &self.password
            && config.get_password().is_none()
        {
            config.password(p);
        }
        if let Some(d) = &self.dbname
            && config.get_dbname().is_none()
        {
            config.dbname(d);
        }
        let mode = mode.unwrap_or_default();
        config
            .connect_timeout(Duration::from_secs(5))
            .application_name("fleet")
            .ssl_mode(match mode {
                SslMode::Disable => PgSslMode::Disable,
                SslMode::Prefer => PgSslMode::Prefer,
                SslMode::Require | SslMode::VerifyFull => PgSslMode::Require,
            });
        Ok(Resolved {
            config,
            mode,
            rootcert,
        })
    }

    /// Where the settings point, for messages: `host:port/dbname`, never the password.
    pub fn target(&self) -> String {
        let Ok(r) = self.resolve() else {
            return "the configured database".into();
        };
        let host = match r.config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        let port = r.config.get_ports().first().copied().unwrap_or(5432);
        let db = r
            .config
            .get_dbname()
            .or(r.config.get_user())
            .unwrap_or("postgres");
        format!("{host}:{port}/{db}")
    }

    /// Builds a pool. Connections are made on first use, so this fails only on bad settings
    /// (or an unreadable `sslrootcert`).
    pub fn pool(&self) -> Result<Pool, SettingsError> {
        let r = self.resolve()?;
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls_config(r.mode, r.rootcert)?);
        let manager = Manager::from_config(
            r.config,
            tls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        Pool::builder(manager)
            .max_size(self.pool_size.max(1))
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(5)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|_| SettingsError("the pool could not be built".into()))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The TLS client for `mode`: verify-full checks the chain against `rootcert` (or the system's
/// roots) and the host name; prefer and require check nothing, as libpq does.
fn tls_config(
    mode: SslMode,
    rootcert: Option<PathBuf>,
) -> Result<rustls::ClientConfig, SettingsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| SettingsError(format!("TLS: {e}")))?;
    if mode != SslMode::VerifyFull {
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
            .with_no_client_auth());
    }
    let mut roots = rustls::RootCertStore::empty();
    match rootcert {
        Some(path) => {
            let pem = std::fs::read(&path).map_err(|e| {
                SettingsError(format!("cannot read sslrootcert {}: {e}", path.display()))
            })?;
            let mut added = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| {
                    SettingsError(format!("sslrootcert {} is not PEM: {e}", path.display()))
                })?;
                roots
                    .add(cert)
                    .map_err(|e| SettingsError(format!("sslrootcert {}: {e}", path.display())))?;
                added += 1;
            }
            if added == 0 {
                return Err(SettingsError(format!(
                    "sslrootcert {} holds no certificate",
                    path.display()
                )));
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// libpq's `prefer` and `require`: encrypted, but the server's certificate is not checked.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_and_sslrootcert_are_read_off_the_url_and_the_rest_kept() {
        let s = PgSettings::from_url(
            "postgres://fleet:secret@db.internal:6432/fleet?sslmode=verify-full&sslrootcert=/etc/ca.pem&application_name=x",
        );
        let r = s.resolve().unwrap();
        assert_eq!(r.mode, SslMode::VerifyFull);
        assert_eq!(r.rootcert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(s.target(), "db.internal:6432/fleet");
        assert!(!s.target().contains("secret"));
        let r = PgSettings::from_url("postgres://u@h/d").resolve().unwrap();
        assert_eq!(r.mode, SslMode::Prefer, "libpq's default");
    }

    #[test]
    fn a_bad_sslmode_is_refused_by_name() {
        let err = PgSettings::from_url("postgres://u@h/d?sslmode=verify-ca")
            .pool()
            .unwrap_err()
            .to_string();
        assert!(err.contains("sslmode `verify-ca`"), "{err}");
    }

    #[test]
    fn separate_settings_fill_what_the_url_leaves_out() {
        let s = PgSettings {
            host: Some("10.0.0.5".into()),
            port: Some(5433),
            dbname: Some("fleet".into()),
            sslmode: Some(SslMode::Require),
            pool_size: 4,
            ..Default::default()
        };
        assert_eq!(s.target(), "10.0.0.5:5433/fleet");
        assert_eq!(s.resolve().unwrap().mode, SslMode::Require);
    }
}
