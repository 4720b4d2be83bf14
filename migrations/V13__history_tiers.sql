-- History that fits on a disk: raw rows for a short window, compact rollups for the long term.
--
-- Raw history keeps its tables and monthly partitions (server_health_checks_YYYY_MM,
-- server_metrics_aggregated_YYYY_MM), but the partition upkeep now makes each month
-- partitioned by day (…_YYYY_MM_DD), so rows past the raw window go by dropping a day's
-- partition, never by DELETE. Month partitions made before this migration cannot be split in
-- place: the empty ones are dropped here (the upkeep makes them again, split); one holding rows
-- stays whole and goes by the monthly retention as before.
DO $$
DECLARE
    part record;
    has_rows boolean;
BEGIN
    FOR part IN
        SELECT c.relname::text AS name
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        JOIN pg_class p ON p.oid = i.inhparent
        WHERE p.relname IN ('server_health_checks', 'server_metrics_aggregated') AND c.relkind = 'r'
    LOOP
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I)', part.name) INTO has_rows;
        IF NOT has_rows THEN
            EXECUTE format('DROP TABLE %I', part.name);
        END IF;
    END LOOP;
END $$;

-- The rollup job reads raw rows by time, a few minutes at a time: a BRIN index finds them
-- (rows arrive in time order), at a few pages per partition.
CREATE INDEX server_health_checks_time ON server_health_checks USING brin (timestamp);
CREATE INDEX server_metrics_aggregated_time ON server_metrics_aggregated USING brin (timestamp);

-- Health rollups per server per 5 minutes (res 'm') and per hour (res 'h'): checks by status,
-- response times (min, max, sum and count for the mean, and a histogram for the p95 with the
-- upper bounds 25, 50, 100, 200, 400, 800, 1600, 3200, 6400 ms and beyond), the last error.
-- Written once per closed period by the rollup job; never updated. Columns are ordered
-- widest first and counts are smallint (an hour holds at most 32,767 checks), so that a row
-- carries no padding: the hourly tier is what a fleet keeps for 13 months.
CREATE TABLE server_health_rollups (
    period_start timestamptz NOT NULL,
    rt_sum       bigint NOT NULL,
    server_id    uuid NOT NULL,
    rt_min       integer,
    rt_max       integer,
    healthy      smallint NOT NULL,
    degraded     smallint NOT NULL,
    critical     smallint NOT NULL,
    unreachable  smallint NOT NULL,
    rt_count     smallint NOT NULL,
    h0 smallint NOT NULL, h1 smallint NOT NULL, h2 smallint NOT NULL, h3 smallint NOT NULL,
    h4 smallint NOT NULL, h5 smallint NOT NULL, h6 smallint NOT NULL, h7 smallint NOT NULL,
    h8 smallint NOT NULL, h9 smallint NOT NULL,
    res          "char" NOT NULL,
    last_error   text
) PARTITION BY LIST (res);

-- The 5-minute tier by day (dropped past FLEET_ROLLUP_5M_RETENTION_DAYS), the hourly tier by
-- month (past FLEET_ROLLUP_1H_RETENTION_MONTHS); the upkeep makes the leaves.
CREATE TABLE server_health_rollups_5m PARTITION OF server_health_rollups FOR VALUES IN ('m')
    PARTITION BY RANGE (period_start);
ALTER TABLE server_health_rollups_5m ADD PRIMARY KEY (server_id, period_start);
CREATE TABLE server_health_rollups_1h PARTITION OF server_health_rollups FOR VALUES IN ('h')
    PARTITION BY RANGE (period_start);
ALTER TABLE server_health_rollups_1h ADD PRIMARY KEY (server_id, period_start);

-- Metrics rollups: min, mean and max of every gauge (percentages in hundredths of a percent and
-- service counts as smallint), and the increase of every counter over the period, resets counted as
-- Prometheus's increase() does (a drop starts again from zero).
CREATE TABLE server_metrics_rollups (
    period_start timestamptz NOT NULL,
    llm_requests_increase bigint,
    llm_cost_usd_increase double precision,
    network_rx_bytes_increase bigint,
    network_tx_bytes_increase bigint,
    server_id    uuid NOT NULL,
    samples      integer NOT NULL,
    active_users_min integer, active_users_mean real, active_users_max integer,
    total_users_min integer, total_users_mean real, total_users_max integer,
    active_services_mean real, failed_services_mean real, total_services_mean real,
    active_services_min smallint, active_services_max smallint,
    failed_services_min smallint, failed_services_max smallint,
    total_services_min smallint, total_services_max smallint,
    cpu_min smallint, cpu_mean smallint, cpu_max smallint,
    memory_min smallint, memory_mean smallint, memory_max smallint,
    disk_min smallint, disk_mean smallint, disk_max smallint,
    res          "char" NOT NULL
) PARTITION BY LIST (res);

CREATE TABLE server_metrics_rollups_5m PARTITION OF server_metrics_rollups FOR VALUES IN ('m')
    PARTITION BY RANGE (period_start);
ALTER TABLE server_metrics_rollups_5m ADD PRIMARY KEY (server_id, period_start);
CREATE TABLE server_metrics_rollups_1h PARTITION OF server_metrics_rollups FOR VALUES IN ('h')
    PARTITION BY RANGE (period_start);
ALTER TABLE server_metrics_rollups_1h ADD PRIMARY KEY (server_id, period_start);

-- How far each tier is rolled up: every period from `rolled_from` (where the first run
-- started: the raw window back from then) to `rolled_until` is done, each exactly once (a
-- period's rows and this mark move in one transaction). Reads before `rolled_from` use raw rows.
CREATE TABLE rollup_progress (
    tier          text PRIMARY KEY CHECK (tier IN ('5m', '1h')),
    rolled_from   timestamptz,
    rolled_until  timestamptz
);
INSERT INTO rollup_progress (tier) VALUES ('5m'), ('1h');
