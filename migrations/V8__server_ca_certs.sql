-- A CA certificate (PEM) a server's TLS is trusted by, beside the system's roots and
-- FLEET_PROBE_CA_FILE: an agent with a certificate of its own CA. Not a secret.
ALTER TABLE managed_servers ADD COLUMN ca_cert text;
