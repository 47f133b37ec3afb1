-- payctl: users of deployment ktcloud-pay on the MariaDB primary (node1).
-- Least privilege: the app has DML on its schema only, migrations a separate DDL user, the exporter what it reads.
-- Passwords are written by payctl into this 0600 file on the node, never on a command line.
CREATE DATABASE IF NOT EXISTS `payments` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;
CREATE USER IF NOT EXISTS 'app'@'198.51.100.11' IDENTIFIED BY '{{SECRET:mariadb_app}}';
ALTER USER 'app'@'198.51.100.11' IDENTIFIED BY '{{SECRET:mariadb_app}}';
GRANT SELECT, INSERT, UPDATE, DELETE ON `payments`.* TO 'app'@'198.51.100.11';
CREATE USER IF NOT EXISTS 'migrate'@'198.51.100.11' IDENTIFIED BY '{{SECRET:mariadb_migrate}}';
ALTER USER 'migrate'@'198.51.100.11' IDENTIFIED BY '{{SECRET:mariadb_migrate}}';
GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, ALTER, DROP, INDEX, REFERENCES, CREATE VIEW, LOCK TABLES, TRIGGER ON `payments`.* TO 'migrate'@'198.51.100.11';
CREATE USER IF NOT EXISTS 'backup'@'localhost' IDENTIFIED BY '{{SECRET:mariadb_backup}}';
ALTER USER 'backup'@'localhost' IDENTIFIED BY '{{SECRET:mariadb_backup}}';
GRANT RELOAD, PROCESS, LOCK TABLES, BINLOG MONITOR, SLAVE MONITOR ON *.* TO 'backup'@'localhost';
CREATE USER IF NOT EXISTS 'exporter'@'198.51.100.11' IDENTIFIED BY '{{SECRET:mariadb_exporter}}';
ALTER USER 'exporter'@'198.51.100.11' IDENTIFIED BY '{{SECRET:mariadb_exporter}}';
GRANT PROCESS, REPLICATION CLIENT, SLAVE MONITOR ON *.* TO 'exporter'@'198.51.100.11';
GRANT SELECT ON `performance_schema`.* TO 'exporter'@'198.51.100.11';
DELETE FROM mysql.global_priv WHERE User = 'root' AND Host NOT IN ('localhost', '127.0.0.1', '::1');
FLUSH PRIVILEGES;
