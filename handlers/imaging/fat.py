"""Which bytes of a FAT12/16/32 volume are in use, read from its File Allocation Table.

The imaging engine stores only what a file system uses (like partclone).
Getting this wrong in the "too few" direction loses data on restore, so this
module reads the boot sector and the FATs itself (standard library only, no
dosfstools at image time) and checks them before trusting them: the FAT
copies must agree, every link of every cluster chain must lead to a cluster
the FAT marks in use, and every file and directory reachable from the root
must start on one.  Whenever something does not add up it raises FatUnusable
and the caller falls back to reading every non-zero byte.  Free clusters are
never reported as used, so stale data of deleted files stays out of images.

Layout facts relied upon (Microsoft's "FAT: General Overview of On-Disk
Format" 1.03, the kernel's fs/fat/inode.c and fatent.c, dosfstools;
verified against mkfs.vfat/mtools output by tests/test_fat.py):

* The volume is: the reserved area (boot sector, on FAT32 also FSInfo and the
  backup boot sector), BPB_NumFATs copies of the FAT, on FAT12/16 the fixed
  root directory, then the data region of clusters numbered from 2.  All of
  the first three are reported used, whatever they hold.
* The FAT type is decided by the count of data clusters, as Microsoft's
  specification says (< 4085: FAT12, < 65525: FAT16, else FAT32), never by the
  BS_FilSysType label.  A boot sector whose shape disagrees with that count
  (the FAT32 fields of mkfs.vfat -F 32 on a tiny volume: Linux reads it as
  FAT32, Windows as FAT16) is refused: two systems would read it differently.
* A cluster is in use when its entry in the FAT is not 0.  The four high bits
  of a FAT32 entry are reserved and masked.  With FAT32 mirroring disabled
  (BPB_ExtFlags bit 7) only the active FAT is read; otherwise the first FAT
  is, and every other copy must be identical to it (entries 2 and up).
* Bad-cluster marks (0xFF7, 0xFFF7, 0x0FFFFFF7) are not data: no chain may
  lead to one (that is checked, and refused), so no file loses a byte, and
  the sectors behind the mark are the ones that could not be read: reading
  them would fail the capture for nothing.  Deploy zeroes them; the mark
  itself, in the FAT, is restored with it.
* Volumes marked dirty (Linux and Windows NT: bit 0 of the byte after the
  drive number; Windows: FAT[1]'s clean-shutdown and hard-error bits on
  FAT16/32) were not cleanly unmounted: their FAT may be behind the truth.
"""

from __future__ import annotations

import re
import struct
import sys
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

from handlers.imaging.fsmap import MapUnusable

__all__ = ["FatLayout", "FatUnusable", "Unusable", "probe", "read_layout"]

_FAT12_MAX_CLUSTERS = 4084     # fewer than 4085 clusters: FAT12
_FAT16_MAX_CLUSTERS = 65524    # fewer than 65525: FAT16, else FAT32
_FAT32_MAX_CLUSTERS = 0x0FFFFFF5
_BAD = {12: 0xFF7, 16: 0xFFF7, 32: 0x0FFFFFF7}
_EOC = {12: 0xFF8, 16: 0xFFF8, 32: 0x0FFFFFF8}     # end of chain: this and above
# FAT[1] bits (FAT16, FAT32): 1 = cleanly unmounted, 1 = no disk error seen.
_CLEAN_SHUTDOWN = {16: 0x8000, 32: 0x08000000}
_NO_HARD_ERROR = {16: 0x4000, 32: 0x04000000}
_STATE_DIRTY = 0x01            # BS_Reserved1 / fat32 "state" (Linux, Windows NT)
_NOT_FAT_OEM = {b"NTFS    ": "NTFS", b"EXFAT   ": "exFAT"}
_MEDIA_OK = frozenset([0xF0, *range(0xF8, 0x100)])
MAX_FAT_BYTES = 128 << 20      # larger FATs are not held in memory: scan instead
_FSINFO_LEAD, _FSINFO_STRUCT, _FSINFO_TRAIL = 0x41615252, 0x61417272, 0xAA550000

_ATTR_VOLUME_ID, _ATTR_DIRECTORY, _ATTR_LONG_NAME = 0x08, 0x10, 0x0F
_DOT, _DOTDOT = b".          ", b"..         "
_DIRENT = struct.Struct("<11sB8xHHHHI")  # name, attr, ..., clus hi, time, date, clus lo, size
_LOW_NIBBLE = bytes(b & 0x0F for b in range(256))
_U32 = next(code for code in "IL" if array(code).itemsize == 4)


class FatUnusable(MapUnusable):
    """The FAT cannot be trusted; copy the whole volume instead."""


Unusable = FatUnusable      # the name source.py's FILESYSTEMS readers share


@dataclass
class FatLayout:
    fat_type: int               # 12, 16 or 32, by the count of clusters
    sector_size: int
    cluster_size: int
    clusters: int               # data clusters, numbered 2 .. clusters + 1
    free_clusters: int
    used_ranges: list[tuple[int, int]]  # (offset, length), sorted, merged
    scan_ranges: list[tuple[int, int]]  # usage unknown: read, keep non-zero
    fs_bytes: int
    facts: dict = field(default_factory=dict)


def _bpb_problem(boot: bytes) -> str | None:
    """Why these bytes are not a FAT boot sector, or None if they look like one."""
    if len(boot) < 512:
        return "device too small to hold a FAT boot sector"
    if boot[0] not in (0xEB, 0xE9):
        return f"no x86 jump at the start of the boot sector (0x{boot[0]:02x})"
    if boot[510:512] != b"\x55\xaa":
        return "no 0x55AA signature at the end of the boot sector"
    other = _NOT_FAT_OEM.get(bytes(boot[3:11]))
    if other:
        return f"the boot sector is {other}'s, not FAT's"
    bps, spc, rsvd, nfats = struct.unpack_from("<HBHB", boot, 11)
    if bps not in (512, 1024, 2048, 4096):
        return f"{bps} bytes per sector is not a power of two in 512..4096"
    if spc == 0 or spc & (spc - 1):
        return f"{spc} sectors per cluster is not a power of two"
    if rsvd == 0:
        return "no reserved sectors (the boot sector itself is one)"
    if not 1 <= nfats <= 4:
        return f"{nfats} FAT copies (1..4 expected)"
    tot16, media, fatsz16 = struct.unpack_from("<HBH", boot, 19)
    tot32, fatsz32 = struct.unpack_from("<II", boot, 32)
    if media not in _MEDIA_OK:
        return f"media descriptor 0x{media:02x} is not one FAT allows"
    if not (tot16 or tot32):
        return "the boot sector gives no sector count"
    if not (fatsz16 or fatsz32):
        return "the boot sector gives no FAT size"
    return None


def probe(read_at: Callable[[int, int], bytes]) -> bool:
    """True if a FAT12/16/32 boot sector (BPB) is at offset 0.

    A short read is simply "no"; I/O errors from read_at propagate."""
    return _bpb_problem(read_at(0, 512)) is None


def _read_exact(read_at: Callable[[int, int], bytes], offset: int, length: int, what: str) -> bytes:
    data = read_at(offset, length)
    if len(data) != length:
        raise FatUnusable(f"short read of {what}: wanted {length} bytes at offset {offset}, got {len(data)}")
    return data


# --------------------------------------------------------------------------
# Boot sector


@dataclass
class _Boot:
    bits: int
    bps: int
    spc: int
    rsvd: int
    nfats: int
    fat_sectors: int
    root_entries: int
    total_sectors: int
    first_data_sector: int
    clusters: int
    media: int
    fat32: dict             # FAT32 only: ext_flags, root_cluster, fsinfo, backup
    dirty: bool
    oem: str
    label: str | None
    volume_id: str | None

    @property
    def cluster_bytes(self) -> int:
        return self.bps * self.spc

    @property
    def max_cluster(self) -> int:
        return self.clusters + 1

    @property
    def entry_bytes(self) -> int:  # bytes of one FAT holding entries 0 .. clusters + 1
        return -(-(self.clusters + 2) * self.bits // 8)


def _parse_boot(boot: bytes, size: int) -> _Boot:
    why = _bpb_problem(boot)
    if why:
        raise FatUnusable(why)
    bps, spc, rsvd, nfats, root_entries, tot16, media, fatsz16 = struct.unpack_from("<HBHBHHBH", boot, 11)
    tot32, fatsz32 = struct.unpack_from("<II", boot, 32)
    if tot16 and tot32 and tot16 != tot32:
        raise FatUnusable(f"the boot sector gives two different sector counts ({tot16} and {tot32})")
    total = tot16 or tot32
    fs_bytes = total * bps
    if fs_bytes > size:
        raise FatUnusable(f"the volume claims {fs_bytes} bytes ({total} sectors of {bps}) but the partition "
                          f"has only {size} bytes")
    fat_sectors = fatsz16 or fatsz32
    if root_entries * 32 % bps:
        raise FatUnusable(f"{root_entries} root directory entries do not fill whole {bps}-byte sectors")
    root_sectors = root_entries * 32 // bps
    first_data = rsvd + nfats * fat_sectors + root_sectors
    if first_data >= total:
        raise FatUnusable(f"the reserved area, FATs and root directory ({first_data} sectors) leave no room "
                          f"for data in {total} sectors")
    clusters = (total - first_data) // spc
    if clusters == 0:
        raise FatUnusable("the volume has no data cluster")
    bits = 12 if clusters <= _FAT12_MAX_CLUSTERS else 16 if clusters <= _FAT16_MAX_CLUSTERS else 32
    # The shape of the boot sector must agree with the type the count gives.
    if bits == 32 and (fatsz16 or root_entries):
        raise FatUnusable(f"{clusters} clusters make this FAT32, but the boot sector has FAT12/16 fields "
                          f"(a 16-bit FAT size or a fixed root directory)")
    if bits != 32 and not fatsz16:
        raise FatUnusable(f"the boot sector has the FAT32 layout but only {clusters} clusters, which make it "
                          f"FAT{bits} by Microsoft's rule (Linux would read it as FAT32): ambiguous")
    if bits != 32 and not root_entries:
        raise FatUnusable(f"FAT{bits} volume without a root directory (0 root entries)")
    if clusters > _FAT32_MAX_CLUSTERS:
        raise FatUnusable(f"{clusters} clusters are more than FAT32 can number")
    if fat_sectors * bps * 8 // bits < clusters + 2:
        raise FatUnusable(f"a FAT of {fat_sectors} sectors cannot describe {clusters} clusters of FAT{bits}")

    fat32: dict = {}
    ext = 36 if bits != 32 else 64      # where the extended boot record starts
    if bits == 32:
        ext_flags, fs_version, root_cluster, fsinfo, backup = struct.unpack_from("<HHIHH", boot, 40)
        if fs_version != 0:
            raise FatUnusable(f"FAT32 version {fs_version >> 8}.{fs_version & 0xFF} is not 0.0: "
                              f"its format is unknown")
        if not 2 <= root_cluster <= clusters + 1:
            raise FatUnusable(f"the root directory cluster {root_cluster} is not a cluster of the volume "
                              f"(2..{clusters + 1})")
        fat32 = {"ext_flags": ext_flags, "root_cluster": root_cluster, "fsinfo": fsinfo, "backup": backup}
    drive_sig = boot[ext + 2]
    has_ebr = drive_sig in (0x28, 0x29)
    dirty = has_ebr and bool(boot[ext + 1] & _STATE_DIRTY)
    volume_id = label = None
    if has_ebr:
        vid, = struct.unpack_from("<I", boot, ext + 3)
        volume_id = f"{vid >> 16:04X}-{vid & 0xFFFF:04X}"
        if drive_sig == 0x29:
            label = boot[ext + 7:ext + 18].decode("latin-1").rstrip(" \0")
    return _Boot(bits=bits, bps=bps, spc=spc, rsvd=rsvd, nfats=nfats, fat_sectors=fat_sectors,
                 root_entries=root_entries, total_sectors=total, first_data_sector=first_data,
                 clusters=clusters, media=media, fat32=fat32, dirty=dirty,
                 oem=boot[3:11].decode("latin-1").rstrip(" \0"), label=label, volume_id=volume_id)


# --------------------------------------------------------------------------
# The FAT


def _read_fats(read_at, bt: _Boot) -> tuple[bytearray, int, bool]:
    """(entry bytes of the FAT in charge, its number, whether copies are mirrored).

    Every other copy must hold the same entries 2 and up (0 and 1 are the
    media mark and flags), compared 4 MiB at a time."""
    fat_bytes = bt.fat_sectors * bt.bps
    need = bt.entry_bytes
    if need > MAX_FAT_BYTES:
        raise FatUnusable(f"the FAT ({need} bytes) is larger than the {MAX_FAT_BYTES} bytes read into memory")
    mirrored = True
    active = 0
    if bt.bits == 32 and bt.fat32["ext_flags"] & 0x80:
        mirrored = False
        active = bt.fat32["ext_flags"] & 0x0F
        if active >= bt.nfats:
            raise FatUnusable(f"FAT mirroring is off and the active FAT is #{active}, but there are only "
                              f"{bt.nfats}")
    base = bt.rsvd * bt.bps
    main = bytearray(_read_exact(read_at, base + active * fat_bytes, need, f"FAT #{active}"))
    if mirrored:
        start = 2 * bt.bits // 8  # entry 2's first byte: 3, 4 or 8
        step = 4 << 20
        for copy in range(1, bt.nfats):
            for pos in range(start, need, step):
                n = min(step, need - pos)
                other = _read_exact(read_at, base + copy * fat_bytes + pos, n, f"FAT #{copy}")
                if other != main[pos:pos + n]:
                    diff = next(i for i in range(n) if other[i] != main[pos + i]) + pos
                    raise FatUnusable(f"FAT #{copy} differs from FAT #0 (byte {diff}, near cluster "
                                      f"{diff * 8 // bt.bits}): the volume was not cleanly written; "
                                      f"run fsck.vfat")
    return main, active, mirrored


def _entries(raw: bytearray, bt: _Boot) -> tuple[array, bytes | bytearray]:
    """FAT entries 0 .. clusters + 1 as an array (FAT32's high bits masked),
    and bytes holding them at the array's item size (a free entry is all zero)."""
    n = bt.clusters + 2
    if bt.bits == 12:
        values = array("H", [((raw[i * 3 // 2] | raw[i * 3 // 2 + 1] << 8) >> 4 if i & 1 else
                              (raw[i * 3 // 2] | raw[i * 3 // 2 + 1] << 8) & 0xFFF) for i in range(n)])
        return values, values.tobytes()     # zero runs are the same in either byte order
    if bt.bits == 32:
        raw[3::4] = raw[3::4].translate(_LOW_NIBBLE)
    values = array("H" if bt.bits == 16 else _U32)
    values.frombytes(raw)
    if sys.byteorder == "big":
        values.byteswap()
    return values, raw


def _not_data(values: array, raw, bt: _Boot) -> tuple[list[tuple[int, int]], int, int]:
    """([start, end) runs of clusters that are free or marked bad, sorted and
    merged), free count, bad count."""
    width = values.itemsize
    n = len(values)
    runs: list[tuple[int, int]] = []
    free = 0
    for m in re.finditer(rb"\0{%d,}" % width, raw):
        s, e = max(2, -(-m.start() // width)), min(n, m.end() // width)
        if s < e:
            runs.append((s, e))
            free += e - s
    bad_mark = _BAD[bt.bits]
    bad = values.count(bad_mark) - (values[0] == bad_mark) - (values[1] == bad_mark)
    if bad:
        i = 1
        while True:
            try:
                i = values.index(bad_mark, i + 1)
            except ValueError:
                break
            runs.append((i, i + 1))
        runs.sort()
        merged: list[tuple[int, int]] = []
        for s, e in runs:
            if merged and merged[-1][1] >= s:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            else:
                merged.append((s, e))
        runs = merged
    return runs, free, bad


def _complement(runs: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    out, pos = [], lo
    for s, e in runs:
        if s > pos:
            out.append((pos, s))
        pos = max(pos, e)
    if pos < hi:
        out.append((pos, hi))
    return out


def _check_links(values: array, used: list[tuple[int, int]], bt: _Boot) -> None:
    """Every entry of a used cluster is an end of chain or a link to a cluster
    of the volume that the FAT marks used (not free, not bad).  With this, a
    chain that starts on a used cluster is used all along."""
    eoc, bad, top = _EOC[bt.bits], _BAD[bt.bits], bt.max_cluster
    for s, e in used:
        for i, v in enumerate(values[s:e], s):
            if s <= v < e or v >= eoc:
                continue  # next cluster of the same used run, or end of chain
            if not 2 <= v <= top:
                raise FatUnusable(f"FAT entry of cluster {i} is 0x{v:x}: neither a cluster of the volume "
                                  f"(2..{top}) nor an end-of-chain mark")
            t = values[v]
            if t == 0 or t == bad:
                raise FatUnusable(f"cluster {i} links to cluster {v}, which the FAT marks "
                                  f"{'free' if t == 0 else 'bad'}: its data would be lost; run fsck.vfat")


# --------------------------------------------------------------------------
# Directories


def _chain(values: array, start: int, bt: _Boot, seen: set[int], what: str) -> list[int]:
    """The clusters of a directory, each visited once across all directories."""
    eoc, top = _EOC[bt.bits], bt.max_cluster
    out, c = [], start
    while True:
        if c in seen:
            raise FatUnusable(f"{what} reaches cluster {c} a second time (a loop, or directories "
                              f"sharing clusters); run fsck.vfat")
        seen.add(c)
        out.append(c)
        v = values[c]
        if v >= eoc:
            return out
        if not 2 <= v <= top:  # _check_links saw to this; kept for the root's chain
            raise FatUnusable(f"{what}: cluster {c} links to 0x{v:x}, not a cluster of the volume")
        c = v


def _read_clusters(read_at, clusters: list[int], bt: _Boot, what: str) -> bytes:
    base, cb = bt.first_data_sector * bt.bps, bt.cluster_bytes
    parts, i = [], 0
    while i < len(clusters):  # consecutive clusters in one read
        j = i + 1
        while j < len(clusters) and clusters[j] == clusters[j - 1] + 1 and j - i < 256:
            j += 1
        parts.append(_read_exact(read_at, base + (clusters[i] - 2) * cb, (j - i) * cb, what))
        i = j
    return b"".join(parts)


def _walk(read_at, values: array, bt: _Boot) -> tuple[int, int]:
    """Check that every file and directory reachable from the root starts on a
    used cluster (with _check_links: all its clusters are used) and that each
    file's chain is long enough for its size; return the number of
    directories and of entries seen."""
    bad, eoc, top, cb = _BAD[bt.bits], _EOC[bt.bits], bt.max_cluster, bt.cluster_bytes
    seen: set[int] = set()
    if bt.bits == 32:
        root = bt.fat32["root_cluster"]
        if values[root] in (0, bad):
            raise FatUnusable(f"the root directory's cluster {root} is marked "
                              f"{'free' if values[root] == 0 else 'bad'} in the FAT")
        data = _read_clusters(read_at, _chain(values, root, bt, seen, "the root directory"), bt,
                              "the root directory")
    else:
        data = _read_exact(read_at, (bt.rsvd + bt.nfats * bt.fat_sectors) * bt.bps, bt.root_entries * 32,
                           "the root directory")
    pending: list[tuple[str, list[int]]] = []
    dirs = entries = 0
    path = "/"
    while True:
        dirs += 1
        for name, attr, hi, _t, _d, lo, size in _DIRENT.iter_unpack(data):
            if name[0] in (0x00, 0xE5) or attr & 0x3F == _ATTR_LONG_NAME or name in (_DOT, _DOTDOT):
                continue
            entries += 1
            start = lo | (hi << 16 if bt.bits == 32 else 0)
            if start == 0:
                continue  # an empty file, or a volume label: no cluster
            base, ext = name[:8].decode("latin-1").rstrip(), name[8:].decode("latin-1").rstrip()
            shown = path + base + ("." + ext if ext else "")
            if not 2 <= start <= top:
                raise FatUnusable(f"{shown!r} starts at cluster {start}, outside the volume (2..{top})")
            if values[start] in (0, bad):
                raise FatUnusable(f"{shown!r} starts at cluster {start}, which the FAT marks "
                                  f"{'free' if values[start] == 0 else 'bad'}: run fsck.vfat")
            if attr & _ATTR_VOLUME_ID:
                continue  # a volume label owns no data
            if attr & _ATTR_DIRECTORY:
                pending.append((shown + "/", _chain(values, start, bt, seen, f"directory {shown!r}")))
                continue
            # A file's chain must hold its size (fsck.vfat truncates one that
            # does not): a chain cut short may have lost its tail to the free list.
            need, count, c = min(-(-size // cb), bt.clusters), 1, start
            while count < need:
                c = values[c]
                if c >= eoc:
                    raise FatUnusable(f"{shown!r} holds {size} bytes but its cluster chain ends after {count} "
                                      f"clusters of {cb} bytes: the FAT does not match the directory; "
                                      f"run fsck.vfat")
                count += 1
        if not pending:
            break
        path, chain = pending.pop()
        data = _read_clusters(read_at, chain, bt, f"directory {path!r}")
    return dirs, entries


# --------------------------------------------------------------------------


def _fsinfo(read_at, bt: _Boot) -> int | None:
    """FAT32 FSInfo's free cluster count, or None (no FSInfo, invalid, unknown)."""
    sector = bt.fat32.get("fsinfo", 0)
    if not 0 < sector < bt.rsvd:
        return None
    raw = _read_exact(read_at, sector * bt.bps, 512, "FSInfo")
    lead, = struct.unpack_from("<I", raw, 0)
    sig, free, _next_free = struct.unpack_from("<III", raw, 484)
    trail, = struct.unpack_from("<I", raw, 508)
    if (lead, sig, trail) != (_FSINFO_LEAD, _FSINFO_STRUCT, _FSINFO_TRAIL) or free == 0xFFFFFFFF:
        return None
    return free


def read_layout(read_at: Callable[[int, int], bytes], size: int) -> FatLayout:
    """Read the cluster allocation of the FAT volume starting at offset 0.

    read_at(offset, length) reads from the volume start; size is the
    partition's byte size.  Raises FatUnusable (with .reason) whenever the
    FAT cannot be trusted."""
    bt = _parse_boot(_read_exact(read_at, 0, 512, "boot sector"), size)
    if bt.dirty:
        raise FatUnusable("the volume is marked dirty (mounted, or not cleanly unmounted): its FAT may be "
                          "stale; unmount it or run fsck.vfat")
    raw, active, mirrored = _read_fats(read_at, bt)
    values, raw = _entries(raw, bt)
    if values[0] & 0xFF != bt.media:
        raise FatUnusable(f"FAT entry 0 (0x{values[0]:x}) does not carry the media byte 0x{bt.media:02x}: "
                          f"this is not where the FAT is")
    if bt.bits != 12:
        if not values[1] & _CLEAN_SHUTDOWN[bt.bits]:
            raise FatUnusable("FAT entry 1 says the volume was not cleanly unmounted; run fsck.vfat")
        if not values[1] & _NO_HARD_ERROR[bt.bits]:
            raise FatUnusable("FAT entry 1 says a disk error was met on this volume; run fsck.vfat")
    not_data, free, bad = _not_data(values, raw, bt)
    del raw
    used_clusters = _complement(not_data, 2, bt.clusters + 2)
    _check_links(values, used_clusters, bt)
    dirs, entries = _walk(read_at, values, bt)
    fsinfo_free = _fsinfo(read_at, bt) if bt.bits == 32 else None

    cb = bt.cluster_bytes
    data_start = bt.first_data_sector * bt.bps
    used: list[tuple[int, int]] = [(0, data_start)]  # reserved area, FATs, fixed root directory
    for s, e in used_clusters:
        off = data_start + (s - 2) * cb
        if used[-1][0] + used[-1][1] == off:
            used[-1] = (used[-1][0], used[-1][1] + (e - s) * cb)
        else:
            used.append((off, (e - s) * cb))
    fs_bytes = bt.total_sectors * bt.bps
    data_end = data_start + bt.clusters * cb
    scan = [(data_end, fs_bytes - data_end)] if data_end < fs_bytes else []  # sectors of no cluster
    n_used = bt.clusters - free - bad
    facts = {
        "fat_type": bt.bits,
        "oem": bt.oem,
        "label": bt.label,
        "volume_id": bt.volume_id,
        "sector_size": bt.bps,
        "cluster_size": cb,
        "clusters": bt.clusters,
        "used_clusters": n_used,
        "free_clusters": free,
        "bad_clusters": bad,
        "fats": bt.nfats,
        "fat_read": active,
        "fats_mirrored": mirrored,
        "fsinfo_free_clusters": fsinfo_free,
        "fsinfo_agrees": None if fsinfo_free is None else fsinfo_free == free,
        "directories": dirs,
        "directory_entries": entries,
        "used_bytes": sum(n for _, n in used),
        "scan_bytes": sum(n for _, n in scan),
    }
    return FatLayout(fat_type=bt.bits, sector_size=bt.bps, cluster_size=cb, clusters=bt.clusters,
                     free_clusters=free, used_ranges=used, scan_ranges=scan, fs_bytes=fs_bytes, facts=facts)
