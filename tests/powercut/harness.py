"""Power-cut campaign: run the workload under the iolog shim, rebuild crash
states (crashsim.py), and check each one with the agent's own code.

Used by tests/test_powercut.py (CI size, asserts) and bench/powercut.py
(bigger, prints a table).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from agent.common.events import TERMINAL
from agent.cta.taskdb import AgentDB, open_db
from ctdataloader.outbox import Outbox

from tests.powercut.crashsim import HOW, MARK, Disk, Op, read_log

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DB = "dsagent.db"


class ToolMissing(RuntimeError):
    """No C compiler: the power-cut test cannot run (and must not pass)."""


def build_shim(workdir: Path) -> Path:
    """Compile iolog.c into workdir (with ``cc``, as installed by ensure-system-tools.sh)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise ToolMissing("no C compiler (cc) to build the iolog shim: "
                          "run packaging/ensure-system-tools.sh (installs gcc)")
    out = workdir / "iolog.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-Wall", "-o", str(out),
                    str(HERE / "iolog.c"), "-ldl"], check=True, capture_output=True, text=True)
    return out


@dataclass
class Run:
    """One workload run: the start snapshot, the log, and what was acked before it."""

    start: dict[str, tuple[int, bytes]]
    ops: list[Op]
    before: list[dict]                # acks of the prefill run (durable at the start)
    piped: list[dict]                 # acks the parent read from the pipe
    killed: bool                      # ended by the shim's SIGKILL (not at "done")
    on_disk: dict[str, bytes]         # the real files afterwards, -shm left out


def _child(state: Path, seed: int, steps: int, options: list[str],
           env_extra: dict[str, str]) -> tuple[list[dict], int]:
    """Run the workload; return its acks (read from the pipe) and its exit status."""
    read_end, write_end = os.pipe()
    env = {**os.environ, **env_extra, "PYTHONPATH": str(ROOT)}
    if "IOLOG_DIR" in env_extra:
        env["IOLOG_MARK_FD"] = str(write_end)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.powercut.workload", str(state / DB), str(write_end),
         str(seed), str(steps), *options],
        pass_fds=(write_end,), env=env, cwd=ROOT, stderr=subprocess.PIPE)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        lines = pipe.read().decode().splitlines()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    status = proc.wait()
    if status not in (0, -9):
        raise RuntimeError(f"workload failed with status {status}:\n{err}")
    return [json.loads(line) for line in lines], status


def _files(state: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_ino, p.read_bytes())
            for p in sorted(state.iterdir()) if not p.name.endswith("-shm")}


def run_workload(shim: Path, workdir: Path, seed: int, *, steps: int, prefill: int = 0,
                 kill_after: int | None = None, cta_sync: str = "FULL",
                 autocheckpoint: int | None = None, drop_sync: bool = False) -> Run:
    """A prefill run without the shim (its files are the start snapshot), then the
    logged run, killed by the shim after ``kill_after`` file operations."""
    state = workdir / "state"
    state.mkdir(parents=True)
    options = ["--cta-sync", cta_sync] + (["--autocheckpoint", str(autocheckpoint)]
                                          if autocheckpoint else [])
    before = _child(state, seed + 1, prefill, options, {})[0] if prefill else []
    (state / f"{DB}-shm").unlink(missing_ok=True)   # as after a reboot
    start = _files(state)
    log = workdir / "io.log"
    env = {"LD_PRELOAD": str(shim), "IOLOG_DIR": str(state), "IOLOG_FILE": str(log)}
    if kill_after:
        env["IOLOG_KILL_AFTER"] = str(kill_after)
    if drop_sync:
        env["IOLOG_DROP_SYNC"] = "1"
    piped, status = _child(state, seed, steps, options, env)
    return Run(start, read_log(log), before, piped, status == -9,
               {name: data for name, (_, data) in _files(state).items()})


@dataclass
class Facts:
    """What the workload was told, up to a point of the log."""

    last: dict[str, str] = field(default_factory=dict)      # event_id -> rec | del? | del
    events: dict[str, tuple[str, int, str]] = field(default_factory=dict)  # -> task, seq, state
    acked_seq: dict[str, int] = field(default_factory=dict)  # task -> highest acked seq
    delete_tried: set[str] = field(default_factory=set)      # event_ids ever in a del?

    def add(self, ack: dict) -> None:
        if ack["k"] in ("rec", "del?"):
            for event_id, task_id, seq, state in ack["e"]:
                self.events[event_id] = (task_id, seq, state)
                self.last[event_id] = ack["k"]
                if ack["k"] == "rec":
                    self.acked_seq[task_id] = max(self.acked_seq.get(task_id, 0), seq)
                else:
                    self.delete_tried.add(event_id)
        elif ack["k"] == "del":
            self.last.update(dict.fromkeys(ack["ids"], "del"))

    def by_task_seq(self) -> dict[tuple[str, int], tuple[str, str]]:
        return {(t, s): (eid, state) for eid, (t, s, state) in self.events.items()}


@dataclass
class Verdict:
    integrity: str = "ok"
    lost: list[str] = field(default_factory=list)          # acknowledged facts missing
    inconsistent: list[str] = field(default_factory=list)  # task state vs events, seq gaps
    resent: int = 0                                        # deleted-acked events back in the outbox
    continued: str = "ok"                                  # the agent's next commit on it

    @property
    def ok(self) -> bool:
        return (self.integrity == "ok" and self.continued == "ok"
                and not self.lost and not self.inconsistent)


def check_state(files: dict[str, bytes], facts: Facts, where: Path) -> Verdict:
    """Open one crash state as the agent would, and check every acknowledged fact."""
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    for name, data in files.items():
        (where / name).write_bytes(data)
    verdict = Verdict()
    try:
        conn = open_db(where / DB)
        try:
            verdict.integrity = "; ".join(r[0] for r in conn.execute("PRAGMA integrity_check"))
            tasks = conn.execute("SELECT task_id, state, next_seq, terminal_event FROM tasks").fetchall()
        finally:
            conn.close()
        if verdict.integrity != "ok":
            return verdict
        box = Outbox(where / DB)
        try:
            outbox = box.batch(limit=1 << 30)
        finally:
            box.close()
    except sqlite3.DatabaseError as exc:
        verdict.integrity = f"cannot open: {exc}"
        return verdict
    _check_facts(verdict, facts, {event["event_id"]: event for event in outbox},
                 {t: (state, next_seq, term) for t, state, next_seq, term in tasks})
    verdict.continued = _carry_on(where / DB)
    return verdict


def _check_facts(v: Verdict, facts: Facts, outbox: dict[str, dict],
                 tasks: dict[str, tuple[str, int, str | None]]) -> None:
    for event_id, last in facts.last.items():
        present = event_id in outbox
        if last == "rec" and not present:
            task_id, seq, state = facts.events[event_id]
            v.lost.append(f"event {task_id} #{seq} {state} ({event_id})")
        v.resent += last == "del" and present
    for task_id, seq in facts.acked_seq.items():
        row = tasks.get(task_id)
        if row is None or row[1] - 1 < seq:
            v.lost.append(f"task {task_id}: state row at seq {row[1] - 1 if row else None}, "
                          f"acknowledged up to {seq}")
    known = facts.by_task_seq()
    in_outbox: dict[str, Counter] = {}
    for event_id, body in outbox.items():
        task_id, seq = body["task_id"], body["seq"]
        in_outbox.setdefault(task_id, Counter())[seq] += 1
        k = known.get((task_id, seq))
        if k is not None and k != (event_id, body["state"]):
            v.inconsistent.append(f"{task_id} #{seq}: outbox has {event_id} {body['state']}, "
                                  f"the agent recorded {k}")
        if task_id not in tasks:
            v.inconsistent.append(f"event {event_id} of {task_id}, which has no task row")
    for task_id, (state, next_seq, terminal) in tasks.items():
        n, seqs = next_seq - 1, in_outbox.get(task_id, Counter())
        if any(count > 1 for count in seqs.values()) or any(s > n for s in seqs):
            v.inconsistent.append(f"{task_id}: outbox seqs {sorted(seqs.elements())}, task at {n}")
        for s in range(1, n + 1):
            gone = known.get((task_id, s))
            if s not in seqs and (gone is None or gone[0] not in facts.delete_tried):
                v.inconsistent.append(f"{task_id}: seq {s} of 1..{n} neither in the outbox "
                                      "nor deleted by the loader")
        last = next((b["state"] for b in outbox.values()
                     if b["task_id"] == task_id and b["seq"] == n), None)
        last = last or (known.get((task_id, n)) or (None, None))[1]
        if last is not None and last != state:
            v.inconsistent.append(f"{task_id}: task row says {state}, its event #{n} says {last}")
        if (terminal is not None) != (state in TERMINAL) or (
                terminal is not None and json.loads(terminal)["seq"] != n):
            v.inconsistent.append(f"{task_id}: state {state} but terminal_event {terminal!r:.60}")


def _carry_on(path: Path) -> str:
    """Restart on the recovered DB as the CTA does (fail what was running, run what
    was received, take a new task) and upload once: each commit must work."""
    db = AgentDB(path)
    try:
        before = dict(db._conn.execute("SELECT task_id, next_seq FROM tasks").fetchall())
        for task_id, state, _ in db.unfinished():
            event = db.record(task_id, "running" if state == "received" else "failed",
                              message="interrupted")
            if event["seq"] != before[task_id]:
                return f"{task_id}: next event got seq {event['seq']}, expected {before[task_id]}"
        if db.record("after-the-cut", "received", type_name="RunScript")["seq"] != 1:
            return "a new task did not start at seq 1"
        outbox = Outbox(path)
        try:
            batch = outbox.batch()
            outbox.delete([e["event_id"] for e in batch[:10]])
        finally:
            outbox.close()
        check = db._conn.execute("PRAGMA integrity_check").fetchone()[0]
        return "ok" if check == "ok" else f"integrity after more work: {check}"
    except sqlite3.Error as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        db.close()


@dataclass
class Tally:
    """Totals over the crash states of one or more runs."""

    runs: int = 0
    killed: int = 0          # runs the shim SIGKILLed (the others ended after their last step)
    states: int = 0
    ops: int = 0
    lost: int = 0            # states missing an acknowledged fact
    corrupt: int = 0         # integrity_check not ok / cannot open
    inconsistent: int = 0    # task state vs events, seq gaps
    stuck: int = 0           # the agent could not carry on
    resent: int = 0          # states with a deleted event back (re-sent, de-duplicated by event_id)
    examples: list[str] = field(default_factory=list)

    def add(self, v: Verdict, label: str) -> None:
        self.states += 1
        self.lost += bool(v.lost)
        self.corrupt += v.integrity != "ok"
        self.inconsistent += bool(v.inconsistent)
        self.stuck += v.continued != "ok"
        self.resent += v.resent > 0
        if not v.ok and len(self.examples) < 5:
            detail = (v.lost + v.inconsistent)[:2] or [v.integrity, v.continued]
            self.examples.append(f"{label}: {'; '.join(map(str, detail))}")


def verify_log(run: Run) -> None:
    """The log holds every write: replaying all of it gives the files on disk.
    Also: every ack the parent read is in the log, in order."""
    disk = Disk(run.start)
    for op in run.ops:
        disk.apply(op)
    live = disk.live_files()
    if live != run.on_disk:
        differ = sorted(n for n in set(live) | set(run.on_disk) if live.get(n) != run.on_disk.get(n))
        raise AssertionError(f"replaying the log does not give the files on disk: {differ}")
    marks = [json.loads(op.data) for op in run.ops if op.kind == MARK]
    if marks[:len(run.piped)] != run.piped or len(marks) > len(run.piped) + 1:
        raise AssertionError("the acks read from the pipe are not the ones logged")


def check_run(run: Run, tally: Tally, rng: random.Random, points: int, workdir: Path,
              label: str) -> None:
    """Crash states at ``points`` random places of the log (and its end), each in
    every way of HOW plus one more random subset."""
    verify_log(run)
    n = len(run.ops)
    where = sorted(set(rng.sample(range(n), min(points - 1, n))) | {n})
    disk = Disk(run.start)
    facts = Facts()
    for ack in run.before:
        facts.add(ack)
    done = 0
    for p in where:
        for op in run.ops[done:p]:
            disk.apply(op)
            if op.kind == MARK:
                facts.add(json.loads(op.data))
        done = p
        for how in HOW + ("subset",):
            verdict = check_state(disk.crash(rng, how), facts, workdir / "crash")
            tally.add(verdict, f"{label} op {p}/{n} {how}")
    tally.ops += n
    tally.runs += 1
    tally.killed += run.killed


def campaign(runs: list[dict], points: int, seed: int, workdir: Path | None = None) -> Tally:
    """Run each workload (keyword arguments of run_workload) and check its crash
    states. Unless given, the kill comes after a random number of file operations
    (a step logs about 14)."""
    tally = Tally()
    rng = random.Random(seed)
    runs = [{"kill_after": rng.randint(4 * spec["steps"], 13 * spec["steps"]), **spec}
            for spec in runs]
    with tempfile.TemporaryDirectory(prefix="powercut-", dir=workdir) as tmp:
        base = Path(tmp)
        shim = build_shim(base)
        for i, spec in enumerate(runs):
            run_dir = base / f"run{i}"
            run = run_workload(shim, run_dir, seed + 1000 * i, **spec)
            check_run(run, tally, rng, points, run_dir, f"run {i} (seed {seed + 1000 * i})")
            shutil.rmtree(run_dir)
    return tally
