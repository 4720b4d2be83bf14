-- The fleet's LLM use over a long window (the summary's "last 30 days") in two reads, not
-- one row per server per hour of it: at the end of every hour the rollup job rolls up, it
-- writes each server's running totals, and a window's use is the difference between the
-- totals at its two ends. One row per hour holds the whole fleet's totals as three arrays
-- indexed by a server number (4 bytes, where the id takes 16): about 20 bytes per
-- server-hour, kept as long as the hourly tier (its monthly partitions go with the tier's).
CREATE TABLE server_numbers (
    num       integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    server_id uuid NOT NULL UNIQUE REFERENCES managed_servers (id) ON DELETE CASCADE
);

-- `servers` ascending; the totals are since the first hour of the chain (the first row), as of
-- the end of the hour starting at `period_start`.
CREATE TABLE server_llm_marks (
    period_start timestamptz NOT NULL,
    servers      integer[] NOT NULL,
    requests     bigint[] NOT NULL,
    cost_usd     double precision[] NOT NULL,
    PRIMARY KEY (period_start)
) PARTITION BY RANGE (period_start);

-- The rollup job reads a period's rows of the tier below across the whole fleet; the tiers'
-- keys lead with the server, so without these it scanned the whole day (or month) partition.
-- Rows are written period by period, so a block-range index is exact enough and tiny.
CREATE INDEX server_health_rollups_5m_time ON server_health_rollups_5m USING brin (period_start);
CREATE INDEX server_metrics_rollups_5m_time ON server_metrics_rollups_5m USING brin (period_start);
CREATE INDEX server_health_rollups_1h_time ON server_health_rollups_1h USING brin (period_start);
CREATE INDEX server_metrics_rollups_1h_time ON server_metrics_rollups_1h USING brin (period_start);
