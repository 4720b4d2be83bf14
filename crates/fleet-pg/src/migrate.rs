//! Schema migrations, embedded from the workspace's `migrations/` folder.

use deadpool_postgres::Pool;

mod embedded {
    refinery::embed_migrations!("../../migrations");
}

/// Migrations could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// No connection.
    #[error("cannot connect to apply migrations: {0}")]
    Connect(#[from] deadpool_postgres::PoolError),
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migration(#[from] refinery::Error),
}

/// Applies every pending migration; returns the names of those applied now.
pub async fn migrate(pool: &Pool) -> Result<Vec<String>, MigrateError> {
    let mut client = pool.get().await?;
    let report = embedded::migrations::runner()
        .run_async(&mut **client)
        .await?;
    let applied: Vec<String> = report
        .applied_migrations()
        .iter()
        .map(|m| m.to_string())
        .collect();
    if !applied.is_empty() {
        tracing::info!(target: "fleet::pg", "applied migrations: {}", applied.join(", "));
    }
    Ok(applied)
}
