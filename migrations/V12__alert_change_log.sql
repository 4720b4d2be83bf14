-- Alerts across instances. Each bucket's owner evaluates its servers' rules and appends what
-- changed (an alert started or stopped firing) to this log, in the same transaction as the
-- alert's phase and under the bucket's fence. The leader tails the log in id order and decides
-- incidents from it; ids are read only once every writer that took one has committed (see
-- fleet-pg alerts.rs), so no change is skipped.
CREATE TABLE alert_change_log (
    id bigserial PRIMARY KEY,
    server_id uuid,
    rule text NOT NULL,
    detail text NOT NULL,
    firing boolean NOT NULL,
    at timestamptz NOT NULL,
    since timestamptz NOT NULL,
    written_at timestamptz NOT NULL DEFAULT now()
);

-- Where the leader stands: the last change it decided on, moved in the same transaction as
-- the incidents, outbox rows and firing set that change produced, under the leader's fence.
CREATE TABLE alert_leader_state (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    position bigint NOT NULL DEFAULT 0
);
INSERT INTO alert_leader_state DEFAULT VALUES;

-- The alerts the leader holds as firing (in an incident or held back), as of its position.
-- A new leader starts from this and the open incidents, never from phases written ahead of it.
CREATE TABLE alert_announced (
    key text PRIMARY KEY,
    server_id uuid,
    rule text NOT NULL,
    detail text NOT NULL,
    since timestamptz NOT NULL
);
