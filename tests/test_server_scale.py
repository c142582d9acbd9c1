"""The reference server at fleet scale (issue #14): ``dsagent-server serve`` on
PostgreSQL runs uvicorn worker processes (taskserver/asgi.py); two such
servers on one database behind a round-robin balancer serve one agent, one
of them stopped halfway: every status arrives once, none is lost. Old
statuses go a month at a time (partitions dropped, not rows deleted)."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path

import httpx
import psutil

from taskserver.app import tickle_client
from taskserver.loopback import LoopbackChain
from taskserver.store import TaskStore

REPO = Path(__file__).resolve().parent.parent


def serve(dsn: str, *extra: str) -> tuple[subprocess.Popen, str]:
    """``dsagent-server serve`` on PostgreSQL; (process, URL)."""
    proc = subprocess.Popen([sys.executable, "-m", "taskserver", "serve", "--db", dsn,
                             "--listen", "127.0.0.1:0", *extra], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = proc.stdout.readline().strip()
    if not url.startswith("http://"):
        proc.kill()
        raise AssertionError(f"serve printed {url!r}: {proc.stderr.read()}")
    for _ in range(200):                       # the workers take a moment to accept
        try:
            httpx.get(url + "/api/v1/nothing", timeout=1)
            return proc, url
        except httpx.TransportError:
            threading.Event().wait(0.05)
    proc.kill()
    raise AssertionError(f"{url} never answered: {proc.stderr.read()}")


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


def event(task_id: str, seq: int, state: str) -> dict:
    return {"event_id": str(uuid.uuid4()), "task_id": task_id, "seq": seq, "state": state,
            "progress": None, "message": "", "details": {},
            "at": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")}


def test_serve_on_postgresql_runs_worker_processes_answering_like_the_builtin(pg_dsn):
    proc, url = serve(pg_dsn, "--workers", "2", "--enrollment-key", "k")
    try:
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "python" in p.name()]
        assert len(workers) >= 2, workers
        with httpx.Client(base_url=url, timeout=10) as http:
            creds = http.post("/api/v1/register", json={"name": "pc 1", "enrollment_key": "k"})
            assert creds.status_code == 201, creds.text
            cid, token = creds.json()["client_id"], creds.json()["token"]
            auth = {"Authorization": f"Bearer {token}"}
            with TaskStore(pg_dsn) as store:
                task = store.queue_task(cid, "RunScript", {"script": "echo hi"})
            pulled = http.get(f"/api/v1/clients/{cid}/tasks", headers=auth,
                              params={"limit": 10, "max_bytes": 65536})
            assert pulled.status_code == 200 and task in pulled.text
            first = event(task, 1, "received")
            for _ in range(3):                 # resent: stored once
                answer = http.post(f"/api/v1/clients/{cid}/status", headers=auth,
                                   json={"events": [first]})
                assert answer.json() == {"accepted": [first["event_id"]]}
            assert task not in http.get(f"/api/v1/clients/{cid}/tasks", headers=auth).text
            assert http.get(f"/api/v1/clients/{cid}/tasks").status_code == 401
            assert http.post(f"/api/v1/clients/{cid}/tasks", headers=auth).status_code == 405
            bad = http.get(f"/api/v1/clients/{cid}/tasks", headers=auth, params={"limit": "x"})
            assert bad.status_code == 400 and "limit" in bad.json()["error"]
        with TaskStore(pg_dsn) as store:
            assert [e["state"] for e in store.events(task)] == ["received"]
    finally:
        err = stop(proc)
    assert "with 2 worker(s)" in err and "Traceback" not in err, err


def test_serve_refuses_workers_on_sqlite_and_an_image_store_on_postgresql(tmp_path, pg_dsn):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "taskserver", "serve", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
    sqlite = run("--db", str(tmp_path / "s.db"), "--workers", "2")
    assert sqlite.returncode == 1 and "--workers needs --db postgresql://" in sqlite.stderr
    images = run("--db", pg_dsn, "--image-store", str(tmp_path))
    assert images.returncode == 1 and "--image-store is the built-in server's" in images.stderr


class Balancer:
    """Round-robin TCP balancer on loopback: each new connection goes to the next
    backend that accepts it (a stopped one is skipped)."""

    def __init__(self, backends: list[tuple[str, int]]):
        self.backends, self.turn = backends, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.served = [0] * len(backends)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        for _ in self.backends:
            index, self.turn = self.turn % len(self.backends), self.turn + 1
            try:
                upstream = socket.create_connection(self.backends[index], timeout=2)
            except OSError:
                continue
            self.served[index] += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()
            return
        client.close()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def test_two_servers_on_one_database_one_stopped_halfway_no_status_lost_or_doubled(
        pg_dsn, tmp_path):
    """One agent behind a balancer over two server processes (2 workers each) on one
    database; server A is stopped while tasks run. Every task ends with exactly
    received, running, succeeded (seq 1, 2, 3), each stored once."""
    a, url_a = serve(pg_dsn, "--workers", "2")
    b, url_b = serve(pg_dsn, "--workers", "2")
    ports = [("127.0.0.1", int(u.rsplit(":", 1)[1])) for u in (url_a, url_b)]
    balancer = Balancer(ports)
    chain = LoopbackChain(tmp_path / "chain", db=pg_dsn, max_concurrent_tasks=4)
    chain.server_url = balancer.url
    try:
        chain.start_agent()
        tasks = [chain.queue("RunScript", {"script": "sleep 0.05"}) for _ in range(30)]
        assert tickle_client(chain.store, chain.client_id) == "OK"
        assert chain.store.wait_terminal(tasks[:5], 60)
        err_a = stop(a)
        tasks += [chain.queue("RunScript", {"script": "true"}) for _ in range(30)]
        assert tickle_client(chain.store, chain.client_id) == "OK"
        assert chain.store.wait_terminal(tasks, 120), "not every task ended"
    finally:
        chain.stop_agent()
        balancer.close()
        stop(b)
        if a.poll() is None:
            stop(a)
        chain.store.close()
    assert "Traceback" not in err_a, err_a
    assert all(balancer.served), balancer.served            # both servers served the agent
    with TaskStore(pg_dsn) as store:
        for task in tasks:
            events = store.events(task)
            assert [(e["seq"], e["state"]) for e in events] == [
                (1, "received"), (2, "running"), (3, "succeeded")], (task, events)
            assert len({e["event_id"] for e in events}) == 3
    log = chain.log_path.read_text()
    assert not re.search(r"Traceback", log), log[-3000:]


def test_old_statuses_leave_a_month_at_a_time(pg_dsn):
    """Events are partitioned by the month of their ``at``; the partitions wholly
    older than the retention are dropped; recent ones and the default stay."""
    with TaskStore(pg_dsn) as store:
        db = store.db
        store.enroll("pc-1")
        old, new = (store.queue_task("pc-1", "RunScript", {"script": "true"}) for _ in range(2))
        db.ensure_event_partitions(datetime(2025, 1, 15, tzinfo=timezone.utc), ahead=1)
        old_event = {**event(old, 1, "received"), "at": "2025-01-20T10:00:00Z"}
        store.record_events("pc-1", [old_event, event(new, 1, "received")])
        parts = {r[0]: r[1] for r in db.read(
            "SELECT tableoid::regclass::text, COUNT(*) FROM events GROUP BY 1")}
        assert parts.get("events_2025_01") == 1, parts
        dropped = db.drop_event_partitions(keep_days=90)
        assert "events_2025_01" in dropped and "events_2025_02" in dropped
        assert store.events(old) == [] and len(store.events(new)) == 1
        assert json.dumps(store.history(task_id=new))            # still readable, JSON-able
