-- payctl: replication user on the MariaDB primary (node1), for the replicas of deployment ktcloud-pay.
-- It may only read the binlog stream: REPLICATION SLAVE, nothing else, from the replicas' private addresses.
CREATE USER IF NOT EXISTS 'replication'@'198.51.100.11' IDENTIFIED BY '{{SECRET:mariadb_replication}}';
ALTER USER 'replication'@'198.51.100.11' IDENTIFIED BY '{{SECRET:mariadb_replication}}';
GRANT REPLICATION SLAVE ON *.* TO 'replication'@'198.51.100.11';
CREATE USER IF NOT EXISTS 'replication'@'198.51.100.12' IDENTIFIED BY '{{SECRET:mariadb_replication}}';
ALTER USER 'replication'@'198.51.100.12' IDENTIFIED BY '{{SECRET:mariadb_replication}}';
GRANT REPLICATION SLAVE ON *.* TO 'replication'@'198.51.100.12';
FLUSH PRIVILEGES;
