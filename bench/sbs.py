"""``python -m bench.sbs``: UpdateSBSInfo mass roll-out on the real chain.

The seed measures ~36 s per replicated SBS file (50 predefined computers ≈
30 min). Goal here: N UpdateSBSInfo tasks queued at once on the reference
server reach the SBS folder and are stored ``succeeded`` at the server in
under 1 s end to end for N = 50, under 30 s for N = 10,000.

For each ``max_concurrent_tasks`` (2 and 4) a fresh LoopbackChain (reference
server + ``dsagent run`` on loopback) is warmed up; then, for each N, the
SBS folder is emptied, N tasks are queued with ``store.queue_task`` (untimed),
and the clock runs from just before one tickle until every task's terminal
status is stored at the server (polled every 5 ms through a separate
read-only SQLite connection, so the measuring costs the server nothing).

No PXE Interface runs (``--interface`` starts a stand-in that moves each file
to SBSStore): the files pile up in the folder, as on a PXE server whose
services are stopped. Prints a Markdown table (machine and date header as
bench/report.py makes it); ``--out FILE`` also writes it to a file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from taskserver.loopback import LoopbackChain

from bench.chain import _cpu_snapshot, at_epoch
from bench.report import Conditions, Row, cpu_row, machine_lines, table

GOALS_S = {50: 1.0, 10_000: 30.0}
PAYLOAD = ('<Computer mac="00:11:22:33:{:02x}:{:02x}" name="PC-{:05d}" '
           'action="boot-automation"/>\r\n')
TERMINAL = ("succeeded", "failed", "cancelled", "timed_out")


def say(message: str) -> None:
    print(f"[bench.sbs {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Result:
    n: int
    concurrency: int
    interface: bool
    queue_s: float = 0.0
    elapsed_s: float = 0.0
    done: int = 0
    succeeded: int = 0
    files: int = 0                  # .sbs files written (in the folder, or moved to SBSStore)
    first_received_s: float = 0.0   # event `at`s relative to the tickle
    last_received_s: float = 0.0
    last_file_s: float = 0.0        # newest file's mtime relative to the tickle
    last_terminal_s: float = 0.0
    handler_ms: float = 0.0         # mean terminal `at` - running `at`
    cpu_s: dict[str, float] = field(default_factory=dict)
    timed_out: bool = False
    failures: dict[str, int] = field(default_factory=dict)   # terminal state: message -> count

    @property
    def goal_s(self) -> float | None:
        return GOALS_S.get(self.n)


class Interface(threading.Thread):
    """A stand-in PXE Interface service: moves every .sbs file to SBSStore."""

    def __init__(self, sbs_dir: Path):
        super().__init__(daemon=True, name="pxe-interface")
        self.sbs_dir, self.store = sbs_dir, sbs_dir.parent / "SBSStore"
        self.store.mkdir(exist_ok=True)
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for entry in os.listdir(self.sbs_dir):
                if entry.endswith(".sbs"):
                    try:
                        os.rename(self.sbs_dir / entry, self.store / entry)
                    except FileNotFoundError:
                        pass
            self.halt.wait(0.01)


def tickle(chain: LoopbackChain) -> None:
    for _ in range(20):
        answer = chain.tickle()
        if answer == "OK":
            return
        if answer != "ERR busy":
            raise RuntimeError(f"tickle refused: {answer}")
        time.sleep(0.1)
    raise RuntimeError("tickle refused: busy 20 times")


def warm_up(chain: LoopbackChain, level: int) -> None:
    """Leave ``level`` live, warm workers in the CTA's pool.

    Workers the CTA prestarts die (SIGKILL) as soon as its prestart thread
    ends: agent/cta/worker.py asks for PR_SET_PDEATHSIG, which Linux sends when
    the *thread* that forked the child exits. So wait for that, then run two
    rounds of tasks: the second finds workers forked by the CTA's long-lived
    task threads.
    """
    time.sleep(1.0)
    for _ in range(2):
        warm = [chain.queue("UpdateSBSInfo", {"kind": "update", "payload": "warm-up"})
                for _ in range(2 * level)]
        tickle(chain)
        if not chain.wait(warm, 60):
            raise RuntimeError(f"warm-up tasks did not finish; see {chain.log_path}")
        time.sleep(0.3)


def empty(folder: Path) -> None:
    for entry in os.listdir(folder):
        path = folder / entry
        if path.is_file():
            path.unlink()


def count_files(*folders: Path) -> tuple[int, float]:
    """(.sbs files in ``folders``, newest mtime)."""
    count, newest = 0, 0.0
    for folder in folders:
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.endswith(".sbs"):
                    count += 1
                    newest = max(newest, entry.stat().st_mtime)
    return count, newest


def run_once(chain: LoopbackChain, sbs_dir: Path, n: int, timeout: float,
             interface: bool) -> Result:
    result = Result(n, chain.max_concurrent_tasks, interface)
    store_dir = sbs_dir.parent / "SBSStore"
    empty(sbs_dir)
    if store_dir.is_dir():
        empty(store_dir)
    reader = sqlite3.connect(f"file:{chain.store.db_path}?mode=ro", uri=True)
    try:
        (last_seq,) = reader.execute("SELECT coalesce(max(seq), 0) FROM tasks").fetchone()
        q0 = time.perf_counter()
        ids = [chain.store.queue_task(chain.client_id, "UpdateSBSInfo",
                                      {"kind": "update",
                                       "payload": PAYLOAD.format(i >> 8 & 255, i & 255, i)})
               for i in range(n)]
        result.queue_s = time.perf_counter() - q0
        before = _cpu_snapshot(chain)
        t0 = time.time()
        p0 = time.perf_counter()
        tickle(chain)
        deadline = p0 + timeout
        pending = "SELECT 1 FROM tasks WHERE client_id = ? AND terminal_state IS NULL " \
                  "AND seq > ? LIMIT 1"
        while reader.execute(pending, (chain.client_id, last_seq)).fetchone():
            if time.perf_counter() > deadline:
                result.timed_out = True
                break
            time.sleep(0.005)
        result.elapsed_s = time.perf_counter() - p0
        after = _cpu_snapshot(chain)
    finally:
        reader.close()
    result.cpu_s = {name: after[name] - before.get(name, 0.0) for name in after}
    result.files, newest = count_files(sbs_dir, store_dir)
    result.last_file_s = newest - t0 if newest else 0.0

    wanted = set(ids)
    received, terminal, handler = [], [], []
    for task in chain.store.history(chain.client_id):
        if task["task_id"] not in wanted:
            continue
        ats = {e["state"]: at_epoch(e["at"]) for e in task["events"]}
        if "received" in ats:
            received.append(ats["received"])
        end = next((ats[s] for s in TERMINAL if s in ats), None)
        if end is not None:
            terminal.append(end)
            if "running" in ats:
                handler.append(end - ats["running"])
        result.done += task["state"] in TERMINAL
        result.succeeded += task["state"] == "succeeded"
        if task["state"] != "succeeded":
            last = task["events"][-1] if task["events"] else {}
            key = f"{task['state']}: {last.get('message') or ''}"[:200]
            result.failures[key] = result.failures.get(key, 0) + 1
    if received:
        result.first_received_s = min(received) - t0
        result.last_received_s = max(received) - t0
    if terminal:
        result.last_terminal_s = max(terminal) - t0
    if handler:
        result.handler_ms = 1000 * sum(handler) / len(handler)
    return result


def rows_for(res: Result) -> list[Row]:
    goal = res.goal_s
    ok = (not res.timed_out and res.succeeded == res.n and res.files == res.n
          and (goal is None or res.elapsed_s < goal))
    status = f"{res.succeeded}/{res.n} succeeded, {res.files} files"
    if res.timed_out:
        status += ", **timed out**"
    rate = res.n / res.elapsed_s if res.elapsed_s else 0.0
    where = "moved to SBSStore by a stand-in Interface" if res.interface else "left in the folder"
    rows = [Row(f"{res.n} UpdateSBSInfo tasks, one tickle, max_concurrent_tasks="
                f"{res.concurrency} (files {where})",
                f"{res.elapsed_s:.2f} s ({rate:.0f} tasks/s; {status})",
                f"< {goal:g} s" if goal else "—", ok if goal else None),
            Row("  ↳ timeline after the tickle",
                f"first `received` +{res.first_received_s:.3f} s, last `received` "
                f"+{res.last_received_s:.3f} s, last file written +{res.last_file_s:.3f} s, "
                f"last terminal `at` +{res.last_terminal_s:.3f} s, all stored at server "
                f"+{res.elapsed_s:.3f} s (queueing {res.queue_s:.2f} s, untimed)"),
            Row("  ↳ `running` → terminal `at`, mean (handler + worker round trip + fsyncs)",
                f"{res.handler_ms:.2f} ms")]
    for message, count in sorted(res.failures.items()):
        rows.append(Row("  ↳ **not succeeded**", f"{count} × {message}"))
    if res.cpu_s and res.done:
        rows.append(cpu_row(res.cpu_s, res.done, res.elapsed_s))
    return rows


NOTES = """\
Notes: the clock starts just before the tickle and stops when the 5 ms poll of
the server's database finds no task of the batch without a terminal status.
Timeline entries are the events' `at` (RFC 3339, milliseconds, truncated) and
the newest file's mtime. "CPU per task" is user+system time of each process
over that window ("workers" are the CTA's handler processes; "task server +
bench" is this process). Every task writes one file with one fsync of the file
and one of the folder; the agent's outbox fsyncs (group-committed) too.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sbs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, action="append",
                        help="batch size (repeatable; default 50 and 10000)")
    parser.add_argument("--concurrency", type=int, action="append",
                        help="max_concurrent_tasks (repeatable; default 2 and 4)")
    parser.add_argument("--interface", action="store_true",
                        help="run a stand-in PXE Interface that moves files to SBSStore")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="give up on a batch after this many seconds (default 300)")
    parser.add_argument("--workdir", help="where to put the chains (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, DBs)")
    parser.add_argument("--out", help="also write the Markdown to this file")
    args = parser.parse_args(argv)
    sizes = args.n or [50, 10_000]
    levels = args.concurrency or [2, 4]

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dsagent-bench-sbs-"))
    workdir.mkdir(parents=True, exist_ok=True)
    conditions = Conditions()
    mode = (f"batches of {', '.join(map(str, sizes))} UpdateSBSInfo tasks at "
            f"max_concurrent_tasks {', '.join(map(str, levels))}"
            + ("; stand-in PXE Interface running" if args.interface else "; no PXE Interface"))
    header = machine_lines(workdir, mode)
    results: list[Result] = []
    try:
        for level in levels:
            sbs_dir = workdir / f"pxe{level}" / "SBS"
            sbs_dir.mkdir(parents=True, exist_ok=True)
            say(f"starting the chain (max_concurrent_tasks={level})")
            chain = LoopbackChain(workdir / f"chain{level}", max_concurrent_tasks=level,
                                  handlers={"sbs_dir": str(sbs_dir)})
            interface = Interface(sbs_dir) if args.interface else None
            try:
                chain.start()
                if interface:
                    interface.start()
                warm_up(chain, level)
                for n in sizes:
                    say(f"{n} tasks, max_concurrent_tasks={level}")
                    res = run_once(chain, sbs_dir, n, args.timeout, bool(interface))
                    say(f"  {res.elapsed_s:.2f} s, {res.succeeded}/{n} succeeded, "
                        f"{res.files} files")
                    results.append(res)
                    time.sleep(0.5)
            finally:
                if interface:
                    interface.halt.set()
                    interface.join()
                chain.stop()
    finally:
        if args.keep or args.workdir:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    rows: list[Row] = []
    for res in results:
        rows += rows_for(res)
    text = "\n".join(["# UpdateSBSInfo mass roll-out bench", "", *header,
                      conditions.line(), "", table(rows), "", NOTES])
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0 if all(not r.timed_out for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
