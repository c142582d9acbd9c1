"""The applied PXE state: settings, managed and predefined computers, images.

SQLite in its own file, ``<state_dir>/pxe.db`` (agent.common.statedb.connect:
WAL, synchronous=FULL), rather than a JSON file: a one-computer update is a
one-row change, not a rewrite of 10,000 computers, and a whole scan -- every
file found -- is applied in one transaction, so one fsync covers a thousand
files and a crash leaves the state before or after the scan, never between.
Its own file, so the PXE process never contends with the CTA's DB.

Rules (PROTOCOL.md §7): a whole list replaces that list; an ``<Update>``
changes one entry: ``<Computer>`` sets a *managed* computer (predefined ones
come only as the whole PredefinedComputers.sbs), ``<RemoveComputer>`` removes
the MAC from both lists. A MAC on the managed list is decided by that entry,
else by the predefined one, else by the ``unknown_computers`` setting.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import NamedTuple

from agent.common.statedb import connect, write_transaction
from agent.pxe.sbsdoc import (Computer, Computers, Document, Image, Images, RemoveComputer,
                              RemoveImage, Setting, Settings, Update, normalise_mac)

SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS computers (list TEXT NOT NULL, mac TEXT NOT NULL, id TEXT,
    action TEXT NOT NULL, config TEXT, PRIMARY KEY (list, mac)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS images (config TEXT PRIMARY KEY, version TEXT) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""
MANAGED, PREDEFINED = "managed", "predefined"
# an <Update>'s change -> (table, its row); a removal -> (table, key column, what)
UPSERTS = {Computer: ("computers", lambda c: (MANAGED, c.mac, c.id, c.action, c.config)),
           Image: ("images", lambda i: (i.config, i.version)),
           Setting: ("settings", lambda s: (s.name, s.value))}
REMOVALS = {RemoveComputer: ("computers", "mac", "computer"),
            RemoveImage: ("images", "config", "image")}


def pxe_db_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / "pxe.db"


class Decision(NamedTuple):
    action: str           # automation | production | ignore
    config: str | None    # the preboot configuration (automation only)


class PXEState:
    """The durable PXE state of one site server."""

    def __init__(self, state_dir: str | Path):
        self.path = pxe_db_path(state_dir)
        self.db = connect(self.path)
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # ---- applying ------------------------------------------------------------------
    def apply_all(self, docs: list[tuple[str, Document]]) -> list[str]:
        """Apply ``(file name, document)`` in order, in one transaction; return
        what each changed (one line each, for the log)."""
        changes = []
        with write_transaction(self.db):
            for name, doc in docs:
                changes.append(self._apply(doc))
            if docs:
                last = {"file": docs[-1][0], "at": time.time(), "change": changes[-1]}
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('last_applied', ?)",
                                (json.dumps(last),))
        return changes

    def apply(self, name: str, doc: Document) -> str:
        return self.apply_all([(name, doc)])[0]

    def _apply(self, doc: Document) -> str:
        db = self.db
        if isinstance(doc, Settings):
            db.execute("DELETE FROM settings")
            db.executemany("INSERT INTO settings VALUES (?, ?)", doc.values.items())
            return "settings replaced: " + (", ".join(f"{k}={v}" for k, v in doc.values.items())
                                            or "none")
        if isinstance(doc, Computers):
            which = PREDEFINED if doc.predefined else MANAGED
            db.execute("DELETE FROM computers WHERE list = ?", (which,))
            db.executemany("INSERT INTO computers VALUES (?, ?, ?, ?, ?)",
                           [(which, c.mac, c.id, c.action, c.config) for c in doc.computers])
            return f"{which} computers replaced: {len(doc.computers)} computer(s)"
        if isinstance(doc, Images):
            db.execute("DELETE FROM images")
            db.executemany("INSERT INTO images VALUES (?, ?)",
                           [(i.config, i.version) for i in doc.images])
            return f"images replaced: {len(doc.images)} image(s)"
        if isinstance(doc, Update):
            return self._update(doc.change)
        raise TypeError(f"not an SBS document: {doc!r}")

    def _update(self, change) -> str:
        if type(change) in REMOVALS:
            table, column, what = REMOVALS[type(change)]
            key = getattr(change, column)
            gone = self.db.execute(f"DELETE FROM {table} WHERE {column} = ?", (key,)).rowcount
            return f"{what} {key} removed" + ("" if gone else " (was not listed)")
        if type(change) not in UPSERTS:
            raise TypeError(f"not an SBS change: {change!r}")
        table, row = UPSERTS[type(change)]
        values = row(change)
        self.db.execute(f"INSERT OR REPLACE INTO {table} VALUES "
                        f"({', '.join('?' * len(values))})", values)
        if isinstance(change, Computer):
            return f"computer {change.mac} set: {change.action} {change.config or ''}".rstrip()
        if isinstance(change, Image):
            return f"image {change.config} set: version {change.version or '-'}"
        return f"setting {change.name} = {change.value}"

    # ---- reading ---------------------------------------------------------------------
    def settings(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT name, value FROM settings"))

    def computers(self, predefined: bool = False) -> dict[str, Computer]:
        rows = self.db.execute("SELECT mac, action, config, id FROM computers WHERE list = ? "
                               "ORDER BY mac", (PREDEFINED if predefined else MANAGED,))
        return {row[0]: Computer(*row) for row in rows}

    def images(self) -> dict[str, str | None]:
        return dict(self.db.execute("SELECT config, version FROM images ORDER BY config"))

    def counts(self) -> dict[str, int]:
        by_list = dict(self.db.execute("SELECT list, count(*) FROM computers GROUP BY list"))
        return {"computers": by_list.get(MANAGED, 0), "predefined": by_list.get(PREDEFINED, 0),
                "images": self.db.execute("SELECT count(*) FROM images").fetchone()[0]}

    def last_applied(self) -> dict | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'last_applied'").fetchone()
        return json.loads(row[0]) if row else None

    def startup_applied(self) -> float | None:
        """When a startup answer (§7) was last applied, or None if never."""
        row = self.db.execute("SELECT value FROM meta WHERE key = 'startup_applied'").fetchone()
        return float(row[0]) if row else None

    def mark_startup_applied(self) -> None:
        with write_transaction(self.db):
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('startup_applied', ?)",
                            (repr(time.time()),))

    def decisions(self) -> tuple[dict[str, "Decision"], "Decision"]:
        """Every listed MAC's decision, and what an unlisted MAC gets: the same
        rules as decision(), in one query (the Server renders them all)."""
        settings = self.settings()
        fallback = settings.get("automation_config") or None
        unknown = (Decision("automation", fallback)
                   if settings.get("unknown_computers", "ignore") == "automation"
                   else Decision("ignore", None))
        found: dict[str, Decision] = {}
        # predefined first, so that a managed entry for the same MAC wins
        for mac, action, config in self.db.execute(
                "SELECT mac, action, config FROM computers ORDER BY list = 'managed'"):
            found[mac] = (Decision(action, config or fallback) if action == "automation"
                          else Decision(action, None))
        return found, unknown

    def decision(self, mac: str) -> Decision:
        """What a PXE request from ``mac`` gets (§7); ValueError if it is no MAC."""
        mac = normalise_mac(mac)
        row = self.db.execute(
            "SELECT action, config FROM computers WHERE mac = ? "
            "ORDER BY list = 'managed' DESC LIMIT 1", (mac,)).fetchone()
        settings = self.settings()
        if row is None:
            if settings.get("unknown_computers", "ignore") != "automation":
                return Decision("ignore", None)
            row = ("automation", None)
        action, config = row
        if action != "automation":
            return Decision(action, None)
        return Decision(action, config or settings.get("automation_config") or None)

