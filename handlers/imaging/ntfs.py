"""Which bytes of an NTFS volume are in use, read from its own $Bitmap.

Like ext4.py (standard library only): only used clusters are stored, so stale
data of deleted files stays out of images.  A used cluster reported free loses
data on restore, so the volume's own structures are cross-checked; whatever
does not add up raises NtfsUnusable and the caller reads the volume whole
(zero-skip), the reason recorded.  A volume that must not be imaged raises
ImageError: BitLocker ("-FVE-FS-" at offset 3), dirty, hibernated.  Sources:
Microsoft's NTFS documentation, ntfs-3g (layout.h, bootsect.c, runlist.c,
mst.c, volume.c, logfile.c); tests/test_ntfs.py checks against ntfs-3g's tools.

* Boot sector: bytes/sector, sectors/cluster (over 128: 2^(256 - v) sectors,
  clusters over 64 KiB), total sectors (clusters = total // sectors/cluster;
  past the last cluster, in the partition's last sector, the backup boot
  sector: reported used, the rest scanned), $MFT/$MFTMirr LCNs, clusters per
  MFT record (negative: 2^-v bytes).
* $MFT from record 0's own $DATA runlist (fragmented; other extents through
  an $ATTRIBUTE_LIST).  Every record: update-sequence fixups checked (a torn
  write is refused) and applied, "FILE" magic, in use, its number, its base
  record and, where a reference names it, its sequence number.
* $MFTMirr equal to the first 4 records; $Volume's dirty flag and version.
* hiberfil.sys through the root directory's index ($INDEX_ROOT, then the
  INDX blocks of $INDEX_ALLOCATION it leads to): walking the B-tree from its
  root meets only live entries (a scan of MFT records meets deleted ones too)
  and reads a few blocks before the MFT walk below.  Resident or not.
* $LogFile judged as ntfs-3g does: changes not checkpointed (Windows crashed)
  mean $Bitmap may lag what is allocated: zero-skip.
* $Bitmap (record 6): unnamed non-resident $DATA, through an $ATTRIBUTE_LIST
  too; one bit per cluster, LSB first, covering every cluster, bits past the
  last one masked.  NTFS keeps no free count to check it by, so every run of
  every MFT record in use must be marked in it (as chkdsk and ntfsclone check).
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Callable

from handlers.imaging.fsmap import MapUnusable, Ranges, bitmap_runs
from handlers.imaging.store import ImageError

__all__ = ["NtfsLayout", "NtfsUnusable", "Unusable", "probe", "read_layout"]

OEM_NTFS = b"NTFS    "
OEM_BITLOCKER = b"-FVE-FS-"
BLOCK = 512                      # update-sequence stride, whatever the sector size
REF = 0xFFFFFFFFFFFF             # record number part of a file reference (the rest: sequence)

MFT, MFTMIRR, LOGFILE, VOLUME, ROOT, BITMAP, BOOT = 0, 1, 2, 3, 5, 6, 7
NAMES = {MFT: "$MFT", MFTMIRR: "$MFTMirr", LOGFILE: "$LogFile", VOLUME: "$Volume",
         ROOT: "the root directory", BITMAP: "$Bitmap", BOOT: "$Boot"}
AT_ATTRIBUTE_LIST, AT_FILE_NAME, AT_VOLUME_NAME, AT_VOLUME_INFORMATION = 0x20, 0x30, 0x60, 0x70
AT_DATA, AT_INDEX_ROOT, AT_INDEX_ALLOCATION, AT_END = 0x80, 0x90, 0xA0, 0xFFFFFFFF
ATTR_COMPRESSED, ATTR_ENCRYPTED, ATTR_SPARSE = 0x0001, 0x4000, 0x8000
VOLUME_IS_DIRTY = 0x0001
MAX_ATTR_LIST = 256 << 10        # Windows never makes a larger one
MAX_INDEX_NODES = 1 << 16

HIBERNATED = ("Windows was hibernated (or Fast Startup left it so): hiberfil.sys starts with {}; boot "
              "Windows and shut it down fully (shutdown /s /t 0, or turn Fast Startup off), then capture "
              "again")
DIRTY = ("the NTFS volume is marked dirty (the dirty flag of $Volume's VOLUME_INFORMATION is set: Windows "
         "found an error on it, or a check is pending); boot Windows and run chkdsk /f on it (or let it "
         "finish the check it scheduled), then capture again")
BITLOCKER = ("the volume is encrypted with BitLocker (\"-FVE-FS-\" at offset 3 of its boot sector): its "
             "used clusters cannot be told and an image would hold ciphertext; decrypt it first "
             "(manage-bde -off X: in Windows, and wait until manage-bde -status says Fully Decrypted; "
             "suspending protection leaves the data encrypted), then capture again")


class NtfsUnusable(MapUnusable):
    """$Bitmap cannot be trusted; copy the whole volume instead."""


Unusable = NtfsUnusable     # the name source.py's FILESYSTEMS readers share


@dataclass
class NtfsLayout:
    cluster_size: int
    clusters: int
    used_ranges: list[tuple[int, int]]  # (offset, length), sorted, merged
    scan_ranges: list[tuple[int, int]]  # usage unknown: read, keep non-zero
    fs_bytes: int
    facts: dict = field(default_factory=dict)


def _unpack(fmt: str, buf, off: int, what: str) -> tuple:
    if off < 0 or off + struct.calcsize(fmt) > len(buf):
        raise NtfsUnusable(f"{what}: a field at byte {off} lies outside it ({len(buf)} bytes)")
    return struct.unpack_from(fmt, buf, off)


def _read_exact(read_at, offset: int, length: int, what: str) -> bytes:
    data = read_at(offset, length)
    if len(data) != length:
        raise NtfsUnusable(f"short read of {what}: wanted {length} bytes at offset {offset}, got {len(data)}")
    return bytes(data)


def _pow2(n: int, lo: int, hi: int) -> bool:
    return lo <= n <= hi and not n & (n - 1)


# --------------------------------------------------------------------------
# Boot sector


class _Boot:
    def __init__(self, sector, cluster, total_sectors, mft_lcn, mirr_lcn, record, serial):
        self.sector, self.cluster, self.total_sectors = sector, cluster, total_sectors
        self.mft_lcn, self.mirr_lcn, self.record, self.serial = mft_lcn, mirr_lcn, record, serial
        self.clusters = total_sectors // (cluster // sector)


def _geometry(raw: bytes) -> _Boot:
    """The boot sector's fields, with the checks of ntfs-3g's ntfs_boot_sector_is_ntfs."""
    if len(raw) < 512 or raw[3:11] != OEM_NTFS:
        raise NtfsUnusable("no NTFS boot sector (OEM id \"NTFS    \" at offset 3)")
    bps, spc, reserved, fats, root_entries, sectors16, _media, spf = _unpack("<HBHBHHBH", raw, 0x0B, "boot sector")
    large_sectors, = _unpack("<I", raw, 0x20, "boot sector")
    total, mft_lcn, mirr_lcn, cpr = _unpack("<qqqb", raw, 0x28, "boot sector")
    serial, = _unpack("<Q", raw, 0x48, "boot sector")
    if not _pow2(bps, 256, 4096):
        raise NtfsUnusable(f"boot sector: {bps} bytes per sector is not a power of two in 256..4096")
    if spc > 128:                       # clusters over 64 KiB: 2^(256 - v) sectors
        spc = 1 << min(256 - spc, 31)
    if not _pow2(spc, 1, 1 << 31) or bps * spc > 2 << 20:
        raise NtfsUnusable(f"boot sector: {spc} sectors of {bps} bytes per cluster: not a power of two "
                           "or over 2 MiB")
    if reserved or fats or root_entries or sectors16 or spf or large_sectors:
        raise NtfsUnusable("boot sector: fields NTFS keeps zero (reserved sectors, FATs, ...) are not zero")
    cluster = bps * spc
    record = (1 << -cpr) if -31 <= cpr < 0 else cpr * cluster
    if not _pow2(record, BLOCK, 65536):
        raise NtfsUnusable(f"boot sector: MFT record size {record} (clusters per record {cpr}) is not a "
                           "power of two in 512..65536")
    if total <= 0:
        raise NtfsUnusable(f"boot sector: the volume has {total} sectors")
    boot = _Boot(bps, cluster, total, mft_lcn, mirr_lcn, record, serial)
    if not (0 <= mft_lcn < boot.clusters and 0 <= mirr_lcn < boot.clusters):
        raise NtfsUnusable(f"boot sector: $MFT at cluster {mft_lcn} or $MFTMirr at {mirr_lcn} lies outside "
                           f"the volume's {boot.clusters} clusters")
    return boot


def probe(read_at: Callable[[int, int], bytes]) -> bool:
    """An NTFS boot sector with sane geometry, or a BitLocker one (refused by read_layout)."""
    raw = read_at(0, 512)
    try:
        return raw[3:11] == OEM_BITLOCKER or bool(_geometry(raw))
    except NtfsUnusable:
        return False


# --------------------------------------------------------------------------
# Records, attributes, runlists


def _fixup(buf: bytearray, magic: bytes, what: str) -> bytearray:
    """Check and undo the multi-sector transfer protection of a record, in place."""
    if buf[:4] != magic:
        torn = " (BAAD: a multi-sector write was torn)" if buf[:4] == b"BAAD" else ""
        raise NtfsUnusable(f"{what} has no {magic.decode()} signature{torn}")
    usa_ofs, usa_count = _unpack("<HH", buf, 4, what)
    if usa_count != len(buf) // BLOCK + 1 or usa_ofs & 1 or usa_ofs < 8 or usa_ofs + 2 * usa_count > BLOCK - 2:
        raise NtfsUnusable(f"{what}: update sequence array (offset {usa_ofs}, {usa_count} entries) does "
                           f"not fit a {len(buf)}-byte record")
    usn = buf[usa_ofs:usa_ofs + 2]
    for i in range(1, usa_count):
        end = i * BLOCK
        if buf[end - 2:end] != usn:
            raise NtfsUnusable(f"{what}: update sequence number mismatch in its {BLOCK}-byte block {i - 1} "
                               "(a torn write); run chkdsk")
        buf[end - 2:end] = buf[usa_ofs + 2 * i:usa_ofs + 2 * i + 2]
    return buf


class _Attr:                             # resident (value) or not (VCNs, runs, sizes)
    def __init__(self, atype: int, name: str, flags: int, ident: int, record: int):
        self.type, self.name, self.flags, self.ident, self.record = atype, name, flags, ident, record
        self.value: bytes | None = None
        self.lowest, self.highest, self.runs, self.alloc, self.size, self.init = 0, -1, [], 0, 0, 0


def _decode_runs(mp: bytes, vcn: int, clusters: int, what: str) -> list[tuple[int, int | None, int]]:
    """Mapping pairs -> [(vcn, lcn or None for a sparse run, length)]."""
    runs, pos, lcn = [], 0, 0
    while True:
        if pos >= len(mp):
            raise NtfsUnusable(f"{what}: its runlist runs past the end of the attribute")
        head = mp[pos]
        if head == 0:
            return runs
        nlen, noff = head & 0xF, head >> 4
        if not 1 <= nlen <= 8 or noff > 8 or pos + 1 + nlen + noff > len(mp):
            raise NtfsUnusable(f"{what}: malformed runlist entry 0x{head:02x}")
        length = int.from_bytes(mp[pos + 1:pos + 1 + nlen], "little", signed=True)
        if length <= 0:
            raise NtfsUnusable(f"{what}: runlist entry of {length} clusters")
        if noff:
            lcn += int.from_bytes(mp[pos + 1 + nlen:pos + 1 + nlen + noff], "little", signed=True)
            if lcn < 0 or lcn + length > clusters:
                raise NtfsUnusable(f"{what}: run of clusters {lcn}..{lcn + length - 1} lies outside the "
                                   f"volume's {clusters} clusters")
            runs.append((vcn, lcn, length))
        else:
            runs.append((vcn, None, length))
        vcn += length
        pos += 1 + nlen + noff


def _parse_attrs(rec: bytes, number: int, clusters: int, what: str) -> list[_Attr]:
    first, _flags, used = _unpack("<HHI", rec, 0x14, what)
    if used > len(rec) or not 0x18 <= first < used:
        raise NtfsUnusable(f"{what}: attributes at {first}..{used} do not fit the record")
    attrs, off = [], first
    while True:
        atype, = _unpack("<I", rec, off, what)
        if atype == AT_END:
            return attrs
        length, nonres, nlen, noff, flags, ident = _unpack("<IBBHHH", rec, off + 4, what)
        if length < 0x18 or length & 7 or off + length > used or noff + 2 * nlen > length:
            raise NtfsUnusable(f"{what}: attribute 0x{atype:x} at byte {off} has a bad length")
        a = rec[off:off + length]
        attr = _Attr(atype, a[noff:noff + 2 * nlen].decode("utf-16-le", "replace"), flags, ident, number)
        if not nonres:
            vlen, voff = _unpack("<IH", a, 0x10, what)
            if voff + vlen > length:
                raise NtfsUnusable(f"{what}: value of attribute 0x{atype:x} lies outside it")
            attr.value = a[voff:voff + vlen]
        else:
            attr.lowest, attr.highest, mp_off = _unpack("<qqH", a, 0x10, what)
            attr.alloc, attr.size, attr.init = _unpack("<qqq", a, 0x28, what)
            if not 0x40 <= mp_off < length or attr.lowest < 0 or attr.highest < attr.lowest - 1:
                raise NtfsUnusable(f"{what}: non-resident attribute 0x{atype:x} has a bad header")
            attr.runs = _decode_runs(a[mp_off:], attr.lowest, clusters, f"{what}, attribute 0x{atype:x}")
            end = attr.runs[-1][0] + attr.runs[-1][2] if attr.runs else attr.lowest
            if end != attr.highest + 1:
                raise NtfsUnusable(f"{what}: attribute 0x{atype:x} maps VCNs {attr.lowest}..{end - 1} but "
                                   f"says {attr.lowest}..{attr.highest}")
        attrs.append(attr)
        off += length


class _Stream:                           # non-resident data: [(vcn, lcn or None, length)], sizes
    def __init__(self, runs: list, size: int, init: int, flags: int = 0):
        self.runs, self.size, self.init, self.flags = runs, size, init, flags
        self.starts = [r[0] for r in runs]


def _parse_attr_list(value: bytes, what: str) -> list[tuple[int, int, int]]:
    """[(type, file reference, attribute id)] of an $ATTRIBUTE_LIST's entries."""
    out, pos = [], 0
    while pos < len(value):
        atype, length, nlen, noff, _lowest, ref, ident = _unpack("<IHBBqQH", value, pos, what)
        if length < 0x1A or pos + length > len(value) or noff + 2 * nlen > length:
            raise NtfsUnusable(f"{what}: entry at byte {pos} has a bad length")
        out.append((atype, ref, ident))
        pos += length
    return out


class _Volume:
    def __init__(self, read_at, boot: _Boot):
        self.read_at, self.b = read_at, boot
        self.cs, self.rec = boot.cluster, boot.record
        self.mft: _Stream | None = None
        self.extents: dict[int, list[int]] = {}   # base record -> its extension records

    def read_stream(self, s: _Stream, offset: int, length: int, what: str) -> bytes:
        """Bytes [offset, offset+length) of a stream: holes and bytes past init read as zero."""
        if offset < 0 or offset + length > s.size:
            raise NtfsUnusable(f"{what}: bytes {offset}..{offset + length} lie past its end ({s.size})")
        out, pos, end, cs = [], offset, offset + length, self.cs
        while pos < end:
            i = bisect_right(s.starts, pos // cs) - 1
            if i < 0 or pos // cs >= s.runs[i][0] + s.runs[i][2]:
                raise NtfsUnusable(f"{what}: byte {pos} is not mapped by its runlist")
            vcn, lcn, n = s.runs[i]
            stop = min(end, (vcn + n) * cs)
            if lcn is None or pos >= s.init:
                out.append(bytes(stop - pos))
            else:
                out.append(_read_exact(self.read_at, lcn * cs + pos - vcn * cs, stop - pos, what))
            pos = stop
        data = b"".join(out)
        if end > s.init:
            keep = max(0, s.init - offset)
            data = data[:keep] + bytes(length - keep)
        return data

    def record(self, n: int, seq: int = 0, base: int = 0) -> list[_Attr]:
        what = f"MFT record {n} ({NAMES.get(n, 'a file')})"
        if n < 0 or (n + 1) * self.rec > self.mft.size:
            raise NtfsUnusable(f"{what} lies past the end of $MFT")
        return self.parse_record(bytearray(self.read_stream(self.mft, n * self.rec, self.rec, what)),
                                 n, what, seq, base)

    def parse_record(self, raw: bytearray, n: int, what: str, seq=0, base=0) -> list[_Attr]:
        _fixup(raw, b"FILE", what)
        usa_ofs, = _unpack("<H", raw, 4, what)
        rseq, _links, _first, flags = _unpack("<HHHH", raw, 0x10, what)
        rbase, = _unpack("<Q", raw, 0x20, what)
        if usa_ofs >= 0x30 and _unpack("<I", raw, 0x2C, what)[0] != n & 0xFFFFFFFF:
            raise NtfsUnusable(f"{what} says it is record {_unpack('<I', raw, 0x2C, what)[0]}")
        if not flags & 1:
            raise NtfsUnusable(f"{what} is not in use")
        if seq and rseq != seq:
            raise NtfsUnusable(f"{what} has sequence number {rseq} but is referenced as {seq}: stale")
        if rbase & REF != base:
            raise NtfsUnusable(f"{what} belongs to base record {rbase & REF}, not {base}")
        return _parse_attrs(bytes(raw), n, self.b.clusters, what)

    def attributes(self, n: int, seq: int = 0) -> list[_Attr]:
        """Every attribute of file n: its base record's and, through an $ATTRIBUTE_LIST, its
        extension records'; each listed attribute must be where the list says."""
        attrs = self.record(n, seq)
        what = f"the $ATTRIBUTE_LIST of {NAMES.get(n, f'MFT record {n}')}"
        lists = [a for a in attrs if a.type == AT_ATTRIBUTE_LIST]
        if not lists:
            return attrs
        if len(lists) > 1:
            raise NtfsUnusable(f"{what}: there are {len(lists)} of them")
        value = self.stream(lists, AT_ATTRIBUTE_LIST, lists[0].name, what)
        if not isinstance(value, bytes):
            if value.size > MAX_ATTR_LIST:
                raise NtfsUnusable(f"{what} is {value.size} bytes, more than Windows ever makes")
            value = self.read_stream(value, 0, value.size, what)
        entries = _parse_attr_list(value, what)
        have = {n}
        for _t, ref, _i in entries:
            if ref & REF not in have:
                have.add(ref & REF)
                attrs = attrs + self.record(ref & REF, ref >> 48, base=n)
        present = {(a.record, a.type, a.ident) for a in attrs}
        for atype, ref, ident in entries:
            if (ref & REF, atype, ident) not in present:
                raise NtfsUnusable(f"{what} names attribute 0x{atype:x} (id {ident}) in record {ref & REF}, "
                                   "which does not hold it")
        self.extents[n] = sorted(have - {n})
        return attrs

    def stream(self, attrs: list[_Attr], atype: int, name: str, what: str) -> _Stream | bytes:
        """The data of one attribute: its resident value, or its extents joined in VCN order."""
        exts = sorted((a for a in attrs if a.type == atype and a.name == name), key=lambda a: a.lowest)
        if not exts:
            raise NtfsUnusable(f"{what} has no attribute 0x{atype:x} {name!r}")
        if exts[0].value is not None:
            if len(exts) > 1:
                raise NtfsUnusable(f"{what}: resident attribute 0x{atype:x} appears {len(exts)} times")
            return exts[0].value
        first, runs, vcn = exts[0], [], 0
        for e in exts:
            if e.value is not None or e.lowest != vcn:
                raise NtfsUnusable(f"{what}: the extents of attribute 0x{atype:x} do not follow each other "
                                   f"(VCN {e.lowest} after {vcn})")
            runs += e.runs
            vcn = e.highest + 1
        if not 0 <= first.init <= first.size <= min(first.alloc, vcn * self.cs) or (
                not first.flags & (ATTR_COMPRESSED | ATTR_SPARSE) and vcn * self.cs != first.alloc):
            raise NtfsUnusable(f"{what}: attribute 0x{atype:x} has sizes {first.init}/{first.size}/"
                               f"{first.alloc} (initialised/data/allocated) for {vcn} clusters")
        return _Stream(runs, first.size, first.init, first.flags)

    def system_stream(self, n: int) -> _Stream:
        s = self.stream(self.attributes(n), AT_DATA, "", NAMES[n])
        if isinstance(s, bytes) or s.flags & (ATTR_COMPRESSED | ATTR_ENCRYPTED | ATTR_SPARSE) or any(
                lcn is None for _v, lcn, _n in s.runs) or not s.runs:
            raise NtfsUnusable(f"the $DATA of {NAMES[n]} is resident, empty, compressed, encrypted or sparse")
        return s


# --------------------------------------------------------------------------
# $MFT, $MFTMirr, $Volume, $LogFile, hiberfil.sys


def _load_mft(vol: _Volume) -> None:
    """$MFT from its own record 0: first the extent in record 0, then any others."""
    raw = bytearray(_read_exact(vol.read_at, vol.b.mft_lcn * vol.cs, vol.rec, "MFT record 0"))
    first = [a for a in vol.parse_record(raw, MFT, "MFT record 0 ($MFT)")
             if a.type == AT_DATA and a.name == "" and a.lowest == 0]
    if len(first) != 1 or first[0].value is not None or not first[0].runs:
        raise NtfsUnusable("MFT record 0 ($MFT) has no non-resident $DATA starting at VCN 0")
    f = first[0]
    if f.runs[0][1] != vol.b.mft_lcn:
        raise NtfsUnusable(f"$MFT's runlist starts at cluster {f.runs[0][1]}, the boot sector says "
                           f"{vol.b.mft_lcn}")
    mapped = (f.highest + 1) * vol.cs
    vol.mft = _Stream(f.runs, min(f.size, mapped), min(f.init, mapped))
    vol.mft = vol.system_stream(MFT)    # all extents, through the attribute list if any
    if vol.mft.size < 16 * vol.rec or vol.mft.init < vol.mft.size:
        raise NtfsUnusable(f"$MFT is {vol.mft.size} bytes ({vol.mft.init} initialised): fewer than its 16 "
                           "system records")


def _check_mirror(vol: _Volume) -> None:
    mirr = vol.system_stream(MFTMIRR)
    if mirr.runs[0][1] != vol.b.mirr_lcn or mirr.size < 4 * vol.rec:
        raise NtfsUnusable(f"$MFTMirr starts at cluster {mirr.runs[0][1]} and holds {mirr.size} bytes; the "
                           f"boot sector says cluster {vol.b.mirr_lcn}")
    for n in range(4):
        what = f"record {n} of $MFTMirr"
        raw = _fixup(bytearray(vol.read_stream(mirr, n * vol.rec, vol.rec, what)), b"FILE", what)
        mine = _fixup(bytearray(vol.read_stream(vol.mft, n * vol.rec, vol.rec, f"MFT record {n}")),
                      b"FILE", f"MFT record {n}")
        used = _unpack("<I", mine, 0x18, what)[0]
        if raw[:used] != mine[:used]:
            raise NtfsUnusable(f"$MFTMirr does not match $MFT (record {n}, {NAMES[n]}): run chkdsk")


def _volume_info(vol: _Volume) -> tuple[str, str]:
    attrs = vol.attributes(VOLUME)
    info = [a.value for a in attrs if a.type == AT_VOLUME_INFORMATION and a.value is not None]
    if len(info) != 1 or len(info[0]) < 12:
        raise NtfsUnusable("$Volume has no valid VOLUME_INFORMATION")
    major, minor, flags = _unpack("<BBH", info[0], 8, "VOLUME_INFORMATION")
    if flags & VOLUME_IS_DIRTY:
        raise ImageError(DIRTY)
    if major not in (1, 3):
        raise NtfsUnusable(f"NTFS version {major}.{minor} is unknown to this reader")
    label = [a.value for a in attrs if a.type == AT_VOLUME_NAME and a.value is not None]
    return f"{major}.{minor}", (label[0].decode("utf-16-le", "replace") if label else "")


def _logfile_state(vol: _Volume, log: _Stream) -> str:
    """"empty" or "clean", as ntfs-3g's ntfs_check_logfile and ntfs_is_logfile_clean see it."""
    found, empty, pos = [], True, 0
    while pos + BLOCK <= log.size and pos <= 65536:
        head = vol.read_stream(log, pos, BLOCK, "$LogFile")
        magic = head[:4]
        if magic != b"\xff\xff\xff\xff":
            empty = False
        elif not empty or magic == b"RCRD":
            break
        if magic in (b"RSTR", b"CHKD"):
            page_size, = _unpack("<I", head, 0x10, "$LogFile")
            try:
                if not _pow2(page_size, BLOCK, 65536) or pos + page_size > log.size:
                    raise NtfsUnusable("bad page size")
                page = _fixup(bytearray(vol.read_stream(log, pos, page_size, "$LogFile")), magic,
                              "$LogFile restart page")
                ra, = _unpack("<H", page, 0x18, "$LogFile restart page")
                lsn, = _unpack("<q", page, ra, "$LogFile restart area")
                found.append((lsn, *_unpack("<HH", page, ra + 0xC, "$LogFile restart area")))
            except NtfsUnusable:
                pass                      # like ntfs-3g: look for the other restart page
            if len(found) == 2:
                break
        pos = pos * 2 if pos else BLOCK
    if empty:
        return "empty"
    if not found:
        raise NtfsUnusable("$LogFile is not empty but has no valid restart page")
    _lsn, in_use, flags = max(found)
    if in_use != 0xFFFF and not flags & 0x2:
        raise NtfsUnusable("the journal ($LogFile) holds changes not yet written back (Windows was not shut "
                           "down cleanly): $Bitmap may be stale; boot Windows and shut it down, or run "
                           "chkdsk /f")
    return "clean"


def _index_entries(buf: bytes, start: int, end: int, what: str):
    """(file reference, $FILE_NAME key or None, sub-node VCN or None) of one index node."""
    if not 0 < start < end <= len(buf):
        raise NtfsUnusable(f"{what}: entries at {start}..{end} do not fit the node")
    pos = start
    while True:
        ref, length, key_len, flags = _unpack("<QHHI", buf, pos, what)
        if length < 16 or length & 7 or pos + length > end:
            raise NtfsUnusable(f"{what}: index entry at byte {pos} has a bad length ({length})")
        if flags & 1 and length < 24:
            raise NtfsUnusable(f"{what}: index entry at byte {pos} is too short for a sub-node")
        sub = _unpack("<q", buf, pos + length - 8, what)[0] if flags & 1 else None
        if flags & 2:
            yield ref, None, sub
            return
        if key_len < 0x42 or 16 + key_len > length:
            raise NtfsUnusable(f"{what}: index entry at byte {pos} has a bad key")
        yield ref, buf[pos + 16:pos + 16 + key_len], sub
        pos += length


def _find_in_root(vol: _Volume, wanted: str) -> int | None:
    """File reference of `wanted` in the root directory, walking its $I30 B-tree."""
    attrs = vol.attributes(ROOT)
    root = vol.stream(attrs, AT_INDEX_ROOT, "$I30", "the root directory")
    if not isinstance(root, bytes):
        raise NtfsUnusable("the root directory's $INDEX_ROOT is not resident")
    itype, _coll, bsize = _unpack("<III", root, 0, "$INDEX_ROOT")
    eo, il = _unpack("<II", root, 0x10, "$INDEX_ROOT")
    if itype != AT_FILE_NAME or not _pow2(bsize, BLOCK, 65536):
        raise NtfsUnusable(f"the root directory's index (type 0x{itype:x}, blocks of {bsize}) is not a file "
                           "name index")
    alloc = None
    if any(a.type == AT_INDEX_ALLOCATION and a.name == "$I30" for a in attrs):
        alloc = vol.stream(attrs, AT_INDEX_ALLOCATION, "$I30", "the root directory")
        if isinstance(alloc, bytes):
            raise NtfsUnusable("the root directory's $INDEX_ALLOCATION is resident")
    unit = vol.cs if bsize >= vol.cs else BLOCK   # what an index VCN counts
    nodes = [("$INDEX_ROOT", root, 0x10 + eo, 0x10 + il)]
    seen: set[int] = set()
    while nodes:
        what, buf, start, end = nodes.pop()
        for ref, key, sub in _index_entries(buf, start, end, f"the root directory's {what}"):
            if key is not None:
                parent, = _unpack("<Q", key, 0, what)
                nlen, = _unpack("<B", key, 0x40, what)
                if parent & REF == ROOT and key[0x42:0x42 + 2 * nlen].decode(
                        "utf-16-le", "replace").casefold() == wanted:
                    return ref
            if sub is None:
                continue
            block = f"index block at VCN {sub}"
            if alloc is None or sub in seen or sub < 0 or len(seen) >= MAX_INDEX_NODES:
                raise NtfsUnusable(f"the root directory's {block} is missing or visited twice")
            seen.add(sub)
            node = _fixup(bytearray(vol.read_stream(alloc, sub * unit, bsize, block)), b"INDX", block)
            vcn, eo2, il2 = _unpack("<qII", node, 0x10, block)
            if vcn != sub:
                raise NtfsUnusable(f"the root directory's {block} says it is VCN {vcn}")
            nodes.append((block, bytes(node), 0x18 + eo2, 0x18 + il2))
    return None


def _check_hibernation(vol: _Volume) -> str:
    ref = _find_in_root(vol, "hiberfil.sys")
    if ref is None:
        return "absent"
    data = vol.stream(vol.attributes(ref & REF, ref >> 48), AT_DATA, "", "hiberfil.sys")
    if not isinstance(data, bytes):
        data = vol.read_stream(data, 0, min(4, data.size), "hiberfil.sys")
    if data[:4].lower() == b"hibr":
        raise ImageError(HIBERNATED.format(data[:4].decode()))
    return "not hibernated"


# --------------------------------------------------------------------------


def _bitmap(vol: _Volume, bitmap: _Stream) -> list[list[int]]:
    """Merged [start, end) runs of used clusters, bits past the last cluster masked."""
    nclusters = vol.b.clusters
    nbytes = -(-nclusters // 8)
    if bitmap.size < nbytes or bitmap.init < nbytes:
        raise NtfsUnusable(f"$Bitmap holds {bitmap.size} bytes ({bitmap.init} initialised), fewer than its "
                           f"{nclusters} clusters need ({nbytes})")
    runs: list[list[int]] = []
    chunk = 1 << 20
    for off in range(0, nbytes, chunk):
        data = vol.read_stream(bitmap, off, min(chunk, nbytes - off), "$Bitmap")
        for s, e in bitmap_runs(data, min(chunk * 8, nclusters - off * 8)):
            s, e = s + off * 8, e + off * 8
            if runs and runs[-1][1] == s:
                runs[-1][1] = e
            else:
                runs.append([s, e])
    return runs


def _check_records(vol: _Volume, runs: list[list[int]]) -> int:
    """Every run of every attribute of every MFT record in use must be marked used in $Bitmap;
    returns how many records are in use."""
    starts, rec, count, in_use = [s for s, _ in runs], vol.rec, vol.mft.size // vol.rec, 0
    per = max(1, (4 << 20) // rec)
    for first in range(0, count, per):
        buf = vol.read_stream(vol.mft, first * rec, min(per, count - first) * rec, "$MFT")
        for n in range(first, first + len(buf) // rec):
            raw = bytearray(buf[(n - first) * rec:(n - first + 1) * rec])
            if raw[:4] != b"BAAD" and not (raw[:4] == b"FILE" and raw[0x16] & 1):
                continue                  # a free record
            in_use += 1
            what = f"MFT record {n} ({NAMES.get(n, 'a file')})"
            for a in _parse_attrs(bytes(_fixup(raw, b"FILE", what)), n, vol.b.clusters, what):
                for _vcn, lcn, length in a.runs:
                    i = bisect_right(starts, lcn) - 1 if lcn is not None else 0
                    if lcn is not None and (i < 0 or runs[i][1] < lcn + length):
                        raise NtfsUnusable(f"$Bitmap marks clusters {lcn}..{lcn + length - 1} of {what} "
                                           "free: it does not match the volume")
    return in_use


def read_layout(read_at: Callable[[int, int], bytes], size: int) -> NtfsLayout:
    """The cluster allocation of the NTFS volume that read_at(offset, length) reads, in a
    partition of size bytes.  NtfsUnusable (.reason) when $Bitmap cannot be trusted,
    ImageError for a volume that must not be imaged (BitLocker, dirty, hibernated)."""
    raw = _read_exact(read_at, 0, 512, "boot sector")
    if raw[3:11] == OEM_BITLOCKER:
        raise ImageError(BITLOCKER)
    boot = _geometry(raw)
    if boot.total_sectors * boot.sector > size:
        raise NtfsUnusable(f"the volume claims {boot.total_sectors * boot.sector} bytes ({boot.total_sectors} "
                           f"sectors of {boot.sector}) but the partition has only {size} bytes")
    vol = _Volume(read_at, boot)
    cs, nclusters = boot.cluster, boot.clusters
    _load_mft(vol)
    version, label = _volume_info(vol)          # dirty: refused
    hiber = _check_hibernation(vol)             # hibernated: refused
    logfile = _logfile_state(vol, vol.system_stream(LOGFILE))
    _check_mirror(vol)
    bitmap = vol.system_stream(BITMAP)
    runs = _bitmap(vol, bitmap)
    if vol.system_stream(BOOT).runs[0][1] != 0 or not runs or runs[0][0] != 0:
        raise NtfsUnusable("$Boot does not start at cluster 0, or $Bitmap marks that cluster free")
    in_use = _check_records(vol, runs)

    # The backup boot sector: in the partition's last sector, and at total_sectors (where
    # mkntfs and Windows put it: the same sector), used; the rest past the last cluster
    # (less than a cluster of slack, or space the volume was shrunk away from) scanned.
    # A volume filling its partition has it in its middle sector (ntfsfix, chkdsk).
    used, scan, bps = Ranges(), Ranges(), boot.sector
    mid = -(-boot.total_sectors // 2) * bps // cs
    extra = [[mid, mid + 1]] if boot.total_sectors * bps > size - bps and mid < nclusters else []
    for s, e in sorted(runs + extra):
        used.add(s * cs, e * cs)
    pos = nclusters * cs
    backups = sorted({o for o in (boot.total_sectors * bps, size - bps) if o >= pos and o + bps <= size})
    for o in backups:
        scan.add(pos, o)
        used.add(max(o, pos), o + bps)
        pos = max(pos, o + bps)
    scan.add(pos, size)
    used_ranges, scan_ranges = used.result(), scan.result()
    used_clusters = sum(e - s for s, e in runs)
    via = vol.extents.get(BITMAP)
    facts = {
        "label": label, "serial": f"{boot.serial:016X}", "version": version,
        "sector_size": bps, "cluster_size": cs, "clusters": nclusters,
        "used_clusters": used_clusters, "free_clusters": nclusters - used_clusters,
        "used_bytes": sum(n for _, n in used_ranges), "scan_bytes": sum(n for _, n in scan_ranges),
        "mft_record_size": boot.record, "mft_lcn": boot.mft_lcn, "mft_records": vol.mft.size // boot.record,
        "mft_fragments": len(vol.mft.runs), "mft_records_in_use": in_use, "mftmirr_lcn": boot.mirr_lcn,
        "bitmap": f"record 6 and its $ATTRIBUTE_LIST (extension records {via})" if via else "record 6",
        "bitmap_fragments": len(bitmap.runs), "logfile": logfile, "hiberfil": hiber,
        "backup_boot_sectors": backups,
    }
    return NtfsLayout(cluster_size=cs, clusters=nclusters, used_ranges=used_ranges,
                      scan_ranges=scan_ranges, fs_bytes=size, facts=facts)
