-- Alerts and incidents: per-server alert phases (only their transitions are written),
-- incidents with members and an append-only timeline, the outbox, and configuration.

CREATE TABLE alert_phases (
    server_id  uuid        NOT NULL REFERENCES managed_servers (id) ON DELETE CASCADE,
    rule       text        NOT NULL,
    detail     text        NOT NULL DEFAULT '',
    phase      text        NOT NULL CHECK (phase IN ('pending', 'firing', 'recovering')),
    since      timestamptz NOT NULL,
    changed_at timestamptz NOT NULL,
    PRIMARY KEY (server_id, rule, detail)
);

CREATE TABLE incidents (
    id              uuid PRIMARY KEY,
    group_key       text        NOT NULL,
    rule            text        NOT NULL,
    severity        text        NOT NULL CHECK (severity IN ('critical', 'warning')),
    region          text,
    state           text        NOT NULL CHECK (state IN ('firing', 'acknowledged', 'resolved')),
    summary         text        NOT NULL,
    opened_at       timestamptz NOT NULL,
    acknowledged_at timestamptz,
    acknowledged_by text,
    ack_reason      text,
    resolved_at     timestamptz,
    servers         bigint      NOT NULL DEFAULT 0,
    covers          bigint      NOT NULL DEFAULT 0,
    -- The engine's timers, so that a restart goes on where it stopped.
    seq             integer     NOT NULL DEFAULT 0,
    announced_at    timestamptz,
    notified_at     timestamptz,
    additions       boolean     NOT NULL DEFAULT false,
    immediate       boolean     NOT NULL DEFAULT false,
    escalated_until bigint      NOT NULL DEFAULT 0,
    told            uuid[]      NOT NULL DEFAULT '{}'
);
-- Two evaluators can never both open an incident for one group.
CREATE UNIQUE INDEX incidents_one_open_per_group ON incidents (group_key) WHERE state <> 'resolved';
CREATE INDEX incidents_by_opened ON incidents (opened_at DESC, id);
CREATE INDEX incidents_open_by_severity ON incidents (severity) WHERE state <> 'resolved';

CREATE TABLE incident_members (
    incident_id uuid        NOT NULL REFERENCES incidents (id) ON DELETE CASCADE,
    server_id   uuid        NOT NULL,
    server_name text        NOT NULL,
    region      text,
    detail      text        NOT NULL DEFAULT '',
    joined_at   timestamptz NOT NULL,
    resolved_at timestamptz,
    PRIMARY KEY (incident_id, server_id, detail)
);
CREATE INDEX incident_members_by_server ON incident_members (server_id);

CREATE TABLE incident_timeline (
    id          bigserial PRIMARY KEY,
    incident_id uuid        NOT NULL REFERENCES incidents (id) ON DELETE CASCADE,
    at          timestamptz NOT NULL,
    kind        text        NOT NULL,
    message     text        NOT NULL,
    channel_id  uuid
);
CREATE INDEX incident_timeline_by_incident ON incident_timeline (incident_id, id);

-- A channel's whole configuration is sealed: URLs, routing keys and passwords are secrets.
CREATE TABLE alert_channels (
    id            uuid PRIMARY KEY,
    name          text        NOT NULL,
    kind          text        NOT NULL,
    config_sealed bytea       NOT NULL,
    config_key_id text        NOT NULL,
    created_at    timestamptz NOT NULL
);
CREATE UNIQUE INDEX alert_channels_name ON alert_channels (lower(name));

CREATE TABLE alert_outbox (
    id              bigserial PRIMARY KEY,
    incident_id     uuid        NOT NULL REFERENCES incidents (id) ON DELETE CASCADE,
    seq             integer     NOT NULL,
    channel_id      uuid        NOT NULL REFERENCES alert_channels (id) ON DELETE CASCADE,
    kind            text        NOT NULL,
    notice          jsonb       NOT NULL,
    state           text        NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'failed')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    claim_token     uuid,
    claim_until     timestamptz,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz,
    UNIQUE (incident_id, seq, channel_id)
);
CREATE INDEX alert_outbox_due ON alert_outbox (next_attempt_at, id) WHERE state = 'pending';

CREATE TABLE alert_silences (
    id         uuid PRIMARY KEY,
    matchers   jsonb       NOT NULL,
    starts_at  timestamptz NOT NULL,
    ends_at    timestamptz NOT NULL CHECK (ends_at > starts_at),
    comment    text        NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL
);

CREATE TABLE maintenance_windows (
    id         uuid PRIMARY KEY,
    name       text        NOT NULL,
    scope      jsonb       NOT NULL,
    schedule   jsonb       NOT NULL,
    created_at timestamptz NOT NULL
);

CREATE TABLE alert_policies (
    id         uuid PRIMARY KEY,
    name       text        NOT NULL,
    matchers   jsonb       NOT NULL,
    steps      jsonb       NOT NULL,
    created_at timestamptz NOT NULL
);
CREATE UNIQUE INDEX alert_policies_name ON alert_policies (lower(name));
