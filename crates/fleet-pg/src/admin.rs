//! Groups, admin tokens, server updates and LLM usage on PostgreSQL.

use std::collections::BTreeMap;

use async_trait::async_trait;
use fleet_core::{
    AdminTokens, GroupFields, GroupId, Groups, LlmUsage, ManagedServer, Resolution, Role,
    ServerGroup, ServerId, ServerUpdate, SessionRecord, Sessions, StoreError, TokenRecord,
};
use time::OffsetDateTime;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::store::{PgStore, db_error, parsed};

fn json_list(v: &[String]) -> serde_json::Value {
    serde_json::Value::Array(v.iter().cloned().map(serde_json::Value::String).collect())
}

fn list_from(v: serde_json::Value) -> Vec<String> {
    match v {
        serde_json::Value::Array(items) => items
            .into_iter()
            .filter_map(|i| i.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

fn conflict_as(what: &str, name: &str) -> impl Fn(StoreError) -> StoreError {
    let message = format!("a {what} named `{name}` already exists");
    move |e| match e {
        StoreError::Conflict(_) => StoreError::Conflict(message.clone()),
        other => other,
    }
}

const GROUP_SELECT: &str = "SELECT g.id, g.name, g.description, g.color, g.tags, g.regions, g.environments, \
     COALESCE(array_agg(m.server_id ORDER BY m.server_id) FILTER (WHERE m.server_id IS NOT NULL), '{}') AS members \
     FROM server_groups g LEFT JOIN server_group_members m ON m.group_id = g.id";

fn group_from_row(row: &Row) -> ServerGroup {
    let members: Vec<Uuid> = row.get("members");
    ServerGroup {
        id: GroupId(row.get("id")),
        name: row.get("name"),
        description: row.get("description"),
        color: row.get("color"),
        tags: list_from(row.get("tags")),
        regions: list_from(row.get("regions")),
        environments: list_from(row.get("environments")),
        members: members.into_iter().map(ServerId).collect(),
    }
}

impl PgStore {
    pub(crate) async fn update_server_row(
        &self,
        id: ServerId,
        u: ServerUpdate,
        sealed: Option<(Vec<u8>, String)>,
    ) -> Result<Option<ManagedServer>, StoreError> {
        let mut sets: Vec<String> = Vec::new();
        let mut params: Vec<Box<dyn ToSql + Sync + Send>> = vec![Box::new(id.0)];
        let mut set = |column: &str, value: Box<dyn ToSql + Sync + Send>| {
            params.push(value);
            sets.push(format!("{column} = ${}", params.len()));
        };
        let name = u.name.clone();
        if let Some(v) = u.name {
            set("name", Box::new(v));
        }
        if let Some(v) = u.api_url {
            set("api_url", Box::new(v));
        }
        if let Some(v) = u.description {
            set("description", Box::new(v));
        }
        if let Some(v) = u.hostname {
            set("hostname", Box::new(v));
        }
        if let Some(v) = u.region {
            set("region", Box::new(v));
        }
        if let Some(v) = u.environment {
            set("environment", Box::new(v));
        }
        if let Some(v) = u.tags {
            set("tags", Box::new(json_list(&v)));
        }
        if let Some(v) = u.metadata {
            set("metadata", Box::new(v));
        }
        if let Some(v) = u.status {
            set("status", Box::new(v.as_str().to_owned()));
        }
        if let Some(v) = u.kind {
            set("kind", Box::new(v.as_str().to_owned()));
        }
        if let Some(v) = u.metrics_path {
            set("metrics_path", Box::new(v));
        }
        if let Some(v) = u.ca_cert {
            set("ca_cert", Box::new(v));
        }
        if let Some((bytes, key_id)) = sealed {
            set("api_token_sealed", Box::new(bytes));
            set("api_token_key_id", Box::new(key_id));
        }
        sets.push("updated_at = now()".into());
        let sql = format!(
            "UPDATE managed_servers SET {} WHERE id = $1 RETURNING {}",
            sets.join(", "),
            crate::store::SERVER_COLUMNS
        );
        let client = self.client().await?;
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect();
        let row = client
            .query_opt(&sql, &refs)
            .await
            .map_err(db_error)
            .map_err(|e| match (&e, &name) {
                (StoreError::Conflict(_), Some(n)) => {
                    StoreError::Conflict(format!("a server named `{n}` already exists"))
                }
                _ => e,
            })?;
        row.as_ref().map(crate::store::server_from_row).transpose()
    }

    /// LLM use per server in `[from, to)`. Within the raw window it is read from raw samples;
    /// a range reaching further back is read from the finest rollups that cover each part:
    /// hourly rows for the whole hours, 5-minute rows for the rest of what is rolled up, and
    /// raw samples after that (with the step into the first one), so that no step counts
    /// twice or is missed at a seam.
    pub(crate) async fn usage(
        &self,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<LlmUsage>, StoreError> {
        let raw_floor = self.policy().raw_window().map(|w| self.clock_now() - w);
        let marks = self.rollup_marks().await?;
        let (rolled_from, rolled_5m) = match (raw_floor, marks.from_5m, marks.until_5m) {
            (Some(floor), Some(first), Some(r)) if from < floor && r > from.max(first) => {
                (first, r)
            }
            _ => return self.raw_usage(from, to, false).await,
        };
        let ceil = |res: Resolution, t: OffsetDateTime| {
            let f = res.floor(t);
            if f == t {
                t
            } else {
                f + res.period().unwrap_or_default()
            }
        };
        // Before the first rollup, and up to the next 5-minute boundary: raw rows.
        let head_5m = ceil(Resolution::FiveMinutes, from.max(rolled_from));
        let hour_from = ceil(Resolution::Hour, head_5m);
        let rolled_1h = marks.until_1h.unwrap_or(hour_from).max(hour_from).min(to);
        let rolled_5m = rolled_5m.min(to);
        let mut total: BTreeMap<ServerId, (i64, f64)> = BTreeMap::new();
        let mut add = |rows: Vec<LlmUsage>| {
            for u in rows {
                let t = total.entry(u.server_id).or_default();
                t.0 += u.requests;
                t.1 += u.cost_usd;
            }
        };
        add(self.raw_usage(from, head_5m.min(to), false).await?);
        add(self
            .tier_usage(
                "server_metrics_rollups_5m",
                head_5m,
                hour_from.min(rolled_5m),
            )
            .await?);
        add(self
            .tier_usage("server_metrics_rollups_1h", hour_from, rolled_1h)
            .await?);
        add(self
            .tier_usage("server_metrics_rollups_5m", rolled_1h, rolled_5m)
            .await?);
        add(self.raw_usage(rolled_5m.max(head_5m), to, true).await?);
        Ok(total
            .into_iter()
            .map(|(server_id, (requests, cost_usd))| LlmUsage {
                server_id,
                requests,
                cost_usd,
            })
            .collect())
    }

    /// The increases stored in a rollup tier for periods starting in `[from, to)`.
    async fn tier_usage(
        &self,
        table: &str,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<LlmUsage>, StoreError> {
        if from >= to {
            return Ok(Vec::new());
        }
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT server_id, COALESCE(sum(llm_requests_increase), 0)::int8, \
                            COALESCE(sum(llm_cost_usd_increase), 0)::float8 \
                     FROM {table} WHERE period_start >= $1 AND period_start < $2 \
                       AND (llm_requests_increase IS NOT NULL OR llm_cost_usd_increase IS NOT NULL) \
                     GROUP BY server_id"
                ),
                &[&from, &to],
            )
            .await
            .map_err(db_error)?;
        Ok(rows.iter().map(usage_row).collect())
    }

    /// Raw samples' increases in `[from, to)`; with `seam`, the step from the last sample
    /// before `from` (within 10 minutes) into the first one counts too.
    async fn raw_usage(
        &self,
        from: OffsetDateTime,
        to: OffsetDateTime,
        seam: bool,
    ) -> Result<Vec<LlmUsage>, StoreError> {
        if from >= to {
            return Ok(Vec::new());
        }
        // increase() per server: sum of positive steps, and after a drop (a restart) the new
        // value itself.
        let lookback = if seam {
            "interval '10 minutes'"
        } else {
            "interval '0'"
        };
        let sql = format!("
            WITH w AS (
                SELECT server_id, timestamp, llm_requests, llm_cost_usd,
                       lag(llm_requests) OVER (PARTITION BY server_id ORDER BY timestamp) AS prev_req,
                       lag(llm_cost_usd) OVER (PARTITION BY server_id ORDER BY timestamp) AS prev_cost,
                       count(*) OVER (PARTITION BY server_id) AS n
                FROM server_metrics_aggregated
                WHERE timestamp >= $1::timestamptz - {lookback} AND timestamp < $2
            )
            SELECT server_id,
                   COALESCE(sum(CASE WHEN prev_req IS NULL OR llm_requests IS NULL THEN 0
                                     WHEN llm_requests >= prev_req THEN llm_requests - prev_req
                                     ELSE llm_requests END), 0)::int8 AS requests,
                   COALESCE(sum(CASE WHEN prev_cost IS NULL OR llm_cost_usd IS NULL THEN 0
                                     WHEN llm_cost_usd >= prev_cost THEN llm_cost_usd - prev_cost
                                     ELSE llm_cost_usd END), 0)::float8 AS cost
            FROM w WHERE n >= 2 AND timestamp >= $1
            GROUP BY server_id ORDER BY server_id");
        let client = self.client().await?;
        let rows = client.query(&sql, &[&from, &to]).await.map_err(db_error)?;
        Ok(rows.iter().map(usage_row).collect())
    }
}

/// A row of (server, requests, cost).
fn usage_row(r: &Row) -> LlmUsage {
    LlmUsage {
        server_id: ServerId(r.get(0)),
        requests: r.get(1),
        cost_usd: r.get(2),
    }
}

#[async_trait]
impl Groups for PgStore {
    async fn create_group(&self, f: GroupFields) -> Result<ServerGroup, StoreError> {
        let Some(name) = f.name.clone() else {
            return Err(StoreError::Invalid("a group needs a name".into()));
        };
        let id = Uuid::new_v4();
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO server_groups (id, name, description, color, tags, regions, environments) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &id,
                    &name,
                    &f.description.flatten(),
                    &f.color.flatten(),
                    &json_list(&f.tags.unwrap_or_default()),
                    &json_list(&f.regions.unwrap_or_default()),
                    &json_list(&f.environments.unwrap_or_default()),
                ],
            )
            .await
            .map_err(db_error)
            .map_err(conflict_as("group", &name))?;
        drop(client);
        self.get_group(GroupId(id))
            .await?
            .ok_or_else(|| StoreError::backend("a created group vanished"))
    }

    async fn list_groups(&self) -> Result<Vec<ServerGroup>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!("{GROUP_SELECT} GROUP BY g.id ORDER BY g.name"),
                &[],
            )
            .await
            .map_err(db_error)?;
        Ok(rows.iter().map(group_from_row).collect())
    }

    async fn get_group(&self, id: GroupId) -> Result<Option<ServerGroup>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("{GROUP_SELECT} WHERE g.id = $1 GROUP BY g.id"),
                &[&id.0],
            )
            .await
            .map_err(db_error)?;
        Ok(row.as_ref().map(group_from_row))
    }

    async fn update_group(
        &self,
        id: GroupId,
        f: GroupFields,
    ) -> Result<Option<ServerGroup>, StoreError> {
        let name = f.name.clone();
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE server_groups SET
                    name = COALESCE($2, name),
                    description = CASE WHEN $3 THEN $4 ELSE description END,
                    color = CASE WHEN $5 THEN $6 ELSE color END,
                    tags = COALESCE($7, tags),
                    regions = COALESCE($8, regions),
                    environments = COALESCE($9, environments),
                    updated_at = now()
                 WHERE id = $1",
                &[
                    &id.0,
                    &f.name,
                    &f.description.is_some(),
                    &f.description.clone().flatten(),
                    &f.color.is_some(),
                    &f.color.clone().flatten(),
                    &f.tags.as_deref().map(json_list),
                    &f.regions.as_deref().map(json_list),
                    &f.environments.as_deref().map(json_list),
                ],
            )
            .await
            .map_err(db_error)
            .map_err(conflict_as("group", name.as_deref().unwrap_or("")))?;
        drop(client);
        if n == 0 {
            return Ok(None);
        }
        self.get_group(id).await
    }

    async fn delete_group(&self, id: GroupId) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let n = client
            .execute("DELETE FROM server_groups WHERE id = $1", &[&id.0])
            .await
            .map_err(db_error)?;
        Ok(n == 1)
    }

    async fn add_member(&self, group: GroupId, server: ServerId) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "WITH ok AS (
                    SELECT EXISTS (SELECT 1 FROM server_groups WHERE id = $1)
                       AND EXISTS (SELECT 1 FROM managed_servers WHERE id = $2) AS present
                 ), ins AS (
                    INSERT INTO server_group_members (group_id, server_id)
                    SELECT $1, $2 FROM ok WHERE ok.present
                    ON CONFLICT DO NOTHING
                 )
                 SELECT present FROM ok",
                &[&group.0, &server.0],
            )
            .await
            .map_err(db_error)?;
        Ok(row.get(0))
    }

    async fn remove_member(&self, group: GroupId, server: ServerId) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let n = client
            .execute(
                "DELETE FROM server_group_members WHERE group_id = $1 AND server_id = $2",
                &[&group.0, &server.0],
            )
            .await
            .map_err(db_error)?;
        Ok(n == 1)
    }

    async fn add_members(
        &self,
        group: GroupId,
        servers: &[ServerId],
    ) -> Result<Option<u64>, StoreError> {
        let ids: Vec<uuid::Uuid> = servers.iter().map(|s| s.0).collect();
        let client = self.client().await?;
        let row = client
            .query_one(
                "WITH g AS (SELECT id FROM server_groups WHERE id = $1),
                 ins AS (
                    INSERT INTO server_group_members (group_id, server_id)
                    SELECT g.id, m.id FROM g, managed_servers m
                    WHERE m.id = ANY($2)
                    ON CONFLICT DO NOTHING
                    RETURNING 1
                 )
                 SELECT EXISTS (SELECT 1 FROM g), (SELECT count(*) FROM ins)",
                &[&group.0, &ids],
            )
            .await
            .map_err(db_error)?;
        let exists: bool = row.get(0);
        Ok(exists.then(|| row.get::<_, i64>(1) as u64))
    }

    async fn remove_members(
        &self,
        group: GroupId,
        servers: &[ServerId],
    ) -> Result<Option<u64>, StoreError> {
        let ids: Vec<uuid::Uuid> = servers.iter().map(|s| s.0).collect();
        let client = self.client().await?;
        let row = client
            .query_one(
                "WITH del AS (
                    DELETE FROM server_group_members WHERE group_id = $1 AND server_id = ANY($2)
                    RETURNING 1
                 )
                 SELECT EXISTS (SELECT 1 FROM server_groups WHERE id = $1), (SELECT count(*) FROM del)",
                &[&group.0, &ids],
            )
            .await
            .map_err(db_error)?;
        let exists: bool = row.get(0);
        Ok(exists.then(|| row.get::<_, i64>(1) as u64))
    }
}

fn token_from_row(row: &Row) -> Result<TokenRecord, StoreError> {
    let role: String = row.get("role");
    Ok(TokenRecord {
        id: row.get("id"),
        name: row.get("name"),
        role: role
            .parse()
            .map_err(|_| StoreError::backend(format!("api_tokens.role holds `{role}`")))?,
        created_at: row.get("created_at"),
        revoked_at: row.get("revoked_at"),
    })
}

#[async_trait]
impl AdminTokens for PgStore {
    async fn insert_token(
        &self,
        name: &str,
        role: Role,
        sha256: [u8; 32],
    ) -> Result<TokenRecord, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "INSERT INTO api_tokens (id, name, role, token_sha256) VALUES ($1, $2, $3, $4) \
                 RETURNING id, name, role, created_at, revoked_at",
                &[&Uuid::new_v4(), &name, &role.as_str(), &sha256.as_slice()],
            )
            .await
            .map_err(db_error)
            .map_err(conflict_as("token", name))?;
        token_from_row(&row)
    }

    async fn find_token(&self, sha256: [u8; 32]) -> Result<Option<TokenRecord>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT id, name, role, created_at, revoked_at FROM api_tokens \
                 WHERE token_sha256 = $1 AND revoked_at IS NULL",
                &[&sha256.as_slice()],
            )
            .await
            .map_err(db_error)?;
        row.as_ref().map(token_from_row).transpose()
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, name, role, created_at, revoked_at FROM api_tokens ORDER BY name",
                &[],
            )
            .await
            .map_err(db_error)?;
        rows.iter().map(token_from_row).collect()
    }

    async fn revoke_token(&self, name: &str) -> Result<bool, StoreError> {
        let client = self.client().await?;
        // The token's sessions end in the same statement.
        let n: i64 = client
            .query_one(
                "WITH revoked AS (UPDATE api_tokens SET revoked_at = now() \
                     WHERE name = $1 AND revoked_at IS NULL RETURNING token_sha256), \
                 ended AS (DELETE FROM dashboard_sessions \
                     WHERE token_sha256 IN (SELECT token_sha256 FROM revoked)) \
                 SELECT count(*) FROM revoked",
                &[&name],
            )
            .await
            .map_err(db_error)?
            .get(0);
        Ok(n == 1)
    }
}

fn session_from_row(row: &Row) -> Result<SessionRecord, StoreError> {
    let hash = |column: &str| -> Result<[u8; 32], StoreError> {
        let bytes: &[u8] = row.get(column);
        bytes.try_into().map_err(|_| {
            StoreError::backend(format!("dashboard_sessions.{column} is not 32 bytes"))
        })
    };
    Ok(SessionRecord {
        sha256: hash("session_sha256")?,
        token_sha256: hash("token_sha256")?,
        token_name: row.get("token_name"),
        role: parsed("dashboard_sessions.role", row.get("role"))?,
        created_at: row.get("created_at"),
        idle_expires_at: row.get("idle_expires_at"),
        expires_at: row.get("expires_at"),
    })
}

#[async_trait]
impl Sessions for PgStore {
    async fn create_session(&self, s: SessionRecord) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        tx.execute(
            "DELETE FROM dashboard_sessions WHERE expires_at <= $1 OR idle_expires_at <= $1",
            &[&s.created_at],
        )
        .await
        .map_err(db_error)?;
        tx.execute(
            "INSERT INTO dashboard_sessions (session_sha256, token_sha256, token_name, role, \
             created_at, idle_expires_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &s.sha256.as_slice(),
                &s.token_sha256.as_slice(),
                &s.token_name,
                &s.role.as_str(),
                &s.created_at,
                &s.idle_expires_at,
                &s.expires_at,
            ],
        )
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)
    }

    async fn find_session(
        &self,
        sha256: [u8; 32],
        now: OffsetDateTime,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT s.* FROM dashboard_sessions s \
                 WHERE s.session_sha256 = $1 AND s.expires_at > $2 AND s.idle_expires_at > $2 \
                 AND NOT EXISTS (SELECT 1 FROM api_tokens t \
                     WHERE t.token_sha256 = s.token_sha256 AND t.revoked_at IS NOT NULL)",
            )
            .await
            .map_err(db_error)?;
        let row = client
            .query_opt(&stmt, &[&sha256.as_slice(), &now])
            .await
            .map_err(db_error)?;
        row.as_ref().map(session_from_row).transpose()
    }

    async fn touch_session(
        &self,
        sha256: [u8; 32],
        idle_expires_at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE dashboard_sessions SET idle_expires_at = least($2, expires_at) \
                 WHERE session_sha256 = $1",
                &[&sha256.as_slice(), &idle_expires_at],
            )
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn delete_session(&self, sha256: [u8; 32]) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let n = client
            .execute(
                "DELETE FROM dashboard_sessions WHERE session_sha256 = $1",
                &[&sha256.as_slice()],
            )
            .await
            .map_err(db_error)?;
        Ok(n == 1)
    }
}
