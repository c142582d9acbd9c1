"""Floors for context: what the building blocks of one task cost on this machine."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import httpx

from agent.common.statedb import write_transaction
from agent.common.taskxml import parse_client_tasks
from agent.common.taskxml import render_client_tasks
from agent.cta.taskdb import open_db
from ctdataloader import outbox
from taskserver.app import TaskServer
from taskserver.store import TaskStore


def _timeit(fn: Callable[[], object], n: int, warm: int = 5) -> list[float]:
    for _ in range(warm):
        fn()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples


def _echo_server() -> tuple[socket.socket, int]:
    """A loopback TCP server echoing each received chunk, one thread per connection."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)

    def serve(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener, listener.getsockname()[1]


def tcp_round_trip(n: int) -> list[float]:
    """One small message there and back on an open loopback connection."""
    listener, port = _echo_server()
    try:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def once() -> None:
                sock.sendall(b"ping\n")
                sock.recv(64)
            return _timeit(once, n)
    finally:
        listener.close()


def tcp_connect_exchange(n: int) -> list[float]:
    """Connect, send a line, read the answer, close: the shape of a tickle / wake-up hop."""
    listener, port = _echo_server()
    try:
        def once() -> None:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(b"DSWAKE/1 0 00 00\n")
                sock.recv(64)
        return _timeit(once, n)
    finally:
        listener.close()


def http_get(workdir: Path, n: int) -> tuple[list[float], list[float]]:
    """httpx keep-alive GETs against the reference server: (tasks list, 404 path)."""
    store = TaskStore(str(workdir / "micro-server.db"))
    server = TaskServer(store).start()
    try:
        creds = store.enroll("micro-pc")
        with httpx.Client(base_url=server.url,
                          headers={"Authorization": f"Bearer {creds['token']}"}) as client:
            def tasks() -> None:
                client.get("/api/v1/clients/micro-pc/tasks").raise_for_status()

            def missing() -> None:
                client.get("/nothing-here")
            return _timeit(tasks, n), _timeit(missing, n)
    finally:
        server.stop()
        store.close()


def sqlite_commit(workdir: Path, n: int) -> list[float]:
    """One outbox-sized row per transaction, WAL + synchronous=FULL (the agent's settings)."""
    conn = open_db(workdir / "micro-state.db")
    try:
        def once() -> None:
            with write_transaction(conn):
                outbox.append(conn, str(uuid.uuid4()), "t", "x" * 300, time.time())
        return _timeit(once, n)
    finally:
        conn.close()


def xml_parse(n: int, tasks: int = 50) -> tuple[list[float], int]:
    """agent.common.taskxml.parse_client_tasks on a ``tasks``-task document from the reference server."""
    rows = [{"task_id": str(uuid.uuid4()), "type": "RunScript", "timeout": 600,
             "params": {"script": f"echo task {i} && true", "interpreter": "/bin/sh"}}
            for i in range(tasks)]
    document = render_client_tasks("micro-pc", rows)

    def once() -> None:
        parsed = parse_client_tasks(document, "micro-pc")
        assert len(parsed.tasks) == tasks
    return _timeit(once, n), len(document)


def sh_spawn(n: int) -> list[float]:
    """subprocess.Popen(['/bin/sh', '-c', 'true']) + wait, from this (large) Python process."""
    def once() -> None:
        subprocess.run(["/bin/sh", "-c", "true"], stdin=subprocess.DEVNULL, check=True)
    return _timeit(once, n)
