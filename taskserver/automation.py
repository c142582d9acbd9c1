"""Automation on the reference task server (PROTOCOL.md §8, issue #13; docs/automation.md).

A bare computer boots an automation environment (an initrd carrying the
agent) and registers with ``"mode": "automation"``. Here the server decides
who it is, from the console's PXE lists (taskserver/pxe.py):

- **Match.** The request's MACs (normalised) against the managed and the
  predefined computers (managed first, then in the request's order); else its
  SMBIOS ``uuid`` against the clients that registered before (one client with
  that uuid, and a listed computer with one of that client's MACs or its id).
- **Identity.** The computer's client id: its name sanitised as registration
  sanitises a machine name, else its MAC with ``-`` (``computer_client_id``).
  An existing client row of that id is adopted when it is this machine's (it
  lists one of the request's MACs, or its uuid, or neither MACs nor uuid at
  all); one that is evidently another machine's is left alone and the next
  free ``<id>-2``, ``-3``... is used, as registration does. Every automation
  registration issues a fresh token and tickle key for that id (a new boot has
  no stored identity): the previous credentials of the id stop working.
- **Lists.** The machine's MACs end up on the managed list, named by the
  computer: a predefined computer becomes a managed one right there, a MAC of
  the machine not listed yet joins with the computer's action and config; the
  PXE servers get the change as for any console change (UpdateSBSInfo tasks,
  queued in the same transaction, then tickled).
- **Unknown.** No match: 403 ("unknown computer ...") unless the store's
  ``allow_unknown_computers`` (``dsagent-server serve
  --allow-unknown-computers``); then the machine is named by its first MAC and
  its MACs join the managed list with action ``automation``. Every attempt,
  refused or not, is kept in ``automation_log`` (``attempts``; ``python -m
  taskserver.automation log --db F``).

A registration that adopts a row closes the tasks the server saw ``running``
(or in ``progress``) and never ended with a ``failed`` status of the
server's own ("interrupted: ..."): the automation environment keeps its
state in RAM, so a power cut or a reset lost their later statuses, and the
new boot knows nothing of them -- they are never run twice, as the agent
itself reports a task it finds ``running`` after a crash. Tasks the server
saw only ``received`` stay queued and are delivered to the new boot.

Tasks may be queued for a listed computer's id before it ever registered:
``placeholder_client`` (TaskStore._insert_tasks' hook) creates its client row
then, with a token nobody holds; the registration adopts the row, and the
tasks queued meanwhile are delivered to the machine.

A ``Reboot`` task's ``running`` (or ``succeeded``) status, once stored
(``event_stored``, TaskStore.record_events' hook), sets the action of that
client's listed computer(s) to the task's ``to`` and queues the UpdateSBSInfo
tasks in the transaction that stores the status; record_events tickles the
PXE servers (``tickle_pxe_servers``) before the status POST is answered. The
agent restarts the machine only after its every status was accepted, so the
PXE answer has changed before the machine boots again (the site servers
apply it within ~0.1 s of the tickle; bench/results.md "PXE site server").
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import sys
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from taskserver.pxe import (MANAGED, MAC_RE, PREDEFINED, Computer, PXEStore, Sent,
                            normalise_mac,
                            record_rebuilt_image)
from taskserver.checks import (UUID_RE, InvalidRequest, RegistrationRefused, parse_hostport,
                               sanitize_client_id, utc_now, valid_client_id)
from taskserver.store import TaskStore

log = logging.getLogger("taskserver.automation")

MODES = ("managed", "automation")
REBOOT_TYPE = "Reboot"
REBOOT_TARGETS = ("production", "automation")
REBOOT_STATES = ("running", "succeeded")   # the statuses that switch the PXE answer
TICKLE_TIMEOUT_S = 3.0
LOG_KEEP = 10_000                          # automation_log rows kept
BOGUS_UUIDS = {"00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff",
               "03000200-0400-0500-0006-000700080009"}   # firmware placeholders, not unique

SCHEMA = """
CREATE TABLE IF NOT EXISTS automation_log (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    at        TEXT NOT NULL,
    outcome   TEXT NOT NULL,
    client_id TEXT,
    matched   TEXT,
    name      TEXT,
    uuid      TEXT,
    macs      TEXT NOT NULL,
    ips       TEXT NOT NULL,
    reason    TEXT
);
"""


def computer_client_id(c: Computer) -> str:
    """The client id of a listed computer: its name sanitised, else its MAC with '-'."""
    return sanitize_client_id(c.name) if c.name else c.mac.replace(":", "-")


def _macs(values: Iterable[Any]) -> list[str]:
    """The MACs among ``values``, normalised, in order, once each."""
    found: list[str] = []
    for value in values:
        if isinstance(value, str) and MAC_RE.fullmatch(value.strip()):
            mac = normalise_mac(value)
            if mac not in found and mac != "00:00:00:00:00:00":
                found.append(mac)
    return found


def _uuid(value: Any) -> str | None:
    """A usable SMBIOS uuid (lowercase), or None (missing, malformed, a placeholder)."""
    if not isinstance(value, str) or not UUID_RE.fullmatch(value.strip()):
        return None
    value = value.strip().lower()
    return None if value in BOGUS_UUIDS else value


def _fields(request: Mapping[str, Any]) -> dict[str, Any]:
    """The register request's fields, checked as TaskStore.register checks them."""
    fields: dict[str, Any] = {}
    for key in ("name", "uuid", "os", "agent_version", "tickle_addr"):
        value = request.get(key)
        if value is not None and not isinstance(value, str):
            raise InvalidRequest(f"register: {key} must be a string")
        fields[key] = value
    for key in ("macs", "ips"):
        value = request.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidRequest(f"register: {key} must be a list of strings")
        fields[key] = value
    if fields["tickle_addr"]:
        parse_hostport(fields["tickle_addr"])      # InvalidRequest if it is no HOST:PORT
    return fields


@dataclass
class Match:
    computer: Computer | None   # the listed computer, None for an unknown one let in
    base_id: str                # the client id it should get
    how: str                    # "MAC …", "uuid …" or "unknown (allowed)"


def _listed(conn, macs: list[str]) -> dict[str, Computer]:
    if not macs:
        return {}
    rows = conn.execute("SELECT mac, action, name, config, list FROM pxe_computers WHERE mac IN "
                        f"({','.join('?' * len(macs))})", macs).fetchall()
    return {row[0]: Computer(*tuple(row)) for row in rows}


def _all_listed(conn) -> list[Computer]:
    rows = conn.execute("SELECT mac, action, name, config, list FROM pxe_computers "
                        "ORDER BY list = 'predefined', mac").fetchall()
    return [Computer(*tuple(row)) for row in rows]


def computers_of(conn, client_id: str) -> list[Computer]:
    """The listed computers (one per MAC) of a client: a MAC it registered with, or its id."""
    row = conn.execute("SELECT macs FROM clients WHERE client_id = ?", (client_id,)).fetchone()
    macs = set(_macs(json.loads(row[0] or "[]"))) if row else set()
    return [c for c in _all_listed(conn) if c.mac in macs or computer_client_id(c) == client_id]


def _match(conn, macs: list[str], uuid_: str | None) -> Match | None:
    listed = _listed(conn, macs)
    for which in (MANAGED, PREDEFINED):
        for mac in macs:
            if mac in listed and listed[mac].list == which:
                c = listed[mac]
                return Match(c, computer_client_id(c), f"MAC {mac} ({which})")
    if uuid_:
        rows = conn.execute("SELECT client_id FROM clients WHERE lower(uuid) = ?",
                            (uuid_,)).fetchall()
        if len(rows) > 1:
            log.warning("uuid %s is shared by clients %s: not used to recognise a computer",
                        uuid_, ", ".join(r[0] for r in rows))
        elif rows and (found := computers_of(conn, rows[0][0])):
            return Match(found[0], rows[0][0], f"uuid {uuid_} (client {rows[0][0]})")
    return None


def _is_this_machine(row, macs: list[str], uuid_: str | None) -> bool:
    """May this client row be adopted? Unless its MACs or uuid say it is another machine."""
    theirs, their_uuid = set(_macs(json.loads(row["macs"] or "[]"))), _uuid(row["uuid"])
    if not theirs and not their_uuid:
        return True
    return bool(theirs & set(macs)) or (uuid_ is not None and their_uuid == uuid_)


def _identity(conn, base: str, macs: list[str], uuid_: str | None) -> tuple[str, bool]:
    """(client id, whether its row exists and is adopted)."""
    client_id, n = base, 1
    while True:
        row = conn.execute("SELECT macs, uuid FROM clients WHERE client_id = ?",
                           (client_id,)).fetchone()
        if row is None:
            return client_id, False
        if _is_this_machine(row, macs, uuid_):
            return client_id, True
        n += 1
        suffix = f"-{n}"
        if n == 2:
            log.warning("client %s is another machine's (other MACs and uuid); this one "
                        "gets a suffixed id", base)
        client_id = base[: 64 - len(suffix)] + suffix


def _record(conn, outcome: str, client_id: str | None, how: str | None,
            fields: Mapping[str, Any], macs: list[str], reason: str | None) -> None:
    conn.execute("INSERT INTO automation_log (at, outcome, client_id, matched, name, uuid, macs,"
                 " ips, reason) VALUES (?,?,?,?,?,?,?,?,?)",
                 (utc_now(), outcome, client_id, how, fields["name"], fields["uuid"],
                  json.dumps(macs), json.dumps(fields["ips"]), reason))
    conn.execute("DELETE FROM automation_log WHERE id <= (SELECT MAX(id) FROM automation_log)"
                 " - ?", (LOG_KEEP,))


def _managed_rows(match: Match, client_id: str, macs: list[str],
                  listed: Mapping[str, Computer]) -> dict[str, Computer]:
    """The machine's MACs as they go onto the managed list (only what changes)."""
    c = match.computer
    wanted: dict[str, Computer] = {}
    for mac in macs:
        row = listed.get(mac)
        if row is None:
            wanted[mac] = Computer(mac, c.action if c else "automation",
                                   (c.name if c else None) or client_id, c.config if c else None)
        elif c is not None and computer_client_id(row) not in (match.base_id, client_id):
            log.warning("MAC %s of %s is listed as another computer's (%s); left as it is",
                        mac, client_id, computer_client_id(row))
        elif row.list == PREDEFINED or row.name is None:
            wanted[mac] = Computer(mac, row.action, row.name or client_id, row.config)
    return wanted


def register(store: TaskStore, request: Mapping[str, Any]) -> dict:
    """POST /api/v1/register with a ``mode`` other than ``managed`` (TaskStore.register's hook).

    Returns ``{client_id, token, tickle_key}``; RegistrationRefused (403) for an
    unknown computer unless ``store.allow_unknown_computers``.
    """
    if request.get("mode") != "automation":
        raise InvalidRequest(f"register: mode must be one of {', '.join(MODES)}, "
                             f"got {request.get('mode')!r:.40}")
    fields = _fields(request)
    macs, uuid_ = _macs(fields["macs"]), _uuid(fields["uuid"])
    if not macs and not uuid_:
        raise InvalidRequest("register: an automation registration needs the machine's MACs "
                             "or its SMBIOS uuid")
    pxe = PXEStore(store)
    sent, creds, refusal = Sent(""), None, None
    with store._write() as conn:
        match = _match(conn, macs, uuid_)
        if match is None and getattr(store, "allow_unknown_computers", False):
            base = macs[0].replace(":", "-") if macs else sanitize_client_id(uuid_)
            match = Match(None, base, "unknown (allowed)")
        if match is None:
            refusal = (f"unknown computer: no managed or predefined computer has MAC "
                       f"{', '.join(macs) or '(none sent)'}, and no client registered with uuid "
                       f"{uuid_ or '(none sent)'}; add it (dsagent-server pxe add-computer "
                       "--mac ...) or serve with --allow-unknown-computers")
            _record(conn, "refused", None, None, fields, macs, refusal)
        else:
            client_id, adopted = _identity(conn, match.base_id, macs, uuid_)
            creds = _issue(store, conn, client_id, adopted, match, fields, macs, uuid_)
            wanted = _managed_rows(match, client_id, macs, _listed(conn, macs))
            if wanted:
                sent = pxe._add(conn, wanted, managed=True, summary=(
                    f"automation registration of {client_id}: {len(wanted)} MAC(s) managed"))
            _record(conn, "registered", client_id, match.how, fields, macs, None)
    if refusal is not None:
        log.warning("automation registration refused: %s (name %r, ips %s)", refusal,
                    fields["name"], ", ".join(fields["ips"]))
        raise RegistrationRefused(refusal)
    log.info("automation registration of %s (matched by %s; MACs %s, uuid %s)%s",
             creds["client_id"], match.how, ", ".join(macs), uuid_,
             f"; {sent.summary}" if sent.files else "")
    tickle_pxe_servers(store, sent.tasks)
    return creds


def _issue(store: TaskStore, conn, client_id: str, adopted: bool, match: Match,
           fields: Mapping[str, Any], macs: list[str], uuid_: str | None) -> dict:
    """Fresh credentials for ``client_id``: the adopted row updated, or a new row."""
    name = (match.computer.name if match.computer else None) or fields["name"]
    if not adopted:
        return store._insert_client(
            conn, client_id, tickle_addr=fields["tickle_addr"], name=name, uuid_=uuid_,
            macs=macs, ips=fields["ips"], os_=fields["os"], agent_version=fields["agent_version"])
    token, tickle_key = secrets.token_urlsafe(32), secrets.token_hex(32)
    conn.execute("UPDATE clients SET token = ?, tickle_key = ?, name = COALESCE(name, ?), "
                 "uuid = COALESCE(?, uuid), macs = ?, ips = ?, os = ?, agent_version = ?, "
                 "tickle_addr = ?, registered_at = ? WHERE client_id = ?",
                 (token, tickle_key, name, uuid_, json.dumps(macs), json.dumps(fields["ips"]),
                  fields["os"], fields["agent_version"], fields["tickle_addr"], utc_now(),
                  client_id))
    log.info("client %s re-registered in automation: new token and tickle key issued "
             "(the previous ones no longer work)", client_id)
    _close_interrupted(store, conn, client_id)
    return {"client_id": client_id, "token": token, "tickle_key": tickle_key}


INTERRUPTED = ("interrupted: the computer registered again in automation (it restarted, or "
               "lost power) while the task was {state}; its later statuses were lost with the "
               "automation environment's memory; it is not run again")


def _close_interrupted(store: TaskStore, conn, client_id: str) -> None:
    """End with ``failed`` each task of ``client_id`` the server saw started but not
    ended, and list again the ones it had only received: the memory that held
    them is gone (store.py, "Delivery")."""
    rows = conn.execute(
        "SELECT t.task_id, MAX(e.seq), (SELECT state FROM events WHERE task_id = t.task_id "
        "ORDER BY seq DESC LIMIT 1) FROM tasks t JOIN events e ON e.task_id = t.task_id "
        "WHERE t.client_id = ? AND t.terminal_state IS NULL GROUP BY t.task_id "
        "HAVING SUM(CASE WHEN e.state IN ('running', 'progress') THEN 1 ELSE 0 END) > 0",
        (client_id,)).fetchall()
    now = utc_now()
    for task_id, seq, state in rows:
        store.insert_event(conn, {
            "event_id": str(uuid.uuid4()), "task_id": task_id, "seq": seq + 1, "state": "failed",
            "progress": None, "message": INTERRUPTED.format(state=state),
            "details": json.dumps({"interrupted": True}), "at": now}, now)
        conn.execute("UPDATE tasks SET terminal_state = 'failed' WHERE task_id = ?", (task_id,))
        log.warning("task %s of %s was %s when the computer registered again: reported "
                    "failed (interrupted)", task_id, client_id, state)
    conn.execute("UPDATE tasks SET delivered = 0 WHERE client_id = ? AND terminal_state IS NULL",
                 (client_id,))


def placeholder_client(store: TaskStore, conn, client_id: str) -> bool:
    """TaskStore._insert_tasks' hook for an unknown client id: if it is a listed
    computer's id, create its client row (a token nobody holds) so that tasks can
    be queued for it before it registers in automation; True if created."""
    if not valid_client_id(client_id):
        return False
    for c in _all_listed(conn):
        if computer_client_id(c) == client_id:
            store._insert_client(conn, client_id, name=c.name, macs=[c.mac])
            log.info("client %s created for the %s computer %s: tasks queued for it wait "
                     "until it registers (automation)", client_id, c.list, c.mac)
            return True
    return False


def event_stored(store: TaskStore, conn, client_id: str, task: Mapping[str, Any],
                 event: Mapping[str, Any], first_terminal: bool) -> list[str]:
    """TaskStore.record_events' hook for each newly stored event, in its transaction:
    what it changes on the PXE side. Returns the PXE servers to tickle after the
    commit. Never raises for bad input (a status is stored whatever it holds)."""
    state = event["state"]
    if task["type"] == "BootWizRebuild" and first_terminal and state == "succeeded":
        store.db.serialize(conn)
        record_rebuilt_image(conn, json.loads(task["params"]), event["details"])
    if task["type"] != REBOOT_TYPE or state not in REBOOT_STATES:
        return []
    to, task_id = json.loads(task["params"]).get("to"), event["task_id"]
    if to not in REBOOT_TARGETS:
        log.warning("Reboot task %s of %s: to=%r is not one of %s; PXE answers unchanged",
                    task_id, client_id, to, ", ".join(REBOOT_TARGETS))
        return []
    store.db.serialize(conn)              # read-then-write of the PXE lists: one at a time
    computers = computers_of(conn, client_id)
    if not computers:
        log.warning("Reboot to %s by %s (task %s): no listed computer has its MACs or its id; "
                    "the PXE answers are unchanged", to, client_id, task_id)
        return []
    wanted = {c.mac: Computer(c.mac, to, c.name, c.config) for c in computers if c.action != to}
    if not wanted:
        return []
    sent = PXEStore(store)._add(conn, wanted, managed=False, summary=(
        f"Reboot to {to} of {client_id} (task {task_id}, {state})"))
    log.info("Reboot to %s of %s (task %s) %s: PXE action of %s set to %s; %d PXE server(s) "
             "to tell", to, client_id, task_id, state, ", ".join(wanted), to, len(sent.tasks))
    return list(sent.tasks)


def tickle_pxe_servers(store: TaskStore, client_ids: Iterable[str]) -> None:
    """Tickle the clients (PXE servers, site servers) a change was queued for; a
    failure only delays it to their poll."""
    from taskserver.app import tickle_clients   # app imports the store, which imports us

    for client_id, answer in tickle_clients(store, client_ids, TICKLE_TIMEOUT_S).items():
        if isinstance(answer, Exception):
            log.warning("%s not tickled: %s; it pulls its task at its next poll",
                        client_id, answer)


def attempts(store: TaskStore, limit: int = 100) -> list[dict[str, Any]]:
    """The last automation registration attempts, newest first."""
    rows = store._read("SELECT * FROM automation_log ORDER BY id DESC LIMIT ?", (limit,))
    return [{**dict(r), "macs": json.loads(r["macs"]), "ips": json.loads(r["ips"])} for r in rows]


def format_attempts(rows: list[dict[str, Any]]) -> str:
    header = ["AT", "OUTCOME", "CLIENT ID", "MATCHED BY", "MACS", "UUID", "REASON"]
    table = [[r["at"], r["outcome"], r["client_id"] or "-", r["matched"] or "-",
              ", ".join(r["macs"]) or "-", r["uuid"] or "-", r["reason"] or ""] for r in rows]
    widths = [max(len(row[i]) for row in [header] + table) for i in range(len(header) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths + [0])).rstrip()
                     for row in [header] + table) if table else "no automation registrations"


def main(argv: list[str] | None = None) -> int:
    """``python -m taskserver.automation log --db F [--json] [--limit N]``."""
    parser = argparse.ArgumentParser(prog="python -m taskserver.automation",
                                     description="automation registrations, newest first")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("log", help="automation registration attempts (refused ones too)")
    p.add_argument("--db", required=True, metavar="FILE")
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit", type=int, default=100, metavar="N")
    args = parser.parse_args(argv)
    with TaskStore(args.db) as store:
        rows = attempts(store, args.limit)
    print(json.dumps(rows, indent=2) if args.json else format_attempts(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
