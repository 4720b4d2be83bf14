//! [`Leases`] in PostgreSQL: `fleet_instances`, `fleet_bucket_leases` and `fleet_leader`.
//! Every expiry is computed with the database's `now()`, never an instance's clock. Every
//! statement that locks several lease rows takes them in bucket order (the fenced writers'
//! shares too), so a heartbeat and a write never wait on each other in a cycle.

use std::time::Duration;

use async_trait::async_trait;
use fleet_core::StoreError;
use fleet_core::cluster::{Beat, InstanceMeta, InstanceRecord, Lease, Leases};

use crate::store::{PgStore, db_error};

/// Instance rows silent for this many TTLs are removed by any heartbeat.
const STALE_TTLS: f64 = 30.0;

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn leases(rows: &[tokio_postgres::Row]) -> Vec<Lease> {
    rows.iter()
        .map(|r| Lease {
            bucket: r.get::<_, i16>(0) as u16,
            epoch: r.get(1),
        })
        .collect()
}

#[async_trait]
impl Leases for PgStore {
    async fn beat(&self, me: &InstanceMeta, ttl: Duration) -> Result<Beat, StoreError> {
        let client = self.client().await?;
        let ttl = seconds(ttl);
        // One statement: register or refresh, renew every bucket still ours (expired or not,
        // as long as nobody took it: the epoch stays), and list the live instances.
        let stmt = client
            .prepare_cached(
                "WITH me AS (
                     INSERT INTO fleet_instances (id, version) VALUES ($1, $2)
                     ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), version = EXCLUDED.version
                     RETURNING id
                 ), locked AS (
                     SELECT bucket FROM fleet_bucket_leases WHERE owner = $1
                     ORDER BY bucket FOR NO KEY UPDATE
                 ), renewed AS (
                     UPDATE fleet_bucket_leases SET expires_at = now() + make_interval(secs => $3)
                     WHERE owner = $1 AND bucket IN (SELECT bucket FROM locked)
                     RETURNING bucket, epoch
                 ), stale AS (
                     DELETE FROM fleet_instances
                     WHERE heartbeat_at < now() - make_interval(secs => $3 * $4) AND id <> $1
                 )
                 SELECT bucket, epoch, NULL::text FROM renewed
                 UNION ALL
                 SELECT NULL, NULL, id FROM fleet_instances
                 WHERE heartbeat_at > now() - make_interval(secs => $3) AND id <> $1
                 UNION ALL
                 SELECT NULL, NULL, id FROM me",
            )
            .await
            .map_err(db_error)?;
        let rows = client
            .query(&stmt, &[&me.id, &me.version, &ttl, &STALE_TTLS])
            .await
            .map_err(db_error)?;
        let mut beat = Beat::default();
        for r in &rows {
            match r.get::<_, Option<String>>(2) {
                Some(id) => beat.live.push(id),
                None => beat.owned.push(Lease {
                    bucket: r.get::<_, i16>(0) as u16,
                    epoch: r.get(1),
                }),
            }
        }
        beat.live.sort();
        beat.live.dedup();
        Ok(beat)
    }

    async fn release(&self, me: &str, buckets: &[u16]) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let buckets: Vec<i16> = buckets.iter().map(|&b| b as i16).collect();
        client
            .execute(
                "WITH locked AS (
                     SELECT bucket FROM fleet_bucket_leases WHERE owner = $1 AND bucket = ANY($2)
                     ORDER BY bucket FOR NO KEY UPDATE)
                 UPDATE fleet_bucket_leases SET owner = NULL, expires_at = '-infinity'
                 WHERE owner = $1 AND bucket IN (SELECT bucket FROM locked)",
                &[&me, &buckets],
            )
            .await
            .map_err(db_error)
    }

    async fn acquire(
        &self,
        me: &str,
        buckets: &[u16],
        ttl: Duration,
        take_expired: bool,
    ) -> Result<Vec<Lease>, StoreError> {
        let client = self.client().await?;
        let buckets: Vec<i16> = buckets.iter().map(|&b| b as i16).collect();
        let rows = client
            .query(
                "WITH locked AS (
                     SELECT bucket FROM fleet_bucket_leases WHERE bucket = ANY($2)
                     ORDER BY bucket FOR NO KEY UPDATE)
                 UPDATE fleet_bucket_leases
                 SET owner = $1, epoch = epoch + 1, expires_at = now() + make_interval(secs => $3)
                 WHERE bucket IN (SELECT bucket FROM locked)
                   AND (owner IS NULL OR ($4 AND owner <> $1 AND expires_at < now()))
                 RETURNING bucket, epoch",
                &[&me, &buckets, &seconds(ttl), &take_expired],
            )
            .await
            .map_err(db_error)?;
        Ok(leases(&rows))
    }

    async fn lead(
        &self,
        me: &str,
        ttl: Duration,
        take_expired: bool,
    ) -> Result<Option<i64>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "UPDATE fleet_leader
                 SET epoch = CASE WHEN owner = $1 THEN epoch ELSE epoch + 1 END,
                     owner = $1,
                     expires_at = now() + make_interval(secs => $2)
                 WHERE owner = $1 OR owner IS NULL OR ($3 AND expires_at < now())
                 RETURNING epoch",
                &[&me, &seconds(ttl), &take_expired],
            )
            .await
            .map_err(db_error)?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn leave(&self, me: &str) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        tx.execute(
            "WITH locked AS (
                 SELECT bucket FROM fleet_bucket_leases WHERE owner = $1
                 ORDER BY bucket FOR NO KEY UPDATE)
             UPDATE fleet_bucket_leases SET owner = NULL, expires_at = '-infinity'
             WHERE owner = $1 AND bucket IN (SELECT bucket FROM locked)",
            &[&me],
        )
        .await
        .map_err(db_error)?;
        tx.execute(
            "UPDATE fleet_leader SET owner = NULL, expires_at = '-infinity' WHERE owner = $1",
            &[&me],
        )
        .await
        .map_err(db_error)?;
        tx.execute("DELETE FROM fleet_instances WHERE id = $1", &[&me])
            .await
            .map_err(db_error)?;
        tx.commit().await.map_err(db_error)
    }

    async fn instances(&self, ttl: Duration) -> Result<Vec<InstanceRecord>, StoreError> {
        let client = self.client().await?;
        // Bounded by the instances and the 1,024 buckets, never by the fleet: active servers
        // are counted per bucket by triggers (server_bucket_tallies).
        let rows = client
            .query(
                "WITH owned AS (
                     SELECT l.owner, count(*) AS buckets, sum(t.active)::int8 AS servers
                     FROM fleet_bucket_leases l JOIN server_bucket_tallies t USING (bucket)
                     WHERE l.owner IS NOT NULL GROUP BY l.owner
                 )
                 SELECT i.id, i.version, EXTRACT(EPOCH FROM now() - i.heartbeat_at)::float8,
                        coalesce(o.buckets, 0), coalesce(o.servers, 0),
                        EXISTS (SELECT 1 FROM fleet_leader f WHERE f.owner = i.id AND f.expires_at > now())
                 FROM fleet_instances i
                 LEFT JOIN owned o ON o.owner = i.id
                 ORDER BY i.id",
                &[],
            )
            .await
            .map_err(db_error)?;
        let ttl = seconds(ttl);
        Ok(rows
            .iter()
            .map(|r| {
                let age: f64 = r.get(2);
                InstanceRecord {
                    id: r.get(0),
                    version: r.get(1),
                    heartbeat_age_seconds: age.max(0.0),
                    live: age < ttl,
                    buckets: r.get::<_, i64>(3) as u64,
                    servers: r.get::<_, i64>(4) as u64,
                    leader: r.get(5),
                }
            })
            .collect())
    }
}
