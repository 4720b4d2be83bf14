-- What a server speaks: Fleet's wire format (also served by fleet-agent), or node_exporter's
-- /metrics page, read from metrics_path when set.
ALTER TABLE managed_servers
    ADD COLUMN kind text NOT NULL DEFAULT 'fleet'
        CHECK (kind IN ('fleet', 'agent', 'node_exporter')),
    ADD COLUMN metrics_path text;
