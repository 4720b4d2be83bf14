-- Active servers per bucket, kept by the statements that change them (as server_tallies is),
-- so that listing the instances with the servers each owns reads 1,024 rows, not the registry.
CREATE TABLE server_bucket_tallies (
    bucket smallint PRIMARY KEY CHECK (bucket >= 0 AND bucket < 1024),
    active bigint NOT NULL DEFAULT 0
);
INSERT INTO server_bucket_tallies (bucket, active)
SELECT b, (SELECT count(*) FROM managed_servers s WHERE s.bucket = b AND s.status = 'active')
FROM generate_series(0, 1023) AS b;

-- A statement's changes per bucket, applied in bucket order (so concurrent writers lock the
-- rows in one order); a state update that leaves every status alone writes nothing.
CREATE FUNCTION server_bucket_tallies_on_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO server_bucket_tallies AS t (bucket, active)
        SELECT bucket, count(*) FROM new_rows WHERE status = 'active' GROUP BY bucket ORDER BY bucket
        ON CONFLICT (bucket) DO UPDATE SET active = t.active + EXCLUDED.active;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO server_bucket_tallies AS t (bucket, active)
        SELECT bucket, -count(*) FROM old_rows WHERE status = 'active' GROUP BY bucket ORDER BY bucket
        ON CONFLICT (bucket) DO UPDATE SET active = t.active + EXCLUDED.active;
    ELSE
        INSERT INTO server_bucket_tallies AS t (bucket, active)
        SELECT bucket, sum(delta) FROM (
            SELECT bucket, 1 AS delta FROM new_rows WHERE status = 'active'
            UNION ALL
            SELECT bucket, -1 FROM old_rows WHERE status = 'active') u
        GROUP BY bucket HAVING sum(delta) <> 0 ORDER BY bucket
        ON CONFLICT (bucket) DO UPDATE SET active = t.active + EXCLUDED.active;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER server_bucket_tallies_insert AFTER INSERT ON managed_servers
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION server_bucket_tallies_on_change();
CREATE TRIGGER server_bucket_tallies_delete AFTER DELETE ON managed_servers
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION server_bucket_tallies_on_change();
CREATE TRIGGER server_bucket_tallies_update AFTER UPDATE ON managed_servers
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION server_bucket_tallies_on_change();
