"""The real servers the suite relies on start and answer (a broken install fails here first)."""

from tests.support.services import MariaDB, Redis


def test_mariadb_durable_settings(mariadb: MariaDB) -> None:
    out = mariadb.sql("SELECT @@log_bin, @@binlog_format, @@gtid_strict_mode, @@sync_binlog;")
    assert out.split() == ["1", "ROW", "1", "1"]


def test_redis_answers(redis_server: Redis) -> None:
    import redis

    client = redis.Redis.from_url(redis_server.url())
    assert client.ping() is True
    client.close()
