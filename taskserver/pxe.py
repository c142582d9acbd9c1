"""The NS side of the PXE site server (PROTOCOL.md §7, issue #12; docs/taskserver-pxe.md).

The console's PXE data lives beside the tasks, in the TaskStore's SQLite
file: the managed and predefined computers (a MAC is on one list at a time),
the preboot images (config -> version), the PXE settings, and the PXE
servers -- the site servers that asked for their startup information or
posted their state -- with the last state each posted.

A console change is turned here into the §7 documents the site servers need
and queued as one UpdateSBSInfo task per PXE server *in the transaction that
stores the change* (PXEStore shares the TaskStore's connection and lock), so
no change is stored without being sent and no server registering meanwhile
misses one: it either gets the change in its startup answer or a task. The
XML of every document is made here only, so the startup answer and the
tasks say the same. Which change gives which file follows the rules the
agent's PXE state applies (agent/pxe/state.py):

- one managed computer set          -> ``update``  ``<Update><Computer .../></Update>``
- several managed computers set     -> ``clients`` the whole managed list
- any predefined computer set/moved -> ``predefined`` the whole predefined list
  (an ``<Update><Computer>`` would make it managed on the site server)
- a computer removed (either list)  -> ``update``  ``<Update><RemoveComputer mac=.../></Update>``
- an image set / removed            -> ``update``  ``<Image .../>`` / ``<RemoveImage .../>``
- one setting / several             -> ``update``  ``<Setting>`` / ``initial-config`` (all of them)

Tickling the servers afterwards is the caller's (taskserver.app.tickle_clients):
this module only queues, and a queued task is pulled at the next poll anyway.
"""

from __future__ import annotations

import json
import logging
import math
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Mapping
from xml.sax.saxutils import escape, quoteattr

from taskserver.checks import (XML_INVALID_RE, InvalidRequest, StoreError, check_rfc3339,
                               check_task_fields, utc_now)
from taskserver.store import TaskStore

log = logging.getLogger("taskserver.pxe")

TASK_TYPE = "UpdateSBSInfo"
MANAGED, PREDEFINED = "managed", "predefined"
LISTS = (MANAGED, PREDEFINED)
ACTIONS = ("automation", "production", "ignore")
SETTINGS = {"unknown_computers": ("ignore", "automation"),   # name -> allowed values (None: a
            "automation_config": None}                       # config name, "" unsets it)
DEFAULT_SETTINGS = {"unknown_computers": "ignore"}
DEFAULT_POLL_INTERVAL_S = 300
SILENT_AFTER_POLLS = 3           # a server whose last state is older than 3 polls is "silent"
MAC_RE = re.compile(r"[0-9A-Fa-f]{2}(?:[:-][0-9A-Fa-f]{2}){5}")
CONFIG_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
VERSION_RE = re.compile(r"[A-Za-z0-9._:+-]{1,128}")
NAME_MAX = 64

SCHEMA = """
CREATE TABLE IF NOT EXISTS pxe_computers (
    mac        TEXT PRIMARY KEY,
    list       TEXT NOT NULL CHECK (list IN ('managed', 'predefined')),
    name       TEXT,
    action     TEXT NOT NULL,
    config     TEXT,
    changed_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pxe_images (
    config TEXT PRIMARY KEY, version TEXT NOT NULL, changed_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pxe_settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pxe_servers (
    client_id       TEXT PRIMARY KEY REFERENCES clients(client_id),
    registered_at   TEXT NOT NULL,
    startup_at      TEXT,
    poll_interval_s INTEGER,
    state           TEXT,
    state_at        TEXT
);
"""


class UnknownEntry(StoreError, LookupError):
    """No computer with that MAC, or no image with that config, is listed."""


# ---- checks (the CLI's argument types use them too) ---------------------------------

def normalise_mac(raw: Any) -> str:
    """``00-11-22-AA-bb-cc`` -> ``00:11:22:aa:bb:cc``; InvalidRequest if it is no MAC."""
    text = raw.strip() if isinstance(raw, str) else ""
    if not MAC_RE.fullmatch(text):
        raise InvalidRequest(f"MAC {raw!r} is not six hex pairs separated by ':' or '-'")
    return text.lower().replace("-", ":")


def check_action(action: Any) -> str:
    if action not in ACTIONS:
        raise InvalidRequest(f"action {action!r} is not one of {', '.join(ACTIONS)}")
    return action


def check_config(config: Any, what: str = "config") -> str:
    if not isinstance(config, str) or not CONFIG_RE.fullmatch(config):
        raise InvalidRequest(f"{what} {config!r} is not a configuration name "
                             "([A-Za-z0-9._-], 1-64 characters)")
    return config


def check_version(version: Any) -> str:
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
        raise InvalidRequest(f"version {version!r} is not a version name "
                             "([A-Za-z0-9._:+-], 1-128 characters)")
    return version


def check_name(name: Any) -> str | None:
    """A computer's name (its ``id`` in the SBS files): 1-64 printable characters, or None."""
    if name is None or (isinstance(name, str) and not name.strip()):
        return None
    text = name.strip() if isinstance(name, str) else None
    if (text is None or len(text) > NAME_MAX or XML_INVALID_RE.search(text)
            or any(ch < " " or ch == "\x7f" for ch in text)):
        raise InvalidRequest(f"name {name!r} must be 1-{NAME_MAX} printable characters")
    return text


def check_setting(name: Any, value: Any) -> tuple[str, str]:
    if name not in SETTINGS:
        raise InvalidRequest(f"unknown setting {name!r} (known: {', '.join(SETTINGS)})")
    allowed = SETTINGS[name]
    if allowed is not None and value not in allowed:
        raise InvalidRequest(f"setting {name} must be one of {', '.join(allowed)}, "
                             f"got {value!r}")
    if allowed is None and value != "":
        check_config(value, f"setting {name}")
    return name, value


@dataclass(frozen=True)
class Computer:
    """One computer as the console keeps it (``list``: managed or predefined)."""
    mac: str
    action: str
    name: str | None = None
    config: str | None = None
    list: str = PREDEFINED

    @classmethod
    def checked(cls, mac: Any, action: Any, name: Any = None, config: Any = None) -> "Computer":
        return cls(normalise_mac(mac), check_action(action), check_name(name),
                   None if config in (None, "") else check_config(config))


# ---- the §7 documents ---------------------------------------------------------------

def _attrs(**values: str | None) -> str:
    return " ".join(f"{key}={quoteattr(value)}" for key, value in values.items()
                    if value is not None)


def computer_xml(c: Computer) -> str:
    return f"<Computer {_attrs(mac=c.mac, id=c.name, action=c.action, config=c.config)}/>"


def image_xml(config: str, version: str | None) -> str:
    return f"<Image {_attrs(config=config, version=version)}/>"


def setting_xml(name: str, value: str) -> str:
    return f"<Setting {_attrs(name=name)}>{escape(value)}</Setting>"


def _document(root: str, lines: Iterable[str]) -> str:
    body = "".join(f"  {line}\n" for line in lines)
    return f"<{root}>\n{body}</{root}>\n"


def computers_xml(computers: Iterable[Computer]) -> str:
    """``<Computers>``: a whole list (``NNNNNNNNNN-client.sbs``, ``PredefinedComputers.sbs``)."""
    return _document("Computers", map(computer_xml, computers))


def images_xml(images: Mapping[str, str | None]) -> str:
    return _document("Images", (image_xml(c, v) for c, v in images.items()))


def settings_xml(settings: Mapping[str, str]) -> str:
    """``<PXEConfig>`` (``initialPXEConfigPath.sbs``); an empty value is left out (unset)."""
    return _document("PXEConfig", (setting_xml(n, v) for n, v in settings.items() if v != ""))


def update_xml(change: str) -> str:
    """``<Update>`` holding exactly one change (``<uuid>.sbs``)."""
    return f"<Update>{change}</Update>\n"


# ---- what a change queued -----------------------------------------------------------

@dataclass
class Sent:
    """What one console change queued: the SBS files (kind, payload) and, per PXE
    server, the ids of their UpdateSBSInfo tasks (in ``files`` order)."""
    summary: str
    files: list[tuple[str, str]] = field(default_factory=list)
    tasks: dict[str, list[str]] = field(default_factory=dict)


def _age_s(stamp: str | None, now: datetime) -> float | None:
    if not stamp:
        return None
    return (now - datetime.fromisoformat(stamp.replace("Z", "+00:00"))).total_seconds()


class PXEStore:
    """The console's PXE lists, settings and servers over a TaskStore (same file, same lock).

    ``confirm_s`` (0-3600 s or None) goes into every UpdateSBSInfo task: the
    site server then waits that long for its PXE Interface to take the file.
    """

    def __init__(self, store: TaskStore, confirm_s: float | None = None):
        if confirm_s is not None and not (math.isfinite(confirm_s) and 0 <= confirm_s <= 3600):
            raise InvalidRequest(f"confirm_s must be 0-3600 seconds, got {confirm_s!r}")
        self.store = store
        self.confirm_s = confirm_s

    # ---- reading -----------------------------------------------------------------
    def _reading(self, read: Callable[[Any], Any]) -> Any:
        with self.store.db.snapshot() as conn:
            return read(conn)

    def settings(self) -> dict[str, str]:
        """Every setting with its value (defaults included; unset ones left out)."""
        return self._reading(self._settings)

    def computers(self, which: str | None = None) -> list[Computer]:
        """The computers of one list (``managed``/``predefined``), or both (managed
        first), each by MAC."""
        return self._reading(lambda conn: [c for w in ((which,) if which else LISTS)
                                           for c in self._list(conn, w)])

    def computer(self, mac: str) -> Computer | None:
        """The computer with that MAC (any list), or None."""
        return self._reading(lambda conn: self._computer(conn, normalise_mac(mac)))

    def images(self) -> dict[str, str]:
        return self._reading(self._images)

    def startup(self, client_id: str, poll_interval_s: int | None = None) -> dict[str, Any]:
        """The §7 startup answer for ``client_id``, which is registered (or seen again)
        as a PXE server in the same transaction: a change made meanwhile is either in
        this answer or queued for it. ``predefined`` is always the XML (an empty list
        too), so a site server's stale predefined list is always replaced."""
        now = utc_now()
        with self.store._write() as conn:
            self._register(conn, client_id, now, poll_interval_s)
            conn.execute("UPDATE pxe_servers SET startup_at = ? WHERE client_id = ?",
                         (now, client_id))
            return {"initial-config": settings_xml(self._settings(conn)),
                    "clients": computers_xml(self._list(conn, MANAGED)),
                    "images": images_xml(self._images(conn)),
                    "predefined": computers_xml(self._list(conn, PREDEFINED))}

    @staticmethod
    def _settings(conn) -> dict[str, str]:
        rows = conn.execute("SELECT name, value FROM pxe_settings ORDER BY name").fetchall()
        return {**DEFAULT_SETTINGS, **{name: value for name, value in rows if value != ""}}

    @staticmethod
    def _images(conn) -> dict[str, str]:
        return dict(conn.execute("SELECT config, version FROM pxe_images ORDER BY config"))

    @staticmethod
    def _list(conn, which: str) -> list[Computer]:
        rows = conn.execute("SELECT mac, action, name, config FROM pxe_computers "
                            "WHERE list = ? ORDER BY mac", (which,)).fetchall()
        return [Computer(*tuple(r), list=which) for r in rows]

    @staticmethod
    def _computer(conn, mac: str) -> Computer | None:
        row = conn.execute("SELECT mac, action, name, config, list FROM pxe_computers "
                           "WHERE mac = ?", (mac,)).fetchone()
        return None if row is None else Computer(*tuple(row))

    # ---- PXE servers ---------------------------------------------------------------
    @staticmethod
    def _register(conn, client_id: str, now: str, poll_interval_s: int | None) -> None:
        if not conn.execute("SELECT 1 FROM clients WHERE client_id = ?", (client_id,)).fetchone():
            raise UnknownEntry(f"unknown client {client_id!r}")
        if conn.execute("INSERT INTO pxe_servers (client_id, registered_at) VALUES (?, ?) "
                        "ON CONFLICT DO NOTHING", (client_id, now)).rowcount:
            log.info("client %s registered as a PXE server", client_id)
        if poll_interval_s:
            conn.execute("UPDATE pxe_servers SET poll_interval_s = ? WHERE client_id = ?",
                         (int(poll_interval_s), client_id))

    def record_state(self, client_id: str, state: Any, poll_interval_s: int | None = None) -> None:
        """Store a §7 ``pxe/state`` body (InvalidRequest naming the bad field); a client
        not yet a PXE server becomes one."""
        check_state(state)
        now = utc_now()
        with self.store._write() as conn:
            self._register(conn, client_id, now, poll_interval_s)
            conn.execute("UPDATE pxe_servers SET state = ?, state_at = ? WHERE client_id = ?",
                         (json.dumps(state, ensure_ascii=False), now, client_id))

    def servers(self, poll_interval_s: int | None = None,
                now: datetime | None = None) -> list[dict[str, Any]]:
        """Each PXE server: ``client_id, name, tickle_addr, registered_at, startup_at,
        poll_interval_s, state (dict|None), state_at, age_s, silent, status`` where
        status is ``serving``, ``not serving``, ``silent`` or ``no state yet``. Silent:
        nothing heard for over 3 poll intervals (``poll_interval_s`` overrides the
        interval recorded when the server last called)."""
        now = now or datetime.now(timezone.utc)
        rows = self.store._read(
            "SELECT s.*, c.name, c.tickle_addr FROM pxe_servers s JOIN clients c USING "
            "(client_id) ORDER BY s.registered_at, s.client_id")
        result = []
        for row in rows:
            data = dict(row)
            data["state"] = json.loads(data["state"]) if data["state"] else None
            interval = poll_interval_s or data["poll_interval_s"] or DEFAULT_POLL_INTERVAL_S
            data["poll_interval_s"] = interval
            data["age_s"] = _age_s(data["state_at"], now)
            heard = _age_s(data["state_at"] or data["registered_at"], now)
            data["silent"] = heard is not None and heard > SILENT_AFTER_POLLS * interval
            data["status"] = ("silent" if data["silent"] else "no state yet" if not data["state"]
                              else "serving" if data["state"]["serving"] else "not serving")
            result.append(data)
        return result

    # ---- console changes -----------------------------------------------------------
    def add_computers(self, computers: Iterable[Computer | Mapping[str, Any]],
                      managed: bool = False) -> Sent:
        """Add or change computers (all or none), then queue what the PXE servers need.

        A computer goes to the managed list if ``managed``, if it is there already,
        or if its MAC is a registered client's (the register request's ``macs``;
        with no name given it takes that client's id); else to the predefined list.
        A MAC on the predefined list that goes to the managed one leaves the former.
        """
        wanted: dict[str, Computer] = {}
        for number, item in enumerate(computers, 1):
            get = (item if isinstance(item, Mapping) else vars(item)).get
            try:
                c = Computer.checked(get("mac"), get("action"), get("name"), get("config"))
            except InvalidRequest as exc:
                raise InvalidRequest(f"computer #{number}: {exc}") from None
            if c.mac in wanted:
                raise InvalidRequest(f"computer #{number}: MAC {c.mac} is listed twice")
            wanted[c.mac] = c
        if not wanted:
            raise InvalidRequest("no computer to add")
        with self.store._write() as conn:
            return self._add(conn, wanted, managed)

    def _add(self, conn, wanted: Mapping[str, Computer], managed: bool,
             summary: str | None = None) -> Sent:
        """add_computers in ``conn``'s transaction (checked computers by MAC); also
        taskserver/automation.py's (registration, Reboot)."""
        now = utc_now()
        lists = dict(conn.execute("SELECT mac, list FROM pxe_computers").fetchall())
        owners = self._client_macs(conn)
        touched = {MANAGED: [], PREDEFINED: []}
        left_predefined = False
        for c in wanted.values():
            target = (MANAGED if managed or lists.get(c.mac) == MANAGED or c.mac in owners
                      else PREDEFINED)
            left_predefined |= lists.get(c.mac) == PREDEFINED and target == MANAGED
            name = (c.name or owners.get(c.mac)) if target == MANAGED else c.name
            c = Computer(c.mac, c.action, name, c.config, target)
            conn.execute("INSERT INTO pxe_computers (mac, list, name, action, config, changed_at) "
                         "VALUES (?,?,?,?,?,?) ON CONFLICT (mac) DO UPDATE SET list = "
                         "excluded.list, name = excluded.name, action = excluded.action, "
                         "config = excluded.config, changed_at = excluded.changed_at",
                         (c.mac, c.list, c.name, c.action, c.config, now))
            touched[target].append(c)
        files = []
        if touched[PREDEFINED] or left_predefined:
            files.append(("predefined", computers_xml(self._list(conn, PREDEFINED))))
        if len(touched[MANAGED]) == 1:
            files.append(("update", update_xml(computer_xml(touched[MANAGED][0]))))
        elif touched[MANAGED]:
            files.append(("clients", computers_xml(self._list(conn, MANAGED))))
        parts = [f"{len(touched[w])} {w}" for w in LISTS if touched[w]]
        return self._fan_out(conn, summary or f"computers set: {', '.join(parts)}", files)

    def add_computer(self, mac: str, action: str, name: str | None = None,
                     config: str | None = None, managed: bool = False) -> Sent:
        return self.add_computers([Computer.checked(mac, action, name, config)], managed)

    @staticmethod
    def _client_macs(conn) -> dict[str, str]:
        """MAC -> client id, from every registered client's ``macs``."""
        owners: dict[str, str] = {}
        for client_id, macs in conn.execute("SELECT client_id, macs FROM clients"):
            for mac in json.loads(macs or "[]"):
                if isinstance(mac, str) and MAC_RE.fullmatch(mac.strip()):
                    owners.setdefault(normalise_mac(mac), client_id)
        return owners

    def set_action(self, mac: str, action: str, config: str | None = None) -> Sent:
        """Change a listed computer's action (and config, if given)."""
        mac, action = normalise_mac(mac), check_action(action)
        config = None if config is None else check_config(config)
        with self.store._write() as conn:
            old = self._computer(conn, mac)
            if old is None:
                raise UnknownEntry(f"no computer with MAC {mac} is listed "
                                   "(add it with `dsagent-server pxe add-computer`)")
            c = Computer(mac, action, old.name, config or old.config, old.list)
            conn.execute("UPDATE pxe_computers SET action = ?, config = ?, changed_at = ? "
                         "WHERE mac = ?", (c.action, c.config, utc_now(), mac))
            files = ([("predefined", computers_xml(self._list(conn, PREDEFINED)))]
                     if c.list == PREDEFINED else [("update", update_xml(computer_xml(c)))])
            return self._fan_out(conn, f"{c.list} computer {mac} set: {action} "
                                       f"{c.config or ''}".rstrip(), files)

    def remove_computer(self, mac: str) -> Sent:
        mac = normalise_mac(mac)
        with self.store._write() as conn:
            old = self._computer(conn, mac)
            if old is None:
                raise UnknownEntry(f"no computer with MAC {mac} is listed")
            conn.execute("DELETE FROM pxe_computers WHERE mac = ?", (mac,))
            return self._fan_out(conn, f"{old.list} computer {mac} removed", [
                ("update", update_xml(f"<RemoveComputer {_attrs(mac=mac)}/>"))])

    def set_image(self, config: str, version: str) -> Sent:
        config, version = check_config(config), check_version(version)
        with self.store._write() as conn:
            _upsert_image(conn, config, version)
            return self._fan_out(conn, f"image {config} set: version {version}",
                                 [("update", update_xml(image_xml(config, version)))])

    def remove_image(self, config: str) -> Sent:
        config = check_config(config)
        with self.store._write() as conn:
            if not conn.execute("DELETE FROM pxe_images WHERE config = ?", (config,)).rowcount:
                raise UnknownEntry(f"no image {config!r} is listed")
            return self._fan_out(conn, f"image {config} removed", [
                ("update", update_xml(f"<RemoveImage {_attrs(config=config)}/>"))])

    def set_settings(self, settings: Mapping[str, str]) -> Sent:
        """Set settings (``automation_config=""`` unsets it): one gives an ``update``,
        several the whole ``initial-config``."""
        checked = dict(check_setting(n, v) for n, v in settings.items())
        if not checked:
            raise InvalidRequest("no setting to set")
        with self.store._write() as conn:
            conn.executemany("INSERT INTO pxe_settings (name, value) VALUES (?, ?) ON CONFLICT "
                             "(name) DO UPDATE SET value = excluded.value", checked.items())
            if len(checked) == 1:
                files = [("update", update_xml(setting_xml(*next(iter(checked.items())))))]
            else:
                files = [("initial-config", settings_xml(self._settings(conn)))]
            return self._fan_out(conn, "settings set: " + ", ".join(
                f"{n}={v}" for n, v in checked.items()), files)

    def _fan_out(self, conn, summary: str, files: list[tuple[str, str]]) -> Sent:
        """Queue one UpdateSBSInfo task per file for every PXE server (in ``conn``'s
        transaction: the change and its tasks commit together)."""
        sent = Sent(summary, files)
        servers = [r[0] for r in conn.execute(
            "SELECT client_id FROM pxe_servers ORDER BY registered_at, client_id")]
        if not servers:
            return sent
        checked = []
        for kind, payload in files:
            params = {"kind": kind, "payload": payload}
            if self.confirm_s is not None:
                params["confirm_s"] = f"{self.confirm_s:g}"
            checked.append(check_task_fields(TASK_TYPE, params, None, None))
        for client_id in servers:
            fresh = [(t, p, timeout, str(uuid.uuid4())) for t, p, timeout, _ in checked]
            sent.tasks[client_id] = self.store._insert_tasks(client_id, fresh, conn)
        log.info("%s: %d file(s) queued for %d PXE server(s)", summary, len(files), len(servers))
        return sent


def _upsert_image(conn, config: str, version: str) -> None:
    conn.execute("INSERT INTO pxe_images (config, version, changed_at) VALUES (?, ?, ?) ON CONFLICT "
                 "(config) DO UPDATE SET version = excluded.version, changed_at = "
                 "excluded.changed_at", (config, version, utc_now()))


def record_rebuilt_image(conn, params: Mapping[str, Any], details: Any) -> None:
    """TaskStore.record_events' hook for a BootWizRebuild's ``succeeded`` event: its
    ``config`` -> details' ``version`` joins the image list. Nothing is queued: the
    site server that rebuilt wrote its own update file (§4). Never raises for bad
    input (a status must be stored whatever it holds); it is logged."""
    try:
        config = check_config(params.get("config"))
        version = check_version((details or {}).get("version"))
    except (InvalidRequest, AttributeError) as exc:
        log.warning("BootWizRebuild succeeded but its image is not recorded: %s", exc)
        return
    _upsert_image(conn, config, version)
    log.info("image %s recorded: version %s (BootWizRebuild)", config, version)


def check_state(state: Any) -> None:
    """A §7 ``pxe/state`` body; InvalidRequest naming the first bad field."""
    if not isinstance(state, dict):
        raise InvalidRequest("pxe/state: the body must be a JSON object")

    def check(name: str, ok, what: str, within: dict = state) -> None:
        key = name.rpartition(".")[2]
        if key not in within or not ok(within[key]):
            got = f"got {within[key]!r:.80}" if key in within else "it is missing"
            raise InvalidRequest(f"pxe/state: {name} must be {what}; {got}")

    def count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    def stamp(value) -> bool:
        return isinstance(value, str) and check_rfc3339(value)

    check("serving", lambda v: isinstance(v, bool), "true or false")
    check("reason", lambda v: isinstance(v, str), "a string")
    check("computers", count, "a whole number >= 0")
    check("images", count, "a whole number >= 0")
    check("last_applied", lambda v: v is None or isinstance(v, dict),
          '{"file": "...", "at": "..."} or null')
    if state["last_applied"] is not None:
        check("last_applied.file", lambda v: isinstance(v, str), "a string",
              state["last_applied"])
        check("last_applied.at", stamp, "an RFC 3339 timestamp", state["last_applied"])
    check("at", stamp, "an RFC 3339 timestamp")
