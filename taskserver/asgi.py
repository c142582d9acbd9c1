"""The §3 API as an ASGI app (Starlette) served by uvicorn worker processes:
the reference task server at fleet scale, on PostgreSQL.

    dsagent-server serve --db postgresql://… --listen 0.0.0.0:8080 --workers 4

Each worker is a process with its own pool of database connections
(taskserver/db.py); they share nothing else, so several workers, and several
nodes, serve one database. The endpoints are taskserver/api.py's, called in
a thread (the store is synchronous), so both servers answer alike. A worker
serves at most MAX_IN_FLIGHT requests at once and sheds the rest with 503
and ``Retry-After`` (api.Admission). Keep-alive is KEEP_ALIVE_S: long enough
for a pull and the statuses that follow it (a tickle's burst, a paged pull)
to share one connection, short enough that 10,000 agents polling every 5
minutes do not each hold a socket between polls.

Why Starlette and uvicorn: the issue's choice, both well kept; uvicorn forks
its workers itself (``workers=N``) and restarts one that dies. A worker
learns its settings from the environment (``DSAGENT_SERVER_*``), as uvicorn
starts workers by import string. The image store (``--image-store``) is the
built-in server's only: at scale, serve images from nginx
(docs/image-store-http.md).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from contextlib import asynccontextmanager

from taskserver.api import MAX_BODY, MAX_IN_FLIGHT, Admission, Api, busy, error

log = logging.getLogger("taskserver.asgi")

KEEP_ALIVE_S = 65
MAINTAIN_EVERY_S = 6 * 3600         # next months' event partitions made, old ones dropped
ENV = "DSAGENT_SERVER_SETTINGS"     # JSON: db, enrollment_key, poll_interval_s, ...


def settings_env(db: str, enrollment_key: str | None, poll_interval_s: int,
                 allow_unknown_computers: bool, keep_events_days: int,
                 max_in_flight: int = MAX_IN_FLIGHT) -> str:
    return json.dumps({"db": db, "enrollment_key": enrollment_key,
                       "poll_interval_s": poll_interval_s,
                       "allow_unknown_computers": allow_unknown_computers,
                       "keep_events_days": keep_events_days, "max_in_flight": max_in_flight})


def maintain(store, keep_days: int, stop: threading.Event) -> None:
    """Every MAINTAIN_EVERY_S: the coming months' event partitions, and the months
    older than ``keep_days`` (0: keep all) dropped. Every worker runs it; the
    store's advisory lock makes them take turns, and each step is idempotent."""
    while True:
        try:
            store.db.ensure_event_partitions()
            if keep_days:
                for name in store.db.drop_event_partitions(keep_days):
                    log.info("statuses of %s dropped (older than %d days)", name[7:], keep_days)
        except Exception:
            log.exception("event partition upkeep failed; tried again in %d s", MAINTAIN_EVERY_S)
        if stop.wait(MAINTAIN_EVERY_S):
            return


def create_app():
    """The app of one worker, from ``$DSAGENT_SERVER_SETTINGS`` (uvicorn's factory)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from taskserver.store import TaskStore

    settings = json.loads(os.environ[ENV])
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app):
        store = await run_in_threadpool(TaskStore, settings["db"])
        store.allow_unknown_computers = settings["allow_unknown_computers"]
        state["api"] = Api(store, settings["enrollment_key"], settings["poll_interval_s"])
        state["admission"] = Admission(settings["max_in_flight"])
        stop = threading.Event()
        threading.Thread(target=maintain, args=(store, settings["keep_events_days"], stop),
                         name="partitions", daemon=True).start()
        log.info("worker %d serving from %s", os.getpid(), store.db)
        try:
            yield
        finally:
            stop.set()
            await run_in_threadpool(store.close)

    async def endpoint(request: Request) -> Response:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            reply = error(413, f"body over the {MAX_BODY} byte limit")
        else:
            body = await request.body()
            with state["admission"].admit() as admitted:
                if not admitted:
                    reply = busy()
                else:
                    target = request.url.path + (f"?{request.url.query}" if request.url.query
                                                 else "")
                    peer = request.client.host if request.client else "?"
                    reply = await run_in_threadpool(
                        state["api"].handle, request.method, target,
                        request.headers.get("authorization"), body, peer)
        headers = dict(reply.headers)
        if reply.status == 204:
            return Response(status_code=204, headers=headers)
        return Response(reply.body, reply.status, headers, media_type=reply.content_type)

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]
    return Starlette(routes=[Route("/{path:path}", endpoint, methods=methods)],
                     lifespan=lifespan)


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the workers start (port 0: a free one),
    so the URL can be printed first and every worker accepts on it. TCP_NODELAY is
    set here, inherited by every accepted connection: uvicorn takes an ``fd`` as
    AF_UNIX, so asyncio does not set it, and Nagle with the client's delayed ACK
    held each answer's body ~40 ms (bench/fleet.py)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def serve(db: str, sock: socket.socket, workers: int, *, enrollment_key: str | None,
          poll_interval_s: int, allow_unknown_computers: bool, keep_events_days: int,
          verbose: bool = False) -> None:
    """Run uvicorn with ``workers`` processes on ``sock`` until SIGINT/SIGTERM
    (uvicorn drains the requests in flight before a worker exits)."""
    import uvicorn

    os.environ[ENV] = settings_env(db, enrollment_key, poll_interval_s, allow_unknown_computers,
                                   keep_events_days)
    uvicorn.run("taskserver.asgi:create_app", factory=True, fd=sock.fileno(), workers=workers,
                timeout_keep_alive=KEEP_ALIVE_S, access_log=verbose,
                log_level="info" if verbose else "warning", server_header=False)
