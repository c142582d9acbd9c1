"""The reference task server's built-in HTTP server for the §3 API (the
endpoints themselves: taskserver/api.py, shared with the ASGI app of
taskserver/asgi.py) and its tickle sender (§2).

Standard library only: ``http.server`` (one daemon thread per connection),
HTTP/1.1 keep-alive with Content-Length. Every response goes out in a single
write with Nagle disabled: ``http.server``'s usual two writes (headers, then
body) cost a delayed-ACK round trip, ~44 ms per request instead of ~0.5 ms.

Endpoints::

    POST /api/v1/register                 201 {client_id, token, tickle_key, poll_interval_s}
    GET  /api/v1/clients/{id}/tasks       200 application/xml <ClientTasks>; ?limit=N&max_bytes=B
                                          pages it (§3 v1.1: taskserver/paging.py)
    POST /api/v1/clients/{id}/status      200 {"accepted": [...]}
    GET  /api/v1/clients/{id}/pxe/startup 200 {"initial-config", "clients", "images",
                                              "predefined"}: the §7 XML documents (predefined
                                              always XML, an empty list too); registers the
                                              client as a PXE server
    POST /api/v1/clients/{id}/pxe/state   204; body {"serving", "reason", "computers",
                                              "images", "last_applied", "at"} (§7), stored
                                              with the time received; registers it too

With ``image_store=DIR``, ``/images/`` serves and takes an image store
(GET/HEAD with Range, atomic PUT): taskserver/imagestore.py.

All but register need ``Authorization: Bearer <token>`` (else 401). Errors are
JSON ``{"error": "..."}``: 400 bad JSON or a bad field (named), 403
registration refused, 404 unknown path, 405 wrong method, 411 no
Content-Length, 413 body over ``max_body`` bytes. The PXE side (lists,
settings, changes fanned out as UpdateSBSInfo tasks) is taskserver/pxe.py;
``tickle_clients`` tickles the PXE servers after a change. A client TCP cannot
reach is woken over MQTT when a broker is given (taskserver/wakeup.py).

Load: over ``max_in_flight`` requests at once, an API request is answered 503
with ``Retry-After`` (3-8 s, spread so the agents do not come back in step;
§3 "Errors, load and back-off").

For tests: ``request_counts(client_id)`` counts each client's requests by
endpoint, and ``set_fault(503, retry_after=5)`` makes the server answer every
request (or those of some endpoints) with that status (still counting them)
to simulate an outage; ``stop()`` and ``start()`` again reopen the same port.
"""

from __future__ import annotations

import logging
import random
import socket
import socketserver
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from agent.common.errors import ConfigError, DsagentError, MqttError
from agent.common.tickle import make_tickle, send_tickle

from taskserver import wakeup
from taskserver.api import MAX_BODY, MAX_IN_FLIGHT, Admission, Api, Reply, busy, error
from taskserver.checks import InvalidRequest, parse_hostport
from taskserver.imagestore import ImageStoreHTTP
from taskserver.store import TaskStore

log = logging.getLogger("taskserver")

TICKLE_RETRY_DELAY_S = (0.05, 0.25)   # one retry of a reset or busy tickle, after a jittered pause
SERVER_NAME = "dsagent-server/0.1"
TICKLE_THREADS = 16


class TickleFailed(DsagentError):
    """A tickle could not be sent (unknown client, no address, unreachable)."""


def tickle_client(store: TaskStore, client_id: str, timeout: float = 5.0,
                  addr: str | None = None) -> str:
    """Send a signed tickle to ``client_id``'s objecthost; return its answer line.

    The answer is ``OK`` or ``ERR <code>``. Raises TickleFailed with a clear
    message if the client is unknown, has no tickle address, or cannot be
    reached. ``addr`` overrides the stored address for this one tickle.

    A tickle that is reset, closed unanswered or answered ``ERR busy`` is sent
    once more (a fresh nonce) after a short random pause: an objecthost full
    of slow senders resets its oldest connections, and a busy one refills its
    rate limit within a fraction of a second. The jitter keeps a server that
    tickles many agents from retrying them all in step.

    With a broker (``$DSAGENT_SERVER_MQTT``, taskserver/wakeup.py), a client
    without a tickle address or that TCP cannot reach is woken over MQTT
    instead: the answer is then ``published to mqtt://host:port``.
    """
    client = store.client(client_id)
    if client is None:
        raise TickleFailed(f"cannot tickle {client_id!r}: no such client")
    key = bytes.fromhex(client["tickle_key"])
    try:
        return _tickle_tcp(client_id, key, addr or client["tickle_addr"], timeout)
    except TickleFailed as failed:
        try:
            broker = wakeup.publisher()
            answer = broker and broker.publish(client_id, make_tickle(client_id, key), timeout)
        except (MqttError, ConfigError) as exc:
            raise TickleFailed(f"{failed}; and over MQTT: {exc}") from None
        if answer is None:
            raise
        log.info("%s; woken over MQTT instead", failed)
        return answer


def _tickle_tcp(client_id: str, key: bytes, addr: str | None, timeout: float) -> str:
    """The TCP tickle of :func:`tickle_client` (its answer, or TickleFailed)."""
    if not addr:
        raise TickleFailed(f"cannot tickle {client_id!r}: no tickle address is known "
                           "(enroll with --tickle HOST:PORT, or give it one: dsagent-server "
                           f"set-tickle --client {client_id} --addr HOST:PORT)")
    try:
        host, port = parse_hostport(addr)
    except InvalidRequest as exc:
        raise TickleFailed(f"cannot tickle {client_id!r}: bad tickle address: {exc}") from None
    for retry in (False, True):
        try:
            answer = send_tickle(host, port, client_id, key, timeout=timeout)
        except ConnectionResetError:
            answer = None
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise TickleFailed(f"cannot tickle {client_id!r} at {addr}: {reason}") from None
        if answer not in (None, "", "ERR busy") or retry:
            break
        delay = random.uniform(*TICKLE_RETRY_DELAY_S)
        what = {None: "was reset", "": "was closed unanswered"}.get(answer, f"got {answer}")
        log.warning("tickle to %s at %s %s; retrying once in %.0f ms", client_id, addr, what, delay * 1000)
        time.sleep(delay)
    if answer is None:
        raise TickleFailed(f"cannot tickle {client_id!r} at {addr}: connection reset (twice)")
    if not answer:
        raise TickleFailed(f"tickle to {client_id!r} at {addr}: the objecthost closed the "
                           "connection without answering (twice)")
    return answer


def tickle_clients(store: TaskStore, client_ids: Iterable[str],
                   timeout: float = 5.0) -> dict[str, str | TickleFailed]:
    """Tickle several clients at once (threads): client id -> its answer line, or the
    TickleFailed saying why not. A failed tickle loses nothing: the client pulls its
    queued tasks at its next poll."""
    ids = list(dict.fromkeys(client_ids))

    def one(client_id: str) -> str | TickleFailed:
        try:
            return tickle_client(store, client_id, timeout)
        except TickleFailed as exc:
            return exc

    if not ids:
        return {}
    with ThreadPoolExecutor(min(TICKLE_THREADS, len(ids)), "tickle") as pool:
        return dict(zip(ids, pool.map(one, ids)))


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 4096   # a fleet's fan-out connects at once (capped by net.core.somaxconn)

    def __init__(self, address, handler, app: "TaskServer", family: int):
        self.address_family = family
        self.app = app
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind also does a reverse DNS lookup (getfqdn), which
        # can take seconds on a machine with broken DNS; we never need the name.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def track(self, sock: socket.socket, add: bool) -> None:
        with self._open_lock:
            (self._open.add if add else self._open.discard)(sock)

    def close_connections(self) -> None:
        """Cut every open keep-alive connection (a real outage drops them too)."""
        with self._open_lock:
            socks = list(self._open)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = SERVER_NAME
    sys_version = ""
    timeout = 60            # idle keep-alive connections and slow senders are dropped
    server: _HTTPServer

    # -- connection bookkeeping ---------------------------------------------

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def handle(self) -> None:
        """Requests until the connection closes; a peer that resets it mid-request
        is an everyday event at scale, not a traceback."""
        try:
            super().handle()
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)

    # -- output: one write per response -------------------------------------

    def _send(self, code: int, body: bytes, content_type: str,
              headers: Iterable[tuple[str, str]] = ()) -> None:
        reason = self.responses.get(code, ("",))[0]
        lines = [f"HTTP/1.1 {code} {reason}", f"Server: {SERVER_NAME}",
                 f"Date: {self.date_time_string()}"]
        if code != 204:                         # a 204 has neither body nor length (RFC 9110)
            lines += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers]
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(head if self.command == "HEAD" else head + body)
        self.log_request(code, len(body))

    def _reply(self, reply: Reply) -> None:
        self._send(reply.status, reply.body, reply.content_type, reply.headers)

    def _error(self, code: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        self._reply(error(code, message, headers))

    def send_error(self, code: int, message: str | None = None, explain: str | None = None):
        """http.server's own protocol errors (bad request line, 501...), as JSON."""
        self.close_connection = True
        self._error(code, message or self.responses.get(code, ("error",))[0])

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.app.verbose:
            log.info("%s %s", self.address_string(), format % args)

    def log_error(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # -- input ----------------------------------------------------------------

    def _read_body(self) -> bytes | None:
        """The request body, or None after answering 411/413 (connection closed)."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self._error(411, "send the body with Content-Length (chunked bodies are not supported)")
            return None
        length = self.headers.get("Content-Length")
        if length is None:
            if self.command in ("POST", "PUT", "PATCH"):
                self.close_connection = True
                self._error(411, "Content-Length required")
                return None
            return b""
        if not length.strip().isdigit():
            self.close_connection = True
            self._error(400, f"bad Content-Length {length!r}")
            return None
        size = int(length)
        if size > self.server.app.max_body:
            self.close_connection = True
            self._error(413, f"body of {size} bytes is over the {self.server.app.max_body} "
                             "byte limit")
            return None
        body = self.rfile.read(size) if size else b""
        if len(body) != size:
            self.close_connection = True
            return None
        return body

    # -- dispatch -------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def _dispatch(self) -> None:
        app = self.server.app
        try:
            if app.images is not None and app.images.handles(self.path):
                app.images.serve(self)      # its own bodies: streamed, chunked, any size
                return
            body = self._read_body()
            if body is None:
                return
            with app.admission.admit() as admitted:
                self._reply(app.api.handle(self.command, self.path,
                                           self.headers.get("Authorization"), body,
                                           self.address_string()) if admitted else busy())
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:
            log.exception("error answering %s %s", self.command, self.path)
            self.close_connection = True
            try:
                self._error(500, "internal server error (see the server log)")
            except OSError:
                pass


class TaskServer:
    """The §3 HTTP API over a TaskStore, served from a background thread.

    ``port=0`` picks a free port; ``.port`` and ``.url`` tell which.
    ``enrollment_key=None`` disables registration (403). ``image_store=DIR``
    serves DIR as an image store under ``/images/`` (``.images``: ImageStoreHTTP).
    """

    def __init__(self, store: TaskStore, host: str = "127.0.0.1", port: int = 0,
                 enrollment_key: str | None = None, poll_interval_s: int = 300,
                 *, verbose: bool = False, max_body: int = MAX_BODY,
                 image_store: str | None = None, max_in_flight: int = MAX_IN_FLIGHT):
        self.store = store
        self.images = ImageStoreHTTP(image_store, store) if image_store else None
        self.host = host
        self.port = port
        self.verbose = verbose
        self.max_body = max_body
        self.api = Api(store, enrollment_key, poll_interval_s)
        self.admission = Admission(max_in_flight)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def start(self) -> "TaskServer":
        """Listen and serve in a daemon thread (again on the same port after stop())."""
        if self._httpd is not None:
            return self
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._httpd = _HTTPServer((self.host, self.port), _Handler, self, family)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.1},
                                        name=f"taskserver:{self.port}", daemon=True)
        self._thread.start()
        log.info("task server listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop listening and cut open connections (the port can be reused by start())."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        httpd.close_connections()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> "TaskServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def pxe_servers(self) -> list[dict]:
        """The PXE servers with their last state (taskserver.pxe.PXEStore.servers)."""
        return self.api.pxe.servers(self.api.poll_interval_s)

    def tickle(self, client_id: str, timeout: float = 5.0) -> str:
        """Tickle ``client_id``'s objecthost; return its answer (``OK`` / ``ERR code``)."""
        return tickle_client(self.store, client_id, timeout)

    def request_counts(self, client_id: str) -> dict[str, int]:
        """Requests received from ``client_id``, by endpoint: register, tasks, status
        (and pxe/startup, pxe/state once called)."""
        return self.store.request_counts(client_id)

    def set_fault(self, status: int | None, endpoints: Iterable[str] | None = None,
                  retry_after: int | None = None) -> None:
        """Answer every request (or those to ``endpoints``) with ``status``, with a
        ``Retry-After`` header when given; None clears.

        Requests are still counted, so tests can measure retries during an outage.
        """
        self.api.fault_endpoints = None if endpoints is None else frozenset(endpoints)
        self.api.fault_retry_after = retry_after
        self.api.fault = status

    @property
    def max_in_flight(self) -> int:
        return self.admission.max_in_flight

    @max_in_flight.setter
    def max_in_flight(self, value: int) -> None:
        self.admission.max_in_flight = value

    @property
    def shed(self) -> int:
        """Requests answered 503 for load so far."""
        return self.admission.shed
