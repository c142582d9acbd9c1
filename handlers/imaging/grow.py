"""``grow``: after an image is written, fill a larger target.

The partition ending last is enlarged to the end of the disk (disklabel.py,
``sfdisk -N``), then its file system: ext2/3/4 with ``resize2fs``, NTFS with
``ntfsresize``; a disk without a partition table has its file system grown
in place. Each is checked before (``e2fsck -fn``, ``ntfsresize --check``:
nothing is changed on a file system that is not clean) and after
(``e2fsck -fn``, ``ntfsfix -n``); a tool that fails fails the task with its
output. Any other file system (FAT, unknown) is refused: by the image's
metadata before anything is written when the capture recorded its type,
else before the partition is touched.

Neither resize2fs nor ntfsresize takes an offset into a disk, so a
partition of the target is handed to them as a loop device
(``losetup --offset --sizelimit``), a window onto exactly that partition:
no tool can write outside it. It is attached only for the tool's run and
always detached. This works the same for a disk file and a block device
(whose kernel partition nodes are stale right after the image is written).
"""

from __future__ import annotations

import logging
import os
import struct
import subprocess
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from handlers.imaging.disklabel import (find_tool, grow_last_partition, has_room, last_partition,
                                        read_table, table_sector_size)
from handlers.imaging.store import ImageError

log = logging.getLogger("dsagent.imaging")

GROWABLE = ("ext4", "ntfs")
TOOLS = {"ext4": ("resize2fs", "e2fsprogs"), "ntfs": ("ntfsresize", "ntfs-3g")}
HEARTBEAT_S = 2.0
OUTPUT_TAIL = 2000


def probe(read_at: Callable[[int, int], bytes]) -> str | None:
    """``ext4`` (any ext2/3/4), ``ntfs``, ``fat`` or None, by the volume's own magic."""
    boot = read_at(0, 512)
    if boot[3:11] == b"NTFS    ":
        return "ntfs"
    if boot[510:512] == b"\x55\xaa" and (boot[54:59] == b"FAT12" or boot[54:59] == b"FAT16"
                                         or boot[82:87] == b"FAT32"):
        return "fat"
    if read_at(1024 + 56, 2) == b"\x53\xef":
        return "ext4"
    return None


def fs_bytes(read_at: Callable[[int, int], bytes], kind: str) -> int:
    """The size a file system says it has (superblock / boot sector)."""
    if kind == "ext4":
        sb = read_at(1024, 1024)
        blocks = struct.unpack_from("<I", sb, 4)[0]
        if struct.unpack_from("<I", sb, 0x60)[0] & 0x80:       # INCOMPAT_64BIT
            blocks |= struct.unpack_from("<I", sb, 0x150)[0] << 32
        return blocks * (1024 << struct.unpack_from("<I", sb, 0x18)[0])
    boot = read_at(0, 512)
    return struct.unpack_from("<Q", boot, 0x28)[0] * struct.unpack_from("<H", boot, 0x0B)[0]


def _family(fs_type: str | None) -> str | None:
    """A capture's file system type name as grow sees it."""
    if not fs_type or fs_type == "unknown":
        return None
    low = fs_type.lower()
    return "ext4" if low.startswith("ext") else "ntfs" if low.startswith("ntfs") else low


def precheck(source: dict[str, Any]) -> None:
    """Before anything is written: refuse grow when the image's metadata says
    the file system to grow is one grow cannot (FAT, say), and when a tool is
    missing. A type the capture did not know is probed on the target later."""
    find_tool("sfdisk", "fdisk")
    table = source.get("partition_table")
    facts = source.get("filesystems") or []
    if table and table.get("partitions"):
        find_tool("losetup", "mount")
        part = last_partition(table)
        start = part["start"] * table_sector_size(table)
        fact = next((f for f in facts if f.get("offset") == start), {})
        where = f"the image's last partition ({part.get('node')})"
    else:
        fact = next(iter(facts), {})
        where = "the image's whole-disk file system"
    kind = _family(fact.get("type"))
    if kind is not None and kind not in GROWABLE:
        raise ImageError(f"grow: {where} is {fact.get('type')}; grow enlarges only ext4 and "
                         "NTFS file systems (deploy without grow)")
    for family in ([kind] if kind else GROWABLE):
        find_tool(*TOOLS[family])


def grow_target(target: str, source_size: int, target_size: int,
                report: Callable[..., None], low: float, high: float) -> dict[str, Any] | None:
    """Grow the target's last partition and its file system (or a whole-disk
    file system); details for ``grown``, or None when there is nothing to grow."""
    step = (high - low) / 4

    def say(n: int, message: str) -> None:
        report(round(low + step * n, 1), f"grow: {message}", phase="grow")

    table = read_table(target)
    if table is None:
        if target_size <= source_size:
            return None
        offset, length, label = 0, target_size, "the whole disk"
    else:
        if not has_room(table, target_size):
            return None
        part = last_partition(table)
        sector = table_sector_size(table)
        offset, length = part["start"] * sector, part["size"] * sector
        label = f"partition {part['node']}"
    kind = _probe_at(target, offset)
    if kind not in GROWABLE:
        raise ImageError(f"grow: {label} holds {'a FAT' if kind == 'fat' else 'no known'} file "
                         "system; grow enlarges only ext4 and NTFS (the image is written and "
                         "its partition table valid, only grow was not done)")
    say(0, f"checking the {kind} file system on {label}")
    with _device(target, offset, length, table is not None) as dev:
        _check_before(kind, dev, report, low)
    if table is None:
        grown = {"partition": None, "node": target, "start_bytes": 0,
                 "from_bytes": source_size, "to_bytes": target_size}
    else:
        say(1, f"enlarging {label} to the end of the disk")
        grown = grow_last_partition(target, target_size)
    tool = TOOLS[kind][0]
    say(2, f"{tool} on {label}")
    with _device(target, offset, grown["to_bytes"], table is not None) as dev:
        _resize(kind, dev, report, low + step * 2)
        say(3, f"checking {label} after {tool}")
        _check_after(kind, dev, report, low + step * 3)
    grown.update(filesystem=kind, tool=tool, filesystem_bytes=_fs_size(target, offset, kind))
    if kind == "ntfs":
        grown["note"] = "ntfsresize schedules chkdsk for Windows' next boot"
    say(4, f"{label} and its {kind} file system now fill the disk")
    return grown


def _probe_at(target: str, offset: int) -> str | None:
    fd = os.open(target, os.O_RDONLY)
    try:
        return probe(lambda off, n: os.pread(fd, n, offset + off))
    finally:
        os.close(fd)


def _fs_size(target: str, offset: int, kind: str) -> int:
    fd = os.open(target, os.O_RDONLY)
    try:
        return fs_bytes(lambda off, n: os.pread(fd, n, offset + off), kind)
    finally:
        os.close(fd)


@contextmanager
def _device(target: str, offset: int, length: int, window: bool) -> Iterator[str]:
    """The path a resize tool is given: a loop device over [offset, offset+length)
    of the target (detached afterwards, whatever happens), or the target itself."""
    if not window:
        yield target
        return
    losetup = find_tool("losetup", "mount")
    out = subprocess.run([losetup, "--find", "--show", "--offset", str(offset),
                          "--sizelimit", str(length), target],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise ImageError(f"grow: losetup could not attach a loop device over {target} "
                         f"(offset {offset}): {out.stderr.strip()}")
    dev = out.stdout.strip()
    try:
        yield dev
    finally:
        for attempt in range(20):   # udev may still hold it a moment after the tool
            done = subprocess.run([losetup, "-d", dev], capture_output=True, text=True)
            if done.returncode == 0:
                break
            if attempt == 19:
                log.warning("could not detach %s (over %s): %s", dev, target,
                            done.stderr.strip())
            time.sleep(0.1)


def _run(cmd: list[str], report: Callable[..., None], pct: float) -> subprocess.CompletedProcess:
    """Run a tool to its end (a resize is never interrupted), with a progress
    event every HEARTBEAT_S seconds so a long resize is seen to be alive."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    while True:
        try:
            proc.wait(timeout=HEARTBEAT_S)
            break
        except subprocess.TimeoutExpired:
            report(round(pct, 1), f"grow: {os.path.basename(cmd[0])} running "
                   f"({time.monotonic() - started:.0f} s)", phase="grow")
    reader.join()
    proc.stdout.close()
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(chunks), "")


def _fail(what: str, result: subprocess.CompletedProcess) -> ImageError:
    command = " ".join([os.path.basename(result.args[0]), *result.args[1:]])
    return ImageError(f"grow: {what} ({command} exited {result.returncode}): "
                      f"{result.stdout.strip()[-OUTPUT_TAIL:]}")


def _check_before(kind: str, dev: str, report, pct: float) -> None:
    if kind == "ext4":
        result = _run([find_tool("e2fsck", "e2fsprogs"), "-fn", dev], report, pct)
        what = "the ext4 file system is not clean before grow; nothing was changed"
    else:
        result = _run([find_tool("ntfsresize", "ntfs-3g"), "--check", dev], report, pct)
        what = "the NTFS volume cannot be resized; nothing was changed"
    if result.returncode != 0:
        raise _fail(what, result)


def _resize(kind: str, dev: str, report, pct: float) -> None:
    if kind == "ext4":
        # -f: e2fsck -fn has just checked it (resize2fs would otherwise want a
        # fresh e2fsck -f run, which writes)
        result = _run([find_tool("resize2fs", "e2fsprogs"), "-f", dev], report, pct)
    else:
        # no --size: the volume fills the device (the loop window = the partition)
        result = _run([find_tool("ntfsresize", "ntfs-3g"), "--force", "--no-progress-bar", dev],
                      report, pct)
    if result.returncode != 0:
        raise _fail(f"{TOOLS[kind][0]} failed", result)


def _check_after(kind: str, dev: str, report, pct: float) -> None:
    if kind == "ext4":
        result = _run([find_tool("e2fsck", "e2fsprogs"), "-fn", dev], report, pct)
    else:
        result = _run([find_tool("ntfsfix", "ntfs-3g"), "-n", dev], report, pct)
    if result.returncode != 0:
        raise _fail(f"the {kind} file system is not clean after {TOOLS[kind][0]}", result)
