-- Dashboard sessions: only a SHA-256 of the session id is kept, with the hash of the token
-- that signed in, so that revoking the token ends its sessions.
CREATE TABLE dashboard_sessions (
    session_sha256  bytea PRIMARY KEY,
    token_sha256    bytea       NOT NULL,
    token_name      text        NOT NULL,
    role            text        NOT NULL CHECK (role IN ('admin', 'viewer')),
    created_at      timestamptz NOT NULL,
    idle_expires_at timestamptz NOT NULL,
    expires_at      timestamptz NOT NULL
);
CREATE INDEX dashboard_sessions_by_token ON dashboard_sessions (token_sha256);

-- The live stream tails the change log by id.
CREATE INDEX server_state_changes_by_id ON server_state_changes (id);
-- (The incident timeline is tailed by id as well: its primary key serves that.)

-- Server search: one lower-cased text of what a search reaches (name, hostname, region,
-- tags), kept by PostgreSQL, and a trigram index on it where pg_trgm is available (a trusted
-- extension in PostgreSQL's contrib, part of Debian's server package). Without it, search
-- scans this one column instead of four expressions per row.
ALTER TABLE managed_servers ADD COLUMN search_text text GENERATED ALWAYS AS (
    lower(name || ' ' || coalesce(hostname, '') || ' ' || coalesce(region, '') || ' ' || tags::text)
) STORED;
DO $$
BEGIN
    CREATE EXTENSION IF NOT EXISTS pg_trgm;
    CREATE INDEX managed_servers_search ON managed_servers USING gin (search_text gin_trgm_ops);
EXCEPTION WHEN OTHERS THEN
    RAISE NOTICE 'pg_trgm is unavailable, so server search scans the registry: %', SQLERRM;
END
$$;
