"""Power-cut campaign, bigger than tests/test_powercut.py
(``python -m bench.powercut [--quick] [--runs N] [--points P] [--seed S]``).

The agent's state-DB writes run under the iolog shim; crash states keep only
what was fsync'd plus any subset of the rest, torn at 512-byte sectors
(tests/powercut/crashsim.py); each state is opened with agent.cta.taskdb and
checked against what the workload was acknowledged. One row per synchronous
setting of the CTA's connection: FULL as shipped, NORMAL and OFF (OFF also on
the ctdataloader's, which ships NORMAL), and FULL with every fsync dropped by
the shim. Prints a Markdown table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from tests.powercut import harness

from bench.report import machine_lines

SETTINGS = (("FULL (as shipped)", {}),
            ("NORMAL", {"cta_sync": "NORMAL"}),
            ("OFF", {"cta_sync": "OFF"}),
            ("FULL, fsyncs dropped by the shim", {"drop_sync": True}))

# the kinds of run, in turn: new state dir; existing DB with a checkpoint and WAL
# restart every few commits; a long run past SQLite's 1000-page checkpoint
SHAPES = ({"steps": 400}, {"steps": 400, "prefill": 200, "autocheckpoint": 30}, {"steps": 1500})


def say(message: str) -> None:
    print(f"[powercut {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.powercut", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 runs of 20 crash points per setting")
    parser.add_argument("--runs", type=int, help="workload runs per setting (default 9)")
    parser.add_argument("--points", type=int, help="crash points per run, 5 states each (default 60)")
    parser.add_argument("--seed", type=int, help="default: random")
    args = parser.parse_args(argv)
    n_runs = args.runs or (3 if args.quick else 9)
    points = args.points or (20 if args.quick else 60)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    runs = [SHAPES[i % len(SHAPES)] for i in range(n_runs)]
    began = time.monotonic()
    rows = []
    with tempfile.TemporaryDirectory(prefix="dsagent-powercut-") as tmp:
        for label, setting in SETTINGS:
            say(f"{label}: {n_runs} runs x {points} crash points (seed {seed})")
            tally = harness.campaign([{**shape, **setting} for shape in runs], points, seed, Path(tmp))
            rows.append((label, tally))
        lines = machine_lines(tmp, f"{n_runs} runs x {points} crash points per setting, seed {seed}")
    header = ("CTA synchronous", "runs (killed)", "ops logged", "crash states checked",
              "states with lost events", "corrupt", "inconsistent", "could not carry on",
              "states with deleted events to re-send")
    out = ["# Power cut", "", *lines, f"- SQLite: {sqlite3.sqlite_version}", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, t in rows:
        out.append(f"| {label} | {t.runs} ({t.killed}) | {t.ops:,} | {t.states:,} | {t.lost:,} | "
                   f"{t.corrupt:,} | {t.inconsistent:,} | {t.stuck:,} | {t.resent:,} |")
    for label, t in rows:
        out += [f"- e.g. {label}: {e}" for e in t.examples[:1]]
    print("\n".join(out))
    say(f"done in {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
