-- payctl: make node2 a replica of node1 (198.51.100.11), GTID-based.
-- Run on the replica only, after it was seeded from a consistent snapshot of the primary.
STOP SLAVE;
CHANGE MASTER TO
  MASTER_HOST = '198.51.100.11',
  MASTER_PORT = 3306,
  MASTER_USER = 'replication',
  MASTER_PASSWORD = '{{SECRET:mariadb_replication}}',
  MASTER_CONNECT_RETRY = 10,
  MASTER_USE_GTID = slave_pos;
SET GLOBAL read_only = ON;
START SLAVE;
