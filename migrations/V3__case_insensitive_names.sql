-- Server names are unique regardless of case: `Web-1` and `web-1` are one server to a reader.
CREATE UNIQUE INDEX managed_servers_name_lower ON managed_servers (lower(name));
