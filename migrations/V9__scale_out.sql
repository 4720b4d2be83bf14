-- Several instances share one fleet: each registers and heartbeats, servers fall into 1,024
-- hash buckets, buckets are leased with an owner, an expiry and an epoch, and one lease row
-- names the leader of fleet-wide jobs. Every expiry is on the database's clock.

CREATE TABLE fleet_instances (
    id           text PRIMARY KEY,
    version      text NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);

-- One row per bucket, made here, never inserted or deleted afterwards. `owner` is NULL when
-- released; `epoch` grows by one at every change of hands, and fences every per-server write.
CREATE TABLE fleet_bucket_leases (
    bucket     smallint PRIMARY KEY CHECK (bucket >= 0 AND bucket < 1024),
    owner      text,
    epoch      bigint NOT NULL DEFAULT 0,
    expires_at timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO fleet_bucket_leases (bucket) SELECT generate_series(0, 1023);
CREATE INDEX fleet_bucket_leases_owner ON fleet_bucket_leases (owner);

-- The leader's lease: a single row, so two unexpired leaders cannot exist.
CREATE TABLE fleet_leader (
    only_row   boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    owner      text,
    epoch      bigint NOT NULL DEFAULT 0,
    expires_at timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO fleet_leader DEFAULT VALUES;

-- A server's bucket: the last two bytes of its id (random in v4 and v7 ids) modulo 1,024.
-- fleet_core::cluster::bucket_of computes the same.
ALTER TABLE managed_servers
    ADD COLUMN bucket smallint NOT NULL
        GENERATED ALWAYS AS (((get_byte(uuid_send(id), 14) << 8) | get_byte(uuid_send(id), 15)) % 1024) STORED;
CREATE INDEX managed_servers_bucket ON managed_servers (bucket);

-- When the metrics worker last collected (or failed to collect) from a server: its next
-- collection is due 0.9 x interval later, whichever instance makes it.
ALTER TABLE managed_servers ADD COLUMN last_metrics_at timestamptz;

-- A check asked for by hand (check-now): not fenced, and not counted as a scheduled check.
ALTER TABLE server_health_checks ADD COLUMN manual boolean NOT NULL DEFAULT false;
