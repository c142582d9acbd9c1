"""``dsagent-server pxe …``: the console's PXE commands (docs/taskserver-pxe.md).

    dsagent-server pxe add-computer    --db FILE (--mac MAC [--name N] --action A [--config C]
                                       | --csv FILE) [--managed] [CHANGE OPTIONS]
    dsagent-server pxe set-action      --db FILE --mac MAC --action A [--config C] [CHANGE OPTIONS]
    dsagent-server pxe remove-computer --db FILE --mac MAC [CHANGE OPTIONS]
    dsagent-server pxe set-image       --db FILE --config C --version V [CHANGE OPTIONS]
    dsagent-server pxe remove-image    --db FILE --config C [CHANGE OPTIONS]
    dsagent-server pxe set             --db FILE NAME=VALUE ... [CHANGE OPTIONS]
    dsagent-server pxe servers         --db FILE [--json] [--poll-interval S]
    dsagent-server pxe computers       --db FILE [--json]

    CHANGE OPTIONS: [--no-tickle] [--confirm-s S]

A command that changes something stores it and queues the UpdateSBSInfo
task(s) for every PXE server in one transaction (taskserver.pxe), prints one
line per task, then tickles each server (in parallel); a tickle that fails is
a warning: the task stays queued and is pulled at the server's next poll. Its
own module so that taskserver/cli.py stays one screenful of commands per
concern (and under the 650-line limit).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from agent.common.errors import DsagentError

from taskserver.app import tickle_clients
from taskserver.cligroup import command_group
from taskserver.pxe import (ACTIONS, LISTS, SETTINGS, TASK_TYPE, Computer, PXEStore, Sent,
                            check_config, check_name, check_setting, check_version, normalise_mac)
from taskserver.checks import InvalidRequest
from taskserver.store import TaskStore
from taskserver.wakeup import PUBLISHED

PROG = "dsagent-server"
CSV_COLUMNS = ("mac", "name", "action", "config")
MAX_ROW_ERRORS = 20        # a CSV's bad rows listed at most (then "and N more")


class PXECliError(DsagentError):
    """A failure of a pxe command (exit status 1)."""


# ---- argument types: a bad value is a usage error (exit 2) ---------------------------

def _arg(check: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return check(text)
        except InvalidRequest as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = check.__name__       # argparse names the type in some messages
    return convert


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep:
        raise InvalidRequest(f"expected NAME=VALUE, got {text!r}")
    return check_setting(name.strip(), value.strip())


def _confirm(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 3600:
        raise InvalidRequest(f"expected 0 to 3600 seconds, got {text!r}")
    return value


# ---- CSV -------------------------------------------------------------------------------

def read_computers_csv(path: str) -> list[Computer]:
    """``mac,name,action,config`` rows (header row first; name and config may be
    empty or left out) -> computers; PXECliError naming each bad line (nothing is
    applied then)."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise PXECliError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise PXECliError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    columns: list[str] | None = None
    computers: list[Computer] = []
    seen: dict[str, int] = {}
    errors: list[str] = []
    try:
        for cells in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in cells):
                continue
            if columns is None:
                columns = [cell.strip().lower() for cell in cells]
                unknown = [c for c in columns if c not in CSV_COLUMNS]
                if unknown or len(set(columns)) != len(columns) or not {"mac", "action"} <= set(
                        columns):
                    raise PXECliError(
                        f"{path} line {line}: the header must name the columns "
                        f"{','.join(CSV_COLUMNS)} (mac and action required, each once), got "
                        f"{','.join(cells)!r}")
                continue
            if len(cells) > len(columns):
                errors.append(f"{path} line {line}: {len(cells)} cells, the header has "
                              f"{len(columns)}")
                continue
            row = dict(zip(columns, (cell.strip() for cell in cells)))
            try:
                computer = Computer.checked(row.get("mac"), row.get("action"), row.get("name"),
                                            row.get("config"))
            except InvalidRequest as exc:
                errors.append(f"{path} line {line}: {exc}")
                continue
            if computer.mac in seen:
                errors.append(f"{path} line {line}: MAC {computer.mac} is already on line "
                              f"{seen[computer.mac]}")
                continue
            seen[computer.mac] = line
            computers.append(computer)
    except csv.Error as exc:
        raise PXECliError(f"{path} line {reader.line_num}: {exc}") from None
    if errors:
        more = len(errors) - MAX_ROW_ERRORS
        raise PXECliError("nothing applied; bad rows:\n  " + "\n  ".join(
            errors[:MAX_ROW_ERRORS] + ([f"... and {more} more"] if more > 0 else [])))
    if not computers:
        raise PXECliError(f"{path}: no computer listed (a header row, then mac,name,action,"
                          "config rows)")
    return computers


# ---- reporting a change ----------------------------------------------------------------

def report(store: TaskStore, sent: Sent, tickle: bool = True) -> None:
    """Print what a change queued (stdout: ``CLIENT  UpdateSBSInfo KIND  TASK_ID``) and
    tickle each PXE server, warning on stderr for each that did not answer OK."""
    print(sent.summary)
    if not sent.tasks:
        print(f"{PROG}: no PXE server has registered yet; the change is stored and will "
              "be in each server's startup answer", file=sys.stderr)
        return
    for client_id, task_ids in sent.tasks.items():
        for (kind, _), task_id in zip(sent.files, task_ids):
            print(f"{client_id}  {TASK_TYPE} {kind}  {task_id}")
    sys.stdout.flush()
    if not tickle:
        return
    for client_id, answer in tickle_clients(store, sent.tasks).items():
        if answer == "OK" or (isinstance(answer, str) and answer.startswith(PUBLISHED)):
            print(f"{PROG}: tickled {client_id}: {answer}", file=sys.stderr)
        else:
            why = answer if isinstance(answer, Exception) else f"it answered {answer}"
            print(f"{PROG}: warning: tickle of {client_id} failed: {why}; its task stays "
                  "queued and is pulled at its next poll", file=sys.stderr)


def _change(args: argparse.Namespace, make: Callable[[PXEStore], Sent]) -> int:
    with TaskStore(args.db) as store:
        sent = make(PXEStore(store, confirm_s=args.confirm_s))
        report(store, sent, tickle=not args.no_tickle)
    return 0


# ---- commands --------------------------------------------------------------------------

def cmd_add_computer(args: argparse.Namespace) -> int:
    one = [o for o, v in (("--mac", args.mac), ("--name", args.name), ("--action", args.action),
                          ("--config", args.config)) if v is not None]
    if args.csv and one:
        args.parser.error(f"--csv lists the computers: {', '.join(one)} go without it")
    if not args.csv and (args.mac is None or args.action is None):
        args.parser.error("give --mac and --action (one computer) or --csv FILE (many)")
    computers = (read_computers_csv(args.csv) if args.csv else
                 [Computer(args.mac, args.action, args.name, args.config)])
    return _change(args, lambda pxe: pxe.add_computers(computers, managed=args.managed))


def cmd_set_action(args: argparse.Namespace) -> int:
    return _change(args, lambda pxe: pxe.set_action(args.mac, args.action, args.config))


def cmd_remove_computer(args: argparse.Namespace) -> int:
    return _change(args, lambda pxe: pxe.remove_computer(args.mac))


def cmd_set_image(args: argparse.Namespace) -> int:
    return _change(args, lambda pxe: pxe.set_image(args.config, args.version))


def cmd_remove_image(args: argparse.Namespace) -> int:
    return _change(args, lambda pxe: pxe.remove_image(args.config))


def cmd_set(args: argparse.Namespace) -> int:
    settings = dict(args.settings)
    if len(settings) != len(args.settings):
        args.parser.error("a setting is given twice")
    return _change(args, lambda pxe: pxe.set_settings(settings))


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in [header, ["-" * w for w in widths]] + rows)


def cmd_servers(args: argparse.Namespace) -> int:
    with TaskStore(args.db) as store:
        servers = PXEStore(store).servers(args.poll_interval)
    if args.json:
        print(json.dumps(servers, indent=2, ensure_ascii=False))
        return 0
    if not servers:
        print("no PXE server (a site server becomes one when it first calls pxe/startup "
              "or posts pxe/state)")
        return 0
    rows = []
    for s in servers:
        state = s["state"] or {}
        last = state.get("last_applied") or {}
        reason = state.get("reason", "")
        if s["silent"]:
            reason = (f"nothing heard for {format_age(s['age_s'])}" if s["state_at"] else
                      "no state since it registered") + (
                f", expected every {format_age(s['poll_interval_s'])}"
                + (f"; last said: {reason}" if reason else ""))
        rows.append([s["client_id"], s["registered_at"],
                     f"{format_age(s['age_s'])} ago" if s["state_at"] else "-", s["status"],
                     str(state.get("computers", "-")), str(state.get("images", "-")),
                     f"{last['file']} at {last['at']}" if last else "-", reason])
    print(_table(["CLIENT ID", "REGISTERED", "LAST STATE", "STATUS", "COMPUTERS", "IMAGES",
                  "LAST APPLIED", "REASON"], rows))
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    silent = sum(s["silent"] for s in servers)
    print(f"\n{len(servers)} PXE server(s), {silent} silent (no state for over 3 poll "
          f"intervals), at {now}")
    return 0


def cmd_computers(args: argparse.Namespace) -> int:
    with TaskStore(args.db) as store:
        pxe = PXEStore(store)
        computers, images, settings = pxe.computers(), pxe.images(), pxe.settings()
    if args.json:
        lists = {which: [{k: v for k, v in asdict(c).items() if k != "list"}
                         for c in computers if c.list == which] for which in LISTS}
        print(json.dumps({**lists, "images": images, "settings": settings}, indent=2))
        return 0
    rows = [[c.list, c.mac, c.name or "", c.action, c.config or ""] for c in computers]
    print(_table(["LIST", "MAC", "NAME", "ACTION", "CONFIG"], rows) if rows else "no computers")
    counts = ", ".join(f"{sum(c.list == w for c in computers)} {w}" for w in LISTS)
    print(f"\ncomputers: {counts}")
    print("images:    " + (", ".join(f"{c}={v}" for c, v in images.items()) or "none"))
    print("settings:  " + ", ".join(f"{n}={v}" for n, v in settings.items()))
    return 0


# ---- the parser ------------------------------------------------------------------------

def add_pxe_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``pxe`` and its sub-commands to dsagent-server's sub-parsers."""
    add = command_group(sub, "pxe", "the NS side of the PXE site servers: computers, images, "
                        "settings, PXE servers",
                        "The NS side of the PXE site servers (PROTOCOL.md §7).",
                        "queue only (the PXE servers pull at their next poll)")
    mac, config = _arg(normalise_mac), _arg(check_config)

    def command(name: str, help_: str, func, change: bool = True) -> argparse.ArgumentParser:
        p = add(name, help_, func, change)
        if change:
            p.add_argument("--confirm-s", type=_arg(_confirm), metavar="S",
                           help="UpdateSBSInfo confirm_s: wait up to S s for the file to be taken")
        return p

    p = command("add-computer", "add or change computers: to the predefined list, or the "
                "managed one (--managed, a registered client's MAC, or already managed)",
                cmd_add_computer)
    p.add_argument("--mac", type=mac, metavar="MAC", help="any case, ':' or '-'")
    p.add_argument("--name", type=_arg(check_name), metavar="N", help="the computer's name (id)")
    p.add_argument("--action", choices=ACTIONS)
    p.add_argument("--config", type=config, metavar="C", help="preboot configuration")
    p.add_argument("--csv", metavar="FILE",
                   help="many at once: a header row, then mac,name,action,config rows")
    p.add_argument("--managed", action="store_true", help="put them on the managed list")

    p = command("set-action", "change a listed computer's action (and config)", cmd_set_action)
    p.add_argument("--mac", type=mac, required=True, metavar="MAC")
    p.add_argument("--action", choices=ACTIONS, required=True)
    p.add_argument("--config", type=config, metavar="C")

    p = command("remove-computer", "remove a computer from its list", cmd_remove_computer)
    p.add_argument("--mac", type=mac, required=True, metavar="MAC")

    p = command("set-image", "set a preboot configuration's version", cmd_set_image)
    p.add_argument("--config", type=config, required=True, metavar="C")
    p.add_argument("--version", type=_arg(check_version), required=True, metavar="V")

    p = command("remove-image", "remove an image from the list", cmd_remove_image)
    p.add_argument("--config", type=config, required=True, metavar="C")

    p = command("set", "set PXE settings: " + ", ".join(
        f"{n}={'|'.join(v) if v else 'CONFIG (empty unsets)'}" for n, v in SETTINGS.items()),
        cmd_set)
    p.add_argument("settings", nargs="+", type=_arg(_setting), metavar="NAME=VALUE")

    p = command("servers", "list the PXE servers with their last state", cmd_servers,
                change=False)
    p.add_argument("--json", action="store_true")
    p.add_argument("--poll-interval", type=int, metavar="S",
                   help="the agents' poll interval (default: the one the server handed out)")

    p = command("computers", "list the managed and predefined computers, images, settings",
                cmd_computers, change=False)
    p.add_argument("--json", action="store_true")
