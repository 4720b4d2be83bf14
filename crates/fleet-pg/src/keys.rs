//! Every sealed column, and what it takes to check and rotate their keys.
//!
//! A sealed value is bound to its row's id (associated data), and each row records the id of
//! the key that sealed it. Features that seal something new add their column to
//! [`SEALED_COLUMNS`], and both the start-up check and `keys rotate` cover it.

use std::collections::BTreeMap;

use fleet_core::{ServerId, StoreError};

use crate::crypto::TokenVault;
use crate::store::{PgStore, db_error};

/// A column of sealed values, with the row id they are bound to and their key id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealedColumn {
    /// How it is named in reports: `table.column`.
    pub label: &'static str,
    /// The table.
    pub table: &'static str,
    /// The row's id, the sealed value's associated data.
    pub id: &'static str,
    /// The sealed bytes.
    pub sealed: &'static str,
    /// The id of the key that sealed them.
    pub key_id: &'static str,
}

/// Every sealed column: probe tokens, and alert channels' configurations (their URLs,
/// routing keys and passwords are secrets).
pub const SEALED_COLUMNS: &[SealedColumn] = &[
    SealedColumn {
        label: "managed_servers.api_token",
        table: "managed_servers",
        id: "id",
        sealed: "api_token_sealed",
        key_id: "api_token_key_id",
    },
    SealedColumn {
        label: "alert_channels.config",
        table: "alert_channels",
        id: "id",
        sealed: "config_sealed",
        key_id: "config_key_id",
    },
];

/// What `keys rotate` did to one column.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rotated {
    /// Values sealed again under the current key.
    pub resealed: u64,
    /// Values already under the current key.
    pub current: u64,
}

/// Rows re-sealed per transaction.
const ROTATE_BATCH: i64 = 500;

impl PgStore {
    /// The key ids in use in every sealed column, with how many values each seals.
    pub async fn key_ids_in_use(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let client = self.client().await?;
        let mut used = BTreeMap::new();
        for c in SEALED_COLUMNS {
            let sql = format!(
                "SELECT {key}, count(*) FROM {table} WHERE {key} IS NOT NULL GROUP BY {key}",
                key = c.key_id,
                table = c.table
            );
            for row in client.query(&sql, &[]).await.map_err(db_error)? {
                let n: i64 = row.get(1);
                *used.entry(row.get::<_, String>(0)).or_default() += n as u64;
            }
        }
        Ok(used)
    }

    /// The key ids in use that no configured key opens, with how many values each seals.
    /// Empty when every sealed value can be opened.
    pub async fn unopenable_keys(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let vault = self.vault();
        let mut used = self.key_ids_in_use().await?;
        used.retain(|id, _| !vault.has_key(id));
        Ok(used)
    }

    /// Re-seals every sealed value under the current key, column by column, in batches; the
    /// counts per column. Refused, changing nothing, when some value is sealed under a key
    /// that is not configured (as current or previous).
    pub async fn rotate_keys(&self) -> Result<BTreeMap<&'static str, Rotated>, StoreError> {
        let vault = self.vault();
        let Some(current) = vault.current_id().map(str::to_owned) else {
            return Err(StoreError::Invalid(
                "rotating keys needs the new key as FLEET_SECRET_KEY".into(),
            ));
        };
        let unknown = self.unopenable_keys().await?;
        if !unknown.is_empty() {
            return Err(StoreError::Invalid(unopenable_message(&unknown)));
        }
        let mut report = BTreeMap::new();
        for c in SEALED_COLUMNS {
            let mut done = Rotated::default();
            loop {
                let n = self.rotate_batch(c, vault, &current).await?;
                if n == 0 {
                    break;
                }
                done.resealed += n;
            }
            let client = self.client().await?;
            let sql = format!(
                "SELECT count(*) FROM {table} WHERE {key} = $1",
                table = c.table,
                key = c.key_id
            );
            let n: i64 = client
                .query_one(&sql, &[&current])
                .await
                .map_err(db_error)?
                .get(0);
            done.current = n as u64 - done.resealed;
            report.insert(c.label, done);
        }
        Ok(report)
    }

    async fn rotate_batch(
        &self,
        c: &SealedColumn,
        vault: &TokenVault,
        current: &str,
    ) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        let select = format!(
            "SELECT {id}, {sealed}, {key} FROM {table} WHERE {key} <> $1 ORDER BY {id} LIMIT $2 FOR UPDATE",
            id = c.id,
            sealed = c.sealed,
            key = c.key_id,
            table = c.table
        );
        let update = format!(
            "UPDATE {table} SET {sealed} = $2, {key} = $3 WHERE {id} = $1",
            table = c.table,
            sealed = c.sealed,
            key = c.key_id,
            id = c.id
        );
        let rows = tx
            .query(&select, &[&current, &ROTATE_BATCH])
            .await
            .map_err(db_error)?;
        for row in &rows {
            let id = ServerId(row.get(0));
            let sealed: Vec<u8> = row.get(1);
            let key_id: String = row.get(2);
            let value = vault
                .open(id, &sealed, &key_id)
                .map_err(|e| StoreError::Invalid(format!("{} of row {}: {e}", c.label, id.0)))?;
            let (resealed, new_key) = vault
                .seal(id, &value)
                .map_err(|e| StoreError::Invalid(e.to_string()))?;
            tx.execute(&update, &[&id.0, &resealed, &new_key])
                .await
                .map_err(db_error)?;
        }
        tx.commit().await.map_err(db_error)?;
        Ok(rows.len() as u64)
    }
}

/// `probe tokens sealed under keys 1a2b3c (12), 4d5e6f (3), which no configured key opens: …`
pub fn unopenable_message(unknown: &BTreeMap<String, u64>) -> String {
    let keys: Vec<String> = unknown
        .iter()
        .map(|(id, n)| format!("{id} ({n})"))
        .collect();
    format!(
        "sealed values exist under key id(s) {}, which neither FLEET_SECRET_KEY nor FLEET_SECRET_KEY_PREVIOUS opens: start with the key that sealed them (as FLEET_SECRET_KEY, or in FLEET_SECRET_KEY_PREVIOUS to rotate with `fleet-server keys rotate`)",
        keys.join(", ")
    )
}
