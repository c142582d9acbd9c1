"""A target's partition table after an image is written onto it.

An image holds the source's table as bytes, so MBR and GPT come back exactly
(disk and partition GUIDs, types, names, attributes, boot code). What a
larger target needs on top:

- GPT: the backup header and partition array belong in the disk's last
  sectors. ``move_gpt_backup`` writes them at the target's end, points the
  primary header at them (AlternateLBA, LastUsableLBA, header CRC), zeroes
  the old backup copy at the source's end and widens the protective MBR.
  Nothing else of the table changes: every GUID stays the source's. Done
  here rather than with ``sfdisk --relocate gpt-bak-std`` (util-linux 2.38
  has it and does the same) because that leaves the old backup copy in the
  middle of the disk and rewrites whatever libfdisk decides; here exactly
  the fields that must change do, both CRCs checked before and after.
- MBR: nothing lies at the disk's end, nothing moves.
- ``grow_last_partition``: the partition ending last is enlarged to the end
  of the disk with ``sfdisk -N`` (its start, type, GUIDs and name kept; for
  an MBR logical partition its extended container first), and the table is
  read back to prove nothing else changed.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import zlib
from typing import Any

from handlers.imaging.store import ImageError

GPT_SIGNATURE = b"EFI PART"
BLKSSZGET = 0x1268
BLKRRPART = 0x125F
EXTENDED_TYPES = {"5", "f", "85"}
SBIN = ("/usr/sbin", "/sbin")
# GPT header: signature, revision, header size, header CRC, reserved, MyLBA,
# AlternateLBA, FirstUsableLBA, LastUsableLBA, disk GUID, PartitionEntryLBA,
# number of entries, entry size, entries CRC (UEFI 2.10 §5.3.2)
_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")


def find_tool(name: str, package: str) -> str:
    """The path of a system tool, or an ImageError naming its package."""
    path = shutil.which(name) or next((os.path.join(d, name) for d in SBIN
                                       if os.access(os.path.join(d, name), os.X_OK)), None)
    if path is None:
        raise ImageError(f"{name} is not installed (Debian package {package})")
    return path


def logical_sector_size(fd: int) -> int | None:
    """A block device's logical sector size; None for a disk file."""
    if not stat.S_ISBLK(os.fstat(fd).st_mode):
        return None
    return struct.unpack("I", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0]


def table_sector_size(table: dict[str, Any] | None) -> int:
    return int((table or {}).get("sectorsize", 512))


def check_sector_size(fd: int, table: dict[str, Any] | None, target: str) -> None:
    """Refuse, before anything is written, a block device whose sectors differ
    from those the image's partition table counts in (it would not be found)."""
    if not table:
        return
    theirs, ours = logical_sector_size(fd), table_sector_size(table)
    if theirs is not None and theirs != ours:
        raise ImageError(f"target {target} has {theirs}-byte logical sectors; the image's "
                         f"{table.get('label', '')} partition table counts {ours}-byte sectors "
                         "and would not be found there")


def reread_partitions(fd: int) -> None:
    """Ask the kernel to re-read a block device's table (best effort: a disk
    file has none, and a busy disk keeps its old view until it is released)."""
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        try:
            fcntl.ioctl(fd, BLKRRPART)
        except OSError:
            pass


# ---- GPT ---------------------------------------------------------------------------

def _crc_header(raw: bytes, size: int) -> int:
    return zlib.crc32(raw[:16] + b"\0\0\0\0" + raw[20:size]) & 0xFFFFFFFF


def _set_header(raw: bytes, size: int, **changes: int) -> bytes:
    """The header ``raw`` with fields changed (by name) and its CRC recomputed."""
    names = ("signature", "revision", "header_size", "header_crc", "reserved", "my_lba",
             "alternate_lba", "first_usable", "last_usable", "disk_guid", "entries_lba",
             "entries", "entry_size", "entries_crc")
    fields = dict(zip(names, _HEADER.unpack_from(raw)))
    fields.update(changes)
    packed = bytearray(raw)
    _HEADER.pack_into(packed, 0, *(fields[n] for n in names))
    struct.pack_into("<I", packed, 16, _crc_header(bytes(packed), size))
    return bytes(packed)


def read_gpt(fd: int, sector: int, where: str = "the primary GPT header") -> dict | None:
    """The primary GPT header at LBA 1 and its partition array, both CRC-checked;
    None when LBA 1 holds no GPT signature (an MBR disk, or no table)."""
    raw = os.pread(fd, sector, sector)
    if raw[:8] != GPT_SIGNATURE:
        return None
    (_, _, size, crc, _, my_lba, alternate, first_usable, last_usable, _, entries_lba,
     entries, entry_size, entries_crc) = _HEADER.unpack_from(raw)
    if not 92 <= size <= sector or _crc_header(raw, size) != crc or my_lba != 1:
        raise ImageError(f"{where} fails its CRC or is malformed: the image's partition "
                         "table is damaged; refusing to move it")
    array_bytes = entries * entry_size
    if entry_size < 128 or array_bytes > 16 << 20:
        raise ImageError(f"{where} describes an implausible partition array "
                         f"({entries} entries of {entry_size} bytes)")
    array = os.pread(fd, array_bytes, entries_lba * sector)
    if len(array) != array_bytes or zlib.crc32(array) & 0xFFFFFFFF != entries_crc:
        raise ImageError("the GPT partition array fails its CRC: the image's partition "
                         "table is damaged; refusing to move it")
    return {"raw": raw, "size": size, "alternate": alternate, "first_usable": first_usable,
            "last_usable": last_usable, "entries_lba": entries_lba, "array": array,
            "array_sectors": -(-array_bytes // sector)}


def move_gpt_backup(fd: int, source_size: int, target_size: int, sector: int) -> dict | None:
    """On a target larger than the source, put the GPT backup at the target's end
    (see the module docstring). None when the disk has no GPT or the sizes match."""
    last_lba = target_size // sector - 1
    gpt = read_gpt(fd, sector)
    if gpt is None or target_size <= source_size or gpt["alternate"] == last_lba:
        return None
    n = gpt["array_sectors"]
    backup_entries = last_lba - n
    last_usable = backup_entries - 1
    if last_usable < gpt["last_usable"] or backup_entries <= gpt["entries_lba"] + n:
        raise ImageError("the GPT does not fit the target: its partitions reach past where "
                         "the backup table must go")
    size = gpt["size"]
    backup = _set_header(gpt["raw"][:size], size, my_lba=last_lba, alternate_lba=1,
                         entries_lba=backup_entries, last_usable=last_usable)
    primary = _set_header(gpt["raw"][:size], size, alternate_lba=last_lba,
                          last_usable=last_usable)
    os.pwrite(fd, gpt["array"], backup_entries * sector)
    os.pwrite(fd, backup + bytes(sector - size), last_lba * sector)
    os.fsync(fd)
    os.pwrite(fd, primary + gpt["raw"][size:], sector)
    # the source's backup copy (array + header, after the old last usable LBA) goes
    old = gpt["alternate"]
    zeroed = 0
    if gpt["last_usable"] < old - n and (old + 1) * sector <= source_size:
        os.pwrite(fd, bytes((n + 1) * sector), (old - n) * sector)
        zeroed = (n + 1) * sector
    pmbr = _widen_protective_mbr(fd, source_size // sector, target_size // sector)
    return {"label": "gpt", "backup_header_lba": last_lba, "last_usable_lba": last_usable,
            "old_backup_header_lba": old, "old_backup_bytes_zeroed": zeroed,
            "protective_mbr_widened": pmbr}


def _widen_protective_mbr(fd: int, old_sectors: int, new_sectors: int) -> bool:
    """A protective MBR entry (type 0xEE from LBA 1) that covered the source
    disk is made to cover the target (a hybrid or odd one is left alone)."""
    mbr = bytearray(os.pread(fd, 512, 0))
    if len(mbr) < 512 or mbr[510:512] != b"\x55\xaa":
        return False
    for slot in range(4):
        entry = 446 + 16 * slot
        ptype = mbr[entry + 4]
        first, count = struct.unpack_from("<II", mbr, entry + 8)
        if ptype == 0xEE and first == 1 and count == min(old_sectors - 1, 0xFFFFFFFF):
            struct.pack_into("<I", mbr, entry + 12, min(new_sectors - 1, 0xFFFFFFFF))
            os.pwrite(fd, bytes(mbr), 0)
            return True
    return False


# ---- the table as sfdisk reads it, and growing its last partition -----------------

def read_table(target: str) -> dict[str, Any] | None:
    """``sfdisk --json`` of the target; None when it has no partition table
    (sfdisk finds none, or an empty "dos" one, as it reports for a disk whose
    first sector is a file system's boot sector)."""
    sfdisk = find_tool("sfdisk", "fdisk")
    out = subprocess.run([sfdisk, "--json", target], capture_output=True, text=True,
                         timeout=120)
    if out.returncode != 0:
        if "does not contain a recognized partition table" in out.stderr:
            return None
        raise ImageError(f"sfdisk --json {target} failed: {out.stderr.strip()}")
    table = json.loads(out.stdout).get("partitiontable")
    if not table or not table.get("partitions"):
        return None
    return table


def partition_number(target: str, node: str) -> int:
    """Partition number from sfdisk's node name (``disk.img3``, ``/dev/nvme0n1p3``)."""
    rest = node.removeprefix(target)
    match = re.search(r"(\d+)$", rest)
    if not match:
        raise ImageError(f"cannot tell the partition number of {node}")
    return int(match.group(1))


def last_partition(table: dict[str, Any]) -> dict[str, Any]:
    """The partition that ends last on the disk (an extended container is not one)."""
    parts = [p for p in table["partitions"]
             if str(p.get("type", "")).lower() not in EXTENDED_TYPES]
    if not parts:
        raise ImageError("grow: the partition table holds only extended containers")
    return max(parts, key=lambda p: p["start"] + p["size"])


def has_room(table: dict[str, Any], target_size: int) -> bool:
    """Whether free space follows the partition ending last (up to the GPT's last
    usable LBA, or the disk's end for MBR, at most 2^32 sectors)."""
    sector = table_sector_size(table)
    last = last_partition(table)
    end_limit = int(table["lastlba"]) if table["label"] == "gpt" else \
        min(target_size // sector, 1 << 32) - 1
    return last["start"] + last["size"] - 1 < end_limit


def grow_last_partition(target: str, target_size: int) -> dict[str, Any]:
    """Enlarge the partition ending last to the end of the disk (its start,
    type, GUIDs and name kept; an MBR logical partition's extended container
    first), and prove from the table read back that nothing else changed."""
    table = read_table(target)
    if table is None or not has_room(table, target_size):
        raise ImageError("grow: the target's table has no room after its last partition")
    sector = table_sector_size(table)
    last = last_partition(table)
    number = partition_number(target, last["node"])
    containers = []
    if table["label"] == "dos" and number >= 5:
        containers = [p for p in table["partitions"]
                      if str(p.get("type", "")).lower() in EXTENDED_TYPES]
    for part in (*containers, last):
        _sfdisk_grow(target, partition_number(target, part["node"]))
    after = read_table(target)
    changed = {partition_number(target, p["node"]) for p in (*containers, last)}
    _check_only_sizes_grew(table, after, changed, target)
    grown = next(p for p in after["partitions"] if p["node"] == last["node"])
    return {"partition": number, "node": last["node"], "start_bytes": last["start"] * sector,
            "from_bytes": last["size"] * sector, "to_bytes": grown["size"] * sector}


def _sfdisk_grow(target: str, number: int) -> None:
    sfdisk = find_tool("sfdisk", "fdisk")
    out = subprocess.run([sfdisk, "--no-reread", "--no-tell-kernel", "-q", "-N", str(number),
                          target], input=", +\n", capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise ImageError(f"grow: sfdisk -N {number} {target} failed: "
                         f"{(out.stderr or out.stdout).strip()}")


def _check_only_sizes_grew(before: dict, after: dict | None, changed: set[int],
                           target: str) -> None:
    """After sfdisk: the same table with only the grown partitions' sizes larger."""
    def strip(table: dict) -> dict:
        return {k: v for k, v in table.items() if k not in ("partitions", "device")}

    problem = None
    if after is None or strip(after) != strip(before):
        problem = "the table's header (label, id, first/last LBA) changed"
    elif len(after["partitions"]) != len(before["partitions"]):
        problem = "the number of partitions changed"
    else:
        for old, new in zip(before["partitions"], after["partitions"]):
            grew = partition_number(target, old["node"]) in changed
            same = {k: v for k, v in old.items() if k != "size"} == \
                {k: v for k, v in new.items() if k != "size"}
            if not same or (new["size"] < old["size"] if grew else new["size"] != old["size"]):
                problem = f"partition {old['node']} changed beyond its size"
                break
    if problem:
        raise ImageError(f"grow: after sfdisk, {problem}; the target's table is not the "
                         "image's any more")
