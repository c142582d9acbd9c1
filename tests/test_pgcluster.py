"""The PostgreSQL the tests start themselves (tests/pgcluster.py) and its
fixtures: what the task server's PostgreSQL tests stand on."""

from __future__ import annotations

import os
import pwd
from concurrent.futures import ThreadPoolExecutor

import psutil
import psycopg
import pytest
from psycopg_pool import ConnectionPool

import pgcluster
from pgcluster import SERVICE_USER, MissingPostgres, PgCluster, exited

seen_databases: list[str] = []


def test_the_cluster_runs_unprivileged_and_answers(pg_cluster, pg_dsn):
    expected = pwd.getpwnam(SERVICE_USER).pw_uid if os.geteuid() == 0 else os.geteuid()
    assert psutil.Process(pg_cluster.pid).uids().real == expected != 0
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT version()").fetchone()[0].startswith(
            f"PostgreSQL {pg_cluster.version}")


def test_a_pool_shared_by_threads_inserts_each_row_once(pg_dsn):
    with ConnectionPool(pg_dsn, min_size=4, max_size=8) as pool:
        with pool.connection() as conn:
            conn.execute("CREATE TABLE seen (id int PRIMARY KEY)")

        def insert_all(_):
            inserted = 0
            for event_id in range(200):
                with pool.connection() as conn:
                    inserted += conn.execute("INSERT INTO seen VALUES (%s) ON CONFLICT DO NOTHING",
                                             (event_id,)).rowcount
            return inserted

        with ThreadPoolExecutor(8) as threads:
            assert sum(threads.map(insert_all, range(8))) == 200
        with pool.connection() as conn:
            assert conn.execute("SELECT count(*) FROM seen").fetchone()[0] == 200


@pytest.mark.parametrize("turn", ["first", "second"])
def test_each_test_gets_its_own_empty_database(pg_cluster, pg_dsn, turn):
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        name = conn.execute("SELECT current_database()").fetchone()[0]
        assert len(name) <= 63 and name not in seen_databases
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
                            ).fetchone()[0] == 0
        existing = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
        assert not existing & set(seen_databases), "the previous test's database was not dropped"
        conn.execute(f"CREATE TABLE written_by_{turn} (x int)")
    seen_databases.append(name)


def test_stop_leaves_no_process_and_no_folder():
    with PgCluster() as cluster:
        pid, base = cluster.pid, cluster.base
        server = psutil.Process(pid)
        family = [server, *server.children(recursive=True)]
        assert len(family) > 1    # the postmaster and its background workers
    assert not base.exists()
    assert not [p.pid for p in family if not exited(p)]


def test_without_the_server_binaries_it_fails_naming_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(pgcluster, "SERVER_ROOT", tmp_path)
    with pytest.raises(MissingPostgres, match="apt-get install postgresql"):
        PgCluster()
