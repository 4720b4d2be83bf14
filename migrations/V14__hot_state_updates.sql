-- Every health check updates its server's row. While last_health_check_at and last_seen_at
-- were indexed, each such update was a new row version in all thirteen of managed_servers'
-- indexes, and at 100,000 servers that was most of the writer's time in PostgreSQL (40 ms of
-- a 1,000-check batch; docs/benchmarks.md). With no index over the columns a check writes,
-- PostgreSQL updates the row in place on its page (a heap-only tuple) and touches no index.
--
-- The three indexes served the workers' selections, which read every active server anyway
-- (a scan and a sort of the registry once a cycle), and the API's sort by last seen, which
-- now sorts as the sort by response time always has.
DROP INDEX managed_servers_health_due;
DROP INDEX managed_servers_metrics_due;
DROP INDEX managed_servers_last_seen_at;
-- Room on each page for the next version of its rows, so updates stay on their page.
ALTER TABLE managed_servers SET (fillfactor = 70);
ALTER TABLE server_metrics_state SET (fillfactor = 70);
