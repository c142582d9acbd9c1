"""Imaging, NTFS: capture and deploy of a 1 GiB NTFS disk file with stale data,
side by side with ``partclone.ntfs | zstd`` and ``ntfsclone --save-image | zstd``
(issue #16), in one run. The machinery (contents, process timing, the measuring
rounds of ``measure()``, the shared rows) is bench/imaging.py's.

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
import re
import subprocess
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench.imaging import (DISK_BYTES, EXT, SEED, BenchDisk, Competitor, Content, DeployCheck,
                           Restore, Series, capture_row, checks_row, deploy_rows, f0_value,
                           image_size_row, measure, measured_subsection, partclone_stages,
                           partclone_version, plan_files, plan_of, rate, rss_row, run, say, tool,
                           tool_says, unsynced, zstd_stages, zstd_version)
from bench.report import Row, mb

HEADING = "### NTFS"

CAPTURE_GOAL = 1.5     # x the faster of partclone.ntfs+zstd and ntfsclone+zstd
SIZE_GOAL = 1.02       # x partclone.ntfs+zstd
DEPLOY_GOAL = 1.0      # x zstd -d


@dataclass
class NtfsDisk(BenchDisk):
    stale_files: int = 0
    stale_bytes: int = 0
    cluster_size: int = 0        # used_bytes: used clusters x cluster size, by ntfscluster -i
    clusters: int = 0
    digests: dict[str, str] = field(default_factory=dict)      # every kept file: name -> sha256
    ntfscp_calls: int = 0
    ntfscp_s: float = 0.0


def build_disk(workdir: Path) -> NtfsDisk:
    started = time.monotonic()
    content = Content(SEED + 16)
    rng = content.rng
    disk = NtfsDisk(workdir / "disk-ntfs.img")
    plan = plan_files(rng)   # (kind, size, made stale later), interleaved
    with open(disk.path, "wb") as fh:
        fh.truncate(DISK_BYTES)
    run(tool("mkntfs"), "-F", "-Q", "-q", "-L", "bench", disk.path)
    ntfscp, scratch = tool("ntfscp"), workdir / "ntfscp.tmp"
    stale: list[str] = []
    for n, (kind, size, doomed) in enumerate(plan):
        name = f"{'tmp-' if doomed else ''}{kind}-{n:03d}{EXT[kind]}"
        data = content.of(kind, size)
        scratch.write_bytes(data)
        t0 = time.monotonic()
        run(ntfscp, disk.path, scratch, name)
        disk.ntfscp_s += time.monotonic() - t0
        disk.ntfscp_calls += 1
        if doomed:
            stale.append(name)
            disk.stale_bytes += size
        else:
            disk.keep(kind, size)
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
    zstd, partclone, ntfsclone = tool("zstd"), tool("partclone.ntfs"), tool("ntfsclone")
    say(f"building the 1 GiB NTFS disk in {workdir}")
    disk = build_disk(workdir)
    say(f"NTFS disk built in {disk.build_s:.1f} s ({disk.ntfscp_calls} ntfscp calls, "
        f"{disk.ntfscp_s:.1f} s): {mb(disk.used_bytes)} used, {mb(disk.stale_bytes)} stale "
        f"({disk.stale_files} files)")
    src, log, pc_img = str(disk.path), str(workdir / "partclone.log"), workdir / "disk.pc.zst"
    nc_img, target_nc = workdir / "disk.nc.zst", workdir / "target-ntfsclone.img"
    m = measure(
        workdir, disk.path,
        {"partclone": Competitor(pc_img, partclone_stages(partclone, zstd, src, log), fsync=True),
         "ntfsclone": Competitor(nc_img, [("ntfsclone", [ntfsclone, "--save-image", "-o", "-",
                                                         src]),
                                          ("zstd", [zstd, "-q", "-1", "-T2"])], fsync=True),
         "partclone-f0": Competitor(pc_img, partclone_stages(partclone, zstd, src, log, f0=True)),
         "zstd": Competitor(workdir / "disk.zst", zstd_stages(zstd, src))},
        DeployCheck("ntfsfix -n", ntfsfix_clean, "every file by ntfscat",
                    list(disk.digests.items()),
                    lambda target, name: [tool("ntfscat"), str(target), f"/{name}"],
                    f"all {len(disk.digests)} files byte-identical by ntfscat"),
        {"partclone+zstd size identical over runs (with -f 0 too)": ("partclone", "partclone-f0"),
         "ntfsclone+zstd size identical over runs": ("ntfsclone",)},
        runs=runs, cold=cold, fill_seed=SEED + 17, label="NTFS ", say=say,
        # context: ntfsclone's own restore (it truncates a file target, writes the used
        # clusters, leaves holes, and syncs before it exits); the fsync after it is timed too
        restores={"ntfsclone": Restore(target_nc, [
            ("zstd", [zstd, "-q", "-d", "-c", str(nc_img)]),
            ("ntfsclone", [ntfsclone, "-q", "--restore-image", "--overwrite", str(target_nc),
                           "-"])])})

    fs = plan_of(m.meta)
    checks = {
        "our plan is ntfs-bitmap": fs.get("strategy") == "ntfs-bitmap",
        "our free clusters = ntfscluster -i's":
            fs.get("free_clusters") == disk.clusters - disk.used_bytes // disk.cluster_size,
        **m.checks,
    }
    facts = {"disk": disk, "cold": m.cold, "runs": runs, "meta": m.meta, "checks": checks}
    return rows(disk, m.cap, m.dep, m.meta, checks), facts


def rows(disk: NtfsDisk, cap: dict[str, Series], dep: dict[str, Series], meta: dict,
         checks: dict[str, bool]) -> list[Row]:
    fs = plan_of(meta)
    plan_used, plan_scan = fs.get("used_bytes", 0), fs.get("scan_bytes", 0)
    ours, pc, nc, pcf, z = (cap[k] for k in ("ours", "partclone", "ntfsclone", "partclone-f0",
                                              "zstd"))
    ours_call = ours.child("call_s")
    d_ours, d_z, d_nc = dep["ours"], dep["zstd"], dep["ntfsclone"]
    return [
        Row("Source disk: 1 GiB NTFS file (`mkntfs -F -Q`, 4 KiB clusters, files put by "
            f"`ntfscp`), then `ntfstruncate` of {disk.stale_files} files to 0",
            f"{disk.kept()}; {mb(disk.stale_bytes)} stale (half random); used clusters "
            f"{mb(disk.used_bytes)} (ntfscluster -i); our plan reads {mb(plan_used)} used + "
            f"{mb(plan_scan)} scanned; ntfsfix -n clean"),
        capture_row(ours, {"partclone+zstd": pc, "ntfsclone+zstd": nc}, CAPTURE_GOAL),
        Row("  ↳ ours, used data MB/s (NTFS used clusters / wall)",
            f"{rate(ours.wall, disk.used_bytes):.0f} MB/s (capture() call alone "
            f"{rate(ours_call, disk.used_bytes):.0f} MB/s); interpreter start + imports "
            f"{ours.wall - ours_call:.2f} s of the process"),
        Row("  ↳ `partclone.ntfs -a0 -c -s disk -o - | zstd -1 -T2`", unsynced(pc)),
        Row("  ↳ `ntfsclone --save-image -o - disk | zstd -1 -T2`", unsynced(nc)),
        Row("  ↳ `partclone.ntfs -a0 -f 0 …` (without partclone's 2 s progress wait at exit), "
            "for context", f0_value(pcf, ours)),
        Row("  ↳ `zstd -1 -T2 -c disk > image` (whole disk; the image `zstd -d` deploys), "
            "for context", f"{rate(z.wall):.0f} MB/s ({z.walls()} s)"),
        Row("  ↳ CPU time per capture (user+sys, median)",
            f"ours {ours.cpu():.2f} s; partclone {pc.cpu('partclone'):.2f} s + zstd "
            f"{pc.cpu('zstd'):.2f} s; ntfsclone {nc.cpu('ntfsclone'):.2f} s + zstd "
            f"{nc.cpu('zstd'):.2f} s; zstd alone {z.cpu():.2f} s"),
        image_size_row(ours, pc, SIZE_GOAL),
        Row("  ↳ others", f"ntfsclone+zstd {mb(nc.out_sizes[-1])} (ours "
            f"{ours.out_sizes[-1] / nc.out_sizes[-1]:.3f}×); `zstd -1` of the whole disk (stale "
            f"bytes included) {mb(z.out_sizes[-1])}"),
        *deploy_rows(d_ours, d_z, DEPLOY_GOAL),
        Row("  ↳ `zstd -d -c image | ntfsclone --restore-image --overwrite target -` + fsync "
            "(a sparse file), for context", f"{rate(d_nc.wall):.0f} MB/s ({d_nc.walls()} s); "
            f"ours is {d_nc.wall / d_ours.wall:.2f}×"),
        Row("  ↳ CPU time per deploy (user+sys, median)",
            f"ours {d_ours.cpu():.2f} s; zstd -d {d_z.cpu():.2f} s; zstd -d + ntfsclone "
            f"{d_nc.cpu():.2f} s"),
        rss_row(ours),
        Row("  ↳ peak RSS, others",
            f"partclone {mb(pc.maxrss('partclone'))} + its zstd {mb(pc.maxrss('zstd'))}; "
            f"ntfsclone {mb(nc.maxrss('ntfsclone'))} + its zstd {mb(nc.maxrss('zstd'))}; our "
            f"deploy {mb(d_ours.maxrss('ours'))}; zstd -d {mb(d_z.maxrss('zstd'))}"),
        checks_row(checks),
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
    return measured_subsection(HEADING, bench, notes, version_line, workdir, runs, cold, quick)


def version_line() -> str:
    ncv = next((line.strip() for line in tool_says("ntfsclone").splitlines()
                if "ntfsclone" in line), "ntfsclone ?")
    return f"{zstd_version()}; partclone.ntfs {partclone_version('partclone.ntfs')}; {ncv}"
