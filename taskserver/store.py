"""The reference task server's state, in one SQLite file (PROTOCOL.md §3).

Tables::

    clients   client_id, token, tickle_key (hex), name, uuid, macs, ips, os,
              agent_version, tickle_addr ("host:port" or NULL), registered_at
    tasks     seq (queue order), task_id (UUID), client_id, type, params (JSON
              object of strings, in order), timeout (or NULL), queued_at,
              terminal_state (NULL while the task is pending), delivered (1 once
              any status of it is stored)
    events    event_id (PK), task_id, seq, state, progress, message,
              details (JSON), at, received_at
    request_counts  client_id, endpoint, count, last_at
    pxe_*     the NS side of the PXE site server: taskserver/pxe.py (automation: automation.py)

One connection per store, shared by all threads under a lock, in WAL mode, so
a CLI process (``dsagent-server queue``) can write while a server process
serves. Commits use ``synchronous=NORMAL`` by default: nothing is lost when a
process is killed; pass ``synchronous="FULL"`` to survive power loss too.

Status semantics: events are deduplicated on ``event_id``; ``accepted`` lists
every event id that is stored after the call (new or duplicate); a malformed
event, or one for a task of another client, is not accepted and the reason is
logged; a task is no longer listed once a terminal event for it is stored.

Delivery: a pull lists a task until the agent has taken it: once any status
of it is stored (the agent's outbox held it durably before sending it), it is
not listed again, so the next page of a paged pull (§3, taskserver/paging.py)
goes on after it; the agent asks for that page once this one's ``received``
statuses are accepted. A GET has no side effect (``dsagent doctor`` pulls
too). The schema is versioned (``PRAGMA user_version``, MIGRATIONS), so a database
made by an older server is brought up to date when it is opened.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from taskserver.checks import (TERMINAL_STATES, InvalidRequest, RegistrationRefused,
                               UnknownClient, check_task_fields, event_problem,
                               parse_task_document, sanitize_client_id, utc_now,
                               parse_hostport, parse_rfc3339, valid_client_id)
from taskserver.chain import awaited, end_at_server, hold, task_ended
from taskserver.db import Database, PostgresDatabase, open_database, pg_ddl

log = logging.getLogger("taskserver.store")

ENDPOINTS = ("register", "tasks", "status")
EVENT_COLUMNS = ("e.event_id, e.task_id, e.seq, e.state, e.progress, e.message, e.details, e.at, "
                 "e.received_at")
SCHEMA = """
CREATE TABLE IF NOT EXISTS clients (
    client_id     TEXT PRIMARY KEY,
    token         TEXT NOT NULL,
    tickle_key    TEXT NOT NULL,
    name          TEXT,
    uuid          TEXT,
    macs          TEXT NOT NULL DEFAULT '[]',
    ips           TEXT NOT NULL DEFAULT '[]',
    os            TEXT,
    agent_version TEXT,
    tickle_addr   TEXT,
    registered_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id        TEXT NOT NULL UNIQUE,
    client_id      TEXT NOT NULL REFERENCES clients(client_id),
    type           TEXT NOT NULL,
    params         TEXT NOT NULL,
    timeout        INTEGER,
    queued_at      TEXT NOT NULL,
    terminal_state TEXT
);
CREATE INDEX IF NOT EXISTS tasks_pending ON tasks(client_id, seq) WHERE terminal_state IS NULL;
CREATE INDEX IF NOT EXISTS tasks_client ON tasks(client_id, seq);
CREATE TABLE IF NOT EXISTS events (
    event_id    TEXT PRIMARY KEY,
    task_id     TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    state       TEXT NOT NULL,
    progress    REAL,
    message     TEXT,
    details     TEXT,
    at          TEXT NOT NULL,
    received_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_task ON events(task_id, seq);
CREATE TABLE IF NOT EXISTS request_counts (
    client_id TEXT NOT NULL,
    endpoint  TEXT NOT NULL,
    count     INTEGER NOT NULL,
    last_at   TEXT NOT NULL,
    PRIMARY KEY (client_id, endpoint)
);
"""

# PostgreSQL's events: partitioned by the month of their `at` (taskserver/db.py
# drops old months whole); the primary key holds the partition key, so a resent
# event (same id, same `at`) is still a conflict.
PG_EVENTS = """
CREATE SEQUENCE IF NOT EXISTS events_rowid;
CREATE TABLE IF NOT EXISTS events (
    event_id    TEXT NOT NULL,
    task_id     TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    state       TEXT NOT NULL,
    progress    DOUBLE PRECISION,
    message     TEXT,
    details     TEXT,
    at          TEXT NOT NULL,
    at_ts       TIMESTAMPTZ NOT NULL,
    received_at TEXT NOT NULL,
    rowid       BIGINT NOT NULL DEFAULT nextval('events_rowid'),
    PRIMARY KEY (event_id, at_ts)
) PARTITION BY RANGE (at_ts);
CREATE TABLE IF NOT EXISTS events_default PARTITION OF events DEFAULT;
CREATE INDEX IF NOT EXISTS events_task ON events(task_id, seq);
CREATE INDEX IF NOT EXISTS events_event_id ON events(event_id);
"""


def migrations() -> dict[int, str | dict[str, str]]:
    """Schema version -> what brings a database from the version before up to it
    (SQLite's SQL; taskserver/db.py turns it into PostgreSQL's)."""
    from taskserver.automation import SCHEMA as AUTOMATION_SCHEMA   # they import this module
    from taskserver.chain import SCHEMA as CHAIN_SCHEMA
    from taskserver.packages import SCHEMA as PACKAGES_SCHEMA
    from taskserver.pxe import SCHEMA as PXE_SCHEMA

    without_events = SCHEMA[:SCHEMA.index("CREATE TABLE IF NOT EXISTS events")] + \
        SCHEMA[SCHEMA.index("CREATE TABLE IF NOT EXISTS request_counts"):]
    return {
        1: {"sqlite": SCHEMA, "postgresql": pg_ddl(without_events) + PG_EVENTS},
        2: """
ALTER TABLE tasks ADD COLUMN delivered INTEGER NOT NULL DEFAULT 0;
UPDATE tasks SET delivered = 1 WHERE task_id IN (SELECT task_id FROM events);
CREATE INDEX IF NOT EXISTS tasks_deliverable ON tasks(client_id, seq)
    WHERE terminal_state IS NULL AND delivered = 0;
""",
        3: PXE_SCHEMA + ";\n" + AUTOMATION_SCHEMA,
        4: CHAIN_SCHEMA + ";\n" + PACKAGES_SCHEMA,
    }


class TaskStore:
    """Clients, tasks and status events in SQLite or PostgreSQL (taskserver/db.py);
    safe to share between threads. ``target``: a file path or a ``postgresql://`` URL."""

    def __init__(self, target: str, *, synchronous: str = "NORMAL"):
        self.db_path = str(target)
        self.db: Database = open_database(self.db_path, synchronous=synchronous)
        self.allow_unknown_computers = False   # §8: let unknown computers register (automation)
        self._changed = threading.Condition()
        try:
            applied = self.db.migrate(migrations())
            if applied and applied[0] > 1:
                log.info("database %s: schema migrated to version %d", self.db, applied[-1])
            if isinstance(self.db, PostgresDatabase):
                self.db.ensure_event_partitions()
        except BaseException:
            self.db.close()
            raise

    # -- plumbing -----------------------------------------------------------
    def _write(self, serial: bool = True):
        """One write transaction (taskserver/db.py: serial unless asked otherwise)."""
        return self.db.write(serial)

    def _read(self, sql: str, args: tuple = ()) -> list[Any]:
        return self.db.read(sql, args)

    def insert_event(self, conn, event: Mapping[str, Any], received_at: str,
                     if_new: bool = False) -> bool:
        """Store one status event (``details`` as a JSON text or None); with
        ``if_new``, nothing if its id is stored already. True if stored."""
        columns = ["event_id", "task_id", "seq", "state", "progress", "message", "details",
                   "at", "received_at"]
        values = [event["event_id"], event["task_id"], event["seq"], event["state"],
                  event["progress"], event["message"], event["details"], event["at"],
                  received_at]
        if self.db.dialect == "postgresql":
            columns.append("at_ts")
            values.append(parse_rfc3339(event["at"]))
        sql = (f"INSERT INTO events ({', '.join(columns)}) VALUES "
               f"({', '.join('?' * len(values))})" + (" ON CONFLICT DO NOTHING" if if_new else ""))
        return conn.execute(sql, values).rowcount == 1

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "TaskStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- clients ------------------------------------------------------------
    def _insert_client(self, conn, client_id: str, *, tickle_addr=None, name=None, uuid_=None,
                       macs=(), ips=(), os_=None, agent_version=None) -> dict:
        token, tickle_key = secrets.token_urlsafe(32), secrets.token_hex(32)
        conn.execute(
            "INSERT INTO clients (client_id, token, tickle_key, name, uuid, macs, ips, os,"
            " agent_version, tickle_addr, registered_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (client_id, token, tickle_key, name, uuid_, json.dumps(list(macs)),
             json.dumps(list(ips)), os_, agent_version, tickle_addr, utc_now()))
        return {"client_id": client_id, "token": token, "tickle_key": tickle_key}

    def enroll(self, client_id: str, tickle_addr: str | None = None,
               name: str | None = None) -> dict:
        """Create a client with a fresh token and tickle key; return them."""
        if not valid_client_id(client_id):
            raise InvalidRequest(f"client id must match [A-Za-z0-9._-]{{1,64}}, got {client_id!r}")
        if tickle_addr is not None:
            parse_hostport(tickle_addr)
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM clients WHERE client_id = ?", (client_id,)).fetchone():
                raise InvalidRequest(f"client {client_id!r} is already enrolled")
            return self._insert_client(conn, client_id, tickle_addr=tickle_addr,
                                       name=name or client_id)

    def register(self, request_json: Any, enrollment_key: str | None) -> dict:
        """§3 register: check the enrollment key, create a client named after the machine.

        ``enrollment_key`` is the server's key; None (or "") disables registration.
        Returns ``{client_id, token, tickle_key}``.
        """
        if not isinstance(request_json, dict):
            raise InvalidRequest("register request must be a JSON object")
        if request_json.get("mode") not in (None, "managed"):   # §8: taskserver/automation.py
            from taskserver.automation import register  # it imports this module
            return register(self, request_json)
        if not enrollment_key:
            raise RegistrationRefused(
                "registration is disabled (the server was started without an enrollment key)")
        given = request_json.get("enrollment_key")
        if not isinstance(given, str) or not secrets.compare_digest(
                given.encode("utf-8"), enrollment_key.encode("utf-8")):
            raise RegistrationRefused("wrong or missing enrollment key")
        fields: dict[str, Any] = {}
        for key in ("name", "uuid", "os", "agent_version"):
            value = request_json.get(key)
            if value is not None and not isinstance(value, str):
                raise InvalidRequest(f"register: {key} must be a string")
            fields[key] = value
        for key in ("macs", "ips"):
            value = request_json.get(key) or []
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise InvalidRequest(f"register: {key} must be a list of strings")
            fields[key] = value
        base = sanitize_client_id(fields["name"] or fields["uuid"] or "client")
        with self._write() as conn:
            client_id, n = base, 1
            while conn.execute("SELECT 1 FROM clients WHERE client_id = ?",
                               (client_id,)).fetchone():
                n += 1
                suffix = f"-{n}"
                client_id = base[: 64 - len(suffix)] + suffix
            result = self._insert_client(
                conn, client_id, name=fields["name"], uuid_=fields["uuid"],
                macs=fields["macs"], ips=fields["ips"], os_=fields["os"],
                agent_version=fields["agent_version"])
        log.info("registered client %s (name %r, uuid %r)", client_id, fields["name"],
                 fields["uuid"])
        return result

    def set_tickle_addr(self, client_id: str, addr: str | None) -> None:
        """Where the client's objecthost listens (``host:port``), or None."""
        if addr is not None:
            parse_hostport(addr)
        with self._write() as conn:
            cur = conn.execute("UPDATE clients SET tickle_addr = ? WHERE client_id = ?",
                               (addr, client_id))
            if cur.rowcount == 0:
                raise UnknownClient(f"unknown client {client_id!r}")

    def client(self, client_id: str) -> dict | None:
        """One client's row as a dict (macs/ips decoded), or None."""
        rows = self._read("SELECT * FROM clients WHERE client_id = ?", (client_id,))
        return self._client_dict(rows[0]) if rows else None

    def clients(self) -> list[dict]:
        return [self._client_dict(r) for r in
                self._read("SELECT * FROM clients ORDER BY registered_at, client_id")]

    @staticmethod
    def _client_dict(row) -> dict:
        data = dict(row)
        data["macs"] = json.loads(data["macs"] or "[]")
        data["ips"] = json.loads(data["ips"] or "[]")
        return data

    def auth(self, client_id: str, token: str | None) -> bool:
        """True if ``token`` is ``client_id``'s token (constant-time compare)."""
        if not token or not isinstance(client_id, str):
            return False
        rows = self._read("SELECT token FROM clients WHERE client_id = ?", (client_id,))
        expected = rows[0]["token"] if rows else secrets.token_urlsafe(32)
        return bool(rows) & secrets.compare_digest(token.encode("utf-8", "replace"),
                                                   expected.encode("utf-8"))

    # -- request counters ---------------------------------------------------
    def count_request(self, client_id: str, endpoint: str) -> None:
        """Count one request of a known client to ``endpoint`` (register/tasks/status)."""
        with self._write(serial=False) as conn:
            conn.execute(
                "INSERT INTO request_counts (client_id, endpoint, count, last_at) "
                "SELECT ?, ?, 1, ? WHERE EXISTS (SELECT 1 FROM clients WHERE client_id = ?) "
                "ON CONFLICT (client_id, endpoint) DO UPDATE SET count = request_counts.count + 1, "
                "last_at = excluded.last_at", (client_id, endpoint, utc_now(), client_id))

    def request_counts(self, client_id: str) -> dict[str, int]:
        """Requests received from ``client_id`` so far, by endpoint (0 if none)."""
        counts = dict.fromkeys(ENDPOINTS, 0)
        counts.update(tuple(row) for row in self._read(
            "SELECT endpoint, count FROM request_counts WHERE client_id = ?", (client_id,)))
        return counts

    def reset_request_counts(self, client_id: str | None = None) -> None:
        where, args = ("", ()) if client_id is None else (" WHERE client_id = ?", (client_id,))
        with self._write() as conn:
            conn.execute("DELETE FROM request_counts" + where, args)

    # -- tasks --------------------------------------------------------------
    def _insert_tasks(self, client_id: str, tasks: list[tuple], conn=None,
                      after: Iterable[str] = (), woken: list[str] | None = None) -> list[str]:
        """Queue checked tasks (all or none), in ``conn``'s transaction if given (pxe.py),
        each waiting for the tasks ``after`` (taskserver/chain.py). Replications a task
        needs are queued with it (taskserver/packages.py); their clients are tickled
        after the commit (added to ``woken`` when the caller owns the transaction)."""
        if conn is None:
            woken = []
            with self._write() as conn:
                ids = self._insert_tasks(client_id, tasks, conn, after, woken)
            self._tickle([c for c in woken if c != client_id])
            return ids
        if not conn.execute("SELECT 1 FROM clients WHERE client_id = ?", (client_id,)).fetchone():
            from taskserver.automation import placeholder_client  # a listed computer's id?
            if not placeholder_client(self, conn, client_id):
                raise UnknownClient(f"unknown client {client_id!r}")
        from taskserver.packages import PackageStore   # chains what needs a replication
        now, ids, after = utc_now(), [], list(after)
        for type_, params, timeout, task_id in tasks:
            try:
                conn.execute(
                    "INSERT INTO tasks (task_id, client_id, type, params, timeout, queued_at)"
                    " VALUES (?,?,?,?,?,?)",
                    (task_id, client_id, type_, json.dumps(params, ensure_ascii=False), timeout,
                     now))
            except self.db.IntegrityError:
                raise InvalidRequest(f"task id {task_id} is already queued") from None
            if after:
                hold(self, conn, task_id, after)
            queued_for = PackageStore(self).task_queued(conn, client_id, type_, params, task_id)
            if woken is not None:
                woken += queued_for
            ids.append(task_id)
        return ids

    def queue_task(self, client_id: str, type: str, params: Mapping[str, str] | None = None,
                   timeout: int | None = None, task_id: str | None = None,
                   after: Iterable[str] = ()) -> str:
        """Queue one task for ``client_id``; return its id (a new UUID unless given).
        ``after``: task ids it waits for (taskserver/chain.py)."""
        return self._insert_tasks(client_id, [check_task_fields(type, params, timeout, task_id)],
                                  after=after)[0]

    def queue_for_clients(self, per_client: Mapping[str, tuple],
                          after: Iterable[str] = ()) -> dict[str, str]:
        """Queue one task for each client in one transaction (all or none):
        ``{client_id: (type, params, timeout)}`` -> ``{client_id: task_id}``. A
        console queueing for thousands pays one commit, not one each."""
        checked = {client: check_task_fields(type_, params, timeout, None)
                   for client, (type_, params, timeout) in per_client.items()}
        woken: list[str] = []
        with self._write() as conn:
            ids = {client: self._insert_tasks(client, [task], conn, after, woken)[0]
                   for client, task in checked.items()}
        self._tickle([c for c in woken if c not in ids])
        return ids

    def queue_xml(self, client_id: str, xml_text: str | bytes,
                  after: Iterable[str] = ()) -> list[str]:
        """Queue every ``<Task>`` of a §3 document (all or none); return their ids.

        Accepts a ``<ClientTasks>`` document, or one or more bare ``<Task>``
        elements. Given ids are kept; tasks without one get a new UUID.
        """
        return self._insert_tasks(client_id, parse_task_document(xml_text), after=after)

    @staticmethod
    def _task_dict(row) -> dict:
        data = dict(row)
        data["params"] = json.loads(data["params"])
        return data

    def pending_tasks(self, client_id: str, limit: int | None = None) -> list[dict]:
        """Tasks of ``client_id`` with no terminal event stored, oldest first
        (the first ``limit`` of them, if given).

        Each: ``{task_id, type, params, timeout, queued_at}``.
        """
        rows = self._read(
            "SELECT task_id, type, params, timeout, queued_at FROM tasks "
            "WHERE client_id = ? AND terminal_state IS NULL ORDER BY seq"
            + ("" if limit is None else " LIMIT ?"), (client_id,) + (() if limit is None
                                                                    else (limit,)))
        return [self._task_dict(r) for r in rows]

    def deliverable_tasks(self, client_id: str, limit: int) -> list[dict]:
        """The first ``limit`` tasks a pull lists (module docstring: Delivery)."""
        rows = self._read(
            "SELECT task_id, type, params, timeout, queued_at FROM tasks WHERE client_id = ? "
            "AND terminal_state IS NULL AND delivered = 0 AND held = 0 ORDER BY seq LIMIT ?",
            (client_id, limit))
        return [self._task_dict(r) for r in rows]

    def cancel_tasks(self, task_ids: Iterable[str],
                     force: bool = False) -> dict[str, str | None]:
        """Cancel queued tasks no agent has taken yet: each gets a ``cancelled``
        status made by the server, so it is listed no more and its history says
        why. ``force`` also ends tasks an agent took but never finished (it lost
        them with its state, say); the agent is not told, and statuses it still
        sends are stored after this one. ``{task_id: None if cancelled, else why not}``."""
        outcome: dict[str, str | None] = {}
        tickle: list[str] = []
        with self._write() as conn:
            for task_id in dict.fromkeys(task_ids):
                row = conn.execute("SELECT terminal_state, delivered FROM tasks WHERE task_id = ?",
                                   (task_id,)).fetchone()
                if row is None:
                    outcome[task_id] = "no such task"
                elif row["terminal_state"]:
                    outcome[task_id] = f"it already ended ({row['terminal_state']})"
                elif row["delivered"] and not force:
                    outcome[task_id] = ("the agent has taken it (a status of it is stored); "
                                        "it cannot be called back (--force ends it here anyway)")
                else:
                    message = ("cancelled at the server after the agent took it (forced): the "
                               "agent was not told" if row["delivered"] else
                               "cancelled at the server before an agent took it")
                    end_at_server(self, conn, task_id, message,
                                  {"by": "server", "forced": bool(row["delivered"])})
                    tickle += task_ended(self, conn, task_id, "cancelled", message)
                    outcome[task_id] = None
        self._notify()
        self._tickle(tickle)
        return outcome

    def task(self, task_id: str) -> dict | None:
        rows = self._read("SELECT task_id, client_id, type, params, timeout, queued_at, "
                          "terminal_state FROM tasks WHERE task_id = ?", (task_id,))
        return self._task_dict(rows[0]) if rows else None

    # -- status events ------------------------------------------------------
    def record_events(self, client_id: str, events: Iterable[Any]) -> list[str]:
        """Store a §3 status batch from ``client_id``; return the accepted event ids."""
        if not isinstance(events, list):
            raise InvalidRequest("events must be a JSON array")
        accepted: list[str] = []
        now, tickle = utc_now(), []     # PXE servers told of a Reboot (taskserver/automation.py)
        with self._write(serial=False) as conn:     # dedup by event_id needs no more
            for index, event in enumerate(events):
                problem = event_problem(event)
                if problem is None:
                    row = conn.execute("SELECT client_id, type, params FROM tasks "
                                       "WHERE task_id = ?", (event["task_id"],)).fetchone()
                    if row is None:
                        problem = f"unknown task {event['task_id']}"
                    elif row["client_id"] != client_id:
                        problem = f"task {event['task_id']} does not belong to this client"
                if problem is not None:
                    eid = event.get("event_id") if isinstance(event, dict) else None
                    log.warning("status from %s: event #%d (event_id %r) not accepted: %s",
                                client_id, index, eid, problem)
                    continue
                details = event["details"]
                stored_now = self.insert_event(conn, {
                    **event, "details": None if details is None else json.dumps(
                        details, ensure_ascii=False)}, now, if_new=True)
                if not stored_now:
                    stored = conn.execute("SELECT task_id, seq, state FROM events "
                                          "WHERE event_id = ?", (event["event_id"],)).fetchone()
                    if tuple(stored) != (event["task_id"], event["seq"], event["state"]):
                        log.warning("status from %s: event_id %s resent with other content "
                                    "(stored: task %s seq %s %s); keeping the stored one",
                                    client_id, event["event_id"], *tuple(stored))
                else:
                    conn.execute("UPDATE tasks SET delivered = 1 WHERE task_id = ? AND "
                                 "delivered = 0", (event["task_id"],))
                    first = event["state"] in TERMINAL_STATES and conn.execute(
                        "UPDATE tasks SET terminal_state = ? WHERE task_id = ? AND terminal_state "
                        "IS NULL", (event["state"], event["task_id"])).rowcount
                    from taskserver.automation import event_stored  # images, Reboot -> PXE
                    tickle += event_stored(self, conn, client_id, row, event, bool(first))
                    if first:       # what waited for it (chain.py), what a holder has
                        tickle += task_ended(self, conn, event["task_id"], event["state"],
                                             event.get("message"))
                        from taskserver.packages import PackageStore
                        PackageStore.replication_ended(conn, client_id, row, event)
                if event["event_id"] not in accepted:
                    accepted.append(event["event_id"])
        self._notify()
        self._tickle(tickle)
        return accepted

    @staticmethod
    def _event_dict(row) -> dict:
        data = dict(row)
        if data["details"] is not None:
            data["details"] = json.loads(data["details"])
        if isinstance(data["progress"], float) and data["progress"].is_integer():
            data["progress"] = int(data["progress"])
        return data

    def events(self, task_id: str) -> list[dict]:
        """A task's stored events, in ``seq`` order."""
        rows = self._read(f"SELECT {EVENT_COLUMNS} FROM events e WHERE task_id = ? "
                          "ORDER BY seq, received_at, rowid", (task_id,))
        return [self._event_dict(r) for r in rows]

    def history(self, client_id: str | None = None, task_id: str | None = None) -> list[dict]:
        """Tasks (queue order) with their events.

        Each: ``{task_id, client_id, type, params, timeout, queued_at,
        state, events: [...]}``, where ``state`` is the latest event's state,
        the terminal one once stored, or before any event ``"waiting"`` while
        it waits for the tasks ``waits_for`` (taskserver/chain.py), else ``"queued"``.
        """
        where, args = [], []
        if client_id is not None:
            where.append("t.client_id = ?")
            args.append(client_id)
        if task_id is not None:
            where.append("t.task_id = ?")
            args.append(task_id)
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        with self.db.snapshot() as conn:
            tasks = conn.execute(
                "SELECT task_id, client_id, type, params, timeout, queued_at, terminal_state, "
                f"held FROM tasks t {clause} ORDER BY t.seq", tuple(args)).fetchall()
            events = conn.execute(
                f"SELECT {EVENT_COLUMNS} FROM events e JOIN tasks t ON t.task_id = e.task_id "
                f"{clause} ORDER BY t.seq, e.seq, e.received_at, e.rowid", tuple(args)).fetchall()
        by_task: dict[str, list[dict]] = {}
        for row in events:
            by_task.setdefault(row["task_id"], []).append(self._event_dict(row))
        result = []
        for row in tasks:
            data = self._task_dict(row)
            data["events"] = by_task.get(data["task_id"], [])
            terminal, held = data.pop("terminal_state"), data.pop("held")
            data["state"] = terminal or (data["events"][-1]["state"] if data["events"]
                                         else "waiting" if held else "queued")
            data["waits_for"] = awaited(self, data["task_id"]) if held and not terminal else []
            result.append(data)
        return result

    def is_terminal(self, task_id: str) -> bool:
        rows = self._read("SELECT terminal_state FROM tasks WHERE task_id = ?", (task_id,))
        return bool(rows and rows[0]["terminal_state"])

    def wait_terminal(self, task_ids: Iterable[str], timeout: float) -> bool:
        """Wait until every task has a terminal event stored; False on timeout.

        Wakes at once on events recorded through this store and polls every
        50 ms for writes by other processes.
        """
        remaining = list(dict.fromkeys(task_ids))
        deadline = time.monotonic() + timeout
        while True:
            if remaining:
                marks = ",".join("?" * len(remaining))
                done = {r["task_id"] for r in self._read(
                    f"SELECT task_id FROM tasks WHERE task_id IN ({marks}) "
                    "AND terminal_state IS NOT NULL", tuple(remaining))}
                remaining = [t for t in remaining if t not in done]
            if not remaining:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with self._changed:
                self._changed.wait(min(left, 0.05))

    def _tickle(self, client_ids: list[str]) -> None:
        """Wake clients a change in a transaction left work for (after its commit)."""
        if client_ids:
            from taskserver.automation import tickle_pxe_servers
            tickle_pxe_servers(self, dict.fromkeys(client_ids))

    def _notify(self) -> None:
        """Wake wait_terminal (after a transaction, never inside one)."""
        with self._changed:
            self._changed.notify_all()
