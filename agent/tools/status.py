"""``dsagent status``: what the agent is doing now.

Put together from what the processes publish (agent/common/statusfile.py),
the processes themselves (psutil: uptime, memory) and the state DB, read
only (tasks running and queued; the outbox's depth and the age of its oldest
event, from ctdataloader.outbox.summary). It never talks to the agent's
ports, so it works when a process is wedged.
Exit code: 0 the agent runs, 3 it does not (as ``systemctl status``), 2 the
state dir cannot be read.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from agent.common.errors import DsagentError
from agent.common.statedb import db_path
from agent.common.statusfile import read_all
from agent.cta.taskdb import unfinished_tasks
from ctdataloader.outbox import summary as outbox_summary

PROCESSES = ("dsagent", "objecthost", "cta", "ctdataloader")
OPTIONAL = ("pxe", "packages")   # listed when the supervisor runs it (or ran it: its facts are there)
NOT_RUNNING = 3
MAX_LISTED_TASKS = 20


def _process(facts: dict[str, Any] | None) -> dict[str, Any]:
    """Is the process of these facts alive (and the same one: pids are reused)?"""
    if not facts or facts.get("stopped_at"):
        return {"running": False, "pid": (facts or {}).get("pid")}
    pid = facts.get("pid")
    try:
        proc = psutil.Process(int(pid))
        created = proc.create_time()
        if created > float(facts.get("started_at", 0)) + 1:  # started after the facts: another program
            raise psutil.NoSuchProcess(pid)
        with proc.oneshot():
            return {"running": proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE,
                    "pid": pid, "uptime_s": time.time() - created,
                    "rss_bytes": proc.memory_info().rss}
    except (psutil.Error, TypeError, ValueError):
        return {"running": False, "pid": pid}


def read_state_db(state_dir: Path) -> dict[str, Any]:
    """Unfinished tasks and the outbox, read only; ``{"error": ...}`` if unreadable."""
    path = db_path(state_dir)
    try:
        box = outbox_summary(state_dir)   # raises if there is no DB yet
        tasks = unfinished_tasks(path)
    except DsagentError as exc:
        return {"error": str(exc)}
    except sqlite3.Error as exc:
        return {"error": f"cannot read {path}: {exc}"}
    now = time.time()
    listed = [{"task_id": tid, "type": kind, "state": state, "since_s": now - at}
              for tid, kind, state, at in tasks]
    return {"running": [t for t in listed if t["state"] != "received"],
            "queued": [t for t in listed if t["state"] == "received"],
            "outbox_depth": box.waiting, "outbox_oldest_s": box.oldest_s}


def gather(state_dir: Path) -> dict[str, Any]:
    facts = read_all(state_dir)
    now = time.time()
    processes = {}
    children = facts.get("dsagent", {}).get("children", {})
    for name in PROCESSES + tuple(n for n in OPTIONAL if n in children or n in facts):
        info = _process(facts.get(name))
        if name != "dsagent":
            info["restarts"] = facts.get("dsagent", {}).get("children", {}).get(name, {}) \
                .get("restarts", 0)
        processes[name] = info
    cta, loader, host = (facts.get(n, {}) for n in ("cta", "ctdataloader", "objecthost"))
    contacts = [t for t in (cta.get("last_pull_ok_at"), loader.get("last_upload_ok_at")) if t]
    errors = [e for e in (cta.get("last_pull_error"), loader.get("last_upload_error")) if e]
    return {
        "state_dir": str(state_dir),
        "running": processes["dsagent"]["running"],
        "processes": processes,
        "tasks": read_state_db(state_dir),
        "server": {
            "last_contact_s": (now - max(contacts)) if contacts else None,
            "last_pull_ok_s": _ago(cta.get("last_pull_ok_at"), now),
            "last_upload_ok_s": _ago(loader.get("last_upload_ok_at"), now),
            "last_error": max(errors, key=lambda e: e.get("at", 0)) if errors else None,
        },
        "tickles": {key: host.get(key) for key in
                    ("accepted", "refused", "last_accepted", "last_refused")},
        "mqtt_wakeup": host.get("mqtt"),
        **({"pxe": {key: facts["pxe"].get(key) for key in PXE_FACTS}} if "pxe" in facts else {}),
    }


PXE_FACTS = ("serving", "reason", "interface", "address", "dnsmasq_pid", "answered",
             "restarts", "unbuilt", "health_error", "applied", "rejected", "waiting",
             "computers", "predefined", "images", "last_applied", "last_rejected", "last_error")


def _ago(moment: float | None, now: float) -> float | None:
    return (now - moment) if moment else None


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    s = int(max(0, seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def format_peer(peer: Any) -> str:
    """A peer as host:port (the objecthost stores the raw address: formatting costs in a flood)."""
    if isinstance(peer, list) and len(peer) >= 2:
        host = f"[{peer[0]}]" if ":" in str(peer[0]) else str(peer[0])
        return f"{host}:{peer[1]}"
    return str(peer)


def render(status: dict[str, Any]) -> str:
    lines = []
    main = status["processes"]["dsagent"]
    lines.append(f"dsagent: {'running' if main['running'] else 'NOT RUNNING'}"
                 + (f" (pid {main['pid']}, up {human_age(main.get('uptime_s'))})"
                    if main["running"] else "") + f"; state in {status['state_dir']}")
    lines.append(f"  {'PROCESS':<13}{'PID':>8}  {'UPTIME':<12}{'RSS':>8}  RESTARTS")
    for name, info in status["processes"].items():
        if name == "dsagent":
            continue
        rss = f"{info['rss_bytes'] / 2**20:.0f} MB" if info.get("rss_bytes") else "-"
        up = human_age(info["uptime_s"]) if info["running"] else "not running"
        lines.append(f"  {name:<13}{str(info.get('pid') or '-'):>8}  {up:<12}{rss:>8}  "
                     f"{info.get('restarts', 0)}")
    tasks = status["tasks"]
    if "error" in tasks:
        lines.append(f"tasks: {tasks['error']}")
    else:
        lines.append(f"tasks: {len(tasks['running'])} running, {len(tasks['queued'])} queued")
        for task in (tasks["running"] + tasks["queued"])[:MAX_LISTED_TASKS]:
            lines.append(f"  {task['state']:<9} {task['task_id']}  {task['type']}  "
                         f"(for {human_age(task['since_s'])})")
        oldest = tasks["outbox_oldest_s"]
        lines.append(f"outbox: {tasks['outbox_depth']} event(s) waiting"
                     + (f", oldest {human_age(oldest)} old" if oldest is not None else ""))
    server = status["server"]
    lines.append(f"server: last contact {human_age(server['last_contact_s'])}"
                 + (" ago" if server["last_contact_s"] is not None else "")
                 + f" (pull {human_age(server['last_pull_ok_s'])}, upload "
                   f"{human_age(server['last_upload_ok_s'])})")
    if server["last_error"]:
        error = server["last_error"]
        lines.append(f"  last error {human_age(time.time() - error.get('at', 0))} ago: "
                     f"{error.get('message')}")
    tickles = status["tickles"]
    for kind in ("accepted", "refused"):
        last = tickles.get(f"last_{kind}")
        text = "none" if not last else (
            f"{human_age(time.time() - last.get('at', 0))} ago from {format_peer(last.get('peer'))}"
            + (f" ({last['code']})" if last.get("code") else ""))
        lines.append(f"tickles {kind}: {tickles.get(kind) or 0}; last {text}")
    lines.append(_render_mqtt(status.get("mqtt_wakeup")))
    if "pxe" in status:
        lines.extend(_render_pxe(status["pxe"]))
    return "\n".join(lines)


def _render_mqtt(link: dict[str, Any] | None) -> str:
    """The MQTT wake-up's link as the objecthost reported it ([wakeup] mqtt)."""
    if not link:
        return "mqtt wake-up: unknown (the objecthost has not reported)"
    state = link.get("state")
    if state == "off":
        return "mqtt wake-up: off ([wakeup] mqtt is not set)"
    where = f"{link.get('broker')} ({link.get('topic') or 'no topic yet'})"
    if state == "connected":
        return f"mqtt wake-up: connected to {where} for {human_age(time.time() - link.get('since', 0))}"
    return (f"mqtt wake-up: {state} to {where}: {link.get('reason') or 'no reason given'} "
            f"({human_age(time.time() - link.get('at', 0))} ago)")


def _render_pxe(pxe: dict[str, Any]) -> list[str]:
    last = pxe.get("last_applied")
    answered = pxe.get("answered")
    lines = [(f"pxe: serving on {pxe.get('interface')} ({pxe.get('address')}), dnsmasq pid "
              f"{pxe.get('dnsmasq_pid')}, answering "
              + ("every MAC" if answered == -1 else f"{answered or 0} MAC(s)")
              + (f"; dnsmasq restarted {pxe['restarts']} time(s)" if pxe.get("restarts") else "")
              if pxe.get("serving") else
              f"pxe: NOT SERVING on {pxe.get('interface')}: {pxe.get('reason') or 'unknown'}"),
             f"  {pxe.get('computers') or 0} computer(s), {pxe.get('predefined') or 0} "
             f"predefined, {pxe.get('images') or 0} image(s); files applied "
             f"{pxe.get('applied') or 0}, rejected {pxe.get('rejected') or 0}, waiting "
             f"{pxe.get('waiting') or 0}"]
    if last:
        lines.append(f"  last applied {human_age(time.time() - last.get('at', 0))} ago: "
                     f"{last.get('file')} ({last.get('change')})")
    for config, count in sorted((pxe.get("unbuilt") or {}).items()):
        lines.append(f"  configuration {config} has no current build: {count} automation "
                     "computer(s) cannot boot it")
    if pxe.get("health_error"):
        lines.append(f"  PXE state not reported to the task server: {pxe['health_error']}")
    for key in ("last_rejected", "last_error"):
        if pxe.get(key):
            what = pxe[key].get("reason") or pxe[key].get("message")
            age = human_age(time.time() - pxe[key].get("at", 0))
            lines.append(f"  {key.replace('_', ' ')} {age} ago: {what}")
    return lines


def show(state_dir: Path, as_json: bool, out=sys.stdout) -> int:
    if state_dir.exists() and not os.access(state_dir, os.R_OK | os.X_OK):
        # not "NOT RUNNING": we simply cannot see (the state dir is 0700, root's)
        print(f"dsagent status: cannot read {state_dir}: permission denied (run it as the "
              f"agent's user, root)", file=sys.stderr)
        return 2
    status = gather(state_dir)
    out.write((json.dumps(status, indent=2) if as_json else render(status)) + "\n")
    return 0 if status["running"] else NOT_RUNNING
