"""Imaging, NTFS: capture and deploy of a 1 GiB NTFS disk file with stale data,
side by side with ``partclone.ntfs | zstd`` and ``ntfsclone --save-image | zstd``
(issue #16), in one run. The machinery (contents, process timing, series) is
bench/imaging.py's.

The disk: a 1 GiB file made with ``mkntfs -F -Q`` (4 KiB clusters), holding
~200 MB of random files and ~200 MB of compressible ones (imaging.py's Content:
log lines, CSV rows, 64-byte records), 64 KiB-32 MiB each, copied in one by one
with ``ntfscp`` (nothing mounts; ntfs-3g has no tool that makes a tree in one
call, and ~100 calls of ``ntfscp`` take a second or two), into its root
directory, plus ~100 MB more (half random) interleaved with them that
``ntfstruncate`` then cuts to 0 bytes: their clusters are free in $Bitmap but
keep their bytes. ``ntfsfix -n`` must be clean.

Measured, each ``runs`` times (median reported), tools interleaved per round:

- capture: ours (``python -c`` calling ``capture()``), ``partclone.ntfs -a0 -c
  -s disk -o - | zstd -1 -T2``, ``ntfsclone --save-image -o - disk | zstd -1
  -T2``, and for context ``partclone.ntfs -a0 -f 0 …`` and ``zstd -1 -T2`` of
  the whole disk (the image ``zstd -d`` deploys);
- deploy: ours onto a 1 GiB target pre-filled with random bytes, ``zstd -d -c
  image > target`` + fsync, and for context ``zstd -d | ntfsclone
  --restore-image --overwrite target -`` + fsync (into an empty file: ntfsclone
  truncates a file target anyway).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench.imaging import (CAPTURE_CHILD, DEPLOY_CHILD, DISK_BYTES, EXT, MiB, RSS_GOAL, SEED,
                           Content, Series, _sizes, drop_caches, fill_random, fsync_path, rate,
                           read_through, run, say, sha256_file, timed, tool, tree_size)
from bench.report import Conditions, Row, machine_lines, mb, table

HEADING = "### NTFS"
RANDOM_BYTES = 200 * MiB          # kept, incompressible
TEXT_BYTES = 200 * MiB            # kept, compressible
STALE_BYTES = 100 * MiB           # written, then cut to 0 by ntfstruncate (half random)

CAPTURE_GOAL = 1.5     # x the faster of partclone.ntfs+zstd and ntfsclone+zstd
SIZE_GOAL = 1.02       # x partclone.ntfs+zstd
DEPLOY_GOAL = 1.0      # x zstd -d


@dataclass
class NtfsDisk:
    path: Path
    tree_bytes: dict[str, int] = field(default_factory=dict)   # kind -> bytes kept
    files: int = 0
    stale_files: int = 0
    stale_bytes: int = 0
    used_bytes: int = 0          # used clusters x cluster size, as ntfscluster -i counts them
    cluster_size: int = 0
    clusters: int = 0
    digests: dict[str, str] = field(default_factory=dict)      # every kept file: name -> sha256
    ntfscp_calls: int = 0
    ntfscp_s: float = 0.0
    build_s: float = 0.0


def build_disk(workdir: Path) -> NtfsDisk:
    started = time.monotonic()
    content = Content(SEED + 16)
    rng = content.rng
    disk = NtfsDisk(workdir / "disk-ntfs.img")
    plan: list[tuple[str, int, bool]] = []   # (kind, size, made stale later)
    plan += [("random", size, False) for size in _sizes(rng, RANDOM_BYTES)]
    kinds = ["log", "csv", "rec"]
    plan += [(kinds[i % 3], size, False) for i, size in enumerate(_sizes(rng, TEXT_BYTES))]
    plan += [("random" if i % 2 == 0 else kinds[i % 3], size, True)
             for i, size in enumerate(_sizes(rng, STALE_BYTES))]
    rng.shuffle(plan)   # stale files' clusters interleaved with kept ones
    with open(disk.path, "wb") as fh:
        fh.truncate(DISK_BYTES)
    run(tool("mkntfs"), "-F", "-Q", "-q", "-L", "bench", disk.path)
    ntfscp, scratch = tool("ntfscp"), workdir / "ntfscp.tmp"
    stale: list[str] = []
    for n, (kind, size, doomed) in enumerate(plan):
        name = f"{'tmp-' if doomed else ''}{kind}-{n:03d}{EXT[kind]}"
        data = content.random(size) if kind == "random" else content.compressible(kind, size)
        scratch.write_bytes(data)
        t0 = time.monotonic()
        run(ntfscp, disk.path, scratch, name)
        disk.ntfscp_s += time.monotonic() - t0
        disk.ntfscp_calls += 1
        if doomed:
            stale.append(name)
            disk.stale_bytes += size
        else:
            disk.files += 1
            disk.tree_bytes[kind] = disk.tree_bytes.get(kind, 0) + size
            disk.digests[name] = hashlib.sha256(data).hexdigest()
    scratch.unlink()
    numbers = inodes(disk.path)
    for name in stale:
        run(tool("ntfstruncate"), disk.path, numbers[name], 0)
    disk.stale_files = len(stale)
    ok, out = ntfsfix_clean(disk.path)
    if not ok:
        raise RuntimeError(f"ntfsfix -n of the bench disk is not clean:\n{out}")
    disk.cluster_size, free, total = cluster_info(disk.path)
    disk.used_bytes = (total - free) * disk.cluster_size
    disk.clusters = total
    disk.build_s = time.monotonic() - started
    return disk


def inodes(path: Path) -> dict[str, int]:
    out = run(tool("ntfsls"), "-i", path).stdout
    return {m.group(2): int(m.group(1)) for m in re.finditer(r"^\s*(\d+)\s+(\S+)$", out, re.M)}


def ntfsfix_clean(path: Path) -> tuple[bool, str]:
    out = subprocess.run([tool("ntfsfix"), "-n", str(path)], capture_output=True, text=True)
    return out.returncode == 0 and "processed successfully" in out.stdout, out.stdout + out.stderr


def cluster_info(path: Path) -> tuple[int, int, int]:
    """(bytes per cluster, free clusters, clusters) as ntfs-3g's ntfscluster -i counts them
    (its "clusters per volume" line is printed wrong, hence bytes over cluster size)."""
    out = run(tool("ntfscluster"), "-i", path).stdout

    def num(label: str) -> int:
        return int(re.search(label + r"\s*:\s*(\d+)", out).group(1))
    cs = num("bytes per cluster")
    return cs, num("clusters of free space"), num("bytes per volume") // cs


# ---- the bench ------------------------------------------------------------------------

def bench(workdir: Path, runs: int = 3, cold: bool = False,
          say: Callable[[str], None] = say) -> tuple[list[Row], dict]:
    """Build the disk, measure; return the rows and facts for the notes."""
    python = sys.executable
    zstd, partclone, ntfsclone = tool("zstd"), tool("partclone.ntfs"), tool("ntfsclone")
    say(f"building the 1 GiB NTFS disk in {workdir}")
    disk = build_disk(workdir)
    say(f"NTFS disk built in {disk.build_s:.1f} s ({disk.ntfscp_calls} ntfscp calls, "
        f"{disk.ntfscp_s:.1f} s): {mb(disk.used_bytes)} used, {mb(disk.stale_bytes)} stale "
        f"({disk.stale_files} files)")

    if cold and not drop_caches():
        say("cannot drop caches (not root?): measuring with a warm cache instead")
        cold = False
    if not cold:
        read_through(disk.path)

    def prepare() -> None:
        os.sync()
        if cold:
            drop_caches()

    src = str(disk.path)
    log = str(workdir / "partclone.log")
    competitors = {   # name -> (image, stages)
        "partclone": (workdir / "disk.pc.zst",
                      [("partclone", [partclone, "-a0", "-c", "-s", src, "-o", "-", "-L", log]),
                       ("zstd", [zstd, "-q", "-1", "-T2"])]),
        "ntfsclone": (workdir / "disk.nc.zst",
                      [("ntfsclone", [ntfsclone, "--save-image", "-o", "-", src]),
                       ("zstd", [zstd, "-q", "-1", "-T2"])]),
        "partclone-f0": (workdir / "disk.pc.zst",
                         [("partclone", [partclone, "-a0", "-f", "0", "-c", "-s", src, "-o", "-",
                                         "-L", log]),
                          ("zstd", [zstd, "-q", "-1", "-T2"])]),
        "zstd": (workdir / "disk.zst", [("zstd", [zstd, "-q", "-1", "-T2", "-c", src])]),
    }
    cap = {name: Series() for name in ("ours", *competitors)}
    store = workdir / "store"
    meta: dict = {}
    for i in range(runs):
        say(f"NTFS capture round {i + 1}/{runs}")
        for name, (image, stages) in competitors.items():
            image.unlink(missing_ok=True)
            prepare()
            res = timed(stages, out=image, errdir=workdir)
            cap[name].runs.append(res)
            cap[name].out_sizes.append(image.stat().st_size)
            if name in ("partclone", "ntfsclone"):
                cap[name].fsync_s.append(fsync_path(image))
        shutil.rmtree(store, ignore_errors=True)
        store.mkdir()
        prepare()
        res = timed([("ours", [python, "-c", CAPTURE_CHILD, src, str(store), "disk",
                               str(workdir / "capture.json")])],
                    child_json=workdir / "capture.json", errdir=workdir)
        cap["ours"].runs.append(res)
        vdir = store / "disk" / res.child["result"]["version"]
        cap["ours"].out_sizes.append(tree_size(vdir))
        meta = json.loads((vdir / "meta.json").read_text())

    dep = {"ours": Series(), "zstd": Series(), "ntfsclone": Series()}
    target_ours, target_zstd = workdir / "target-ours.img", workdir / "target-zstd.img"
    target_nc = workdir / "target-ntfsclone.img"
    fill_rng = random.Random(SEED + 17)
    digests, verified = set(), {}
    for i in range(runs):
        say(f"NTFS deploy round {i + 1}/{runs}")
        fill_random(target_ours, fill_rng)
        prepare()
        res = timed([("ours", [python, "-c", DEPLOY_CHILD, str(store), "disk", str(target_ours),
                               str(workdir / "deploy.json")])],
                    child_json=workdir / "deploy.json", errdir=workdir)
        dep["ours"].runs.append(res)
        digests.add(res.child["result"]["target_sha256"])
        if i == 0:
            say("checking our deployed NTFS disk: ntfsfix -n, every file by ntfscat")
            verified = verify_deployed(target_ours, disk)
        with open(target_zstd, "wb"):
            pass
        prepare()
        res = timed([("zstd", [zstd, "-q", "-d", "-c", str(competitors["zstd"][0])])],
                    out=target_zstd, fsync_out=True, errdir=workdir)
        dep["zstd"].runs.append(res)
        if os.stat(target_zstd).st_size != DISK_BYTES:
            raise RuntimeError("zstd -d restored a disk of the wrong size")
        if i == 0:
            say("checking the zstd round trip: sha256 of the restored disk")
            zstd_ok = sha256_file(target_zstd) == sha256_file(disk.path)
        # context: ntfsclone's own restore (it truncates a file target, writes the used
        # clusters, leaves holes, and syncs before it exits); the fsync after it is timed too
        with open(target_nc, "wb"):
            pass
        prepare()
        res = timed([("zstd", [zstd, "-q", "-d", "-c", str(competitors["ntfsclone"][0])]),
                     ("ntfsclone", [ntfsclone, "-q", "--restore-image", "--overwrite",
                                    str(target_nc), "-"])], errdir=workdir)
        res.wall_s += fsync_path(target_nc)
        dep["ntfsclone"].runs.append(res)
    target_nc.unlink(missing_ok=True)

    fs = (meta.get("source", {}).get("filesystems") or [{}])[0]
    checks = {
        "our plan is ntfs-bitmap": fs.get("strategy") == "ntfs-bitmap",
        "our free clusters = ntfscluster -i's":
            fs.get("free_clusters") == disk.clusters - disk.used_bytes // disk.cluster_size,
        "our target_sha256 identical over runs": len(digests) == 1,
        "our image size identical over runs": len(set(cap["ours"].out_sizes)) == 1,
        "partclone+zstd size identical over runs (with -f 0 too)":
            len(set(cap["partclone"].out_sizes + cap["partclone-f0"].out_sizes)) == 1,
        "ntfsclone+zstd size identical over runs": len(set(cap["ntfsclone"].out_sizes)) == 1,
        "zstd -d round trip sha256 = source": zstd_ok,
        **verified,
    }
    facts = {"disk": disk, "cold": cold, "runs": runs, "meta": meta, "checks": checks}
    return rows(disk, cap, dep, meta, checks), facts


def verify_deployed(target: Path, disk: NtfsDisk) -> dict[str, bool]:
    ok, out = ntfsfix_clean(target)
    if not ok:
        say(f"ntfsfix -n of our deployed NTFS disk is not clean:\n{out}")
    same = True
    for name, digest in disk.digests.items():
        got = subprocess.run([tool("ntfscat"), str(target), f"/{name}"], capture_output=True,
                             check=True).stdout
        same &= hashlib.sha256(got).hexdigest() == digest
    return {"our deploy: ntfsfix -n clean (run 1)": ok,
            f"our deploy: all {len(disk.digests)} files byte-identical by ntfscat (run 1)": same}


def rows(disk: NtfsDisk, cap: dict[str, Series], dep: dict[str, Series], meta: dict,
         checks: dict[str, bool]) -> list[Row]:
    fs = (meta.get("source", {}).get("filesystems") or [{}])[0]
    plan_used, plan_scan = fs.get("used_bytes", 0), fs.get("scan_bytes", 0)
    ours, pc, nc, pcf, z = (cap[k] for k in ("ours", "partclone", "ntfsclone", "partclone-f0",
                                              "zstd"))
    best_name, best = min((("partclone+zstd", pc.wall), ("ntfsclone+zstd", nc.wall)),
                          key=lambda x: x[1])
    ours_call = ours.child("call_s")
    speedup = best / ours.wall
    size_ratio = ours.out_sizes[-1] / pc.out_sizes[-1]
    d_ours, d_z, d_nc = dep["ours"], dep["zstd"], dep["ntfsclone"]
    d_ratio = d_z.wall / d_ours.wall
    kept = sum(disk.tree_bytes.values())
    tb = disk.tree_bytes
    return [
        Row("Source disk: 1 GiB NTFS file (`mkntfs -F -Q`, 4 KiB clusters, files put by "
            f"`ntfscp`), then `ntfstruncate` of {disk.stale_files} files to 0",
            f"{disk.files} files kept, {mb(kept)} (random {mb(tb.get('random', 0))}, logs "
            f"{mb(tb.get('log', 0))}, CSV {mb(tb.get('csv', 0))}, 64-byte records "
            f"{mb(tb.get('rec', 0))}); {mb(disk.stale_bytes)} stale (half random); used clusters "
            f"{mb(disk.used_bytes)} (ntfscluster -i); our plan reads {mb(plan_used)} used + "
            f"{mb(plan_scan)} scanned; ntfsfix -n clean"),
        Row(f"Capture throughput, ours (1 GiB / wall, median of {len(ours.runs)})",
            f"{rate(ours.wall):.0f} MB/s ({ours.walls()} s, whole `python -c` process); "
            f"{speedup:.2f}× {best_name}; capture() call alone {rate(ours_call):.0f} MB/s "
            f"({best / ours_call:.2f}×)",
            f"≥ {CAPTURE_GOAL}× the faster of partclone+zstd and ntfsclone+zstd "
            f"(≥ {rate(best) * CAPTURE_GOAL:.0f} MB/s)", speedup >= CAPTURE_GOAL),
        Row("  ↳ ours, used data MB/s (NTFS used clusters / wall)",
            f"{rate(ours.wall, disk.used_bytes):.0f} MB/s (capture() call alone "
            f"{rate(ours_call, disk.used_bytes):.0f} MB/s); interpreter start + imports "
            f"{ours.wall - ours_call:.2f} s of the process"),
        Row("  ↳ `partclone.ntfs -a0 -c -s disk -o - | zstd -1 -T2`",
            f"{rate(pc.wall):.0f} MB/s ({pc.walls()} s); output not fsync'd (an fsync after it "
            f"took {statistics.median(pc.fsync_s):.2f} s more)"),
        Row("  ↳ `ntfsclone --save-image -o - disk | zstd -1 -T2`",
            f"{rate(nc.wall):.0f} MB/s ({nc.walls()} s); output not fsync'd (an fsync after it "
            f"took {statistics.median(nc.fsync_s):.2f} s more)"),
        Row("  ↳ `partclone.ntfs -a0 -f 0 …` (without partclone's 2 s progress wait at exit), "
            "for context",
            f"{rate(pcf.wall):.0f} MB/s ({pcf.walls()} s); ours is {pcf.wall / ours.wall:.2f}× "
            f"(call alone {pcf.wall / ours_call:.2f}×)"),
        Row("  ↳ `zstd -1 -T2 -c disk > image` (whole disk; the image `zstd -d` deploys), "
            "for context", f"{rate(z.wall):.0f} MB/s ({z.walls()} s)"),
        Row("  ↳ CPU time per capture (user+sys, median)",
            f"ours {ours.cpu():.2f} s; partclone {pc.cpu('partclone'):.2f} s + zstd "
            f"{pc.cpu('zstd'):.2f} s; ntfsclone {nc.cpu('ntfsclone'):.2f} s + zstd "
            f"{nc.cpu('zstd'):.2f} s; zstd alone {z.cpu():.2f} s"),
        Row("Image size, ours (data.zst + index.bin + meta.json)",
            f"{mb(ours.out_sizes[-1])} = {size_ratio:.3f}× partclone+zstd "
            f"({mb(pc.out_sizes[-1])})", f"≤ {SIZE_GOAL}×", size_ratio <= SIZE_GOAL),
        Row("  ↳ others", f"ntfsclone+zstd {mb(nc.out_sizes[-1])} (ours "
            f"{ours.out_sizes[-1] / nc.out_sizes[-1]:.3f}×); `zstd -1` of the whole disk (stale "
            f"bytes included) {mb(z.out_sizes[-1])}"),
        Row(f"Deploy throughput, ours (1 GiB / wall, median of {len(d_ours.runs)}, fsync incl.)",
            f"{rate(d_ours.wall):.0f} MB/s ({d_ours.walls()} s, whole process; deploy() call "
            f"alone {rate(d_ours.child('call_s')):.0f} MB/s); {d_ratio:.2f}× zstd -d",
            f"≥ {DEPLOY_GOAL}× zstd -d", d_ratio >= DEPLOY_GOAL),
        Row("  ↳ `zstd -d -c image > target && sync target`",
            f"{rate(d_z.wall):.0f} MB/s ({d_z.walls()} s)"),
        Row("  ↳ `zstd -d -c image | ntfsclone --restore-image --overwrite target -` + fsync "
            "(a sparse file), for context", f"{rate(d_nc.wall):.0f} MB/s ({d_nc.walls()} s); ours is "
            f"{d_nc.wall / d_ours.wall:.2f}×"),
        Row("  ↳ CPU time per deploy (user+sys, median)",
            f"ours {d_ours.cpu():.2f} s; zstd -d {d_z.cpu():.2f} s; zstd -d + ntfsclone "
            f"{d_nc.cpu():.2f} s"),
        Row("Peak RSS of our capture process (max of runs)",
            mb(ours.maxrss("ours")), f"≤ {mb(RSS_GOAL)}", ours.maxrss("ours") <= RSS_GOAL),
        Row("  ↳ peak RSS, others",
            f"partclone {mb(pc.maxrss('partclone'))} + its zstd {mb(pc.maxrss('zstd'))}; "
            f"ntfsclone {mb(nc.maxrss('ntfsclone'))} + its zstd {mb(nc.maxrss('zstd'))}; our "
            f"deploy {mb(d_ours.maxrss('ours'))}; zstd -d {mb(d_z.maxrss('zstd'))}"),
        Row("Checks", "; ".join(f"{k}: {'yes' if v else '**NO**'}" for k, v in checks.items()),
            "all yes", all(checks.values())),
    ]


def notes(facts: dict) -> str:
    d = facts["disk"]
    cache = ("Cold cache: caches dropped before every run of every tool." if facts["cold"] else
             "Warm cache, as for ext4: the disk read once before the first run; `sync` (untimed) "
             "before every run.")
    return textwrap.fill(f"""\
Notes: as for ext4 above (MB = 2^20 bytes; throughput = 1 GiB over wall time, median of
{facts['runs']} runs; ours as a `python -c` child, whole process timed; competitors' captures
not fsync'd, ours fsyncs its image), with these differences. Per round the captures run in
the order partclone+zstd, ntfsclone+zstd, partclone -f 0 + zstd, zstd, ours; then our
deploy, zstd -d, zstd -d | ntfsclone --restore-image. partclone.ntfs runs with `-a0` (no
checksums in its image, as for ext4; its default CRC32 ones cost partclone ~1 s more CPU on this disk). The verdict is
against the faster of the issue's two commands as written (partclone with its default
2 s progress refresh). {cache} The disk took {d.build_s:.1f} s to build, of which
{d.ntfscp_calls} `ntfscp` calls {d.ntfscp_s:.1f} s. Its stale files keep their MFT
records (0 bytes long), their clusters free with the old bytes in them: ours, partclone and
ntfsclone leave those bytes out of their images, `zstd` of the whole disk keeps them. Our
deploy writes zeros there (holes punched in the random-filled target); our deployed disk is
checked with `ntfsfix -n` and by reading every kept file back with `ntfscat` (run 1). The
ntfsclone restore, for context: into a target file truncated just before (untimed); it
writes the used clusters, leaves holes for the free ones, and syncs before it exits.""", width=90) + "\n"


def subsection(workdir: Path, runs: int, cold: bool, quick: bool) -> str:
    conditions = Conditions()
    workdir.mkdir(parents=True, exist_ok=True)
    rws, facts = bench(workdir, runs=runs, cold=cold)
    mode = (f"{runs} runs per tool, " + ("cold cache" if facts["cold"] else "warm cache")
            + (" (quick)" if quick else ""))
    return "\n".join([HEADING, "", *machine_lines(workdir, mode), conditions.line(),
                      f"- Tools: {version_line()}", "", table(rws), "", notes(facts)])


def version_line() -> str:
    zstd = run(tool("zstd"), "--version").stdout.strip().split(",")[0].replace("*** ", "")
    pc = subprocess.run([tool("partclone.ntfs"), "--version"], capture_output=True, text=True)
    pcv = (pc.stdout + pc.stderr).strip().splitlines()[0].split("(")[0].strip()
    nc = subprocess.run([tool("ntfsclone"), "--version"], capture_output=True, text=True)
    ncv = next((line.strip() for line in (nc.stdout + nc.stderr).splitlines()
                if "ntfsclone" in line), "ntfsclone ?")
    return f"{zstd}; partclone.ntfs {pcv}; {ncv}"
