-- Fleet's schema. Table and column names follow the original design so that its operators'
-- queries keep working.

CREATE TABLE managed_servers (
    id                    uuid PRIMARY KEY,
    name                  text NOT NULL UNIQUE,
    description           text,
    hostname              text,
    api_url               text NOT NULL,
    -- The probe token, sealed with XChaCha20-Poly1305: a 24-byte nonce, then the ciphertext.
    api_token_sealed      bytea,
    -- Which key sealed it, so keys can be rotated without a flag day.
    api_token_key_id      text,
    version               text,
    region                text,
    environment           text,
    status                text NOT NULL DEFAULT 'active'
                          CHECK (status IN ('active', 'inactive', 'maintenance')),
    health_status         text
                          CHECK (health_status IN ('healthy', 'degraded', 'critical', 'unreachable')),
    last_seen_at          timestamptz,
    last_health_check_at  timestamptz,
    last_metrics_error    text,
    last_metrics_error_at timestamptz,
    tags                  jsonb NOT NULL DEFAULT '[]'::jsonb,
    metadata              jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    CHECK ((api_token_sealed IS NULL) = (api_token_key_id IS NULL))
);

-- The health worker's selection: active servers, stalest first, never-checked first.
CREATE INDEX managed_servers_health_due
    ON managed_servers (last_health_check_at ASC NULLS FIRST, id)
    WHERE status = 'active';
-- The metrics worker's selection: active healthy or degraded servers, most recently seen first.
CREATE INDEX managed_servers_metrics_due
    ON managed_servers (last_seen_at DESC NULLS LAST, id)
    WHERE status = 'active' AND health_status IN ('healthy', 'degraded');
-- The API's filters.
CREATE INDEX managed_servers_status ON managed_servers (status);
CREATE INDEX managed_servers_health_status ON managed_servers (health_status);
CREATE INDEX managed_servers_region ON managed_servers (region);
CREATE INDEX managed_servers_environment ON managed_servers (environment);
CREATE INDEX managed_servers_tags ON managed_servers USING gin (tags);
CREATE INDEX managed_servers_last_seen_at ON managed_servers (last_seen_at);

CREATE TABLE server_groups (
    id           uuid PRIMARY KEY,
    name         text NOT NULL UNIQUE,
    description  text,
    color        text,
    tags         jsonb NOT NULL DEFAULT '[]'::jsonb,
    regions      jsonb NOT NULL DEFAULT '[]'::jsonb,
    environments jsonb NOT NULL DEFAULT '[]'::jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE server_group_members (
    server_id uuid NOT NULL REFERENCES managed_servers (id) ON DELETE CASCADE,
    group_id  uuid NOT NULL REFERENCES server_groups (id) ON DELETE CASCADE,
    added_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, server_id)
);
CREATE INDEX server_group_members_server ON server_group_members (server_id);

-- One row per check. Lean on purpose: no copy of the answer, error_details only when
-- something is unhealthy. `responded` is not stored: it is `status <> 'unreachable'`.
-- No foreign key: a per-row check would cost every batch; deleting a server deletes its
-- history explicitly, and batches skip servers that no longer exist.
CREATE TABLE server_health_checks (
    server_id        uuid NOT NULL,
    timestamp        timestamptz NOT NULL,
    status           text NOT NULL,
    response_time_ms integer,
    database_healthy boolean,
    redis_healthy    boolean,
    services_healthy boolean,
    successful       boolean NOT NULL,
    error_message    text,
    error_details    jsonb,
    PRIMARY KEY (server_id, timestamp)
) PARTITION BY RANGE (timestamp);

CREATE TABLE server_metrics_aggregated (
    server_id        uuid NOT NULL,
    timestamp        timestamptz NOT NULL,
    period           text NOT NULL,
    cpu_percent      double precision,
    memory_percent   double precision,
    disk_percent     double precision,
    network_rx_bytes bigint,
    network_tx_bytes bigint,
    active_services  bigint,
    failed_services  bigint,
    total_services   bigint,
    llm_requests     bigint,
    llm_cost_usd     double precision,
    active_users     bigint,
    total_users      bigint,
    PRIMARY KEY (server_id, timestamp, period)
) PARTITION BY RANGE (timestamp);

-- Admin API tokens: only a SHA-256 of each is kept.
CREATE TABLE api_tokens (
    id           uuid PRIMARY KEY,
    name         text NOT NULL UNIQUE,
    role         text NOT NULL CHECK (role IN ('admin', 'viewer')),
    token_sha256 bytea NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);
