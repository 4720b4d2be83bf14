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
    /// The database's schema is newer than this build knows: a newer Fleet migrated it.
    #[error(
        "the database's schema is at version {found}, newer than this Fleet knows (up to {known}); \
         run the newer Fleet, or restore a database of this version"
    )]
    Newer {
        /// The schema version in the database.
        found: i32,
        /// The newest version this build embeds.
        known: i32,
    },
    /// The migration lock could not be taken or given back.
    #[error("migration lock: {0}")]
    Lock(String),
}

/// The advisory lock migrations run under, so that instances starting together migrate once.
const MIGRATION_LOCK: i64 = 0x666c_6565_746d_6967; // "fleetmig"

/// The innermost cause of an error: what actually went wrong.
pub(crate) fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    std::iter::successors(Some(e), |e| e.source())
        .last()
        .map(ToString::to_string)
        .unwrap_or_default()
}

/// Applies every pending migration; returns the names of those applied now.
///
/// Runs under a session advisory lock, so that instances starting at once take turns, and
/// refuses a database whose schema is newer than this build's migrations.
pub async fn migrate(pool: &Pool) -> Result<Vec<String>, MigrateError> {
    let mut client = pool
        .get()
        .await
        .map_err(|e| MigrateError::Connect(root_cause(&e)))?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| MigrateError::Lock(root_cause(&e)))?;
    let report = locked(&mut client).await;
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    if unlocked.is_err() {
        // A session lock left behind would block every later migration on this connection's
        // server session: drop the connection instead of returning it to the pool.
        let _ = deadpool_postgres::Object::take(client);
    }
    let report = report?;
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

async fn locked(client: &mut deadpool_postgres::Object) -> Result<refinery::Report, MigrateError> {
    let runner = embedded::migrations::runner();
    let known = runner
        .get_migrations()
        .iter()
        .map(|m| m.version())
        .max()
        .unwrap_or(0);
    let lock_error = |e: tokio_postgres::Error| MigrateError::Lock(root_cause(&e));
    let history: bool = client
        .query_one(
            "SELECT to_regclass('refinery_schema_history') IS NOT NULL",
            &[],
        )
        .await
        .map_err(lock_error)?
        .get(0);
    let found: Option<i32> = if history {
        client
            .query_one("SELECT max(version) FROM refinery_schema_history", &[])
            .await
            .map_err(lock_error)?
            .get(0)
    } else {
        None
    };
    if let Some(found) = found
        && found > known
    {
        return Err(MigrateError::Newer { found, known });
    }
    Ok(runner.run_async(&mut ***client).await?)
}
