//! The fleet's LLM use over long windows from running totals (`server_llm_marks`, V15).
//!
//! Summing a window's hourly rows reads one row per server per hour: 72 million rows for a
//! 30-day summary of 100,000 servers. Instead, as the rollup job rolls up each hour it writes
//! every server's running totals as of the hour's end, and a window on whole hours is the
//! difference between two of those rows. A row holds the whole fleet as three arrays keyed by
//! a server number, so reading one costs about 20 bytes per server, whatever the window.

use fleet_core::{LlmSummary, LlmUsage, Resolution, ServerId, StoreError};
use time::{Duration, OffsetDateTime};
use tokio_postgres::Transaction;

use crate::store::{PgStore, db_error};

/// Numbers the servers that used an LLM in the hour `$1` for the first time. Servers already
/// numbered are skipped before the insert, so that the identity is not spent every hour.
const NUMBER_SERVERS: &str = "\
INSERT INTO server_numbers (server_id)
SELECT r.server_id FROM server_metrics_rollups_1h r JOIN managed_servers m ON m.id = r.server_id
WHERE r.period_start = $1
  AND (r.llm_requests_increase IS NOT NULL OR r.llm_cost_usd_increase IS NOT NULL)
  AND NOT EXISTS (SELECT 1 FROM server_numbers n WHERE n.server_id = r.server_id)
ORDER BY r.server_id
ON CONFLICT (server_id) DO NOTHING";

/// The totals at the end of the hour `$1`: the previous hour's, plus the hour's increases (the
/// hourly tier's, resets already handled), for every server still registered.
const MARK_HOUR: &str = "\
WITH prev AS (
    SELECT u.num, u.requests, u.cost_usd
    FROM server_llm_marks m, unnest(m.servers, m.requests, m.cost_usd) AS u(num, requests, cost_usd)
    WHERE m.period_start = $1::timestamptz - interval '1 hour'
), hour AS (
    SELECT n.num, coalesce(r.llm_requests_increase, 0) AS requests,
           coalesce(r.llm_cost_usd_increase, 0) AS cost_usd
    FROM server_metrics_rollups_1h r JOIN server_numbers n ON n.server_id = r.server_id
    WHERE r.period_start = $1
      AND (r.llm_requests_increase IS NOT NULL OR r.llm_cost_usd_increase IS NOT NULL)
), totals AS (
    SELECT t.num, sum(t.requests)::int8 AS requests, sum(t.cost_usd)::float8 AS cost_usd
    FROM (SELECT * FROM prev UNION ALL SELECT * FROM hour) t
    WHERE t.num IN (SELECT num FROM server_numbers)
    GROUP BY t.num
)
INSERT INTO server_llm_marks (period_start, servers, requests, cost_usd)
SELECT $1, coalesce(array_agg(num ORDER BY num), '{}'), coalesce(array_agg(requests ORDER BY num), '{}'),
       coalesce(array_agg(cost_usd ORDER BY num), '{}')
FROM totals
ON CONFLICT (period_start) DO NOTHING";

/// Use between the totals at the end of hour `$2` (none: the chain's start) and at the end of
/// hour `$1`, for servers still registered: first the fleet's totals (a row without a
/// server), then the `$3` largest spenders.
const MARKS_BETWEEN: &str = "\
WITH a AS (
    SELECT u.* FROM server_llm_marks m, unnest(m.servers, m.requests, m.cost_usd) AS u(num, requests, cost_usd)
    WHERE m.period_start = $1
), b AS (
    SELECT u.* FROM server_llm_marks m, unnest(m.servers, m.requests, m.cost_usd) AS u(num, requests, cost_usd)
    WHERE m.period_start = $2
), d AS (
    SELECT n.server_id, a.requests - coalesce(b.requests, 0) AS requests,
           a.cost_usd - coalesce(b.cost_usd, 0) AS cost_usd
    FROM a JOIN server_numbers n ON n.num = a.num LEFT JOIN b ON b.num = a.num
)
SELECT NULL::uuid, coalesce(sum(requests), 0)::int8, coalesce(sum(cost_usd), 0)::float8 FROM d
UNION ALL
(SELECT server_id, requests, cost_usd FROM d WHERE requests <> 0 OR cost_usd <> 0
 ORDER BY cost_usd DESC, requests DESC, server_id LIMIT $3)";

/// Writes the running totals for each hour in `[from, to)`, in order, in the rollup's
/// transaction (so an hour's totals are written exactly once, with its rollups).
pub(crate) async fn mark_hours(
    tx: &Transaction<'_>,
    from: OffsetDateTime,
    to: OffsetDateTime,
) -> Result<(), StoreError> {
    let mut hour = from;
    while hour < to {
        tx.execute(NUMBER_SERVERS, &[&hour])
            .await
            .map_err(db_error)?;
        tx.execute(MARK_HOUR, &[&hour]).await.map_err(db_error)?;
        hour += Duration::hours(1);
    }
    Ok(())
}

const HOUR: Duration = Duration::hours(1);

/// Windows at least this long are totalled on whole hours unless raw samples are asked for.
const HOURLY_FROM: Duration = Duration::hours(24);

impl PgStore {
    /// [`fleet_core::History::llm_summary`] on PostgreSQL: whole hours from two running
    /// totals when they cover the window, else every sample (with the finest rollups past the
    /// raw window, as [`llm_usage`](fleet_core::History::llm_usage)).
    pub(crate) async fn summarise_llm(
        &self,
        (from, to): (OffsetDateTime, OffsetDateTime),
        resolution: Option<Resolution>,
        limit: usize,
    ) -> Result<LlmSummary, StoreError> {
        let hourly = match resolution {
            Some(Resolution::Hour) => true,
            None => to - from >= HOURLY_FROM,
            Some(_) => false,
        };
        if hourly {
            let hour = Resolution::Hour;
            let span = self.marks_span().await?;
            let end = span.map_or(hour.floor(to), |s| hour.floor(to).min(s.last + HOUR));
            let start = hour.floor(from).min(end);
            if let Some(span) = span
                && span.covers(start)
                && span.covers(end)
            {
                return self.between_marks(start, end, span, limit).await;
            }
            if resolution == Some(Resolution::Hour) {
                let usage = if start < end {
                    self.usage(start, end).await?
                } else {
                    Vec::new()
                };
                return Ok(LlmSummary::of((start, end), hour, usage, limit));
            }
        }
        let usage = self.usage(from, to).await?;
        Ok(LlmSummary::of((from, to), Resolution::Raw, usage, limit))
    }

    /// The first and last hour with running totals, and where the hourly tier starts.
    async fn marks_span(&self) -> Result<Option<MarksSpan>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT (SELECT min(period_start) FROM server_llm_marks), \
                        (SELECT max(period_start) FROM server_llm_marks), \
                        (SELECT rolled_from FROM rollup_progress WHERE tier = '1h')",
                &[],
            )
            .await
            .map_err(db_error)?;
        Ok(match (row.get(0), row.get(1)) {
            (Some(first), Some(last)) => Some(MarksSpan {
                first,
                last,
                tier_from: row.get(2),
            }),
            _ => None,
        })
    }

    async fn between_marks(
        &self,
        start: OffsetDateTime,
        end: OffsetDateTime,
        span: MarksSpan,
        limit: usize,
    ) -> Result<LlmSummary, StoreError> {
        let window = (start, end);
        if start >= end {
            return Ok(LlmSummary::of(window, Resolution::Hour, Vec::new(), limit));
        }
        // The totals at an hour boundary are the mark of the hour before it; at or before the
        // chain's first hour they are nothing.
        let mark_before = |t: OffsetDateTime| (t > span.first).then(|| t - HOUR);
        let client = self.client().await?;
        let rows = client
            .query(
                MARKS_BETWEEN,
                &[
                    &mark_before(end),
                    &mark_before(start),
                    &i64::try_from(limit).unwrap_or(i64::MAX),
                ],
            )
            .await
            .map_err(db_error)?;
        let mut summary = LlmSummary::of(window, Resolution::Hour, Vec::new(), limit);
        for row in &rows {
            match row.get::<_, Option<uuid::Uuid>>(0) {
                None => {
                    summary.total_requests = row.get(1);
                    summary.total_cost_usd = row.get(2);
                }
                Some(id) => summary.top.push(LlmUsage {
                    server_id: ServerId(id),
                    requests: row.get(1),
                    cost_usd: row.get(2),
                }),
            }
        }
        Ok(summary)
    }
}

/// Where the running totals stand.
#[derive(Clone, Copy, Debug)]
struct MarksSpan {
    /// The first hour with totals: they count from its start.
    first: OffsetDateTime,
    /// The last hour with totals.
    last: OffsetDateTime,
    /// Where the hourly tier starts: when the totals start there too, nothing came before.
    tier_from: Option<OffsetDateTime>,
}

impl MarksSpan {
    /// Whether the totals at the hour boundary `t` are known.
    fn covers(self, t: OffsetDateTime) -> bool {
        if t <= self.first {
            t == self.first || self.tier_from.is_some_and(|f| f >= self.first)
        } else {
            t <= self.last + HOUR
        }
    }
}
