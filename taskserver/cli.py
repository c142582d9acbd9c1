"""``dsagent-server`` (also ``python -m taskserver``): run and drive the reference task server.

    dsagent-server serve   --db FILE|postgresql://… --listen HOST:PORT [--enrollment-key K]
                           [--poll-interval S] [--workers N]   # N: PostgreSQL only (uvicorn)
                           [--image-store DIR] [--allow-unknown-computers] [--mqtt URL]
                           [--package-check-s S] [--package-resync-s S]
    dsagent-server enroll  --db FILE --client-id ID [--tickle HOST:PORT]
                           [--agent-config FILE --server-url URL --state-dir DIR [--set SECTION.KEY=VALUE ...]]
    dsagent-server queue   --db FILE --client ID [--client ID ...] (FILE.xml | --type T
                           [--param NAME=VALUE ...] [--param-file NAME=PATH ...] [--timeout S])
                           [--after TASK ...] [--tickle]   # --param values may hold tokens: tokens.py
    dsagent-server deploy  --db FILE --mac MAC --image I [--target DEV] [--config C] [--no-wait]
    dsagent-server capture --db FILE --mac MAC --image I [--source DEV] [--config C] [--no-wait]
    dsagent-server bootwiz-base NAME --preboot-store DIR --server-url URL [--enrollment-key K]
                                     # the automation environment (docs/automation-base.md)
    dsagent-server cancel  --db FILE (--task ID [--task ID ...] | --client ID) [--force]
    dsagent-server tickle  --db FILE --client ID [--addr HOST:PORT] [--mqtt URL]
    dsagent-server set-tickle --db FILE --client ID --addr HOST:PORT
    dsagent-server status  --db FILE [--client ID] [--task ID] [--json]
    dsagent-server clients --db FILE [--json]
    dsagent-server pxe add-computer --db FILE (--mac MAC [--name N] --action ACTION [--config C]
                           | --csv FILE) [--managed] [--no-tickle] [--confirm-s S]
    dsagent-server pxe set-action --db FILE --mac MAC --action A [--config C]
    dsagent-server pxe remove-computer --db FILE --mac MAC
    dsagent-server pxe set-image --db FILE --config C --version V
    dsagent-server pxe remove-image --db FILE --config C
    dsagent-server pxe set --db FILE unknown_computers=ignore|automation automation_config=C ...
    dsagent-server pxe servers --db FILE [--json] [--poll-interval S]
    dsagent-server pxe computers --db FILE [--json]
    dsagent-server packages add|remove|check|list --db FILE …   # taskserver/packagescli.py

Every command but ``serve`` works on the database directly, so it can run
while a server process serves the same file. Exit status: 0 done, 1 failed
(tickle not answered OK, unknown client or task, bad task, unknown MAC, bad
CSV row), 2 usage error (a bad MAC, ACTION, config name or setting too).

Every command that tickles wakes a client TCP cannot reach over MQTT when
given a broker: ``--mqtt mqtt(s)://[user:password@]host[:port]`` (``serve``,
``tickle``) or the environment variable ``DSAGENT_SERVER_MQTT`` (all of them);
see taskserver/wakeup.py.

The ``pxe`` commands (taskserver/pxecli.py, docs/taskserver-pxe.md) store a
console change, queue UpdateSBSInfo tasks for every PXE server and tickle
them (``--no-tickle``, ``--confirm-s S`` go with every change); ACTION is
automation, production or ignore.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sqlite3
import sys
import threading
import tomllib
from pathlib import Path
from typing import Any

from agent.common.config import SCHEMA as AGENT_SCHEMA, check_config, render_config, write_private
from agent.common.errors import DsagentError

from taskserver import wakeup
from taskserver.app import TaskServer, tickle_client
from taskserver.basecli import add_commands as add_base_commands
from taskserver.deploy import add_commands as add_deploy_commands
from taskserver.packagescli import PackageSchedule, add_packages_commands
from taskserver.pxecli import add_pxe_commands
from taskserver.tokens import expand, facts_of
from taskserver.checks import TERMINAL_STATES, parse_hostport
from taskserver.store import TaskStore

PROG = "dsagent-server"


class CliError(Exception):
    """A failure to report on stderr with exit status 1."""


# -- helpers -----------------------------------------------------------------

def render_agent_config(sections: dict[str, dict[str, Any]]) -> str:
    """A §6 agent config (TOML) from ``{section: {key: value}}``."""
    return render_config(sections, [
        "dsagent agent config, written by `dsagent-server enroll`.",
        "It holds this client's token and tickle key: keep it private (mode 0600)."])


def _parse_setting(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` -> (section, key, value typed by the agent's config schema)."""
    dotted, sep, raw = text.partition("=")
    section, dot, key = dotted.strip().partition(".")
    if not sep or not dot:
        raise CliError(f"--set {text!r}: expected SECTION.KEY=VALUE")
    if section not in AGENT_SCHEMA or key not in AGENT_SCHEMA[section]:
        raise CliError(f"--set {text!r}: the agent config has no key '{key}' in [{section}]")
    if section == "agent":
        raise CliError(f"--set {text!r}: [agent] keys come from enroll's own options")
    kind = AGENT_SCHEMA[section][key][0]
    if kind is bool:
        if raw.lower() not in ("true", "false"):
            raise CliError(f"--set {text!r}: [{section}] {key} must be true or false")
        return section, key, raw.lower() == "true"
    if kind is int:
        try:
            return section, key, int(raw)
        except ValueError:
            raise CliError(f"--set {text!r}: [{section}] {key} must be an integer") from None
    return section, key, raw


def write_agent_config(path: str, server_url: str, state_dir: str, creds: dict,
                       settings: list[str]) -> None:
    sections: dict[str, dict[str, Any]] = {"agent": {
        "server_url": server_url, "client_id": creds["client_id"], "token": creds["token"],
        "tickle_key": creds["tickle_key"], "state_dir": state_dir}}
    for text in settings:
        section, key, value = _parse_setting(text)
        sections.setdefault(section, {})[key] = value
    text = render_agent_config(sections)
    check_config(tomllib.loads(text), path)        # the agent must accept what we write
    target = Path(path)
    if target.parent != Path(""):
        target.parent.mkdir(parents=True, exist_ok=True)
    write_private(target, text)


def _one_line(text: Any, limit: int = 80) -> str:
    if text is None:
        return ""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fmt_progress(value: Any) -> str:
    if value is None:
        return "-"
    return f"{round(value, 1):g}%" if isinstance(value, (int, float)) else str(value)


def format_history(history: list[dict], show_client: bool) -> str:
    """The status table: one row per event, the task id and type on its first row."""
    header = (["CLIENT"] if show_client else []) + [
        "TASK ID", "TYPE", "SEQ", "STATE", "PROGRESS", "AT", "MESSAGE"]
    rows: list[list[str]] = []
    groups: list[int] = []
    for task in history:
        groups.append(len(rows))
        events = task["events"] or [None]
        for number, event in enumerate(events):
            first = number == 0
            lead = ([task["client_id"] if first else ""] if show_client else [])
            ident = [task["task_id"] if first else "", task["type"] if first else ""]
            if event is None:
                waits = task.get("waits_for") or []
                rows.append(lead + ident + ["-", task["state"], "-", task["queued_at"],
                                            "waiting for task " + ", ".join(waits) + " to succeed"
                                            if waits else "waiting for the agent to pull it"])
            else:
                rows.append(lead + ident + [str(event["seq"]), event["state"],
                                            _fmt_progress(event["progress"]), event["at"],
                                            _one_line(event["message"])])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    right = {header.index("SEQ"), header.index("PROGRESS")}

    def line(cells: list[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w)
               for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    starts = set(groups)
    for index, row in enumerate(rows):
        if index in starts and index:
            out.append("")
        out.append(line(row))
    counts: dict[str, int] = {}
    for task in history:
        counts[task["state"]] = counts.get(task["state"], 0) + 1
    order = ["waiting", "queued", "received", "running", "progress", *TERMINAL_STATES]
    summary = ", ".join(f"{counts[s]} {s}" for s in sorted(counts, key=lambda s: (
        order.index(s) if s in order else len(order), s)))
    noun = "task" if len(history) == 1 else "tasks"
    out += ["", f"{len(history)} {noun}: {summary}" if history else "no tasks"]
    return "\n".join(out)


# -- commands ----------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    host, port = _hostport(args.listen, "--listen", allow_zero=True)
    if args.db.startswith(("postgresql://", "postgres://")):
        return serve_asgi(args, host, port)
    if args.workers is not None:
        raise CliError("--workers needs --db postgresql://… (an SQLite file is served by one "
                       "process)")
    store = TaskStore(args.db)
    store.allow_unknown_computers = args.allow_unknown_computers   # §8, taskserver/automation.py
    if args.image_store and not Path(args.image_store).is_dir():
        raise CliError(f"--image-store {args.image_store}: not a folder")
    server = TaskServer(store, host, port, enrollment_key=args.enrollment_key,
                        poll_interval_s=args.poll_interval, verbose=args.verbose,
                        image_store=args.image_store)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    schedule = PackageSchedule(store, args.package_check_s, args.package_resync_s).__enter__()
    print(server.url, flush=True)
    print(f"{PROG}: serving {server.url} from {args.db}"
          f"{'' if args.enrollment_key else ' (registration disabled: no --enrollment-key)'}"
          "; SIGINT/SIGTERM stops", file=sys.stderr, flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        schedule.__exit__()
        server.stop()
        store.close()
    print(f"{PROG}: stopped", file=sys.stderr, flush=True)
    return 0


def serve_asgi(args: argparse.Namespace, host: str, port: int) -> int:
    """PostgreSQL: uvicorn worker processes (taskserver/asgi.py)."""
    from taskserver.asgi import listen, serve

    if args.image_store:
        raise CliError("--image-store is the built-in server's (an SQLite --db); with "
                       "PostgreSQL serve images from a web server (docs/image-store-http.md)")
    workers = args.workers or 2
    if not 1 <= workers <= 64:
        raise CliError(f"--workers must be 1..64, got {workers}")
    probe = TaskStore(args.db)          # the schema, once, before the workers start
    where = str(probe.db)               # the URL without its password
    probe.close()
    sock = listen(host, port)
    shown = host if ":" not in host else f"[{host}]"
    url = f"http://{'127.0.0.1' if host in ('', '0.0.0.0') else shown}:{sock.getsockname()[1]}"
    print(url, flush=True)
    print(f"{PROG}: serving {url} from {where} with {workers} worker(s)"
          f"{'' if args.enrollment_key else ' (registration disabled: no --enrollment-key)'}"
          "; SIGINT/SIGTERM stops", file=sys.stderr, flush=True)
    with TaskStore(args.db) as store, PackageSchedule(store, args.package_check_s,
                                                      args.package_resync_s):
        serve(args.db, sock, workers, enrollment_key=args.enrollment_key,
              poll_interval_s=args.poll_interval,
              allow_unknown_computers=args.allow_unknown_computers,
              keep_events_days=args.keep_events_days, verbose=args.verbose)
    print(f"{PROG}: stopped", file=sys.stderr, flush=True)
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    wanted = {"--agent-config": args.agent_config, "--server-url": args.server_url,
              "--state-dir": args.state_dir}
    given = [k for k, v in wanted.items() if v]
    if given and len(given) != len(wanted):
        missing = ", ".join(k for k in wanted if k not in given)
        raise CliError(f"writing an agent config also needs {missing}")
    if args.set and not given:
        raise CliError("--set only applies with --agent-config")
    if args.agent_config:
        for text in args.set:          # check before enrolling anything
            _parse_setting(text)
        if not args.server_url.startswith(("http://", "https://")):
            raise CliError("--server-url must start with http:// or https://")
    with TaskStore(args.db) as store:
        creds = store.enroll(args.client_id, tickle_addr=args.tickle, name=args.name)
    for key in ("client_id", "token", "tickle_key"):
        print(f"{key} = {creds[key]}")
    if args.agent_config:
        write_agent_config(args.agent_config, args.server_url, args.state_dir, creds, args.set)
        print(f"{PROG}: wrote agent config {args.agent_config} (mode 0600)", file=sys.stderr)
    return 0


def _params(args: argparse.Namespace) -> dict[str, str]:
    params: dict[str, str] = {}

    def add(name: str, value: str, option: str) -> None:
        if not name:
            raise CliError(f"{option}: expected NAME=VALUE")
        if name in params:
            raise CliError(f"parameter {name!r} given twice")
        params[name] = value

    for text in args.param:
        name, sep, value = text.partition("=")
        add(name if sep else "", value, f"--param {text!r}")
    for text in args.param_file:
        name, sep, path = text.partition("=")
        if not sep or not path:
            raise CliError(f"--param-file {text!r}: expected NAME=PATH")
        try:
            data = Path(path).read_bytes().decode("utf-8")
        except OSError as exc:
            raise CliError(f"--param-file {text!r}: cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise CliError(f"--param-file {text!r}: {path} is not UTF-8 text") from None
        add(name, data, f"--param-file {text!r}")
    return params


def cmd_queue(args: argparse.Namespace) -> int:
    if bool(args.file) == bool(args.type):
        raise CliError("give either a task document FILE.xml or --type (not both)")
    if args.file and (args.param or args.param_file or args.timeout is not None):
        raise CliError("--param, --param-file and --timeout go with --type, not a FILE.xml")
    clients = list(dict.fromkeys(args.client))
    with TaskStore(args.db) as store:
        if args.file:
            try:
                document = Path(args.file).read_bytes()
            except OSError as exc:
                raise CliError(f"cannot read {args.file}: {exc.strerror}") from None
            queued = [(client, i) for client in clients
                      for i in store.queue_xml(client, document, after=args.after)]
        else:
            params = _params(args)
            # every computer's tokens first: one unknown token queues nothing
            each = {client: expand(params, facts_of(store.client(client), client), client)
                    for client in clients}
            queued = list(store.queue_for_clients(
                {client: (args.type, each[client], args.timeout) for client in clients},
                after=args.after).items())
        for client, task_id in queued:
            print(task_id if len(clients) == 1 else f"{client}\t{task_id}")
        sys.stdout.flush()
        for client in clients if args.tickle else ():
            try:
                answer = tickle_client(store, client)
            except DsagentError as exc:
                print(f"{PROG}: warning: {exc}; the agent will pull on its next poll",
                      file=sys.stderr)
            else:
                who = f" {client}" if len(clients) > 1 else ""
                print(f"{PROG}: tickle{who} answered {answer}", file=sys.stderr)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    if bool(args.task) == bool(args.client):
        raise CliError("give --task ID (repeatable) or --client ID (its queued tasks)")
    with TaskStore(args.db) as store:
        ids = args.task or [t["task_id"] for t in store.pending_tasks(args.client)]
        outcome = store.cancel_tasks(ids, force=args.force)
    for task_id, why in outcome.items():
        print(f"{task_id}\t{'cancelled' if why is None else 'not cancelled: ' + why}")
    if not outcome:
        print(f"{PROG}: {args.client} has no queued task", file=sys.stderr)
    return 0 if all(why is None for why in outcome.values()) else 1


def cmd_tickle(args: argparse.Namespace) -> int:
    if args.addr:
        _hostport(args.addr, "--addr")
    with TaskStore(args.db) as store:
        answer = tickle_client(store, args.client, timeout=args.timeout, addr=args.addr)
    print(answer)
    return 0 if answer == "OK" or answer.startswith(wakeup.PUBLISHED) else 1


def cmd_set_tickle(args: argparse.Namespace) -> int:
    _hostport(args.addr, "--addr")
    with TaskStore(args.db) as store:
        store.set_tickle_addr(args.client, args.addr)
    print(f"{PROG}: {args.client} is tickled at {args.addr}", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with TaskStore(args.db) as store:
        if args.client and store.client(args.client) is None:
            raise CliError(f"no such client: {args.client}")
        history = store.history(client_id=args.client, task_id=args.task)
    if args.task and not history:
        raise CliError(f"no such task: {args.task}"
                       + (f" for client {args.client}" if args.client else ""))
    if args.json:
        print(json.dumps(history, indent=2, ensure_ascii=False))
    else:
        clients = {task["client_id"] for task in history}
        print(format_history(history, show_client=not args.client and len(clients) > 1))
    return 0


def cmd_clients(args: argparse.Namespace) -> int:
    with TaskStore(args.db) as store:
        clients = store.clients()
        for client in clients:
            client.pop("token")
            client.pop("tickle_key")
            client["requests"] = store.request_counts(client["client_id"])
    if args.json:
        print(json.dumps(clients, indent=2, ensure_ascii=False))
        return 0
    header = ["CLIENT ID", "NAME", "TICKLE ADDR", "OS", "AGENT", "REGISTERED", "REQUESTS"]
    rows = [[c["client_id"], c["name"] or "", c["tickle_addr"] or "-", c["os"] or "",
             c["agent_version"] or "", c["registered_at"],
             " ".join(f"{k}={v}" for k, v in c["requests"].items())] for c in clients]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths]] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    if not rows:
        print("no clients")
    return 0


def _hostport(value: str, option: str, allow_zero: bool = False) -> tuple[str, int]:
    if allow_zero and value.endswith(":0"):
        host = value[:-2]
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if host:
            return host, 0
    try:
        return parse_hostport(value)
    except DsagentError as exc:
        raise CliError(f"{option}: {exc}") from None


def add_mqtt_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mqtt", type=wakeup.check_url, metavar="URL",
                        help="a broker (mqtt://… or mqtts://…) to wake clients TCP cannot "
                             f"reach; default ${wakeup.ENV}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="The dsagent reference task server (PROTOCOL.md §3) and its tools.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--db", required=True, metavar="FILE|URL",
                       help="the server's database: an SQLite file, or postgresql://…")
        return p

    p = command("serve", "serve the HTTP API until SIGTERM/SIGINT (prints the URL first)")
    p.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT",
                   help="address to listen on; port 0 picks a free one (default %(default)s)")
    p.add_argument("--enrollment-key", metavar="K",
                   help="key agents present to register (without it registration is refused)")
    p.add_argument("--poll-interval", type=int, default=300, metavar="S",
                   help="poll interval handed to registering agents (default %(default)s)")
    p.add_argument("--allow-unknown-computers", action="store_true",
                   help="let a computer on neither PXE list register in automation mode "
                        "(named by its MAC; default: refused with 403)")
    p.add_argument("--image-store", metavar="DIR",
                   help="serve DIR as an image store under /images/ (GET with Range; PUT "
                        "with an enrolled client's ID:TOKEN as Basic auth)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="with --db postgresql://…: uvicorn worker processes (default 2)")
    p.add_argument("--keep-events-days", type=int, default=180, metavar="D",
                   help="with --db postgresql://…: drop statuses older than D days, a month "
                        "at a time (0 keeps all; default %(default)s)")
    p.add_argument("--package-check-s", type=int, default=300, metavar="S",
                   help="read the packages' sources every S s and queue a replication for "
                        "each site server whose copy differs (0: never; default %(default)s)")
    p.add_argument("--package-resync-s", type=int, default=86400, metavar="S",
                   help="replicate every package to every holder every S s, changed or not, "
                        "repairing damaged replicas (0: never; default %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every request")
    add_mqtt_option(p)
    p.set_defaults(func=cmd_serve)

    p = command("enroll", "create a client and print its credentials as `key = value` lines")
    p.add_argument("--client-id", required=True, metavar="ID")
    p.add_argument("--tickle", metavar="HOST:PORT", help="where the client's objecthost listens")
    p.add_argument("--name", help="descriptive name (default: the client id)")
    p.add_argument("--agent-config", metavar="FILE", help="also write an agent TOML config (0600)")
    p.add_argument("--server-url", metavar="URL", help="[agent] server_url for --agent-config")
    p.add_argument("--state-dir", metavar="DIR", help="[agent] state_dir for --agent-config")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra agent config setting, e.g. objecthost.listen=127.0.0.1:50122")
    p.set_defaults(func=cmd_enroll)

    p = command("queue", "queue tasks for one or more clients and print their ids")
    p.add_argument("--client", required=True, action="append", metavar="ID",
                   help="repeat for several: --param values may hold tokens (%%COMPNAME%%, "
                        "%%ID%%, %%MAC%%, %%SERIALNUMBER%%, %%IMAGE%%) replaced per client")
    p.add_argument("file", nargs="?", metavar="FILE.xml",
                   help="a <ClientTasks> document (or bare <Task> elements)")
    p.add_argument("--type", metavar="T", help="task type of a single task")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--param-file", action="append", default=[], metavar="NAME=PATH",
                   help="parameter whose value is a file's UTF-8 text, byte for byte")
    p.add_argument("--timeout", type=int, metavar="S", help="task timeout in seconds")
    p.add_argument("--after", action="append", default=[], metavar="TASK",
                   help="hold the task(s) until task TASK succeeded (repeat for several; any "
                        "client's); cancelled if it fails")
    p.add_argument("--tickle", action="store_true", help="tickle the client afterwards")
    p.set_defaults(func=cmd_queue)

    p = command("cancel", "cancel queued tasks no agent has taken yet (they end `cancelled`)")
    p.add_argument("--task", action="append", default=[], metavar="ID", help="repeatable")
    p.add_argument("--client", metavar="ID", help="every queued task of this client")
    p.add_argument("--force", action="store_true", help="also end tasks an agent took but "
                   "never finished (it is not told; e.g. it lost them with its state)")
    p.set_defaults(func=cmd_cancel)

    p = command("tickle", "send a signed tickle to a client's objecthost; print its answer")
    p.add_argument("--client", required=True, metavar="ID")
    p.add_argument("--addr", metavar="HOST:PORT", help="tickle this address instead")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S")
    add_mqtt_option(p)
    p.set_defaults(func=cmd_tickle)

    p = command("set-tickle", "remember where a client's objecthost listens (a client that "
                "registered itself has no tickle address)")
    p.add_argument("--client", required=True, metavar="ID")
    p.add_argument("--addr", required=True, metavar="HOST:PORT")
    p.set_defaults(func=cmd_set_tickle)

    p = command("status", "print each task's status history")
    p.add_argument("--client", metavar="ID")
    p.add_argument("--task", metavar="ID")
    p.add_argument("--json", action="store_true", help="tasks with their events, as JSON")
    p.set_defaults(func=cmd_status)

    p = command("clients", "list enrolled and registered clients")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_clients)

    add_pxe_commands(sub)
    add_packages_commands(sub)
    add_deploy_commands(sub, command)
    add_base_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "mqtt", None):
        wakeup.use_broker(args.mqtt)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format=f"{PROG}: %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (CliError, DsagentError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:
        print(f"{PROG}: error: database {args.db}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:       # e.g. the listen address is in use
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
