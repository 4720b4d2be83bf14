//! Fleet's PostgreSQL store.
//!
//! [`PgStore`] implements the core [`fleet_core::Store`], [`fleet_core::Registry`],
//! [`fleet_core::History`] and [`fleet_core::StorageCheck`] on a deadpool-postgres pool.
//! Each batch of results is one round trip (`UNNEST` arrays in one statement); probe tokens are
//! sealed with XChaCha20-Poly1305 ([`TokenVault`]); the two history tables are partitioned by
//! month, premade ahead and dropped past their retention.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use fleet_pg::{PartitionPolicy, PgSettings, PgStore, SecretKey, TokenVault};
//!
//! let pool = PgSettings::from_url("postgres://fleet@127.0.0.1/fleet").pool()?;
//! fleet_pg::migrate(&pool).await?;
//! let vault = TokenVault::new(Some(SecretKey::generate()));
//! let store = PgStore::new(pool, vault, Arc::new(fleet_core::SystemClock), PartitionPolicy::default());
//! store.maintain().await?;
//! # Ok(()) }
//! ```

mod admin;
mod alerts;
mod cluster;
mod crypto;
mod keys;
mod llm;
mod migrate;
mod partitions;
mod rollup;
mod settings;
mod store;
pub mod supervise;
#[cfg(feature = "test-util")]
pub mod testing;

pub use crypto::{CryptoError, SecretKey, TokenVault};
pub use keys::{Rotated, SEALED_COLUMNS, SealedColumn, unopenable_message};
pub use migrate::{MigrateError, migrate};
pub use partitions::{PARTITIONED, PartitionPolicy, YearMonth};
pub use rollup::{RollupReport, SETTLE};
pub use settings::{PgSettings, SettingsError, SslMode};
pub use store::PgStore;
