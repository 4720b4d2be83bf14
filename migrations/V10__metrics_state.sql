-- When each server's metrics were last collected, apart from managed_servers: updating that
-- row for every sample made the metrics writer take the row locks the health writer takes,
-- and at 100,000 servers the two writers queued behind each other (docs/benchmarks.md).
CREATE TABLE server_metrics_state (
    server_id       uuid PRIMARY KEY,
    last_metrics_at timestamptz NOT NULL
);
INSERT INTO server_metrics_state (server_id, last_metrics_at)
    SELECT id, last_metrics_at FROM managed_servers WHERE last_metrics_at IS NOT NULL;
ALTER TABLE managed_servers DROP COLUMN last_metrics_at;
