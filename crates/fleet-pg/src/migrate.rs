//! Schema migrations, embedded from the workspace's `migrations/` folder.

use deadpool_postgres::Pool;

mod embedded {
    refinery::embed_migrations!("../../migrations");
}

/// Migrations could not be applied. The messages carry the root cause once, so a chain of
/// sources does not repeat it.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// No connection.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migration(#[from] refinery::Error),
}

/// The innermost cause of an error: what actually went wrong.
pub(crate) fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    std::iter::successors(Some(e), |e| e.source())
        .last()
        .map(ToString::to_string)
        .unwrap_or_default()
}

/// Applies every pending migration; returns the names of those applied now.
pub async fn migrate(pool: &Pool) -> Result<Vec<String>, MigrateError> {
    let mut client = pool
        .get()
        .await
        .map_err(|e| MigrateError::Connect(root_cause(&e)))?;
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
