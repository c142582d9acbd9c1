"""``python -m bench.replication``: issue #15's replication table.

"A 1 GiB image replicated on loopback vs ``curl`` of the same files (goal ≥
0.9×); re-replication after one changed file moves only that file's bytes."
One section, ``## Replication`` in bench/results.md.

**The source of truth** is a folder served by **nginx** on 127.0.0.1 (the
``Nginx`` of bench/deployment.py: ``sendfile on``, a read-only ``alias``),
holding two packages of random (incompressible) bytes, each with its
``manifest.json`` (``{"id", "files": [{"path", "sha256", "size"}]}``):

- ``golden`` (``kind=image``), shaped like an image: ``current`` (the version's
  name), ``<version>/data.zst`` (nearly all the bytes), ``<version>/index.bin``
  (1 MiB) and ``<version>/meta.json``; 1 GiB in all (``--quick``: 128 MiB);
- ``drivers-x64`` (``kind=driver``): 400 files of 4 KiB-1 MiB in 40 folders,
  64 MiB (``--quick``: 100 files, 16 MiB): the cost of a file, not of a byte.

**Measured**, per package, ``runs`` rounds (default 3, ``--quick`` 1; curl and
the handler in a rotated order each round, after one untimed warm-up of each),
the median reported:

1. ``curl -sS --fail -o F1 URL1 -o F2 URL2 …``: one process, one keep-alive
   connection, every file of the package and its manifest; wall time.
2. ReplicatePackage into an empty store through the real dispatch
   (``dsagent run-task`` in a child process, run by
   ``agent.plugin.testing.DsagentRunner``: a worker process, the validation
   hook, the handler): manifest checked, every file fetched, fsync'd and
   verified against its sha256, the version switched in by a symlink
   rename. Its time is the task's ``running`` → ``succeeded`` event ``at``s
   (the handler's work, without the Python start of ``dsagent run-task``,
   which is shown too); the ratio is curl's time ÷ it (≥ 0.9: goal met; the
   goal is the image's, the driver package's ratio is information).
   Peak RSS is the worker process's (``VmHWM``, polled).
3. One file changed at the source (``index.bin``, or a driver file: new random
   bytes of the same size) and the manifest rewritten; ReplicatePackage again:
   its time and ``bytes_fetched``, which must equal that file's size.
4. Nothing changed: ReplicatePackage again (``unchanged: true``), its time.

Then one more replication of each package into an empty store, in this
process under cProfile (``replicate()`` with a real ``TaskContext`` whose
progress goes nowhere; once without cProfile first), splits its time by where
it goes: by phase (manifest checks, download, request round trips, waiting for
the sha256 thread, the switch) and by operation (socket reads, writes, fsync, sha256,
Python). ``--profile`` also prints cProfile's top functions.

Page cache: the source's files are written by the bench, so nginx serves
them from the page cache; curl's folder and the store are on tmpfs
(``/dev/shm``, or ``--dest``), so neither side waits on a disk: this compares
the network path and the handler's own work. The tmpfs folder is removed at
the end, also with ``--keep``.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import logging
import os
import pstats
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psutil

from bench import imaging as imaging_bench
from bench.deployment import NGINX, NGINX_PACKAGE, Nginx
from bench.report import (Conditions, Row, filesystem_of, machine_lines, mb, run_standalone,
                          standalone_options, table)

HEADING = "## Replication"
MiB = 1 << 20
SEED = 20261215
RATIO_GOAL = 0.9                     # curl's time ÷ the handler's
VERSION = "20261215T0900Z"
IMAGE, DRIVERS = "golden", "drivers-x64"
SIZES = {False: {"image": 1024 * MiB, "drivers": 64 * MiB, "driver_files": 400},
         True: {"image": 128 * MiB, "drivers": 16 * MiB, "driver_files": 100}}
INDEX_BYTES = 1 * MiB
BLOCK = 16 * MiB
WAIT_S = 600.0


class Unavailable(RuntimeError):
    """This machine cannot run the bench (the message says what to install)."""


def say(message: str) -> None:
    print(f"[bench.replication {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr,
          flush=True)


def check() -> None:
    """Unavailable unless nginx, curl and the test extra (DsagentRunner) are here."""
    if not os.access(NGINX, os.X_OK):
        raise Unavailable(f"the replication bench needs nginx ({NGINX} is missing): install the "
                          f"Debian package {NGINX_PACKAGE} (apt-get install {NGINX_PACKAGE}; "
                          "`make setup` does it as root)")
    if shutil.which("curl") is None:
        raise Unavailable("the replication bench needs curl: install the Debian package curl")
    try:
        import agent.plugin.testing  # noqa: F401  (needs pytest: the test extra)
    except ImportError as exc:
        raise Unavailable(f"the replication bench runs tasks with agent.plugin.testing, which "
                          f"needs the test extra ({exc}): pip install -e '.[test]'") from None


# ---- the source of truth --------------------------------------------------------------

@dataclass
class Package:
    name: str
    kind: str                                   # "image" or "driver"
    root: Path                                  # its folder at the source
    files: dict[str, tuple[str, int]] = field(default_factory=dict)   # path -> (sha256, size)
    changeable: str = ""                        # the file step 3 changes

    @property
    def total(self) -> int:
        return sum(size for _, size in self.files.values())

    def write(self, path: str, data: bytes) -> None:
        target = self.root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        self.files[path] = (hashlib.sha256(data).hexdigest(), len(data))

    def write_random(self, path: str, size: int, rng: random.Random) -> None:
        """``size`` random bytes, written and hashed a block at a time."""
        target = self.root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with open(target, "wb") as fh:
            for at in range(0, size, BLOCK):
                block = rng.randbytes(min(BLOCK, size - at))
                digest.update(block)
                fh.write(block)
        self.files[path] = (digest.hexdigest(), size)

    def write_manifest(self) -> None:
        manifest = {"id": self.name, "files": [
            {"path": path, "sha256": sha, "size": size}
            for path, (sha, size) in sorted(self.files.items())]}
        (self.root / "manifest.json").write_text(json.dumps(manifest, indent=1))

    def change_one(self, rng: random.Random) -> int:
        """New random bytes (same size) for ``changeable``, the manifest rewritten;
        the file's size."""
        size = self.files[self.changeable][1]
        self.write(self.changeable, rng.randbytes(size))
        self.write_manifest()
        return size

    def urls(self, base: str) -> list[tuple[str, str]]:
        """(path, URL) of every file and of the manifest."""
        from handlers.replication.fetch import file_url
        return [(path, file_url(f"{base}{self.name}/", path))
                for path in [*sorted(self.files), "manifest.json"]]


def build_image(root: Path, nbytes: int, rng: random.Random) -> Package:
    """An image's shape: ``current``, ``<v>/data.zst``, ``<v>/index.bin``, ``<v>/meta.json``."""
    pkg = Package(IMAGE, "image", root / IMAGE, changeable=f"{VERSION}/index.bin")
    pkg.write("current", f"{VERSION}\n".encode())
    meta = json.dumps({"version": VERSION, "source": "disk0", "frames": "zstd",
                       "created": "2026-12-15T09:00:00Z", "tool": "dsagent bench"}).encode()
    pkg.write(f"{VERSION}/meta.json", meta)
    pkg.write_random(f"{VERSION}/index.bin", INDEX_BYTES, rng)
    pkg.write_random(f"{VERSION}/data.zst", nbytes - pkg.total, rng)
    pkg.write_manifest()
    return pkg


def build_drivers(root: Path, nbytes: int, count: int, rng: random.Random) -> Package:
    """``count`` files of 4 KiB-1 MiB (log-uniform, scaled to ``nbytes``) in 40 folders."""
    pkg = Package(DRIVERS, "driver", root / DRIVERS)
    raw = [2 ** rng.uniform(12, 20) for _ in range(count)]
    scale = nbytes / sum(raw)
    sizes = [max(1, int(s * scale)) for s in raw]
    sizes[-1] += nbytes - sum(sizes)
    vendors = ("intel", "realtek", "broadcom", "amd", "nvidia", "marvell", "qualcomm", "mellanox")
    classes = ("net", "storage", "display", "chipset", "audio")
    for n, size in enumerate(sizes):
        folder = f"{classes[n % 5]}/{vendors[n // 5 % 8]}"
        ext = (".sys", ".inf", ".cat", ".dll")[n % 4]
        pkg.write(f"{folder}/drv{n:04d}{ext}", rng.randbytes(size))
    # the changed file: the one nearest 1 MiB
    pkg.changeable = min(pkg.files, key=lambda p: abs(pkg.files[p][1] - MiB))
    pkg.write_manifest()
    return pkg


# ---- measuring --------------------------------------------------------------------------

def _hwm(pid: int) -> int:
    """VmHWM (peak RSS) of ``pid`` in bytes, 0 if gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


class PeakRSS:
    """The peak RSS (VmHWM) of the first descendant of this process whose command
    line holds ``match``, polled every ``interval`` s while the ``with`` block runs
    (the process table is scanned only until it is found)."""

    def __init__(self, match: str, interval: float = 0.05):
        self.match, self.interval = match, interval
        self.pid: int | None = None
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _find(self) -> int | None:
        for child in psutil.Process().children(recursive=True):
            try:
                if self.match in " ".join(child.cmdline()):
                    return child.pid
            except psutil.Error:
                continue
        return None

    def _poll(self) -> None:
        while True:
            if self.pid is None:
                self.pid = self._find()
            if self.pid is not None:
                self.peak = max(self.peak, _hwm(self.pid))
            if self._stop.wait(self.interval):
                return


@dataclass
class CurlRun:
    seconds: float
    peak_rss: int
    cpu_s: float


def run_curl(pkg: Package, base: str, out: Path) -> CurlRun:
    """One curl process fetching every file of ``pkg`` and its manifest into ``out``
    (timed by bench/imaging.py's ``timed``: GNU time gives its own peak RSS and CPU)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    args = ["curl", "-sS", "--fail"]
    for n, (_, url) in enumerate(pkg.urls(base)):
        args += ["-o", str(out / f"{n:05d}"), url]
    run = imaging_bench.timed([("curl", args)], errdir=out.parent)
    got = sum(p.stat().st_size for p in out.iterdir())
    want = pkg.total + (pkg.root / "manifest.json").stat().st_size
    if got != want:
        raise RuntimeError(f"curl fetched {got} bytes of {pkg.name}, not {want}")
    shutil.rmtree(out)
    return CurlRun(run.wall_s, run.procs[0].maxrss, run.procs[0].cpu_s)


@dataclass
class TaskRun:
    wall_s: float             # the whole `dsagent run-task` process
    task_s: float             # `running` at -> `succeeded` at
    details: dict
    peak_rss: int             # the worker's


def _at(event: dict) -> float:
    return datetime.fromisoformat(event["at"]).timestamp()


class Replicator:
    """ReplicatePackage through ``dsagent run-task`` (agent.plugin.testing.DsagentRunner)."""

    def __init__(self, workdir: Path, stores: dict[str, Path]):
        from agent.plugin.testing import DsagentRunner
        workdir.mkdir(parents=True, exist_ok=True)
        self.runner = DsagentRunner(workdir)
        self.stores = stores
        self.handlers = {"image_store": str(stores["image"]),
                         "package_store": str(stores["driver"])}

    def run(self, pkg: Package, base: str) -> TaskRun:
        params = {"package": pkg.name, "kind": pkg.kind, "source": f"{base}{pkg.name}/"}
        with PeakRSS("agent.cta.worker") as rss:      # the worker running the handler
            t0 = time.perf_counter()
            run = self.runner("ReplicatePackage", params, handlers=self.handlers, wait_s=WAIT_S)
            wall = time.perf_counter() - t0
        if run.state != "succeeded":
            raise RuntimeError(f"ReplicatePackage of {pkg.name} {run.state}: {run.message}\n"
                               f"{run.log[-3000:]}")
        running = next(e for e in run.events if e["state"] == "running")
        return TaskRun(wall, _at(run.final) - _at(running), run.details, rss.peak)

    def empty(self, pkg: Package) -> None:
        """Remove the package from its store (the next run starts from nothing)."""
        store = self.stores[pkg.kind]
        link = store / pkg.name
        if link.is_symlink():
            link.unlink()
        shutil.rmtree(store / ".replicas" / pkg.name, ignore_errors=True)


@dataclass
class PackageResult:
    pkg: Package
    curl: list[CurlRun] = field(default_factory=list)
    full: list[TaskRun] = field(default_factory=list)
    changed: list[TaskRun] = field(default_factory=list)
    changed_bytes: list[int] = field(default_factory=list)    # the changed file's size
    unchanged: list[TaskRun] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def measure_package(pkg: Package, base: str, rep: Replicator, curl_dir: Path, runs: int,
                    rng: random.Random) -> PackageResult:
    res = PackageResult(pkg)
    say(f"{pkg.name}: warm-up (one untimed curl and replication)")
    run_curl(pkg, base, curl_dir)
    rep.empty(pkg)
    rep.run(pkg, base)
    for r in range(runs):
        for what in (("curl", "handler") if r % 2 == 0 else ("handler", "curl")):
            if what == "curl":
                res.curl.append(run_curl(pkg, base, curl_dir))
            else:
                rep.empty(pkg)
                run = rep.run(pkg, base)
                got = run.details.get("bytes_fetched")
                if got != pkg.total:
                    res.problems.append(f"full replication fetched {got} bytes, not {pkg.total}")
                res.full.append(run)
        say(f"{pkg.name} round {r + 1}/{runs}: curl {res.curl[-1].seconds:.3f} s, handler "
            f"{res.full[-1].task_s:.3f} s (run-task {res.full[-1].wall_s:.2f} s)")
    for r in range(runs):
        size = pkg.change_one(rng)
        run = rep.run(pkg, base)
        res.changed.append(run)
        res.changed_bytes.append(size)
        if run.details.get("bytes_fetched") != size or \
                run.details.get("files_fetched") != [pkg.changeable]:
            res.problems.append(f"one changed file ({size} bytes): fetched "
                                f"{run.details.get('files_fetched')}, "
                                f"{run.details.get('bytes_fetched')} bytes")
        same = rep.run(pkg, base)
        res.unchanged.append(same)
        if same.details.get("unchanged") is not True:
            res.problems.append(f"nothing changed, yet the details say {same.details}")
        say(f"{pkg.name} re-replication {r + 1}/{runs}: one file changed {run.task_s:.3f} s "
            f"({run.details.get('bytes_fetched')} bytes fetched), unchanged {same.task_s:.3f} s")
    return res


# ---- where the time goes ------------------------------------------------------------------

# (label, pstats function names whose own time counts), in the order shown
BUCKETS = (
    ("socket reads", ("<method 'recv' of '_socket.socket' objects>",
                      "<method 'recv_into' of '_socket.socket' objects>",
                      "<method 'readinto' of '_io.BufferedReader' objects>")),
    ("file writes", ("<method 'write' of '_io.BufferedWriter' objects>",)),
    ("fsync", ("<built-in method posix.fsync>",)),
    ("sha256 (hashlib update)", ("<method 'update' of '_hashlib.HASH' objects>",)),
    ("file reads (for sha256)", ("<method 'read' of '_io.BufferedReader' objects>",)),
)
# (label, the function's file ends with, its name): cumulative time
PHASES = (("manifest checks (`parse_manifest`)", "replication/manifest.py", "parse_manifest"),
          ("download (`fetch._download`)", "replication/fetch.py", "_download"),
          ("of which request sent + headers read (`Fetcher._request`)", "replication/fetch.py",
           "_request"),
          ("of which waiting for the sha256 thread (`_Hasher.finish`)", "replication/fetch.py",
           "finish"),
          ("switch (`Replica.switch`)", "replication/replica.py", "switch"))


@dataclass
class Profile:
    seconds: float            # replicate() under cProfile
    plain_s: float            # the same, without cProfile
    buckets: dict[str, float]
    phases: dict[str, float]
    top: str                  # pstats text, for --profile


def profile(pkg: Package, base: str, store: Path) -> Profile:
    """``replicate()`` of ``pkg`` into an empty ``store``, in this process: once plain, once
    under cProfile."""
    from agent.common.task import Task
    from agent.plugin.tasks import TaskContext
    from handlers.replication import plugin

    def once(prof: cProfile.Profile | None) -> float:
        link = store / pkg.name
        if link.is_symlink():
            link.unlink()
        shutil.rmtree(store / ".replicas" / pkg.name, ignore_errors=True)
        task = Task(id=str(uuid.uuid4()), type=plugin.TASK_TYPE,
                    parameters={"package": pkg.name, "kind": pkg.kind,
                                "source": f"{base}{pkg.name}/"})
        config = {"image_store": str(store), "package_store": str(store)}
        plugin.dsagent_validate_task(task, config)
        ctx = TaskContext(task, config, lambda percent, message, details: None,
                          logging.LoggerAdapter(logging.getLogger("bench.replication"), {}))
        t0 = time.perf_counter()
        if prof is not None:
            prof.enable()
        details = plugin.replicate(str(store), pkg.name, task.parameters["source"], ctx)
        if prof is not None:
            prof.disable()
        seconds = time.perf_counter() - t0
        if details.get("bytes_fetched") != pkg.total:
            raise RuntimeError(f"in-process replication of {pkg.name}: {details}")
        return seconds

    plain = once(None)
    prof = cProfile.Profile()
    seconds = once(prof)
    stats = pstats.Stats(prof)
    own = {}
    phases = {label: 0.0 for label, _, _ in PHASES}
    for (filename, _, name), (_, _, tottime, cumtime, _) in stats.stats.items():
        own[name] = own.get(name, 0.0) + tottime
        for label, module, func in PHASES:
            if name == func and filename.endswith(module):
                phases[label] += cumtime
    buckets = {label: sum(own.get(n, 0.0) for n in names) for label, names in BUCKETS}
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(20)
    return Profile(seconds, plain, buckets, phases, text.getvalue())


# ---- the section ----------------------------------------------------------------------------

def secs(value: float) -> str:
    return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"


def mibs(nbytes: int, seconds: float) -> str:
    return f"{nbytes / MiB / seconds:,.0f} MiB/s" if seconds > 0 else "—"


def size(nbytes: int) -> str:
    return f"{nbytes / MiB:,.0f} MiB" if nbytes >= 10 * MiB else f"{nbytes / MiB:.2f} MiB" \
        if nbytes >= MiB // 4 else f"{nbytes:,} bytes"


def package_rows(res: PackageResult, runs: int) -> list[Row]:
    pkg = res.pkg
    n = len(pkg.files)
    curl_t = statistics.median(c.seconds for c in res.curl)
    task_t = statistics.median(r.task_s for r in res.full)
    wall_t = statistics.median(r.wall_s for r in res.full)
    ratios = [c.seconds / r.task_s for c, r in zip(res.curl, res.full)]
    ratio = statistics.median(ratios)
    ratio_wall = statistics.median(c.seconds / r.wall_s for c, r in zip(res.curl, res.full))
    ratio_best = min(c.seconds for c in res.curl) / min(r.task_s for r in res.full)
    what = (f"`{pkg.name}` ({pkg.kind}: {n} files, {size(pkg.total)}"
            + (f"; data.zst {size(pkg.files[f'{VERSION}/data.zst'][1])}" if pkg.kind == "image"
               else "") + ")")
    rows = [
        Row(f"{what}: `curl` of its {n + 1} files (one process, keep-alive), median of {runs}",
            f"{secs(curl_t)} ({mibs(pkg.total, curl_t)}); best "
            f"{secs(min(c.seconds for c in res.curl))}; peak RSS "
            f"{mb(max(c.peak_rss for c in res.curl))}, CPU "
            f"{statistics.median(c.cpu_s for c in res.curl):.2f} s"),
        Row(f"  ReplicatePackage into an empty store (`dsagent run-task`: `running` → "
            f"`succeeded`), median of {runs}",
            f"{secs(task_t)} ({mibs(pkg.total, task_t)}); best "
            f"{secs(min(r.task_s for r in res.full))}; whole `dsagent run-task` {secs(wall_t)} "
            f"({mibs(pkg.total, wall_t)}); worker peak RSS "
            f"{mb(max(r.peak_rss for r in res.full))}"),
        Row("  ↳ speed × curl's (median of the per-round ratios; ratio of the bests; with the "
            "Python start of `dsagent run-task`)",
            f"{ratio:.2f}× ({ratio_best:.2f}×, {ratio_wall:.2f}×; rounds: "
            + ", ".join(f"{x:.2f}" for x in ratios) + ")",
            *((f"≥ {RATIO_GOAL}×", ratio >= RATIO_GOAL) if pkg.kind == "image" else ())),
    ]
    changed_t = statistics.median(r.task_s for r in res.changed)
    fetched = [r.details.get("bytes_fetched") for r in res.changed]
    only = all(f == s for f, s in zip(fetched, res.changed_bytes))
    rows.append(Row(f"  re-replication after one changed file (`{pkg.changeable}`, "
                    f"{size(res.changed_bytes[0])}), median of {runs}",
                    f"{secs(changed_t)}; bytes_fetched "
                    + ", ".join(f"{f:,}" for f in fetched)
                    + f" of {pkg.total:,} ({100 * max(fetched) / pkg.total:.2f} %); "
                    f"bytes_reused {res.changed[-1].details.get('bytes_reused', 0):,}",
                    "only that file's bytes", only))
    unchanged_t = statistics.median(r.task_s for r in res.unchanged)
    rows.append(Row(f"  re-replication with nothing changed, median of {runs}",
                    f"{secs(unchanged_t)} (`unchanged: true` "
                    f"{sum(r.details.get('unchanged') is True for r in res.unchanged)}/"
                    f"{len(res.unchanged)}; every file hashed: "
                    f"{mibs(pkg.total, unchanged_t)})"))
    if res.problems:
        rows.append(Row("  ↳ problems", "; ".join(res.problems[:3]), "none", False))
    return rows


def profile_rows(prof: Profile, pkg: Package) -> list[Row]:
    total = prof.seconds
    parts = [f"{label} {secs(t)} ({100 * t / total:.0f} %)" for label, t in prof.buckets.items()]
    rest = total - sum(prof.buckets.values())
    parts.append(f"Python (http.client, the loop, progress) {secs(rest)} "
                 f"({100 * rest / total:.0f} %)")
    return [
        Row(f"Where the time goes: `replicate()` of `{pkg.name}` in this process, under cProfile",
            f"{secs(total)} ({secs(prof.plain_s)} without cProfile, "
            f"{mibs(pkg.total, prof.plain_s)})"),
        Row("  ↳ by phase (cumulative)",
            "; ".join(f"{label} {secs(t)} ({100 * t / total:.0f} %)"
                      for label, t in prof.phases.items())),
        Row("  ↳ by operation (own time)", "; ".join(parts)),
    ]


NOTES = """\
Notes: both sides fetch the same files from the same nginx (its own process,
`sendfile on`, one worker) over loopback, from the page cache (the bench wrote
the files; one untimed warm-up of each side first); both write into tmpfs, so
no disk is waited on (the handler's fsync of every file is nearly free there;
on a disk it is not, and curl does none). curl's time is its process's wall
time (start included); the handler's is the task's `running` → `succeeded`
event `at`s (ms, truncated) in `dsagent run-task --json`: the manifest
fetched and checked, every file fetched (hashed as it arrives, a big one on a
second thread, which cProfile does not see), fsync'd and placed in a staging
folder, the switch (manifest, chmod, rename, symlink,
fsyncs of the folders). "whole `dsagent run-task`" adds the Python start, the
entry-point discovery and the worker's start. MiB/s = the package's bytes
(2^20) over the time. Each round runs curl and the handler in a rotated order;
the ratio is curl's time ÷ the handler's in the same round (≥ 1: as fast as
curl). A re-replication starts with the version before in place: every file
in place is hashed to know it is unchanged (that is most of its time). The
profile is one extra replication of each package in this process: cProfile's
own cost per Python call lands in the "Python" share (compare the time
without it); the own times of C functions (reads, writes, hashing) are
their real cost. The machine may be shared: other processes show as spread
between rounds and in the load averages above.
"""


def tmpfs_dir() -> Path | None:
    """A folder on tmpfs (``/dev/shm``), or None when there is none."""
    shm = Path("/dev/shm")
    if shm.is_dir() and filesystem_of(shm).startswith("tmpfs") and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="dsagent-bench-replication-", dir=shm))
    return None


def measure(workdir: Path, quick: bool, runs: int, dest: Path | None,
            show_profile: bool = False, sizes: dict[str, int] | None = None
            ) -> tuple[list[Row], str]:
    check()
    sizes = sizes or SIZES[quick]
    rng = random.Random(SEED)
    source = workdir / "source"
    say(f"writing the source: {sizes['image'] // MiB} MiB image, {sizes['driver_files']} driver "
        f"files ({sizes['drivers'] // MiB} MiB), random bytes")
    t0 = time.monotonic()
    image = build_image(source, sizes["image"], rng)
    drivers = build_drivers(source, sizes["drivers"], sizes["driver_files"], rng)
    say(f"  written in {time.monotonic() - t0:.1f} s")
    made = dest is None
    dest = tmpfs_dir() if dest is None else dest
    if dest is None:
        dest, made = workdir / "dest", False
    dest.mkdir(parents=True, exist_ok=True)
    dest_fs = filesystem_of(dest)
    nginx = Nginx(workdir / "nginx", source)
    try:
        nginx.start()
        version = nginx.version()
        stores = {"image": dest / "images", "driver": dest / "packages"}
        for store in stores.values():
            store.mkdir(exist_ok=True)
        rep = Replicator(workdir / "runs", stores)
        results = [measure_package(pkg, nginx.url, rep, dest / "curl", runs, rng)
                   for pkg in (image, drivers)]
        load_after = os.getloadavg()[0]
        profiles = []
        for pkg in (image, drivers):
            say(f"profiling replicate() of {pkg.name} in this process")
            store = stores[pkg.kind]
            shutil.rmtree(store, ignore_errors=True)
            store.mkdir()
            profiles.append((pkg, profile(pkg, nginx.url, store)))
            if show_profile:
                print(f"{pkg.name}:\n{profiles[-1][1].top}", file=sys.stderr)
    finally:
        nginx.stop()
        if made:
            shutil.rmtree(dest, ignore_errors=True)
    rows = [row for res in results for row in package_rows(res, runs)]
    rows += [row for pkg, prof in profiles for row in profile_rows(prof, pkg)]
    mode = (("quick: " if quick else "full: ") + f"{runs} round(s) per package after a warm-up; "
            f"image {sizes['image'] // MiB} MiB, {sizes['driver_files']} driver files "
            f"{sizes['drivers'] // MiB} MiB; nginx {version} on 127.0.0.1; source on "
            f"{filesystem_of(source)} (page cache warm); curl's folder and the stores on {dest_fs}"
            f"; 1-min load average {load_after:.2f} when the rounds ended (curl and the "
            "handler each keep ~1 core busy, nginx a little)")
    return rows, mode


def section(workdir: Path, quick: bool = False, runs: int | None = None,
            dest: Path | None = None, show_profile: bool = False,
            sizes: dict[str, int] | None = None) -> str:
    """The ``## Replication`` Markdown section (bench/__main__.py's ``replication``);
    ``sizes`` (keys as in ``SIZES``) overrides the package sizes (a smoke test's)."""
    conditions = Conditions()
    workdir.mkdir(parents=True, exist_ok=True)
    rows, mode = measure(workdir, quick, runs or (1 if quick else 3), dest, show_profile,
                         sizes)
    return "\n".join([HEADING, "", *machine_lines(workdir, mode), conditions.line(), "",
                      table(rows), "", NOTES])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replication", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="128 MiB image, 1 round")
    parser.add_argument("--runs", type=int, help="rounds per package (default 3, quick 1)")
    parser.add_argument("--dest", help="curl's folder and the stores (default: a new folder "
                                       "on tmpfs, /dev/shm)")
    parser.add_argument("--profile", action="store_true",
                        help="also print the profile's top functions to stderr")
    standalone_options(parser)
    args = parser.parse_args(argv)
    return run_standalone("bench.replication", args, "dsagent-bench-replication-",
                          lambda w: section(w, args.quick, args.runs,
                                            Path(args.dest) if args.dest else None, args.profile),
                          "nginx was stopped", say, check)


if __name__ == "__main__":
    sys.exit(main())
