"""``python -m bench.logs``: what the support logs cost, printed as a table.

- the cost of one log line in a process (stderr text + JSON file, file only,
  and the rotating check), measured in a child process writing to /dev/null
  and a temp folder;
- ``dsagent logs --task`` over a log folder of N lines from several
  processes, in a child process as a support engineer runs it: time and peak
  memory;
- how soon ``LogFollower`` (``--follow`` and the remote trace) sees a line.

Nothing is asserted; figures vary with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

from agent.common.logsetup import utc_timestamp
from agent.tools.logview import LogFollower

from bench.report import Row, table

PROCESSES = ("objecthost", "cta", "worker", "ctdataloader")


def line_cost(log_dir: Path, lines: int, *, to_file: bool, to_stderr: bool) -> float:
    """Microseconds per ``log.info`` with a task and event id, in a fresh process."""
    code = textwrap.dedent(f"""
        import logging, sys, time
        from agent.common.logsetup import LogSettings, setup_logging, task_context
        setup_logging("cta", settings=LogSettings(dir={str(log_dir) if to_file else ""!r}))
        if not {to_stderr}:
            logging.getLogger().handlers[:] = logging.getLogger().handlers[1:]
        log = logging.getLogger("bench")
        with task_context("0b8e8c5e-3f7a-4f63-9d8f-2a61c1e0e4a1"):
            start = time.perf_counter()
            for i in range({lines}):
                log.info("task %s seq %d recorded", "x", i,
                         extra={{"event_id": "2c1a4b6e-1d2f-4a3b-8c9d-0e1f2a3b4c5d"}})
            print((time.perf_counter() - start) / {lines} * 1e6)
    """)
    with open(os.devnull, "w") as devnull:   # stderr, as a journal would take it
        out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE,
                             stderr=devnull, text=True, check=True, stdin=subprocess.DEVNULL)
    return float(out.stdout.strip())


def write_folder(log_dir: Path, lines: int, tasks: int) -> int:
    """A log folder like a busy agent's: ``lines`` records over four processes."""
    log_dir.mkdir(parents=True, exist_ok=True)
    files = {p: open(log_dir / f"{p}.log", "w") for p in PROCESSES}
    now = time.time() - lines / 1000
    for i in range(lines):
        process = PROCESSES[i % len(PROCESSES)]
        record = {"ts": utc_timestamp(now + i / 1000), "level": "INFO", "process": process,
                  "pid": 1000 + i % 4, "logger": "bench", "task_id": f"task-{i % tasks:06d}",
                  "event_id": f"event-{i:09d}", "msg": f"step {i} of a task " + "x" * 60}
        files[process].write(json.dumps(record) + "\n")
    for fh in files.values():
        fh.close()
    return sum(f.stat().st_size for f in log_dir.iterdir())


def logs_command(log_dir: Path, *args: str) -> tuple[float, float, int]:
    """(seconds, peak RSS MiB, lines printed) of ``dsagent logs`` in its own process."""
    code = textwrap.dedent(f"""
        import resource, sys, time
        from agent.tools.cli import main
        start = time.perf_counter()
        code = main(["logs", "--log-dir", {str(log_dir)!r}, *{list(args)!r}])
        took = time.perf_counter() - start
        print(took, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    took, rss = out.stderr.split()[-2:]
    return float(took), int(rss) / 1024, len(out.stdout.splitlines())


def follow_latency(log_dir: Path, samples: int) -> list[float]:
    """Seconds from a line's write to the follower yielding it, at the agent's poll period."""
    follower = LogFollower(log_dir)
    written: dict[str, float] = {}
    stop = threading.Event()

    def writer() -> None:
        with open(log_dir / "cta.log", "a") as fh:
            for i in range(samples):
                time.sleep(random.uniform(0.01, 0.3))
                written[f"probe {i}"] = time.perf_counter()
                fh.write(json.dumps({"ts": utc_timestamp(time.time()), "msg": f"probe {i}"}) + "\n")
                fh.flush()

    thread = threading.Thread(target=writer)
    thread.start()
    delays = []
    for record in follower.follow(stop):
        if record.get("msg", "").startswith("probe "):
            delays.append(time.perf_counter() - written[record["msg"]])
            if len(delays) == samples:
                stop.set()
    thread.join()
    follower.close()
    return delays


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.logs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=500_000, help="lines in the log folder")
    parser.add_argument("--quick", action="store_true", help="50,000 lines, fewer samples")
    args = parser.parse_args(argv)
    total = 50_000 if args.quick else args.lines
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-logs-") as tmp:
        tmp = Path(tmp)
        per_line = 20_000 if args.quick else 100_000
        both = line_cost(tmp / "a", per_line, to_file=True, to_stderr=True)
        file_only = line_cost(tmp / "b", per_line, to_file=True, to_stderr=False)
        stderr_only = line_cost(tmp / "c", per_line, to_file=False, to_stderr=True)
        rows += [("one log line: stderr (text) + file (JSON), rotation check", f"{both:.1f} µs"),
                 ("one log line: file only", f"{file_only:.1f} µs"),
                 ("one log line: stderr only", f"{stderr_only:.1f} µs")]
        size = write_folder(tmp / "logs", total, tasks=max(1, total // 20))
        took, rss, printed = logs_command(tmp / "logs", "--task", "task-000007")
        rows.append((f"`dsagent logs --task` over {total:,} lines ({size / 2**20:.0f} MiB, "
                     f"4 files)", f"{took:.2f} s, peak RSS {rss:.0f} MiB, {printed} lines"))
        took, rss, printed = logs_command(tmp / "logs", "-n", "100")
        rows.append(("`dsagent logs -n 100` over the same", f"{took:.2f} s, peak RSS {rss:.0f} MiB"))
        lat = sorted(follow_latency(tmp / "logs", 20 if args.quick else 100))
        rows.append(("`--follow` / remote trace: line written → seen (200 ms poll), p50 / max",
                     f"{lat[len(lat) // 2] * 1000:.0f} ms / {lat[-1] * 1000:.0f} ms"))
    print(table([Row(measure, result) for measure, result in rows]))
    print(f"\n(peak RSS of this bench process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
