"""Machine facts, small statistics and the Markdown table."""

from __future__ import annotations

import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import psutil


@dataclass
class Row:
    measure: str
    result: str
    goal: str = "—"
    met: bool | None = None   # None: information only

    def cells(self) -> list[str]:
        met = "—" if self.met is None else ("yes" if self.met else "**no**")
        return [self.measure, self.result, self.goal, met]


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (``pct`` in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def ms(seconds: float) -> str:
    value = seconds * 1000
    if value < 0.1:
        return f"{value * 1000:.0f} µs"
    return f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms"


def mb(nbytes: float) -> str:
    return f"{nbytes / (1024 * 1024):.1f} MB"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def filesystem_of(path: str | os.PathLike) -> str:
    """``fstype on device`` for the mount holding ``path``."""
    path = os.path.realpath(path)
    best = None
    for part in psutil.disk_partitions(all=True):
        mount = part.mountpoint
        if (path == mount or path.startswith(mount.rstrip("/") + "/")) and \
                (best is None or len(mount) > len(best.mountpoint)):
            best = part
    return f"{best.fstype} ({best.device} on {best.mountpoint})" if best else "unknown"


def cpu_stat() -> tuple[int, int]:
    """(all jiffies, steal jiffies) from /proc/stat, or (0, 0)."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return sum(fields[:8]), (fields[7] if len(fields) > 7 else 0)


class Conditions:
    """Load when the run starts and hypervisor steal time over the run (noise indicators)."""

    def __init__(self):
        self.loadavg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        self._start = cpu_stat()

    def line(self) -> str:
        total, steal = cpu_stat()
        d_total, d_steal = total - self._start[0], steal - self._start[1]
        share = f"{100 * d_steal / d_total:.1f} %" if d_total > 0 else "unknown"
        return (f"- Conditions: 1-min load average {self.loadavg:.2f} at start; "
                f"CPU steal (hypervisor) during the run {share}")


def machine_lines(workdir: str | os.PathLike, mode: str) -> list[str]:
    logical = os.cpu_count() or 0
    physical = psutil.cpu_count(logical=False) or logical
    mem = psutil.virtual_memory().total
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"- Date: {now}",
        f"- Machine: {cpu_model()}, {physical} cores / {logical} threads, "
        f"{mem / 2**30:.1f} GiB RAM; {platform.system()} {platform.release()}",
        f"- Python: {platform.python_implementation()} {platform.python_version()} "
        f"({Path(sys.executable).parent.parent.name} venv)",
        f"- State dir file system: {filesystem_of(workdir)}",
        f"- Mode: {mode}",
    ]


def table(rows: list[Row]) -> str:
    header = ["Measure", "Result", "Goal", "Met"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 4) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row.cells()) + " |")
    return "\n".join(lines)


def cpu_row(cpu_s: dict[str, float], done: int, elapsed_s: float) -> "Row":
    """The "CPU per task, by process" row of a throughput measurement."""
    total = sum(cpu_s.values())
    return Row("  ↳ CPU per task, by process",
               f"{total / done * 1000:.2f} ms in all ("
               + ", ".join(f"{name} {cpu / done * 1000:.2f}" for name, cpu in cpu_s.items())
               + f"); {total / elapsed_s:.2f} cores busy on average")


def standalone_options(parser, workdir_help: str = "where to work (default: a new temp dir)",
                       keep_help: str = "keep the work dir") -> None:
    """The options every ``python -m bench.X`` with a work dir takes (run_standalone's)."""
    parser.add_argument("--workdir", help=workdir_help)
    parser.add_argument("--keep", action="store_true", help=keep_help)
    parser.add_argument("--out", help="also write the Markdown to this file")


def run_standalone(prog: str, args, prefix: str, make_text: Callable[[Path], str],
                   stopped: str, say: Callable[[str], None],
                   check: Callable[[], None] | None = None) -> int:
    """The ``python -m bench.X`` tail the VM/namespace benches share: ``check()``
    first (a RuntimeError naming what is missing exits 2), a work dir
    (``args.workdir`` or a new temp one, removed unless kept), the section made,
    printed and written to ``args.out``; Ctrl-C/SIGTERM ends it with 130 and
    ``stopped`` (what was cleaned up)."""
    if check is not None:
        try:
            check()
        except RuntimeError as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return 2
    unwind_on_sigterm()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix=prefix))
    began = time.monotonic()
    try:
        text = make_text(workdir)
    except KeyboardInterrupt as exc:
        print(f"{prog}: interrupted ({exc or 'Ctrl-C'}); {stopped}", file=sys.stderr)
        return 130
    finally:
        if args.keep or args.workdir:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    say(f"done in {time.monotonic() - began:.0f} s")
    return 0


def _unwind(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def unwind_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so a bench's ``finally`` blocks stop what it
    started (agents, dnsmasq, QEMU, nginx, the namespaces)."""
    signal.signal(signal.SIGTERM, _unwind)


def split_section(text: str, heading: str) -> tuple[str, str]:
    """``text`` without the section under ``heading`` (to the next ``## ``), and
    that section (or "")."""
    at = 0 if text.startswith(heading + "\n") else text.find("\n" + heading + "\n")
    if at < 0:
        return text, ""
    start = at if at == 0 else at + 1
    end = text.find("\n## ", start + len(heading))
    end = len(text) if end < 0 else end + 1
    return (text[:start] + text[end:]).rstrip("\n") + "\n", text[start:end].strip()
