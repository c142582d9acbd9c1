"""What to read from a source disk, and facts about disks.

A plan is a list of regions, each either ``used`` (bytes a file system's own
allocation map says are in use: stored as they are) or ``scan`` (content
unknown: read, and keep only chunks that are not all zero, skipping file holes
with SEEK_DATA). With a partition table, each partition is planned on its own
and the rest of the disk (tables, gaps) is scanned.

A file system is planned by the first reader of FILESYSTEMS whose ``probe``
knows it (each a module of this package: ``probe(read_at) -> bool``,
``read_layout(read_at, size)`` -> ``used_ranges``, ``scan_ranges``,
``fs_bytes``, ``facts``); its ``Unusable`` falls back to zero-skip, with the
reason recorded; an ImageError (a volume that must not be imaged: a
hibernated NTFS, say) fails the capture with its message.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from handlers.imaging.store import ImageError

log = logging.getLogger("dsagent.imaging")

EXTENDED_TYPES = {"5", "f", "85"}  # MBR extended partition containers
WHOLE_DISK_IDS = (b"NTFS    ", b"-FVE-FS-")   # OEM ids no MBR carries at byte 3
FILESYSTEMS = ("ext4", "ntfs", "fat")  # readers of used-block maps, tried in this order


@dataclass
class Plan:
    size: int
    used: list[tuple[int, int]] = field(default_factory=list)   # absolute (offset, length)
    scan: list[tuple[int, int]] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def regions(self) -> list[tuple[int, int, str]]:
        """All regions in disk order: (offset, length, "used"|"scan")."""
        merged = [(o, n, "used") for o, n in self.used] + [(o, n, "scan") for o, n in self.scan]
        return sorted(merged)

    @property
    def read_bytes(self) -> int:
        return sum(n for _, n in self.used) + sum(n for _, n in self.scan)


def disk_size(fd: int) -> int:
    """Size in bytes of an open block device or regular file."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISBLK(mode):
        return os.lseek(fd, 0, os.SEEK_END)
    if stat.S_ISREG(mode):
        return os.fstat(fd).st_size
    raise ImageError("not a block device or a regular file")


def check_disk_path(path: str, what: str) -> None:
    """Refuse paths that are not an existing block device or disk file."""
    if not os.path.isabs(path) or "\0" in path:
        raise ImageError(f"{what} must be an absolute path, got {path!r}")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ImageError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise ImageError(f"{what} {path}: {exc.strerror}") from None
    if not (stat.S_ISBLK(mode) or stat.S_ISREG(mode)):
        raise ImageError(f"{what} {path} is not a block device or a disk file")


def in_use(path: str) -> str | None:
    """Why ``path`` must not be written (mounted, attached to a loop device), or None."""
    real = os.path.realpath(path)
    mode = os.stat(real).st_mode
    if stat.S_ISBLK(mode):
        try:
            fd = os.open(real, os.O_RDONLY | os.O_EXCL)
            os.close(fd)
        except OSError as exc:
            return f"{path} is in use (mounted or held by another program: {exc.strerror})"
        return None
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if os.path.realpath(backing.read_text().strip()) == real:
                return f"{path} is attached to /dev/{backing.parent.parent.name}"
        except OSError:
            continue
    return None


def partition_table(path: str) -> dict[str, Any] | None:
    """``sfdisk --json`` of the disk, or None when it has no partition table."""
    try:
        out = subprocess.run(["sfdisk", "--json", path], capture_output=True, text=True,
                             timeout=60)
    except FileNotFoundError:
        log.warning("sfdisk not found: partition tables are not recognised")
        return None
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        return None
    try:
        return json.loads(out.stdout).get("partitiontable")
    except ValueError:
        return None


def _reader(fd: int, base: int):
    def read_at(offset: int, length: int) -> bytes:
        return os.pread(fd, length, base + offset)
    return read_at


def _readers():
    from importlib import import_module

    return [(name, import_module(f"handlers.imaging.{name}")) for name in FILESYSTEMS]


def _plan_filesystem(fd: int, plan: Plan, start: int, size: int, label: str) -> None:
    """Plan [start, start+size): by the file system's own map when one is known, else scan."""
    read_at = _reader(fd, start)
    fs_fact: dict[str, Any] = {"where": label, "offset": start, "size": size}
    plan.facts.setdefault("filesystems", []).append(fs_fact)
    found = None
    try:
        found = next(((name, reader) for name, reader in _readers() if reader.probe(read_at)),
                     None)
        if found is None:
            fs_fact["type"] = "unknown"
            fs_fact["strategy"] = "zero-skip"
            plan.scan.append((start, size))
            return
        name, reader = found
        layout = reader.read_layout(read_at, size)
    except ImageError as exc:
        raise ImageError(f"{label}: {exc}") from None
    except OSError as exc:
        raise ImageError(f"cannot read the source: {exc.strerror or exc}") from None
    except Exception as exc:
        if found is None or not isinstance(exc, found[1].Unusable):
            raise
        fs_fact.update(type=name, strategy="zero-skip", fallback_reason=exc.reason)
        log.warning("%s: the %s allocation map is not usable (%s); reading everything", label,
                    name, exc.reason)
        plan.scan.append((start, size))
        return
    fs_fact.update(type=name, strategy=f"{name}-bitmap", **layout.facts)
    plan.used += [(start + o, n) for o, n in layout.used_ranges]
    plan.scan += [(start + o, n) for o, n in layout.scan_ranges]
    if layout.fs_bytes < size:  # slack after the filesystem's last block
        plan.scan.append((start + layout.fs_bytes, size - layout.fs_bytes))


def plan_source(path: str, fd: int) -> Plan:
    """Decide which bytes of the source to read (see module docstring)."""
    size = disk_size(fd)
    plan = Plan(size=size)
    # sector 0 an NTFS (or BitLocker) boot sector: a whole-disk volume, no table to ask
    # sfdisk for (its start is a fifth of a small capture's time)
    table = None if os.pread(fd, 11, 0)[3:11] in WHOLE_DISK_IDS else partition_table(path)
    plan.facts["partition_table"] = table
    if not table or not table.get("partitions"):
        _plan_filesystem(fd, plan, 0, size, "whole disk")
        return plan
    sector = int(table.get("sectorsize", 512))
    cursor = 0
    for part in sorted(table["partitions"], key=lambda p: p["start"]):
        if str(part.get("type", "")).lower() in EXTENDED_TYPES:
            continue  # a container: its logical partitions are listed too
        start, length = part["start"] * sector, part["size"] * sector
        if start < cursor or start + length > size:
            raise ImageError(f"partition {part.get('node')} lies outside the disk or overlaps "
                             "another; refusing to guess")
        if start > cursor:
            plan.scan.append((cursor, start - cursor))
        _plan_filesystem(fd, plan, start, length, f"partition {part.get('node')}")
        cursor = start + length
    if cursor < size:
        plan.scan.append((cursor, size - cursor))
    return plan
