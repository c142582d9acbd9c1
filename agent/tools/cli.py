"""The ``dsagent`` command line (PROTOCOL.md §5)."""

from __future__ import annotations

import argparse
import sys

from agent.common.config import DEFAULT_CONFIG_PATH, parse_hostport
from agent.common.errors import ConfigError


def _cmd_run(args) -> int:
    from agent.common.logsetup import setup_logging
    from agent.supervisor import run

    setup_logging("dsagent")
    return run(args.config)


def _cmd_run_task(args) -> int:
    from agent.tools.localrun import run_tasks
    from agent.common.logsetup import setup_logging

    import os

    os.environ["DSAGENT_LOG_LEVEL"] = "INFO" if args.verbose else "WARNING"  # workers too
    setup_logging("run-task")
    return run_tasks(args.file, args.config, args.json)


def _cmd_handlers(args) -> int:
    from agent.common.logsetup import setup_logging
    from agent.plugin.manager import load_handlers

    setup_logging("dsagent", level="WARNING")
    registry = load_handlers()
    registered = sorted(registry.types.items())
    rows = [(name, reg.plugin, reg.version, reg.task_type.default_timeout,
             reg.task_type.description) for name, reg in registered]
    header = ("TASK TYPE", "PLUGIN", "VERSION", "TIMEOUT", "DESCRIPTION")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    def line(row) -> str:
        return "  ".join(str(v).ljust(w) for v, w in zip(row, widths)) + "  " + str(row[4])

    print(line(header))
    for row, (_, reg) in zip(rows, registered):
        print(line(row))
        declared = reg.task_type.parameters
        if declared is None:  # a handler written before Param checks them itself
            print("    parameters checked by the handler")
        elif not declared:
            print("    no parameters")
        for param in declared or ():
            print(f"    {param.describe()}")
    for plugin, error in sorted(registry.broken.items()):
        print(f"BROKEN plugin {plugin}: {error}")
    for name, plugins in sorted(registry.conflicts.items()):
        print(f"REFUSED task type {name}: registered by both {' and '.join(plugins)}")
    return 1 if registry.broken or registry.conflicts else 0


def _cmd_tickle(args) -> int:
    from agent.common.tickle import send_tickle

    try:
        host, port = parse_hostport(args.address, "address")
        key = bytes.fromhex(args.key)
    except (ConfigError, ValueError) as exc:
        print(f"dsagent tickle: {exc}", file=sys.stderr)
        return 2
    try:
        answer = send_tickle(host, port, args.client_id, key, timeout=args.timeout)
    except OSError as exc:
        print(f"dsagent tickle: cannot reach {args.address}: {exc}", file=sys.stderr)
        return 1
    print(answer)
    return 0 if answer == "OK" else 1


def _load_config_or_exit(path: str, command: str):
    from agent.common.config import load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"dsagent {command}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _cmd_logs(args) -> int:
    from pathlib import Path

    from agent.common.logsetup import log_dir
    from agent.tools.logview import parse_since, show

    try:
        since = parse_since(args.since) if args.since else None
    except ConfigError as exc:
        print(f"dsagent logs: {exc}", file=sys.stderr)
        return 2
    folder = Path(args.log_dir) if args.log_dir else log_dir(_load_config_or_exit(args.config, "logs"))
    return show(folder, task=args.task, since=since, follow=args.follow, as_json=args.json,
                lines=args.lines)


def _cmd_status(args) -> int:
    from agent.tools.status import show

    return show(_load_config_or_exit(args.config, "status").state_dir, args.json)


def _cmd_new_handler(args) -> int:
    from agent.tools.scaffold import ScaffoldError, new_handler

    try:
        path = new_handler(args.name, args.dir, args.task_type)
    except (ScaffoldError, OSError) as exc:
        print(f"dsagent new-handler: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}/ (see its README.md); next: pip install -e '{path}[test]' && pytest {path}")
    return 0


def _cmd_doctor(args) -> int:
    from agent.tools.doctor import doctor
    from agent.common.logsetup import setup_logging

    setup_logging("doctor", level="ERROR")  # findings say it all; no log lines among them
    return doctor(args.config, args.json)


def _cmd_enroll(args) -> int:
    from agent.tools.enroll import enroll
    from agent.common.logsetup import setup_logging

    setup_logging("enroll", level="ERROR")
    return enroll(args.server, args.key, args.config, state_dir=args.state_dir, name=args.name,
                  force=args.force)


def _cmd_trace(args) -> int:
    from agent.tools.trace import load_trace_key, watch

    config = None if (args.address and args.key) else _load_config_or_exit(args.config, "trace")
    try:
        address = args.address or config.get("trace", "listen")
        if not address:
            raise ConfigError(f"{config.path}: [trace] listen is not set (the trace is off)")
        host, port = parse_hostport(address, "address")
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        key = bytes.fromhex(args.key) if args.key else load_trace_key(config.state_dir)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"dsagent trace: {exc}", file=sys.stderr)
        return 2
    return watch(host, port, key, task=args.task, as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsagent", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run objecthost, CTA and ctdataloader, supervised")
    run.add_argument("--config", required=True)
    run.set_defaults(func=_cmd_run)

    run_task = sub.add_parser("run-task", help="run tasks from an XML file locally")
    run_task.add_argument("file")
    run_task.add_argument("--config")
    run_task.add_argument("--json", action="store_true", help="one §3 event object per line")
    run_task.add_argument("-v", "--verbose", action="store_true", help="show handler logs")
    run_task.set_defaults(func=_cmd_run_task)

    handlers = sub.add_parser("handlers", help="installed task types: plugin, version, parameters")
    handlers.set_defaults(func=_cmd_handlers)

    tickle = sub.add_parser("tickle", help="send a signed tickle")
    tickle.add_argument("address", metavar="HOST:PORT")
    tickle.add_argument("--client-id", required=True)
    tickle.add_argument("--key", required=True, help="tickle key, hex")
    tickle.add_argument("--timeout", type=float, default=5.0)
    tickle.set_defaults(func=_cmd_tickle)

    logs = sub.add_parser("logs", help="the agent's logs, merged in time order")
    logs.add_argument("--config", default=DEFAULT_CONFIG_PATH)
    logs.add_argument("--log-dir", help="read this folder instead of the config's")
    logs.add_argument("--task", help="only lines about this task id (or id prefix)")
    logs.add_argument("--since", help="e.g. 10m, 2h, 1d or 2026-12-01T18:00 (local time)")
    logs.add_argument("-n", "--lines", type=int, help="only the last N lines of the history")
    logs.add_argument("-f", "--follow", action="store_true", help="then print new lines as they come")
    logs.add_argument("--json", action="store_true", help="JSON lines instead of text")
    logs.set_defaults(func=_cmd_logs)

    status = sub.add_parser("status", help="processes, tasks, outbox, server contact, tickles")
    status.add_argument("--config", default=DEFAULT_CONFIG_PATH)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_cmd_status)

    trace = sub.add_parser("trace", help="watch the remote trace stream (log lines, live)")
    trace.add_argument("address", nargs="?", metavar="HOST:PORT",
                       help="default: the config's [trace] listen")
    trace.add_argument("--config", default=DEFAULT_CONFIG_PATH)
    trace.add_argument("--key", help="trace key, hex (default: <state_dir>/trace.key)")
    trace.add_argument("--task", help="only lines about this task id (or id prefix)")
    trace.add_argument("--json", action="store_true", help="JSON lines instead of text")
    trace.set_defaults(func=_cmd_trace)

    new_handler = sub.add_parser("new-handler", help="write a ready handler package (with a test)")
    new_handler.add_argument("name", metavar="NAME", help="its distribution name, e.g. "
                             "acme-inventory (module acme_inventory)")
    new_handler.add_argument("--dir", default=".", help="where to create NAME/ (default: here)")
    new_handler.add_argument("--task-type",
                             help="the task type it serves (default: the module name in CamelCase)")
    new_handler.set_defaults(func=_cmd_new_handler)

    doctor = sub.add_parser("doctor", help="check the seed's classic failures; say what to do")
    doctor.add_argument("--config", default=DEFAULT_CONFIG_PATH)
    doctor.add_argument("--json", action="store_true", help="the checks as one JSON object")
    doctor.set_defaults(func=_cmd_doctor)

    enroll = sub.add_parser("enroll", help="register with a task server, write the config (0600)")
    enroll.add_argument("--server", required=True, metavar="URL", help="the task server's URL")
    enroll.add_argument("--key", required=True, help="the server's enrollment key")
    enroll.add_argument("--config", default=DEFAULT_CONFIG_PATH, help="where to write the config")
    enroll.add_argument("--state-dir", help="[agent] state_dir (default /var/lib/dsagent)")
    enroll.add_argument("--name", help="the name to register (default: the host name)")
    enroll.add_argument("--force", action="store_true",
                        help="replace an existing config's identity, keeping its other settings")
    enroll.set_defaults(func=_cmd_enroll)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
