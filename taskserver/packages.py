"""Packages and the site servers that hold them: the reference server's side
of replication (issue #15, the seed's "Image Replication" and "Driver
Replication").

Every package has one **source of truth**: the http(s) URL of its folder,
holding ``manifest.json`` (PROTOCOL.md §4 ReplicatePackage), on any web
server: nginx, or a site server's own package server (docs/package-server.md),
which is how an image captured on a site server becomes the source others
replicate from. Its **holders** are the site servers (clients) that should
have it. The server:

- **checks** each source's manifest (``check``: on ``packages add``, on
  ``packages check``, every ``--package-check-s`` while serving) and queues a
  ReplicatePackage for every holder whose copy is not that manifest and has
  none pending; a 404 (deleted at the source) is a change too: the holders
  delete it;
- **resyncs** on a schedule (``--package-resync-s``, ``packages check
  --resync``): a ReplicatePackage for every holder, changed or not, so a file
  deleted or damaged at a replica is fetched again;
- learns what each holder has from its ReplicatePackage's ``succeeded``
  status (``details.manifest_sha256``, or ``deleted``);
- **chains** (taskserver/chain.py) a BootWizRebuild queued for a site server
  behind the replication of the driver packages it names (making the server a
  holder if it was not), and a DeployImage behind the replication of its
  image to every holder, queueing that replication first when the holder's
  copy is not the source's last checked manifest. So "add drivers, then
  rebuild", queued at once, runs in that order, and a failed replication
  cancels the rebuild, naming why.

Tables::

    packages         package_id, kind (driver|image), source, manifest_sha256 (of the
                     source's manifest at the last check; 'gone' after a 404; NULL
                     before any), checked_at, check_error, changed_at, added_at
    package_holders  package_id, client_id, added_at, task_id (its last
                     ReplicatePackage), held_sha256 (the manifest it last replicated;
                     'gone' once it deleted the package), replicated_at
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from taskserver.chain import hold
from taskserver.checks import InvalidRequest, UnknownClient, check_task_fields, utc_now

log = logging.getLogger("taskserver.packages")

REPLICATE = "ReplicatePackage"
KINDS = ("driver", "image")
GONE = "gone"
ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
MAX_MANIFEST = 16 << 20
FETCH_TIMEOUT_S = 15.0
SCHEMA = """
CREATE TABLE IF NOT EXISTS packages (
    package_id      TEXT PRIMARY KEY,
    kind            TEXT NOT NULL,
    source          TEXT NOT NULL,
    manifest_sha256 TEXT,
    checked_at      TEXT,
    check_error     TEXT,
    changed_at      TEXT,
    added_at        TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS package_holders (
    package_id    TEXT NOT NULL REFERENCES packages(package_id) ON DELETE CASCADE,
    client_id     TEXT NOT NULL,
    added_at      TEXT NOT NULL,
    task_id       TEXT,
    held_sha256   TEXT,
    replicated_at TEXT,
    PRIMARY KEY (package_id, client_id)
);
"""


@dataclass(frozen=True)
class Queued:
    package: str
    client_id: str
    task_id: str


def check_package_id(value: str) -> str:
    if not isinstance(value, str) or not ID_RE.fullmatch(value) or value in (".", ".."):
        raise InvalidRequest(f"package id must match [A-Za-z0-9._-]{{1,128}}, got {value!r}")
    return value


def check_source(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query \
            or parts.fragment or not parts.path.endswith("/"):
        raise InvalidRequest(f"source {value!r} is not an http(s) URL of a folder "
                             "(ending in /, no query)")
    return value


def fetch_manifest_digest(package: str, source: str) -> str:
    """The sha256 of the source's ``manifest.json`` (GONE on a 404), or
    InvalidRequest naming what is wrong with it."""
    url = source + "manifest.json"
    try:
        with httpx.Client(timeout=FETCH_TIMEOUT_S, follow_redirects=False,
                          headers={"Cache-Control": "no-cache"}) as http, \
                http.stream("GET", url) as response:
            if response.status_code == 404:
                return GONE
            if response.status_code != 200:
                raise InvalidRequest(f"{url}: HTTP {response.status_code}")
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MAX_MANIFEST:
                    raise InvalidRequest(f"{url} is larger than {MAX_MANIFEST >> 20} MiB")
    except httpx.HTTPError as exc:
        raise InvalidRequest(f"{url}: {type(exc).__name__}: {exc}") from None
    try:
        named = json.loads(body).get("id")
    except (ValueError, AttributeError):
        raise InvalidRequest(f"{url} is not a JSON manifest") from None
    if named != package:
        raise InvalidRequest(f"{url} is the manifest of {named!r}, not of '{package}'")
    return hashlib.sha256(body).hexdigest()


class PackageStore:
    """The packages side of a TaskStore (same database, same transactions)."""

    def __init__(self, store):
        self.store = store

    # -- the console's changes ------------------------------------------------
    def add(self, package: str, kind: str, source: str, holders: Iterable[str] = ()) -> None:
        """Add a package (or change its source) and the site servers that should
        hold it; ``check`` then queues what they need."""
        check_package_id(package)
        check_source(source)
        if kind not in KINDS:
            raise InvalidRequest(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        now = utc_now()
        with self.store._write() as conn:
            row = conn.execute("SELECT kind, source FROM packages WHERE package_id = ?",
                               (package,)).fetchone()
            if row is None:
                conn.execute("INSERT INTO packages (package_id, kind, source, added_at) "
                             "VALUES (?, ?, ?, ?)", (package, kind, source, now))
            elif row["kind"] != kind:
                raise InvalidRequest(f"package '{package}' is a {row['kind']} package, not "
                                     f"a {kind} one (remove it first)")
            elif row["source"] != source:
                conn.execute("UPDATE packages SET source = ?, manifest_sha256 = NULL WHERE "
                             "package_id = ?", (source, package))
            for client_id in dict.fromkeys(holders):
                self._add_holder(conn, package, client_id)

    def _add_holder(self, conn, package: str, client_id: str) -> None:
        if not conn.execute("SELECT 1 FROM clients WHERE client_id = ?", (client_id,)).fetchone():
            raise UnknownClient(f"unknown client {client_id!r} (a site server must be "
                                "enrolled or registered first)")
        conn.execute("INSERT INTO package_holders (package_id, client_id, added_at) VALUES "
                     "(?, ?, ?) ON CONFLICT DO NOTHING", (package, client_id, utc_now()))

    def remove(self, package: str, holders: Iterable[str] = ()) -> int:
        """Forget the package (or only these holders of it); the copies stay where
        they are. The number of rows removed."""
        holders = list(holders)
        with self.store._write() as conn:
            if holders:
                marks = ",".join("?" * len(holders))
                return conn.execute(f"DELETE FROM package_holders WHERE package_id = ? AND "
                                    f"client_id IN ({marks})", (package, *holders)).rowcount
            conn.execute("DELETE FROM package_holders WHERE package_id = ?", (package,))
            return conn.execute("DELETE FROM packages WHERE package_id = ?",
                                (package,)).rowcount

    # -- checking the sources, queueing the replications -------------------------
    def check(self, packages: Iterable[str] | None = None, resync: bool = False,
              fetch=fetch_manifest_digest) -> tuple[list[Queued], dict[str, str]]:
        """Read each source's manifest and queue a ReplicatePackage for every
        holder that needs one (``resync``: every holder without one pending).
        Returns (what was queued, {package: why its source could not be read})."""
        wanted = None if packages is None else list(packages)
        rows = self.store._read("SELECT package_id, source FROM packages ORDER BY package_id")
        known = {r["package_id"]: r["source"] for r in rows}
        for package in wanted or ():
            if package not in known:
                raise InvalidRequest(f"no package '{package}' (dsagent-server packages add)")
        queued: list[Queued] = []
        errors: dict[str, str] = {}
        for package, source in known.items():
            if wanted is not None and package not in wanted:
                continue
            try:
                digest, error = fetch(package, source), None
            except InvalidRequest as exc:
                digest, error = None, str(exc)
                errors[package] = error
                log.warning("package '%s': its source cannot be read: %s", package, error)
            with self.store._write() as conn:
                queued += self._checked(conn, package, source, digest, error, resync)
        return queued, errors

    def _checked(self, conn, package: str, source: str, digest: str | None,
                 error: str | None, resync: bool) -> list[Queued]:
        row = conn.execute("SELECT source, manifest_sha256 FROM packages WHERE package_id = ?",
                           (package,)).fetchone()
        if row is None or row["source"] != source:
            return []           # removed or changed meanwhile: the next check
        now = utc_now()
        if digest is None:
            conn.execute("UPDATE packages SET checked_at = ?, check_error = ? WHERE "
                         "package_id = ?", (now, error, package))
            return []
        if digest != row["manifest_sha256"]:
            log.info("package '%s': its source's manifest is now %s", package,
                     "gone (deleted at the source)" if digest == GONE else digest[:12])
            conn.execute("UPDATE packages SET changed_at = ? WHERE package_id = ?",
                         (now, package))
        conn.execute("UPDATE packages SET manifest_sha256 = ?, checked_at = ?, check_error = "
                     "NULL WHERE package_id = ?", (digest, now, package))
        queued = []
        for holder in conn.execute("SELECT client_id FROM package_holders WHERE package_id = ? "
                                   "ORDER BY client_id", (package,)).fetchall():
            task_id = self._needs(conn, package, holder["client_id"], force=resync)
            if task_id is not None and task_id[1]:
                queued.append(Queued(package, holder["client_id"], task_id[0]))
        return queued

    def _needs(self, conn, package: str, client_id: str,
               force: bool = False) -> tuple[str, bool] | None:
        """The ReplicatePackage this holder waits on: (its pending one, False), or
        (a new one, True) if its copy is not the last checked manifest (or
        ``force``); None if its copy is that manifest."""
        row = conn.execute(
            "SELECT p.kind, p.source, p.manifest_sha256, h.held_sha256, h.task_id, "
            "t.terminal_state FROM packages p JOIN package_holders h ON h.package_id = "
            "p.package_id LEFT JOIN tasks t ON t.task_id = h.task_id WHERE p.package_id = ? "
            "AND h.client_id = ?", (package, client_id)).fetchone()
        if row["task_id"] and row["terminal_state"] is None:
            return row["task_id"], False
        if not force and row["manifest_sha256"] is not None \
                and row["held_sha256"] == row["manifest_sha256"]:
            return None
        task = check_task_fields(REPLICATE, {"package": package, "kind": row["kind"],
                                             "source": row["source"]}, None, None)
        task_id = self.store._insert_tasks(client_id, [task], conn)[0]
        conn.execute("UPDATE package_holders SET task_id = ? WHERE package_id = ? AND "
                     "client_id = ?", (task_id, package, client_id))
        return task_id, True

    # -- hooks of TaskStore ------------------------------------------------------
    def task_queued(self, conn, client_id: str, type_: str, params: Mapping[str, str],
                    task_id: str) -> list[str]:
        """Chain a BootWizRebuild or a DeployImage behind the replication it needs;
        the clients a ReplicatePackage was queued for now."""
        if type_ == "BootWizRebuild":
            drivers = [d.strip() for d in (params.get("drivers") or "").split(",") if d.strip()]
            needs = [(d, [client_id]) for d in drivers if self._kind(conn, d) == "driver"]
            for package, _ in needs:
                self._add_holder(conn, package, client_id)
        elif type_ == "DeployImage" and self._kind(conn, params.get("image")) == "image":
            needs = [(params["image"], [r[0] for r in conn.execute(
                "SELECT client_id FROM package_holders WHERE package_id = ?",
                (params["image"],)).fetchall()])]
        else:
            return []
        awaited, woken = [], []
        for package, clients in needs:
            for client in clients:
                found = self._needs(conn, package, client)
                if found is not None:
                    awaited.append(found[0])
                    woken += [client] if found[1] else []
        if awaited:
            hold(self.store, conn, task_id, awaited)
            log.info("task %s (%s for %s) waits for replication task(s) %s", task_id, type_,
                     client_id, ", ".join(awaited))
        return woken

    @staticmethod
    def _kind(conn, package: str | None) -> str | None:
        if not package:
            return None
        row = conn.execute("SELECT kind FROM packages WHERE package_id = ?",
                           (package,)).fetchone()
        return row["kind"] if row else None

    @staticmethod
    def replication_ended(conn, client_id: str, task: Mapping[str, Any],
                          event: Mapping[str, Any]) -> None:
        """A ReplicatePackage succeeded: remember what the holder now has."""
        if task["type"] != REPLICATE or event["state"] != "succeeded":
            return
        params, details = json.loads(task["params"]), event.get("details") or {}
        held = GONE if details.get("deleted") is not None else details.get("manifest_sha256")
        if not isinstance(held, str):
            return
        conn.execute("UPDATE package_holders SET held_sha256 = ?, replicated_at = ? WHERE "
                     "package_id = ? AND client_id = ? AND package_id IN (SELECT package_id "
                     "FROM packages WHERE source = ?)",
                     (held, event["at"], params.get("package"), client_id, params.get("source")))

    # -- what the console shows ----------------------------------------------------
    def packages(self) -> list[dict[str, Any]]:
        """Each package with its holders' state (``dsagent-server packages list``)."""
        packages = [dict(r) for r in self.store._read(
            "SELECT * FROM packages ORDER BY package_id")]
        holders = self.store._read(
            "SELECT h.*, t.terminal_state FROM package_holders h LEFT JOIN tasks t ON "
            "t.task_id = h.task_id ORDER BY h.package_id, h.client_id")
        # each holder's last replication status, in one query (not one per holder)
        last = {row["task_id"]: dict(row) for row in self.store._read(
            "SELECT task_id, state, progress, message FROM (SELECT e.task_id, e.state, "
            "e.progress, e.message, ROW_NUMBER() OVER (PARTITION BY e.task_id ORDER BY e.seq "
            "DESC, e.received_at DESC, e.rowid DESC) AS n FROM events e JOIN package_holders "
            "h ON h.task_id = e.task_id) latest WHERE n = 1")}
        sources = {p["package_id"]: p["manifest_sha256"] for p in packages}
        by_package: dict[str, list[dict]] = {}
        for row in holders:
            holder = dict(row)
            holder["state"], holder["detail"] = _holder_state(
                holder, sources[row["package_id"]], last.get(row["task_id"]))
            by_package.setdefault(row["package_id"], []).append(holder)
        for package in packages:
            package["holders"] = by_package.get(package["package_id"], [])
        return packages



def _holder_state(holder: dict, source_sha256: str | None,
                  last: dict | None) -> tuple[str, str]:
    """(state, detail) of one holder: ``last`` is its replication's last status."""
    if holder["task_id"] and holder["terminal_state"] is None:
        if last is None:
            return "queued", f"task {holder['task_id']}"
        progress = last["progress"]
        return "replicating", f"{progress:.0f}%" if progress is not None else last["state"]
    if holder["terminal_state"] in ("failed", "cancelled") and last is not None:
        return holder["terminal_state"], last["message"] or ""
    if holder["held_sha256"] is None:
        return "never replicated", ""
    if holder["held_sha256"] == GONE:
        return ("deleted" if source_sha256 == GONE else "missing",
                f"at {holder['replicated_at']}")
    if holder["held_sha256"] == source_sha256:
        return "replicated", f"manifest {holder['held_sha256'][:12]} at " \
                             f"{holder['replicated_at']}"
    return "outdated", f"has manifest {holder['held_sha256'][:12]}"
