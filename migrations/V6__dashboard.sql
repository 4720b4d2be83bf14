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
