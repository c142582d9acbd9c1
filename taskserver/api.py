"""The §3 HTTP API apart from any HTTP server: one request in, one Reply out.

Both servers of the reference task server call ``Api.handle``: the built-in
one (taskserver/app.py: ``http.server`` threads, one process, the default)
and the ASGI app (taskserver/asgi.py: uvicorn worker processes on
PostgreSQL), so they answer byte for byte alike. Errors are JSON
``{"error": ...}``: 400 a bad field (named), 401 a bad token, 403
registration refused, 404 unknown path, 405 wrong method, 503 with
``Retry-After`` when the database cannot be reached (or a test's fault).
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator
from urllib.parse import parse_qs, unquote, urlsplit

from taskserver.checks import InvalidRequest, RegistrationRefused
from taskserver.db import DatabaseUnavailable
from taskserver.paging import page_parameters, render_page
from taskserver.pxe import PXEStore
from taskserver.store import TaskStore

log = logging.getLogger("taskserver")

CLIENT_PATH_RE = re.compile(r"/api/v1/clients/([^/]+)/(tasks|status|pxe/startup|pxe/state)")
METHODS = {"register": "POST", "tasks": "GET", "status": "POST", "pxe/startup": "GET",
           "pxe/state": "POST"}
UNAVAILABLE_RETRY_AFTER_S = (5, 15)   # the database is down: come back in a while, not at once
MAX_BODY = 16 * 1024 * 1024          # a request body, on either server
MAX_IN_FLIGHT = 64                     # requests served at once by one server process
SHED_RETRY_AFTER_S = (3, 8)           # spread, so the shed agents do not come back in step


@dataclass
class Reply:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


def json_reply(status: int, data: Any, headers: Iterable[tuple[str, str]] = ()) -> Reply:
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return Reply(status, body, "application/json", list(headers))


def error(status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> Reply:
    return json_reply(status, {"error": message}, headers)


def parse_json(body: bytes) -> Any:
    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")
    try:
        return json.loads(body.decode("utf-8"), parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequest(f"body is not valid UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("body is JSON nested too deeply") from None


def bearer(authorization: str | None) -> str | None:
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class Admission:
    """At most ``max_in_flight`` requests at once; the others are shed (``busy()``)."""

    def __init__(self, max_in_flight: int = MAX_IN_FLIGHT):
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.shed = 0
        self._lock = threading.Lock()

    @contextmanager
    def admit(self) -> Iterator[bool]:
        with self._lock:
            admitted = self.in_flight < self.max_in_flight
            if admitted:
                self.in_flight += 1
            else:
                self.shed += 1
        try:
            yield admitted
        finally:
            if admitted:
                with self._lock:
                    self.in_flight -= 1


def busy() -> Reply:
    """The answer to a request shed for load (§3: 503 with Retry-After)."""
    return error(503, "the server is busy: try again later",
                 [("Retry-After", str(random.randint(*SHED_RETRY_AFTER_S)))])


class Api:
    """The endpoints over a TaskStore. ``fault`` (tests): answer every request, or
    those of ``fault_endpoints``, with that status (and ``fault_retry_after``)."""

    def __init__(self, store: TaskStore, enrollment_key: str | None = None,
                 poll_interval_s: int = 300):
        self.store = store
        self.pxe = PXEStore(store)
        self.enrollment_key = enrollment_key or None
        self.poll_interval_s = int(poll_interval_s)
        self.fault: int | None = None
        self.fault_endpoints: frozenset[str] | None = None
        self.fault_retry_after: int | None = None

    def handle(self, method: str, target: str, authorization: str | None, body: bytes,
               peer: str = "?") -> Reply:
        """Answer one request (``target``: the request line's path and query)."""
        try:
            return self._route(method, target, authorization, body, peer)
        except InvalidRequest as exc:
            return error(400, str(exc))
        except DatabaseUnavailable as exc:
            log.error("answering %s %s: %s", method, target, exc)
            return error(503, "the task server's database is not reachable: try again later",
                         [("Retry-After", str(random.randint(*UNAVAILABLE_RETRY_AFTER_S)))])

    def _route(self, method: str, target: str, authorization: str | None, body: bytes,
               peer: str) -> Reply:
        parts = urlsplit(target)
        path = parts.path
        match = CLIENT_PATH_RE.fullmatch(path)
        if path == "/api/v1/register":
            client_id, endpoint = None, "register"
        elif match:
            client_id, endpoint = unquote(match.group(1)), match.group(2)
        else:
            return error(404, f"no such endpoint: {path}")
        if self.fault is not None and (self.fault_endpoints is None
                                       or endpoint in self.fault_endpoints):
            if client_id:
                self.store.count_request(client_id, endpoint)
            after = [] if self.fault_retry_after is None else [
                ("Retry-After", str(self.fault_retry_after))]
            return error(self.fault, "simulated outage", after)
        if method != METHODS[endpoint]:
            return error(405, f"{path} takes {METHODS[endpoint]}, not {method}",
                         [("Allow", METHODS[endpoint])])
        if endpoint == "register":
            return self._register(body, peer)
        self.store.count_request(client_id, endpoint)
        if not self.store.auth(client_id, bearer(authorization)):
            return error(401, "missing or invalid bearer token for this client",
                         [("WWW-Authenticate", 'Bearer realm="dsagent"')])
        if endpoint == "tasks":
            limit, max_bytes = page_parameters(parse_qs(parts.query))
            xml, _ = render_page(client_id, lambda n: self.store.deliverable_tasks(client_id, n),
                                 limit, max_bytes)
            return Reply(200, xml, "application/xml")
        if endpoint == "status":
            data = parse_json(body)
            if not isinstance(data, dict) or not isinstance(data.get("events"), list):
                raise InvalidRequest('body must be {"events": [...]}')
            return json_reply(200, {"accepted": self.store.record_events(client_id,
                                                                         data["events"])})
        if endpoint == "pxe/startup":
            return json_reply(200, self.pxe.startup(client_id, self.poll_interval_s))
        self.pxe.record_state(client_id, parse_json(body), self.poll_interval_s)
        return Reply(204)

    def _register(self, body: bytes, peer: str) -> Reply:
        data = parse_json(body)
        try:
            creds = self.store.register(data, self.enrollment_key)
        except RegistrationRefused as exc:
            log.warning("registration from %s refused: %s", peer, exc)
            return error(403, str(exc))
        self.store.count_request(creds["client_id"], "register")
        return json_reply(201, {**creds, "poll_interval_s": self.poll_interval_s})
