"""Imaging: capture and deploy of a 1 GiB ext4 disk file, side by side with
``zstd`` and Debian's ``partclone.ext4``, in one run; the NTFS one
(bench/imaging_ntfs.py, using this module's machinery) is its second table.

The disk: a 1 GiB file made with ``mkfs.ext4 -q -F -d TREE``, TREE holding
~200 MB of random (incompressible) files and ~200 MB of compressible ones
(log lines, CSV rows, 64-byte binary records), 64 KiB-32 MiB each, plus
~100 MB more (half random, half compressible) that are then deleted with
``debugfs -w -R "rm /path"``, so their stale bytes stay on the disk but the
block bitmaps say free. ``e2fsck -fn`` must be clean.

Measured, each ``runs`` times (median reported), tools interleaved per round:

- capture: ours (``python -c`` calling ``capture()``, in a child process so its
  peak RSS is its own), ``zstd -1 -T2 -c disk > image`` and
  ``partclone.ext4 -a0 -c -s disk -o - | zstd -1 -T2``;
- deploy: ours (``python -c`` calling ``deploy()``) onto a 1 GiB target file
  pre-filled with random bytes, and ``zstd -d -c image > target`` (target
  truncated first) followed by an fsync of the target (what ``sync target``
  does); ours fsyncs the target itself.

Each process's own peak RSS and CPU time come from GNU time wrapping it (see
``timed``). Throughput is always the source disk's size (1 GiB) over wall time.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench.report import Conditions, Row, machine_lines, mb, table

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
DISK_BYTES = 1 << 30
SEED = 20261125

RANDOM_BYTES = 200 * MiB          # kept, incompressible
TEXT_BYTES = 200 * MiB            # kept, compressible
DELETED_BYTES = 100 * MiB         # written, then removed with debugfs (half random)
MIN_FILE, MAX_FILE = 64 * 1024, 32 * MiB

CAPTURE_GOAL = 1.2     # x the faster of zstd and partclone+zstd
SIZE_GOAL = 1.02       # x partclone+zstd
DEPLOY_GOAL = 1.0      # x zstd -d
RSS_GOAL = 150 * MiB

SBIN = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")

CAPTURE_CHILD = r"""
import json, sys, time
t0 = time.monotonic()
from handlers.imaging.capture import capture
from handlers.imaging.store import ImageStore
t1 = time.monotonic()
res = capture(sys.argv[1], ImageStore(sys.argv[2]), sys.argv[3], "capture",
              lambda *a, **k: None)
t2 = time.monotonic()
with open(sys.argv[4], "w") as fh:
    json.dump({"import_s": t1 - t0, "call_s": t2 - t1, "result": res}, fh)
"""

DEPLOY_CHILD = r"""
import json, sys, time
t0 = time.monotonic()
from handlers.imaging.deploy import deploy
from handlers.imaging.store import ImageStore
t1 = time.monotonic()
res = deploy(ImageStore(sys.argv[1]), sys.argv[2], "capture", sys.argv[3],
             lambda *a, **k: None)
t2 = time.monotonic()
with open(sys.argv[4], "w") as fh:
    json.dump({"import_s": t1 - t0, "call_s": t2 - t1, "result": res}, fh)
"""


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] imaging: {message}", file=sys.stderr, flush=True)


def tool(name: str) -> str:
    path = shutil.which(name) or next(
        (os.path.join(d, name) for d in SBIN if os.path.exists(os.path.join(d, name))), None)
    if path is None:
        raise RuntimeError(f"{name} is not installed (make setup installs the system tools)")
    return path


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True, **kw)


# ---- the disk ----------------------------------------------------------------

LEVELS = ["INFO"] * 12 + ["DEBUG"] * 6 + ["WARN"] * 2 + ["ERROR"]
COMPONENTS = ["sshd", "kernel", "nginx", "postgres", "dsagent.cta", "systemd", "cron",
              "dockerd", "kubelet", "app.worker", "app.api", "redis"]
TEMPLATES = [
    "GET /api/v1/items/{a} HTTP/1.1 200 {b} {c}ms",
    "POST /api/v1/orders HTTP/1.1 201 {b} {c}ms user={d}",
    "connection from 10.{e}.{f}.{g} port {a} accepted",
    "checkpoint complete: wrote {a} buffers ({e}.{f}%); {g} WAL file(s) added",
    "task {d:08x}-{a:04x} state changed: running -> succeeded in {c} ms",
    "cache miss for key session:{d:x}, loading from backend ({c} ms)",
    "disk /dev/sd{h} temperature {e} C, reallocated sectors {f}",
    "worker {f} processed batch {a} ({b} records, {c} ms)",
    "Started Session {a} of user u{d}.",
    "retrying request id={d:016x} attempt {f} after {c}ms: timeout",
]
CITIES = ["Berlin", "Paris", "Lyon", "Madrid", "Oslo", "Rome", "Lisbon", "Vienna", "Prague",
          "Dublin"]
STATUS = ["paid", "pending", "shipped", "refunded", "cancelled"]
RECORD = struct.Struct("<QIIhhf16s24x")   # 64-byte records, like a database page
SENSORS = [f"sensor-{i:04d}".encode() for i in range(500)]


def _log_lines(rng: random.Random, n: int) -> list[bytes]:
    ri, ch = rng.randrange, rng.choice
    t = 1_700_000_000.0
    lines = []
    for _ in range(n):
        t += rng.random() * 0.2
        s = int(t)
        msg = ch(TEMPLATES).format(a=ri(100000), b=ri(1, 100000), c=ri(1, 5000), d=ri(1 << 32),
                                   e=ri(256), f=ri(256), g=ri(256), h="abcd"[ri(4)])
        lines.append(f"2024-{(s // 2592000) % 12 + 1:02d}-{(s // 86400) % 28 + 1:02d}T"
                     f"{(s // 3600) % 24:02d}:{(s // 60) % 60:02d}:{s % 60:02d}."
                     f"{int(t * 1000) % 1000:03d}Z host{ri(8):02d} {ch(COMPONENTS)}"
                     f"[{ri(100, 40000)}]: {ch(LEVELS)} {msg}\n".encode())
    return lines


def _csv_rows(rng: random.Random, n: int) -> list[bytes]:
    ri, ch = rng.randrange, rng.choice
    oid, t = ri(10**6), 1_600_000_000
    rows = []
    for _ in range(n):
        oid += 1
        t += ri(1, 90)
        rows.append(f"{oid},{t},{ri(1, 200000)},{ch(CITIES)},{ch(STATUS)},{ri(1, 9)},"
                    f"{ri(100, 99999) / 100:.2f},{'' if ri(4) else 'gift wrap'}\n".encode())
    return rows


def _records(rng: random.Random, n: int) -> list[bytes]:
    ri, pack = rng.randrange, RECORD.pack
    rid, t = ri(10**9), 1_600_000_000
    out = []
    for _ in range(n):
        rid += 1
        t += ri(0, 3)
        out.append(pack(rid, t, ri(500), ri(-400, 400), ri(0, 1000), ri(0, 10000) / 8,
                        SENSORS[ri(500)]))
    return out


class Content:
    """Deterministic file contents: random bytes, or text/records drawn from pools of
    ~6-8 MB of distinct lines (far larger than zstd -1's 512 KiB window, so lines
    drawn again are not cheap matches)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.pools = {"log": _log_lines(self.rng, 75_000), "csv": _csv_rows(self.rng, 120_000),
                      "rec": _records(self.rng, 100_000)}
        self.avg = {k: sum(map(len, v)) / len(v) for k, v in self.pools.items()}

    def random(self, size: int) -> bytes:
        return self.rng.randbytes(size)

    def compressible(self, kind: str, size: int) -> bytes:
        header = b"order_id,created,customer_id,city,status,items,amount_eur,note\n" \
            if kind == "csv" else b""
        body = b"".join(self.rng.choices(self.pools[kind], k=int(size / self.avg[kind]) + 2))
        return (header + body)[:size]

    def of(self, kind: str, size: int) -> bytes:
        """A file of ``kind`` (random, log, csv, rec)."""
        return self.random(size) if kind == "random" else self.compressible(kind, size)


def _sizes(rng: random.Random, total: int) -> list[int]:
    """File sizes, log-uniform in [64 KiB, 32 MiB], summing to ``total``."""
    sizes, left = [], total
    while left >= MIN_FILE:
        size = int(2 ** rng.uniform(16, 25)) // 4096 * 4096 + rng.randrange(4096)
        size = max(MIN_FILE, min(size, MAX_FILE, left))
        if left - size < MIN_FILE:
            size = left if left <= MAX_FILE else size
        sizes.append(size)
        left -= size
    return sizes


def plan_files(rng: random.Random) -> list[tuple[str, int, bool]]:
    """(kind, size, removed later) of the bench disk's files, the ones removed later
    interleaved with the kept ones."""
    plan: list[tuple[str, int, bool]] = []
    plan += [("random", size, False) for size in _sizes(rng, RANDOM_BYTES)]
    kinds = ["log", "csv", "rec"]
    plan += [(kinds[i % 3], size, False) for i, size in enumerate(_sizes(rng, TEXT_BYTES))]
    plan += [("random" if i % 2 == 0 else kinds[i % 3], size, True)
             for i, size in enumerate(_sizes(rng, DELETED_BYTES))]
    rng.shuffle(plan)
    return plan


@dataclass
class BenchDisk:
    """What both bench disks count: the files kept, by kind; the used bytes by the file
    system's own map."""
    path: Path
    tree_bytes: dict[str, int] = field(default_factory=dict)   # kind -> bytes kept
    files: int = 0
    used_bytes: int = 0
    build_s: float = 0.0

    def keep(self, kind: str, size: int) -> None:
        self.files += 1
        self.tree_bytes[kind] = self.tree_bytes.get(kind, 0) + size

    def kept(self) -> str:
        tb = self.tree_bytes
        return (f"{self.files} files kept, {mb(sum(tb.values()))} (random "
                f"{mb(tb.get('random', 0))}, logs {mb(tb.get('log', 0))}, CSV "
                f"{mb(tb.get('csv', 0))}, 64-byte records {mb(tb.get('rec', 0))})")


@dataclass
class Disk(BenchDisk):
    deleted_files: int = 0
    deleted_bytes: int = 0
    block_size: int = 0          # used_bytes: ext4 used blocks x block size (dumpe2fs)
    samples: list[tuple[str, str]] = field(default_factory=list)  # (path in fs, sha256)


DIRS = {"random": ["media/photos", "media/video", "opt/bundles", "home/ana/archive"],
        "log": ["var/log", "var/log/app", "home/ana/logs"],
        "csv": ["srv/exports", "home/ana/reports"],
        "rec": ["srv/db/pages", "srv/db/wal"]}
EXT = {"random": ".bin", "log": ".log", "csv": ".csv", "rec": ".db"}


def build_disk(workdir: Path) -> Disk:
    started = time.monotonic()
    content = Content(SEED)
    rng = content.rng
    tree = workdir / "tree"
    disk = Disk(workdir / "disk.img")
    doomed: list[str] = []
    # deleted files interleaved with kept ones in the same folders
    for n, (kind, size, deleted) in enumerate(plan_files(rng)):
        folder = tree / rng.choice(DIRS[kind])
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{'tmp-' if deleted else ''}{kind}-{n:03d}{EXT[kind]}"
        data = content.of(kind, size)
        (folder / name).write_bytes(data)
        rel = "/" + str((folder / name).relative_to(tree))
        if deleted:
            doomed.append(rel)
            disk.deleted_bytes += size
        else:
            disk.keep(kind, size)
            if len(disk.samples) < 4 and size > 1 * MiB:
                disk.samples.append((rel, hashlib.sha256(data).hexdigest()))
    disk.deleted_files = len(doomed)
    with open(disk.path, "wb") as fh:
        fh.truncate(DISK_BYTES)
    run(tool("mkfs.ext4"), "-q", "-F", "-d", tree, disk.path)
    shutil.rmtree(tree)
    for rel in doomed:
        run(tool("debugfs"), "-w", "-R", f"rm {rel}", disk.path)
    ok, out = e2fsck_clean(disk.path)
    if not ok:
        raise RuntimeError(f"e2fsck -fn of the bench disk is not clean:\n{out}")
    info = dumpe2fs(disk.path)
    disk.block_size = int(info["Block size"])
    disk.used_bytes = (int(info["Block count"]) - int(info["Free blocks"])) * disk.block_size
    disk.build_s = time.monotonic() - started
    return disk


def e2fsck_clean(path: Path) -> tuple[bool, str]:
    out = subprocess.run([tool("e2fsck"), "-fn", str(path)], capture_output=True, text=True)
    return out.returncode == 0, out.stdout + out.stderr


def dumpe2fs(path: Path) -> dict[str, str]:
    out = run(tool("dumpe2fs"), "-h", path).stdout
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())
            if v}


# ---- measuring processes ---------------------------------------------------------

@dataclass
class Proc:
    name: str
    maxrss: int      # bytes
    cpu_s: float


@dataclass
class Timed:
    wall_s: float
    procs: list[Proc]
    child: dict | None = None     # what our python child reported


GNU_TIME = next((p for p in ("/usr/bin/time",) if os.access(p, os.X_OK)), None)


def timed(stages: list[tuple[str, list[str]]], out: Path | None = None, fsync_out: bool = False,
          child_json: Path | None = None, errdir: Path | None = None) -> Timed:
    """Run ``stages`` as a pipeline (stdout of one into the next, the last into
    ``out``), timing wall clock from the first spawn to the last reap (and the
    fsync of ``out`` when asked).

    Peak RSS and CPU of each stage come from GNU time (``/usr/bin/time -f``),
    which spawns the command from its own small process: a child forked
    straight from this (large) Python process would report this process's RSS
    as its own ru_maxrss (Linux carries the pre-exec high-water mark over
    exec). Without GNU time, wait4's figures are used (RSS then an upper bound).
    """
    errdir = errdir or Path(tempfile.gettempdir())
    out_fh = open(out, "wb") if out else None
    errs = [open(errdir / f"stderr-{i}.txt", "w+b") for i in range(len(stages))]
    usage_files = [errdir / f"usage-{i}.txt" for i in range(len(stages))]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs: list[subprocess.Popen] = []
    try:
        t0 = time.perf_counter()
        stdin = subprocess.DEVNULL
        for i, (_, cmd) in enumerate(stages):
            last = i == len(stages) - 1
            stdout = (out_fh or subprocess.DEVNULL) if last else subprocess.PIPE
            wrapped = [GNU_TIME, "-f", "%M %U %S", "-o", str(usage_files[i]), *cmd] \
                if GNU_TIME else cmd
            p = subprocess.Popen(wrapped, stdin=stdin, stdout=stdout, stderr=errs[i], cwd=ROOT,
                                 env=env)
            if procs and procs[-1].stdout:
                procs[-1].stdout.close()
            procs.append(p)
            stdin = p.stdout
        reaped = []
        for p in procs:
            _, status, usage = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
            reaped.append(usage)
        if out_fh and fsync_out:
            os.fsync(out_fh.fileno())
        wall = time.perf_counter() - t0
    finally:
        if out_fh:
            out_fh.close()
    for (name, cmd), p, err in zip(stages, procs, errs):
        err.seek(0)
        text = err.read().decode(errors="replace")
        err.close()
        if p.returncode != 0:
            raise RuntimeError(f"{name} failed ({p.returncode}): {' '.join(cmd)}\n{text[-2000:]}")
    measured = []
    for (name, _), usage, path in zip(stages, reaped, usage_files):
        if GNU_TIME:
            kib, user, system = path.read_text().split()[-3:]
            measured.append(Proc(name, int(kib) * 1024, float(user) + float(system)))
        else:
            measured.append(Proc(name, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime))
    result = Timed(wall, measured)
    if child_json:
        result.child = json.loads(child_json.read_text())
    return result


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def read_through(path: Path) -> None:
    with open(path, "rb", buffering=0) as fh:
        while fh.readinto(bytearray(8 * MiB)):
            pass


def sha256_file(path: Path, length: int | None = None) -> str:
    h = hashlib.sha256()
    left = length if length is not None else 1 << 62
    with open(path, "rb", buffering=0) as fh:
        while left > 0:
            buf = fh.read(min(8 * MiB, left))
            if not buf:
                break
            h.update(buf)
            left -= len(buf)
    return h.hexdigest()


def fill_random(path: Path, rng: random.Random) -> None:
    """A 1 GiB file of random bytes, every block allocated (not sparse), on disk."""
    block = rng.randbytes(64 * MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(DISK_BYTES // len(block)):
            # a different block each time, cheaply: rotate by i MiB
            k = (i * MiB) % len(block)
            os.pwrite(fd, block[k:] + block[:k], i * len(block))
        os.fsync(fd)
    finally:
        os.close(fd)
    st = os.stat(path)
    if st.st_blocks * 512 < DISK_BYTES:
        raise RuntimeError(f"{path} is sparse after the random fill")


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---- the bench ------------------------------------------------------------------------

@dataclass
class Series:
    runs: list[Timed] = field(default_factory=list)
    out_sizes: list[int] = field(default_factory=list)
    fsync_s: list[float] = field(default_factory=list)   # fsync of a competitor's output, untimed

    @property
    def wall(self) -> float:
        return statistics.median(r.wall_s for r in self.runs)

    def child(self, key: str) -> float:
        return statistics.median(r.child[key] for r in self.runs)

    def maxrss(self, name: str) -> int:
        return max(p.maxrss for r in self.runs for p in r.procs if p.name == name)

    def cpu(self, name: str | None = None) -> float:
        return statistics.median(sum(p.cpu_s for p in r.procs if name in (None, p.name))
                                 for r in self.runs)

    def walls(self) -> str:
        return "/".join(f"{r.wall_s:.2f}" for r in self.runs)


def rate(seconds: float, nbytes: int = DISK_BYTES) -> float:
    return nbytes / MiB / seconds


def fsync_path(path: Path) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


Stages = list[tuple[str, list[str]]]    # a pipeline, as ``timed`` runs it


@dataclass
class Competitor:
    """A competitor's capture: its pipeline into ``image``; ``fsync``: the fsync of the
    image after it is measured too (untimed, for context)."""
    image: Path
    stages: Stages
    fsync: bool = False


@dataclass
class Restore:
    """A deploy for context that writes its own ``target`` (nothing on stdout): the target
    truncated before (untimed), the fsync of it after timed with it."""
    target: Path
    stages: Stages


def zstd_stages(zstd: str, src: str) -> Stages:
    """``zstd -1 -T2`` of the whole disk (the image ``zstd -d`` deploys)."""
    return [("zstd", [zstd, "-q", "-1", "-T2", "-c", src])]


def partclone_stages(partclone: str, zstd: str, src: str, log: str, f0: bool = False) -> Stages:
    """``partclone.FS -a0 -c -s disk -o - | zstd -1 -T2``; ``f0``: with ``-f 0``, as
    partclone's progress thread sleeps its refresh interval (-f, default 2 s) and is
    joined at exit, so the command without it never ends in < 2 s."""
    return [("partclone", [partclone, "-a0", *(("-f", "0") if f0 else ()), "-c", "-s", src,
                           "-o", "-", "-L", log]),
            ("zstd", [zstd, "-q", "-1", "-T2"])]


@dataclass
class DeployCheck:
    """How our deployed disk is checked (round 1): by the file system's own checker, and
    each of ``files`` (name, sha256) read back from it by the command ``cat(disk, name)``."""
    fsck: str                                   # the checker, as the row names it
    clean: Callable[[Path], tuple[bool, str]]   # disk -> (clean, its output)
    how: str                                    # how the files are checked, for the log
    files: list[tuple[str, str]]
    cat: Callable[[Path, str], list[str]]
    same: str                                   # the files' check, as the row names it

    def __call__(self, target: Path, label: str = "",
                 say: Callable[[str], None] = say) -> dict[str, bool]:
        say(f"checking our deployed {label}disk: {self.fsck}, {self.how}")
        ok, out = self.clean(target)
        if not ok:
            say(f"{self.fsck} of our deployed {label}disk is not clean:\n{out}")
        same = True
        for name, digest in self.files:
            got = subprocess.run(self.cat(target, name), capture_output=True, check=True).stdout
            same &= hashlib.sha256(got).hexdigest() == digest
        return {f"our deploy: {self.fsck} clean (run 1)": ok,
                f"our deploy: {self.same} (run 1)": same}


@dataclass
class Measured:
    cap: dict[str, Series]      # "ours" and each competitor
    dep: dict[str, Series]      # "ours", "zstd" and each restore
    meta: dict                  # our last image's meta.json
    cold: bool                  # False if asked for but caches cannot be dropped
    checks: dict[str, bool]


def measure(workdir: Path, disk_path: Path, competitors: dict[str, Competitor],
            check: DeployCheck, same_size: dict[str, tuple[str, ...]],
            *, runs: int, cold: bool, fill_seed: int, restores: dict[str, Restore] | None = None,
            label: str = "", say: Callable[[str], None] = say) -> Measured:
    """Measure capture and deploy of ``disk_path``, ``runs`` rounds of each.

    A capture round runs ``competitors`` in their order (each image removed first),
    then ours in a child (a fresh store each run: publish would otherwise delete the
    last version). A deploy round runs ours onto a target filled with random bytes
    from ``fill_seed`` (rewritten before every run, untimed; ``check`` checks it in
    round 1), then ``zstd -d`` of the ``"zstd"`` competitor's image into a truncated
    target + fsync (round 1: sha256 = the source's), then each of ``restores``. Before
    every run ``sync`` and, ``cold``, caches dropped; warm, the disk is read once first.
    ``same_size``: check label -> competitors whose image sizes must all be equal."""
    python, zstd = sys.executable, tool("zstd")
    restores = restores or {}
    if cold and not drop_caches():
        say("cannot drop caches (not root?): measuring with a warm cache instead")
        cold = False
    if not cold:
        read_through(disk_path)   # the whole source in the page cache, for every tool

    def prepare() -> None:
        os.sync()   # no writeback of an earlier run's output during this one
        if cold:
            drop_caches()

    cap = {name: Series() for name in ("ours", *competitors)}
    store = workdir / "store"
    meta: dict = {}
    for i in range(runs):
        say(f"{label}capture round {i + 1}/{runs}")
        for name, comp in competitors.items():
            comp.image.unlink(missing_ok=True)
            prepare()
            res = timed(comp.stages, out=comp.image, errdir=workdir)
            cap[name].runs.append(res)
            cap[name].out_sizes.append(comp.image.stat().st_size)
            if comp.fsync:
                cap[name].fsync_s.append(fsync_path(comp.image))
        shutil.rmtree(store, ignore_errors=True)
        store.mkdir()
        prepare()
        res = timed([("ours", [python, "-c", CAPTURE_CHILD, str(disk_path), str(store), "disk",
                               str(workdir / "capture.json")])],
                    child_json=workdir / "capture.json", errdir=workdir)
        cap["ours"].runs.append(res)
        vdir = store / "disk" / res.child["result"]["version"]
        cap["ours"].out_sizes.append(tree_size(vdir))
        meta = json.loads((vdir / "meta.json").read_text())

    # deploys, onto targets on the same file system
    dep = {name: Series() for name in ("ours", "zstd", *restores)}
    target_ours, target_zstd = workdir / "target-ours.img", workdir / "target-zstd.img"
    fill_rng = random.Random(fill_seed)
    digests: set[str] = set()
    verified: dict[str, bool] = {}
    zstd_ok = False
    for i in range(runs):
        say(f"{label}deploy round {i + 1}/{runs}")
        fill_random(target_ours, fill_rng)
        prepare()
        res = timed([("ours", [python, "-c", DEPLOY_CHILD, str(store), "disk", str(target_ours),
                               str(workdir / "deploy.json")])],
                    child_json=workdir / "deploy.json", errdir=workdir)
        dep["ours"].runs.append(res)
        digests.add(res.child["result"]["target_sha256"])
        if i == 0:
            verified = check(target_ours, label, say)
        with open(target_zstd, "wb"):
            pass    # truncated, untimed
        prepare()
        res = timed([("zstd", [zstd, "-q", "-d", "-c", str(competitors["zstd"].image)])],
                    out=target_zstd, fsync_out=True, errdir=workdir)
        dep["zstd"].runs.append(res)
        if os.stat(target_zstd).st_size != DISK_BYTES:
            raise RuntimeError("zstd -d restored a disk of the wrong size")
        if i == 0:
            say("checking the zstd round trip: sha256 of the restored disk")
            zstd_ok = sha256_file(target_zstd) == sha256_file(disk_path)
        for name, restore in restores.items():
            with open(restore.target, "wb"):
                pass    # truncated, untimed
            prepare()
            res = timed(restore.stages, errdir=workdir)
            res.wall_s += fsync_path(restore.target)
            dep[name].runs.append(res)
    for restore in restores.values():
        restore.target.unlink(missing_ok=True)

    checks = {
        "our target_sha256 identical over runs": len(digests) == 1,
        "our image size identical over runs": len(set(cap["ours"].out_sizes)) == 1,
        **{text: len({size for name in names for size in cap[name].out_sizes}) == 1
           for text, names in same_size.items()},
        "zstd -d round trip sha256 = source": zstd_ok,
        **verified,
    }
    return Measured(cap, dep, meta, cold, checks)


def bench(workdir: Path, runs: int = 3, cold: bool = False,
          say: Callable[[str], None] = say) -> tuple[list[Row], dict]:
    """Build the disk, measure; return the rows and facts for the notes."""
    zstd, partclone = tool("zstd"), tool("partclone.ext4")
    say(f"building the 1 GiB ext4 disk in {workdir}")
    disk = build_disk(workdir)
    say(f"disk built in {disk.build_s:.1f} s: {mb(disk.used_bytes)} used, "
        f"{mb(disk.deleted_bytes)} deleted ({disk.deleted_files} files)")
    src, log, pc_img = str(disk.path), str(workdir / "partclone.log"), workdir / "disk.pc.zst"
    m = measure(
        workdir, disk.path,
        {"zstd": Competitor(workdir / "disk.zst", zstd_stages(zstd, src), fsync=True),
         "partclone": Competitor(pc_img, partclone_stages(partclone, zstd, src, log), fsync=True),
         "partclone-f0": Competitor(pc_img, partclone_stages(partclone, zstd, src, log, f0=True))},
        DeployCheck("e2fsck -fn", e2fsck_clean, "sample files", disk.samples,
                    lambda target, rel: [tool("debugfs"), "-R", f"cat {rel}", str(target)],
                    f"{len(disk.samples)} sample files byte-identical"),
        {"partclone+zstd size identical over runs (with -f 0 too)": ("partclone", "partclone-f0"),
         "zstd size identical over runs": ("zstd",)},
        runs=runs, cold=cold, fill_seed=SEED + 1, say=say)
    facts = {"disk": disk, "cold": m.cold, "runs": runs, "meta": m.meta, "checks": m.checks}
    return rows(disk, m.cap, m.dep, m.meta, m.checks, m.cold), facts


def plan_of(meta: dict) -> dict:
    """Our image's plan of the (first) file system: strategy, used and scanned bytes..."""
    return (meta.get("source", {}).get("filesystems") or [{}])[0]


def capture_row(ours: Series, rivals: dict[str, Series], goal: float) -> Row:
    """Our capture throughput against the faster of ``rivals`` (name -> series)."""
    best_name, best = min(((name, s.wall) for name, s in rivals.items()), key=lambda x: x[1])
    ours_call = ours.child("call_s")
    speedup = best / ours.wall
    return Row(f"Capture throughput, ours (1 GiB / wall, median of {len(ours.runs)})",
               f"{rate(ours.wall):.0f} MB/s ({ours.walls()} s, whole `python -c` process); "
               f"{speedup:.2f}× {best_name}; capture() call alone {rate(ours_call):.0f} MB/s "
               f"({best / ours_call:.2f}×)",
               f"≥ {goal}× the faster of {' and '.join(rivals)} "
               f"(≥ {rate(best) * goal:.0f} MB/s)", speedup >= goal)


def unsynced(s: Series) -> str:
    """A competitor capture's throughput, and the fsync of its output measured after it."""
    return (f"{rate(s.wall):.0f} MB/s ({s.walls()} s); output not fsync'd (an fsync after it "
            f"took {statistics.median(s.fsync_s):.2f} s more)")


def f0_value(pcf: Series, ours: Series) -> str:
    """partclone -f 0 + zstd's throughput, and ours relative to it."""
    return (f"{rate(pcf.wall):.0f} MB/s ({pcf.walls()} s); ours is {pcf.wall / ours.wall:.2f}× "
            f"(call alone {pcf.wall / ours.child('call_s'):.2f}×)")


def image_size_row(ours: Series, pc: Series, goal: float) -> Row:
    size_ratio = ours.out_sizes[-1] / pc.out_sizes[-1]
    return Row("Image size, ours (data.zst + index.bin + meta.json)",
               f"{mb(ours.out_sizes[-1])} = {size_ratio:.3f}× partclone+zstd "
               f"({mb(pc.out_sizes[-1])})", f"≤ {goal}×", size_ratio <= goal)


def deploy_rows(d_ours: Series, d_z: Series, goal: float) -> list[Row]:
    """Our deploy throughput against ``zstd -d``'s, and zstd -d's."""
    d_ratio = d_z.wall / d_ours.wall
    return [
        Row(f"Deploy throughput, ours (1 GiB / wall, median of {len(d_ours.runs)}, fsync incl.)",
            f"{rate(d_ours.wall):.0f} MB/s ({d_ours.walls()} s, whole process; deploy() call "
            f"alone {rate(d_ours.child('call_s')):.0f} MB/s); {d_ratio:.2f}× zstd -d",
            f"≥ {goal}× zstd -d", d_ratio >= goal),
        Row("  ↳ `zstd -d -c image > target && sync target`",
            f"{rate(d_z.wall):.0f} MB/s ({d_z.walls()} s)"),
    ]


def rss_row(ours: Series) -> Row:
    return Row("Peak RSS of our capture process (max of runs)",
               mb(ours.maxrss("ours")), f"≤ {mb(RSS_GOAL)}", ours.maxrss("ours") <= RSS_GOAL)


def checks_row(checks: dict[str, bool]) -> Row:
    return Row("Checks", "; ".join(f"{k}: {'yes' if v else '**NO**'}" for k, v in checks.items()),
               "all yes", all(checks.values()))


def rows(disk: Disk, cap: dict[str, Series], dep: dict[str, Series], meta: dict,
         checks: dict[str, bool], cold: bool) -> list[Row]:
    fs = plan_of(meta)
    plan_used = fs.get("used_bytes", 0)
    plan_scan = fs.get("scan_bytes", 0)
    ours, z, pc, pcf = cap["ours"], cap["zstd"], cap["partclone"], cap["partclone-f0"]
    ours_call = ours.child("call_s")
    d_ours, d_z = dep["ours"], dep["zstd"]
    return [
        Row("Source disk: 1 GiB ext4 file (`mkfs.ext4 -d`), then `debugfs -w -R rm` of "
            f"{disk.deleted_files} files",
            f"{disk.kept()}; {mb(disk.deleted_bytes)} deleted (half random); used blocks "
            f"{mb(disk.used_bytes)}; our plan reads {mb(plan_used)} used + {mb(plan_scan)} "
            "scanned; e2fsck -fn clean"),
        capture_row(ours, {"zstd": z, "partclone+zstd": pc}, CAPTURE_GOAL),
        Row("  ↳ ours, used data MB/s (ext4 used blocks / wall)",
            f"{rate(ours.wall, disk.used_bytes):.0f} MB/s (capture() call alone "
            f"{rate(ours_call, disk.used_bytes):.0f} MB/s"
            + (f"; counting the {mb(plan_scan)} the plan scans too, "
               f"{rate(ours_call, plan_used + plan_scan):.0f} MB/s" if plan_scan else "")
            + f"); interpreter start + imports {ours.wall - ours_call:.2f} s of the process"),
        Row("  ↳ `zstd -1 -T2 -c disk > image`", unsynced(z)),
        Row("  ↳ `partclone.ext4 -a0 -c -s disk -o - | zstd -1 -T2`", unsynced(pc)),
        Row("  ↳ `partclone.ext4 -a0 -f 0 …` (the same without partclone's 2 s progress wait "
            "at exit), for context", f0_value(pcf, ours)),
        Row("  ↳ CPU time per capture (user+sys, median)",
            f"ours {ours.cpu():.2f} s; zstd {z.cpu():.2f} s; partclone {pc.cpu('partclone'):.2f}"
            f" s + zstd {pc.cpu('zstd'):.2f} s"),
        image_size_row(ours, pc, SIZE_GOAL),
        Row("  ↳ `zstd -1` of the whole disk (deleted files' bytes included)",
            f"{mb(z.out_sizes[-1])}"),
        *deploy_rows(d_ours, d_z, DEPLOY_GOAL),
        Row("  ↳ CPU time per deploy (user+sys, median)",
            f"ours {d_ours.cpu():.2f} s; zstd -d {d_z.cpu():.2f} s"),
        rss_row(ours),
        Row("  ↳ peak RSS, others",
            f"zstd -1 -T2 {mb(z.maxrss('zstd'))}; partclone {mb(pc.maxrss('partclone'))} + "
            f"its zstd {mb(pc.maxrss('zstd'))}; our deploy {mb(d_ours.maxrss('ours'))}; "
            f"zstd -d {mb(d_z.maxrss('zstd'))}"),
        checks_row(checks),
    ]


def notes(facts: dict) -> str:
    cache = ("Cold cache: `sync; echo 3 > /proc/sys/vm/drop_caches` before every run of every "
             "tool (capture and deploy)." if facts["cold"] else
             "Warm cache: the source disk was read once before the first run and stays in the "
             "page cache for every tool (caches are not dropped); `sync` (untimed) before every "
             "run so no earlier output is written back during it.")
    return textwrap.fill(f"""\
Notes: MB = 2^20 bytes. Throughput is the source disk's size (1 GiB) over wall time for
every tool, median of {facts['runs']} runs; the tools are interleaved in each round (zstd,
partclone+zstd, partclone -f 0 + zstd, ours; then our deploy, zstd -d). The verdict uses the
issue's two commands as written; partclone's default progress refresh (-f 2) makes it sleep
2 s in a thread that is joined at exit, a floor that dominates on a 1 GiB disk, so the
`-f 0` run is shown for context. {cache} Ours runs as
`python -c` calling `capture()`/`deploy()`: the verdict uses the whole process's wall time
(interpreter start and imports included, like the CLI tools' own start); the call alone
is shown too. Our capture fsyncs its image (data, index, metadata) before it returns;
the two competitor captures are timed as the issue writes them, without an fsync (the
fsync of their output measured afterwards is shown for context). Deploy: ours writes onto
a 1 GiB file pre-filled with random bytes (not sparse; rewritten before every run,
untimed), punches holes for every byte the image does not store, and fsyncs the target;
zstd -d writes into the same-sized target truncated (untimed) just before, and is followed
by fsync of the target (what `sync target` does), timed. Our deployed disk differs from
zstd's byte for byte (free blocks are zero in ours, stale in the source), so it is checked
with `e2fsck -fn` and by comparing sample files (run 1). Peak RSS is each process's own
maximum resident set size as GNU time reports it. Image store, images and targets are files on the same file system
as the source.""", width=90) + "\n"


HEADING, EXT4_HEADING = "## Imaging", "### ext4"
FILESYSTEMS = ("ext4", "ntfs")
INTRO = ("Capture and deploy of 1 GiB disk files, ours side by side with the command-line "
         "tools: ext4 (vs zstd and partclone.ext4) and NTFS (issue #16: vs partclone.ntfs and "
         "ntfsclone). `python -m bench imaging --fs ext4|ntfs` measures one and keeps the "
         "other's subsection as it was.")


def measured_subsection(heading: str, bench: Callable[..., tuple[list[Row], dict]],
               notes: Callable[[dict], str], version_line: Callable[[], str],
               workdir: Path, runs: int, cold: bool, quick: bool) -> str:
    """A ``### `` subsection: machine and conditions, tool versions, the table of
    ``bench``'s rows, its notes."""
    conditions = Conditions()
    workdir.mkdir(parents=True, exist_ok=True)
    rws, facts = bench(workdir, runs=runs, cold=cold)
    mode = (f"{runs} runs per tool, " + ("cold cache" if facts["cold"] else "warm cache")
            + (" (quick)" if quick else ""))
    return "\n".join([heading, "", *machine_lines(workdir, mode), conditions.line(),
                      f"- Tools: {version_line()}", "", table(rws), "", notes(facts)])


def ext4_subsection(workdir: Path, runs: int, cold: bool, quick: bool) -> str:
    return measured_subsection(EXT4_HEADING, bench, notes, version_line, workdir, runs, cold, quick)


def section(workdir: Path, runs: int, cold: bool, quick: bool,
            filesystems: tuple[str, ...] = FILESYSTEMS) -> str:
    """The ``## Imaging`` section: a ``### ext4`` and a ``### NTFS`` subsection (those
    measured; merge_section puts back the others)."""
    from bench import imaging_ntfs   # it imports this module
    parts = [HEADING, "", INTRO]
    if "ext4" in filesystems:
        parts += ["", ext4_subsection(workdir, runs, cold, quick)]
    if "ntfs" in filesystems:
        parts += ["", imaging_ntfs.subsection(workdir / "ntfs", runs, cold, quick)]
    return "\n".join(parts)


def subsections(text: str) -> dict[str, str]:
    """``### `` heading -> its block, of an ``## Imaging`` section (one from before
    the NTFS bench, without subsections, is the ext4 one)."""
    out = {}
    for block in re.split(r"(?m)^(?=### )", text.split("\n", 1)[1] if text.startswith(HEADING)
                          else text):
        block = block.strip()
        if block.startswith("### "):
            out[block.splitlines()[0]] = block
        elif block.startswith("- Date:"):
            out[EXT4_HEADING] = f"{EXT4_HEADING}\n\n{block}"
    return out


def merge_section(old: str, new: str) -> str:
    """``new``'s subsections, and ``old``'s others, in their order."""
    subs = {**subsections(old), **subsections(new)}
    order = [EXT4_HEADING] + sorted(h for h in subs if h != EXT4_HEADING)
    return "\n\n".join([HEADING, INTRO] + [subs[h] for h in order if h in subs])


def tool_says(name: str, flag: str = "--version") -> str:
    """What ``name flag`` prints, stdout and stderr."""
    out = subprocess.run([tool(name), flag], capture_output=True, text=True)
    return (out.stdout + out.stderr).strip()


def zstd_version() -> str:
    return run(tool("zstd"), "--version").stdout.strip().split(",")[0].replace("*** ", "")


def partclone_version(name: str) -> str:
    return tool_says(name).splitlines()[0].split("(")[0].strip()


def version_line() -> str:
    e2v = tool_says("mkfs.ext4", "-V").splitlines()[0]
    import zstandard
    libzstd = ".".join(map(str, getattr(zstandard, "ZSTD_VERSION", ())))
    return (f"{zstd_version()}; {partclone_version('partclone.ext4')}; {e2v}; "
            f"python-zstandard {zstandard.__version__} (libzstd {libzstd})")
