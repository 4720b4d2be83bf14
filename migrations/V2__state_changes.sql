-- The last check's response time and error beside the state, so that lists can sort and show
-- them without reading history.
ALTER TABLE managed_servers
    ADD COLUMN last_response_time_ms integer,
    ADD COLUMN last_error            text;

-- Every change of a server's health, written in the same statement as the forward-only state
-- update, so that a change is recorded exactly once, retries included. The check that made
-- it is the history row (server_id, timestamp = changed_at). Partitioned by month like the
-- history, and kept as long as the longest history tier.
CREATE SEQUENCE server_state_changes_id_seq AS bigint;
CREATE TABLE server_state_changes (
    id            bigint NOT NULL DEFAULT nextval('server_state_changes_id_seq'),
    server_id     uuid NOT NULL,
    changed_at    timestamptz NOT NULL,
    from_status   text CHECK (from_status IN ('healthy', 'degraded', 'critical', 'unreachable')),
    to_status     text NOT NULL
                  CHECK (to_status IN ('healthy', 'degraded', 'critical', 'unreachable')),
    error_message text,
    PRIMARY KEY (server_id, changed_at)
) PARTITION BY RANGE (changed_at);
ALTER SEQUENCE server_state_changes_id_seq OWNED BY server_state_changes.id;
-- The fleet-wide log, newest first.
CREATE INDEX server_state_changes_newest ON server_state_changes (changed_at DESC, id DESC);
