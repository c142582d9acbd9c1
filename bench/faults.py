"""Fault campaign: kill storm and server outage, on the real chain
(``python -m bench.faults [storm|outage|all] [--quick]``).

- **Kill storm**: tasks of a quick RunScript type are fed to the agent while
  the CTA, the ctdataloader and the objecthost are SIGKILLed at random moments
  (a random victim every 0.2-1.5 s, each restarted by the supervisor before
  the next kill). Afterwards every task's history at the server is audited:
  seq 1..n without gaps, ``received`` -> ``running`` -> ``progress``* -> one
  terminal state, the agent recorded no event the server lacks, no task's
  script ran to completion twice, tasks running when the CTA died are
  ``failed`` ("interrupted"), and the outbox is empty.
- **Server outage**: while a run of tasks goes on, the task server goes away
  (really stopped, or answering 503 to everything) and comes back. Printed:
  requests during the outage (per endpoint when the server can count them, and
  the agent's own failure log lines), the outbox's peak depth and size on disk,
  and how long everything took to arrive after the server returned.

The restart backoff of the supervisor is capped with
``DSAGENT_RESTART_BACKOFF_MAX_S`` (0.5 s here) so a storm of 20 kills takes
under a minute. tests/test_faults.py runs smaller versions of the same
functions and asserts on their results; this module only measures and prints
(a Markdown table with the machine and the date, as ``python -m bench`` does).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import re
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from agent.common.events import TERMINAL
from ctdataloader.outbox import summary as outbox_summary
from taskserver.app import tickle_client
from taskserver.loopback import LoopbackChain, wait_port

from bench.report import Conditions, Row, machine_lines, table

VICTIMS = ("cta", "ctdataloader", "objecthost")
BACKOFF_ENV = "DSAGENT_RESTART_BACKOFF_MAX_S"
RESTART_BACKOFF_S = "0.5"


def say(message: str) -> None:
    print(f"[faults {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def env(name: str, value: str):
    """Set an environment variable for the block (the agent inherits it at start)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def start_chain(workdir: Path, **kwargs) -> LoopbackChain:
    chain = LoopbackChain(workdir, **kwargs)
    with env(BACKOFF_ENV, RESTART_BACKOFF_S):
        chain.start()
    return chain


def tickle(chain: LoopbackChain) -> bool:
    """Tickle the agent even while our HTTP server is stopped; False if it failed."""
    try:
        return tickle_client(chain.store, chain.client_id, timeout=2.0) == "OK"
    except Exception:  # objecthost being restarted: the poll timer covers it
        return False


def agent_db(chain: LoopbackChain) -> sqlite3.Connection:
    """The agent's state DB, opened read-only (we never write to it)."""
    path = chain.workdir / "state" / "dsagent.db"
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30,
                           isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def wait_outbox_empty(chain: LoopbackChain, timeout: float) -> int:
    """Wait until the uploader emptied the outbox; return what is left."""
    deadline = time.monotonic() + timeout
    while True:
        left = outbox_summary(chain.workdir / "state").waiting
        if left == 0 or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def db_bytes(chain: LoopbackChain) -> tuple[int, int]:
    """(dsagent.db, dsagent.db-wal) sizes in bytes."""
    state = chain.workdir / "state"
    sizes = []
    for name in ("dsagent.db", "dsagent.db-wal"):
        try:
            sizes.append((state / name).stat().st_size)
        except FileNotFoundError:
            sizes.append(0)
    return sizes[0], sizes[1]


def ran_counts(path: Path) -> Counter:
    """How many times each task's script ran to its last line."""
    return Counter(path.read_text().split()) if path.exists() else Counter()


# ---- the audit ---------------------------------------------------------------

@dataclass
class Audit:
    tasks: int = 0
    terminal: Counter = field(default_factory=Counter)   # final state -> tasks
    interrupted: int = 0          # failed "interrupted: the agent stopped while ..."
    failed_other: int = 0         # failed for another reason (unexpected here)
    not_terminal: int = 0
    events_at_server: int = 0
    events_recorded: int = 0      # by the agent (tasks.next_seq - 1, summed)
    lost: int = 0                 # events the agent recorded that the server lacks
    duplicates: int = 0           # two server events with the same task and seq
    completions: int = 0          # script lines written
    double_runs: int = 0          # tasks whose script ran to completion twice
    succeeded_not_run: int = 0    # succeeded but the script's last line is missing
    interrupted_completed: int = 0  # interrupted, yet the script had reached its end
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, text: str) -> None:
        if len(self.problems) < 50:
            self.problems.append(text)


def audit(chain: LoopbackChain, ids: list[str], ran_file: Path) -> Audit:
    """Check every task's history at the server against the rules of PROTOCOL.md §3."""
    result = Audit(tasks=len(ids))
    wanted = set(ids)
    runs = ran_counts(ran_file)
    result.completions = sum(runs[t] for t in wanted)
    with sqlite3.connect(f"file:{chain.workdir / 'server.db'}?mode=ro", uri=True) as server:
        result.duplicates = sum(n - 1 for (n,) in server.execute(
            "SELECT COUNT(*) FROM events GROUP BY task_id, seq HAVING COUNT(*) > 1"))
    conn = agent_db(chain)
    try:
        recorded = dict(conn.execute("SELECT task_id, next_seq - 1 FROM tasks"))
    finally:
        conn.close()
    for task in chain.store.history(chain.client_id):
        tid = task["task_id"]
        if tid not in wanted:
            continue
        events = task["events"]
        states = [e["state"] for e in events]
        result.events_at_server += len(events)
        result.events_recorded += recorded.get(tid, 0)
        if recorded.get(tid, 0) > len(events):
            result.lost += recorded[tid] - len(events)
            result.problem(f"{tid}: agent recorded {recorded[tid]} events, server has {len(events)}")
        if [e["seq"] for e in events] != list(range(1, len(events) + 1)):
            result.problem(f"{tid}: seqs {[e['seq'] for e in events]}")
        terminals = [s for s in states if s in TERMINAL]
        if not terminals:
            result.not_terminal += 1
            result.problem(f"{tid}: no terminal state ({states})")
            continue
        final = states[-1]
        if len(terminals) != 1 or final not in TERMINAL or states[0] != "received" or (
                len(states) > 2 and (states[1] != "running"
                                     or set(states[2:-1]) - {"progress"})):
            result.problem(f"{tid}: states {states}")
        result.terminal[final] += 1
        n_runs = runs[tid]
        if n_runs > 1:
            result.double_runs += 1
            result.problem(f"{tid}: script ran to completion {n_runs} times")
        if final == "succeeded" and n_runs != 1:
            result.succeeded_not_run += 1
            result.problem(f"{tid}: succeeded but its script ran {n_runs} times")
        if final == "failed":
            message = events[-1]["message"]
            if message.startswith("interrupted"):
                result.interrupted += 1
                result.interrupted_completed += n_runs == 1
                if states[-2] not in ("running", "progress"):
                    result.problem(f"{tid}: interrupted but never running: {states}")
            else:
                result.failed_other += 1
                result.problem(f"{tid}: failed: {message}")
        elif final != "succeeded":
            result.problem(f"{tid}: {final}: {events[-1]['message']}")
    return result


def log_counts(log_text: str) -> tuple[Counter, Counter, Counter]:
    """(restarts after SIGKILL, other exits, by child; tracebacks by their last line)."""
    killed = Counter(re.findall(r"\b(objecthost|cta|ctdataloader) killed by signal 9; restarting",
                                log_text))
    other = Counter(m.group(1) for m in re.finditer(
        r"\b(objecthost|cta|ctdataloader) (exited with code \d+|killed by signal (?!9;)\d+)",
        log_text))
    tracebacks: Counter = Counter()
    lines = log_text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last)"):
            j = i + 1
            while j < len(lines) and (lines[j].startswith(" ") or not lines[j].strip()):
                j += 1
            tracebacks[lines[j][:100] if j < len(lines) else "?"] += 1
    return killed, other, tracebacks


# ---- kill storm ----------------------------------------------------------------

@dataclass
class StormResult:
    n_tasks: int
    n_kills: int
    task_s: float = 0.0
    kills: Counter = field(default_factory=Counter)
    restarts_logged: Counter = field(default_factory=Counter)
    other_exits: Counter = field(default_factory=Counter)
    tracebacks: Counter = field(default_factory=Counter)  # by exception line
    restart_s: list[float] = field(default_factory=list)  # kill -> new pid seen
    tickles_ok: int = 0
    tickles_failed: int = 0
    storm_s: float = 0.0
    drain_s: float = 0.0
    total_s: float = 0.0
    all_terminal: bool = False
    outbox_left: int = -1
    audit: Audit | None = None


def kill_storm(workdir: Path, n_tasks: int = 300, n_kills: int = 20,
               gap_s: tuple[float, float] = (0.2, 1.5), task_s: float | None = None,
               poll_interval_s: int = 2, seed: int | None = None,
               drain_timeout: float = 120.0) -> StormResult:
    """Feed ``n_tasks`` RunScript tasks while SIGKILLing a random child ``n_kills`` times.

    The tasks are queued evenly over the expected length of the storm (with a
    tickle every 0.25 s); each sleeps ``task_s`` (default: long enough to keep
    the two task slots ~80 % busy, so kills of the CTA often land on running
    tasks), then appends its id to a file.
    """
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    ran = workdir / "ran.txt"
    # Spread the tasks over the expected storm: a gap plus ~1.2 s to restart, per kill.
    expected_s = n_kills * (sum(gap_s) / 2 + 1.2)
    per_tick = max(1, math.ceil(n_tasks * 0.25 / expected_s))
    if task_s is None:
        task_s = round(min(1.0, max(0.01, 0.8 * 2 * expected_s / n_tasks - 0.012)), 3)
    script = f"sleep {task_s}; echo $DSAGENT_TASK_ID >> {ran}"
    result = StormResult(n_tasks, n_kills, task_s=task_s)
    chain = start_chain(workdir / "chain", poll_interval_s=poll_interval_s,
                        max_concurrent_tasks=2)
    ids: list[str] = []
    ids_lock = threading.Lock()
    storm_over = threading.Event()

    def feeder() -> None:
        while True:
            with ids_lock:
                left = n_tasks - len(ids)
            if left <= 0:
                return
            batch = left if storm_over.is_set() else min(per_tick, left)
            new = [chain.queue("RunScript", {"script": script}) for _ in range(batch)]
            with ids_lock:
                ids.extend(new)
            if tickle(chain):
                result.tickles_ok += 1
            else:
                result.tickles_failed += 1
            storm_over.wait(0.25)

    began = time.monotonic()
    feeding = threading.Thread(target=feeder, name="feeder", daemon=True)
    feeding.start()
    try:
        for _ in range(n_kills):
            time.sleep(rng.uniform(*gap_s))
            victim = rng.choice(VICTIMS)
            proc = chain.child(victim)
            deadline = time.monotonic() + 30
            while proc is None and time.monotonic() < deadline:
                time.sleep(0.05)
                proc = chain.child(victim)
            if proc is None:
                raise RuntimeError(f"{victim} is not running; see {chain.log_path}")
            t_kill = time.monotonic()
            proc.kill()
            proc.wait(5)
            result.kills[victim] += 1
            while time.monotonic() < deadline:
                new = chain.child(victim)
                if new is not None and new.pid != proc.pid:
                    result.restart_s.append(time.monotonic() - t_kill)
                    break
                time.sleep(0.05)
            else:
                raise RuntimeError(f"{victim} was not restarted; see {chain.log_path}")
            # the next random moment counts from when the new process serves again
            port = {"cta": chain.cta_port, "objecthost": chain.objecthost_port}.get(victim)
            if port and not wait_port(port, 30):
                raise RuntimeError(f"{victim} did not listen again; see {chain.log_path}")
        storm_over.set()
        feeding.join()
        result.storm_s = time.monotonic() - began
        tickle(chain)
        t_drain = time.monotonic()
        result.all_terminal = chain.wait(ids, drain_timeout)
        result.outbox_left = wait_outbox_empty(chain, 35.0)
        result.drain_s = time.monotonic() - t_drain
        result.total_s = time.monotonic() - began
        result.audit = audit(chain, ids, ran)
        killed, other, tracebacks = log_counts(chain.log_path.read_text(errors="replace"))
        result.restarts_logged, result.other_exits, result.tracebacks = killed, other, tracebacks
    finally:
        storm_over.set()
        chain.stop()
    return result


def storm_rows(res: StormResult) -> list[Row]:
    a = res.audit or Audit()
    kills = ", ".join(f"{v} {res.kills[v]}" for v in VICTIMS)
    restarts = ", ".join(f"{v} {res.restarts_logged[v]}" for v in VICTIMS)
    restart_p50 = sorted(res.restart_s)[len(res.restart_s) // 2] if res.restart_s else 0.0
    terminal = ", ".join(f"{n} {s}" for s, n in sorted(a.terminal.items()))
    return [
        Row(f"Tasks (RunScript: `sleep {res.task_s}`, then append its id to a file)",
            f"{a.tasks} queued during the storm; {terminal or 'none terminal'}"),
        Row("SIGKILLs (random victim every 0.2-1.5 s)", f"{sum(res.kills.values())} ({kills})"),
        Row("Restarts seen in the agent log (\"killed by signal 9; restarting\")",
            f"{sum(res.restarts_logged.values())} ({restarts}); kill → new process p50 "
            f"{restart_p50:.2f} s, max {max(res.restart_s, default=0):.2f} s",
            "= kills", res.restarts_logged == res.kills),
        Row("Other child exits (not our SIGKILLs) in the agent log",
            str(sum(res.other_exits.values())), "0", not res.other_exits),
        Row("Tracebacks in the agent log",
            f"{sum(res.tracebacks.values())}" + "".join(
                f"; {n}× `{line}`" for line, n in res.tracebacks.most_common(3))),
        Row("Tasks with exactly one terminal status at the server",
            f"{sum(a.terminal.values())} of {a.tasks}", "all",
            res.all_terminal and sum(a.terminal.values()) == a.tasks),
        Row("  ↳ succeeded", str(a.terminal.get("succeeded", 0))),
        Row("  ↳ failed \"interrupted\" (running when the CTA died; never re-run)",
            f"{a.interrupted} (of which the script had reached its end: "
            f"{a.interrupted_completed})"),
        Row("  ↳ failed otherwise / other states", f"{a.failed_other} / "
            f"{a.tasks - a.terminal.get('succeeded', 0) - a.terminal.get('failed', 0)}",
            "0 / 0", a.failed_other == 0 and set(a.terminal) <= {"succeeded", "failed"}),
        Row("Events at the server / recorded by the agent",
            f"{a.events_at_server} / {a.events_recorded}", "equal",
            a.events_at_server == a.events_recorded and a.lost == 0),
        Row("Duplicate events at the server (same task and seq)", str(a.duplicates), "0",
            a.duplicates == 0),
        Row("History violations (seq gaps, order, terminal count)",
            str(len(a.problems)) + (f": {a.problems[0]}" if a.problems else ""), "0", a.ok),
        Row("Double runs (script completed twice)", str(a.double_runs), "0", a.double_runs == 0),
        Row("Succeeded without exactly one completion", str(a.succeeded_not_run), "0",
            a.succeeded_not_run == 0),
        Row("Outbox rows left after the final upload", str(res.outbox_left), "0",
            res.outbox_left == 0),
        Row("Tickles answered OK / failed (objecthost down)",
            f"{res.tickles_ok} / {res.tickles_failed}"),
        Row("Time: storm / drain after it / total",
            f"{res.storm_s:.1f} s / {res.drain_s:.1f} s / {res.total_s:.1f} s"),
    ]


# ---- server outage -------------------------------------------------------------

@dataclass
class OutageResult:
    mode: str                     # "stop" (server really gone) or "503"
    n_tasks: int
    outage_s: float
    poll_interval_s: int
    task_s: float
    requests: dict[str, int] | None = None        # during the outage, counted by the server
    requests_after: dict[str, int] | None = None  # from its return until all arrived
    log_failures: Counter = field(default_factory=Counter)  # agent log lines in the window
    done_before: int = 0          # tasks terminal at the server when the outage began
    finished_during: int = 0      # tasks the agent finished during the outage
    peak_outbox: int = 0
    peak_db_bytes: tuple[int, int] = (0, 0)       # (db, wal) at the peak
    start_db_bytes: tuple[int, int] = (0, 0)
    start_logical_bytes: int = 0                  # page_count x page_size (WAL included)
    peak_logical_bytes: int = 0
    outbox_before: int = 0
    event_body_bytes: float = 0.0                 # average JSON body of an outbox row
    first_upload_after_s: float | None = None     # return -> first new event at the server
    drain_s: float = 0.0          # return -> every task terminal at the server
    all_terminal: bool = False
    outbox_left: int = -1
    audit: Audit | None = None


def server_outage(workdir: Path, mode: str = "503", n_tasks: int = 100,
                  outage_s: float = 10.0, lead_s: float = 1.5, task_s: float | None = None,
                  late_share: float = 0.2, poll_interval_s: int = 5,
                  drain_timeout: float = 150.0) -> OutageResult:
    """Run ``n_tasks`` tasks; ``lead_s`` after the tickle the server goes away for
    ``outage_s`` (``mode`` "stop": really stopped, "503": answers 503 to all).

    ``late_share`` of the tasks are queued in the middle of the outage (with a
    tickle, as a server would send), so they can only be pulled once it is back.
    Each task sleeps ``task_s`` (default: so that the first tasks keep the two
    task slots busy for ~80 % of the outage), then appends its id to a file.
    """
    if task_s is None:
        task_s = round(max(0.02, min(0.5, 2 * 0.8 * outage_s / (n_tasks * (1 - late_share)))), 3)
    if mode not in ("stop", "503"):
        raise ValueError(f"mode must be 'stop' or '503', not {mode!r}")
    workdir.mkdir(parents=True, exist_ok=True)
    ran = workdir / "ran.txt"
    script = f"sleep {task_s}; echo $DSAGENT_TASK_ID >> {ran}"
    result = OutageResult(mode, n_tasks, outage_s, poll_interval_s, task_s)
    chain = start_chain(workdir / "chain", poll_interval_s=poll_interval_s,
                        max_concurrent_tasks=2)
    try:
        n_late = int(n_tasks * late_share)
        ids = [chain.queue("RunScript", {"script": script}) for _ in range(n_tasks - n_late)]
        tickle(chain)
        time.sleep(lead_s)
        port = chain.server.port
        result.done_before = sum(chain.store.is_terminal(t) for t in ids)
        events_before = _server_event_count(chain)
        log_offset = chain.log_path.stat().st_size
        counts_before = chain.server.request_counts(chain.client_id)
        result.start_db_bytes = db_bytes(chain)
        conn = agent_db(chain)
        result.start_logical_bytes = _logical_bytes(conn)
        outbox_before = outbox_summary(chain.workdir / "state").waiting
        # ---- outage ----
        t_out = time.monotonic()
        if mode == "stop":
            chain.stop_server()
        else:
            chain.server.set_fault(503)
        late_at = t_out + outage_s / 2
        bodies: list[float] = []
        while (now := time.monotonic()) < t_out + outage_s:
            if n_late and now >= late_at:
                ids += [chain.queue("RunScript", {"script": script}) for _ in range(n_late)]
                n_late = 0
                tickle(chain)
            box = outbox_summary(chain.workdir / "state")
            if box.waiting >= result.peak_outbox:
                result.peak_outbox = box.waiting
                result.peak_db_bytes = db_bytes(chain)
                result.peak_logical_bytes = _logical_bytes(conn)
                bodies.append(box.body_bytes / box.waiting if box.waiting else 0.0)
            time.sleep(0.25)
        with sqlite3.connect(f"file:{chain.workdir / 'state' / 'dsagent.db'}?mode=ro",
                             uri=True) as agent:
            finished = agent.execute(
                "SELECT COUNT(*) FROM tasks WHERE terminal_event IS NOT NULL").fetchone()[0]
        if mode == "503":
            during = chain.server.request_counts(chain.client_id)
            chain.server.set_fault(None)
        else:
            chain.start_server(port=port)
            during = None
        t_back = time.monotonic()
        # ---- after ----
        result.finished_during = finished - result.done_before
        result.outbox_before = outbox_before
        if during is not None:
            result.requests = {k: during[k] - counts_before[k] for k in ("tasks", "status")}
        result.event_body_bytes = bodies[-1] if bodies else 0.0
        log_window = chain.log_path.read_bytes()[log_offset:].decode(errors="replace")
        result.log_failures = Counter(re.findall(r"(pull failed|upload failed)", log_window))
        while time.monotonic() < t_back + drain_timeout:
            if _server_event_count(chain) > events_before:
                result.first_upload_after_s = time.monotonic() - t_back
                break
            time.sleep(0.05)
        result.all_terminal = chain.wait(ids, max(1.0, t_back + drain_timeout - time.monotonic()))
        result.drain_s = time.monotonic() - t_back
        after = chain.server.request_counts(chain.client_id)
        base = during if during is not None else counts_before
        if during is not None:
            result.requests_after = {k: after[k] - base[k] for k in ("tasks", "status")}
        conn.close()
        result.outbox_left = wait_outbox_empty(chain, 35.0)
        result.audit = audit(chain, ids, ran)
    finally:
        if chain.server is not None:
            chain.server.set_fault(None)
        chain.stop()
    return result


def _logical_bytes(conn: sqlite3.Connection) -> int:
    """The database's size as its readers see it (pages in the WAL included)."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    return pages * conn.execute("PRAGMA page_size").fetchone()[0]


def _server_event_count(chain: LoopbackChain) -> int:
    with sqlite3.connect(f"file:{chain.workdir / 'server.db'}?mode=ro", uri=True) as server:
        return server.execute("SELECT COUNT(*) FROM events").fetchone()[0]


def outage_rows(res: OutageResult) -> list[Row]:
    a = res.audit or Audit()
    how = ("task server stopped (connections refused)" if res.mode == "stop"
           else "task server answering 503 to every request")
    rows = [Row(f"Outage: {how}",
                f"{res.outage_s:.0f} s, {res.n_tasks} tasks of `sleep {res.task_s}` "
                f"(poll_interval_s = "
                f"{res.poll_interval_s}; {res.done_before} done before it began)")]
    if res.requests is not None:
        total = res.requests["tasks"] + res.requests["status"]
        rows.append(Row("Requests during the outage, counted by the server",
                        f"{total}: GET tasks {res.requests['tasks']}, "
                        f"POST status {res.requests['status']} "
                        f"({total / res.outage_s:.2f}/s)"))
    rows.append(Row("Failed requests during the outage, from the agent log",
                    f"pulls {res.log_failures['pull failed']}, "
                    f"uploads {res.log_failures['upload failed']}"))
    db, wal = res.peak_db_bytes
    db0, wal0 = res.start_db_bytes
    added = res.peak_outbox - res.outbox_before
    grown = res.peak_logical_bytes - res.start_logical_bytes
    rows += [
        Row("Tasks finished by the agent during the outage", str(res.finished_during)),
        Row("Outbox peak depth during the outage",
            f"{res.peak_outbox} events (+{added}: {added / max(1, res.finished_during):.1f} "
            f"per finished task); JSON body ≈ {res.event_body_bytes:.0f} B per event"),
        Row("State DB size, logical (page_count × page_size)",
            f"{res.start_logical_bytes / 1024:.0f} → {res.peak_logical_bytes / 1024:.0f} KiB "
            f"(≈ {grown / max(1, added):.0f} B per outbox event, task rows included)"),
        Row("State DB files on disk at the peak (dsagent.db + WAL)",
            f"{db / 1024:.0f} KiB + {wal / 1024:.0f} KiB (at the start {db0 / 1024:.0f} + "
            f"{wal0 / 1024:.0f} KiB; the WAL is reused after each checkpoint, ~4 MiB at most)"),
        Row("After the server returned: first event stored / all tasks terminal",
            (f"{res.first_upload_after_s:.1f} s" if res.first_upload_after_s is not None
             else "never") + f" / {res.drain_s:.1f} s", "all arrive", res.all_terminal),
    ]
    if res.requests_after is not None:
        rows.append(Row("  ↳ requests from the return until all arrived",
                        f"GET tasks {res.requests_after['tasks']}, "
                        f"POST status {res.requests_after['status']}"))
    terminal = ", ".join(f"{n} {s}" for s, n in sorted(a.terminal.items()))
    rows += [
        Row("Tasks terminal at the server", f"{sum(a.terminal.values())} of {a.tasks} "
            f"({terminal})", "all succeeded", a.terminal.get("succeeded", 0) == a.tasks),
        Row("Events at the server / recorded by the agent; duplicates; violations",
            f"{a.events_at_server} / {a.events_recorded}; {a.duplicates}; {len(a.problems)}",
            "equal; 0; 0", a.events_at_server == a.events_recorded and not a.duplicates
            and a.ok),
        Row("Outbox rows left", str(res.outbox_left), "0", res.outbox_left == 0),
    ]
    return rows


# ---- command line --------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", nargs="?", choices=("storm", "outage", "all"), default="all")
    parser.add_argument("--quick", action="store_true",
                        help="300 tasks / 20 kills; 100 tasks / 10 s outages")
    parser.add_argument("--tasks", type=int, help="storm tasks (default 1000, quick 300)")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--outage-tasks", type=int, help="default 500, quick 100")
    parser.add_argument("--outage-s", type=float, help="default 60, quick 10")
    parser.add_argument("--seed", type=int, help="random seed of the storm (default: random)")
    parser.add_argument("--workdir", help="default: a new temp dir, removed afterwards")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, DBs)")
    args = parser.parse_args(argv)
    n_storm = args.tasks or (300 if args.quick else 1000)
    n_outage = args.outage_tasks or (100 if args.quick else 500)
    outage_s = args.outage_s or (10.0 if args.quick else 60.0)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dsagent-faults-"))
    conditions = Conditions()
    sections = []
    ok = True
    try:
        if args.suite in ("storm", "all"):
            say(f"kill storm: {n_storm} tasks, {args.kills} kills (seed {seed})")
            storm = kill_storm(workdir / "storm", n_storm, args.kills, seed=seed)
            rows = storm_rows(storm)
            ok &= all(r.met is not False for r in rows)
            sections.append(f"## Kill storm ({n_storm} tasks, {args.kills} SIGKILLs, "
                            f"seed {seed})\n\n" + table(rows))
        if args.suite in ("outage", "all"):
            for mode in ("stop", "503"):
                say(f"server outage ({mode}): {n_outage} tasks, {outage_s:.0f} s")
                res = server_outage(workdir / f"outage-{mode}", mode, n_outage, outage_s,
                                    lead_s=2.0, poll_interval_s=5 if outage_s <= 10 else 10)
                rows = outage_rows(res)
                ok &= all(r.met is not False for r in rows)
                sections.append(f"## Server outage: {mode} ({n_outage} tasks, "
                                f"{outage_s:.0f} s)\n\n" + table(rows))
    finally:
        if args.keep:
            say(f"kept {workdir}")
        elif not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    mode = ("quick" if args.quick else "full") + \
        f": storm {n_storm} tasks / {args.kills} kills; outages {n_outage} tasks / {outage_s:.0f} s"
    print("\n".join(["# dsagent fault campaign", "", *machine_lines(workdir.parent, mode),
                     conditions.line(), "", "\n\n".join(sections), ""]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
