"""The fleet simulator's agents (bench/fleetagent.py) against a real TaskServer.

The bench's numbers are only worth something if its agents follow the
protocol: every task they are given reaches a terminal status at the server
(the built-in one, and the ASGI one on PostgreSQL as bench/fleetservers.py
starts it), their tickle listeners refuse what an objecthost refuses, and an
upload outage makes them back off rather than hammer the server.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from agent.common.tickle import exchange_line, make_tickle
from bench import fleetagent
from bench.fleetagent import AgentSpec, Shard, loopback_address
from bench.fleetservers import ServerProcess
from taskserver.app import TaskServer, tickle_clients
from taskserver.store import TaskStore

AGENTS = 20


class Fleet:
    """A shard of simulated agents on an event loop in a thread, enrolled in
    ``store`` and pulling from the server on ``port``."""

    def __init__(self, store: TaskStore, port: int):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.specs = [AgentSpec(f"sim-{i:02d}", loopback_address(i, base=31))
                      for i in range(AGENTS)]
        self.shard = Shard(self.specs, 0, "test-fleet-sim", poll_s=30.0)
        self.addrs = self.run(self.shard.listen())
        creds = {}
        for spec, addr in zip(self.specs, self.addrs):
            enrolled = store.enroll(spec.client_id, tickle_addr=addr)
            creds[spec.client_id] = (enrolled["token"], enrolled["tickle_key"])

        async def start():
            self.shard.start(creds, "127.0.0.1", port, time.time(), 0.5)
        self.run(start())

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def close(self):
        records = self.run(self.shard.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        return records


@pytest.fixture
def fleet(tmp_path):
    store = TaskStore(str(tmp_path / "taskserver.db"))
    server = TaskServer(store).start()
    fleet = Fleet(store, server.port)
    try:
        yield store, server, fleet
    finally:
        assert fleet.close().crashes == []
        server.stop()
        store.close()


def test_every_tickled_task_reaches_a_terminal_status(fleet):
    store, _, fleet = fleet
    ids = [store.queue_task(spec.client_id, "FleetNoop") for spec in fleet.specs for _ in range(2)]
    answers = tickle_clients(store, [spec.client_id for spec in fleet.specs])
    assert set(answers.values()) == {"OK"}
    assert store.wait_terminal(ids, 10)
    for task in store.history():
        assert task["state"] == "succeeded"
        assert [(e["seq"], e["state"]) for e in task["events"]] == [
            (1, "received"), (2, "running"), (3, "succeeded")]


def test_the_tickle_listener_checks_like_an_objecthost(fleet):
    store, _, fleet = fleet
    spec, (host, port) = fleet.specs[0], fleet.addrs[0].rsplit(":", 1)
    key = bytes.fromhex(store.client(spec.client_id)["tickle_key"])
    assert exchange_line(host, int(port), make_tickle(spec.client_id, b"x" * 32)) == \
        "ERR bad-signature"
    assert exchange_line(host, int(port), make_tickle("sim-99", key)) == "ERR unknown-client"
    assert exchange_line(host, int(port), make_tickle(spec.client_id, key,
                                                      now=int(time.time()) - 900)) == "ERR stale"
    line = make_tickle(spec.client_id, key)
    assert exchange_line(host, int(port), line) == "OK"
    assert exchange_line(host, int(port), line) == "ERR replay"
    assert exchange_line(host, int(port), b"hello\n") == "ERR bad-frame"


def test_a_status_outage_is_waited_out_with_backoff(fleet, monkeypatch):
    """3 s of 503s on status posts: each agent backs off (full jitter, 0.5 s
    doubling, capped at 2 s here so the test need not wait out a 60 s cap), so
    20 agents post ~100 times (119 at most in 20,000 simulated runs) instead of
    thousands; pulls go on; every status arrives once the server is back."""
    store, server, fleet = fleet
    monkeypatch.setattr(fleetagent, "UPLOAD_BACKOFF_S", (0.5, 2.0))
    time.sleep(0.6)                         # every agent has made its first pull
    server.set_fault(503, ["status"])
    ids = [store.queue_task(spec.client_id, "FleetNoop") for spec in fleet.specs]
    tickle_clients(store, [spec.client_id for spec in fleet.specs])
    time.sleep(3)
    posts = [store.request_counts(spec.client_id)["status"] for spec in fleet.specs]
    pulls = [store.request_counts(spec.client_id)["tasks"] for spec in fleet.specs]
    server.set_fault(None)
    assert store.wait_terminal(ids, 10)
    assert min(posts) >= 1 and sum(posts) <= 8 * AGENTS
    assert min(pulls) >= 2


def test_every_tickled_task_ends_on_the_asgi_server_on_postgresql(pg_dsn, tmp_path):
    """The fleet against `dsagent-server serve` on PostgreSQL (uvicorn, 2
    workers), started as bench/fleet.py starts it."""
    server = ServerProcess(pg_dsn, tmp_path / "server.log", poll_s=30, workers=2)
    server.start()
    store, fleet = TaskStore(pg_dsn), None
    try:
        fleet = Fleet(store, server.port)
        ids = [store.queue_task(spec.client_id, "FleetNoop") for spec in fleet.specs]
        answers = tickle_clients(store, [spec.client_id for spec in fleet.specs])
        assert set(answers.values()) == {"OK"}
        assert store.wait_terminal(ids, 10)
        assert {task["state"] for task in store.history()} == {"succeeded"}
    finally:
        if fleet is not None:
            assert fleet.close().crashes == []
        server.stop()
        store.close()
    assert "Traceback" not in (tmp_path / "server.log").read_text()
