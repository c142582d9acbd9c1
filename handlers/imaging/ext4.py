"""Which bytes of an ext2/3/4 filesystem are in use, read from its block bitmaps.

The imaging engine stores only the blocks a filesystem uses (like partclone).
Getting this wrong in the "too few" direction loses data on restore, so this
module reads the on-disk allocation bitmaps itself (standard library only, no
e2fsprogs at image time) and cross-checks them against every free count the
filesystem keeps: each group descriptor's count against its bitmap, and the sum
against the superblock.  Whenever something does not add up, or the filesystem
uses a feature whose effect on allocation we cannot reason about, it raises
Ext4Unusable and the caller falls back to copying every byte.  Free blocks are
never reported as used, so stale data of deleted files stays out of images.

Layout facts relied upon (ext4 disk-layout documentation, the kernel's
fs/ext4/super.c and balloc.c, e2fsprogs' lib/ext2fs; verified against mkfs
output by tests/test_ext4.py):

* The superblock is always at byte 1024.  Block groups start at
  s_first_data_block (1 for 1K blocks, else 0), so with 1K blocks the first
  1024 bytes (boot block) belong to no group; we report them as used.
* One block bitmap per group, one bit per cluster (a cluster is a block unless
  BIGALLOC), bit i = LSB-first bit i%8 of byte i//8.  The last group may be
  short; its bitmap is padded with set bits which mean nothing.
* Group descriptors follow the superblock's block (or, with META_BG, sit in
  the first groups of each meta group); FLEX_BG only moves bitmaps elsewhere,
  and the descriptor says where.
* BLOCK_UNINIT (only meaningful with GDT_CSUM/METADATA_CSUM) means the bitmap
  block was never written: the kernel computes it from the group's metadata.
"""

from __future__ import annotations

import struct
import uuid as _uuid
from dataclasses import dataclass, field
from typing import Callable

from handlers.imaging.fsmap import MapUnusable, Ranges, bitmap_runs

__all__ = ["Ext4Layout", "Ext4Unusable", "Unusable", "probe", "read_layout"]

SUPERBLOCK_OFFSET = 1024
EXT4_MAGIC = 0xEF53

# s_state bits
_STATE_VALID = 0x1  # cleanly unmounted (ext2 clears it while mounted)
_STATE_ERROR = 0x2  # the kernel saw corruption; bitmaps may be wrong

# bg_flags bits
_BG_BLOCK_UNINIT = 0x2

# Feature names as e2fsprogs spells them (for facts and messages).
_COMPAT = {
    0x1: "dir_prealloc", 0x2: "imagic_inodes", 0x4: "has_journal",
    0x8: "ext_attr", 0x10: "resize_inode", 0x20: "dir_index",
    0x40: "lazy_bg", 0x80: "snapshot_exclude", 0x100: "exclude_bitmap",
    0x200: "sparse_super2", 0x400: "fast_commit", 0x800: "stable_inodes",
    0x1000: "orphan_file",
}
_RO_COMPAT = {
    0x1: "sparse_super", 0x2: "large_file", 0x4: "btree_dir",
    0x8: "huge_file", 0x10: "uninit_bg", 0x20: "dir_nlink",
    0x40: "extra_isize", 0x80: "snapshot", 0x100: "quota",
    0x200: "bigalloc", 0x400: "metadata_csum", 0x800: "replica",
    0x1000: "read-only", 0x2000: "project", 0x4000: "shared_blocks",
    0x8000: "verity", 0x10000: "orphan_present",
}
_INCOMPAT = {
    0x1: "compression", 0x2: "filetype", 0x4: "needs_recovery",
    0x8: "journal_dev", 0x10: "meta_bg", 0x40: "extent", 0x80: "64bit",
    0x100: "mmp", 0x200: "flex_bg", 0x400: "ea_inode", 0x1000: "dirdata",
    0x2000: "metadata_csum_seed", 0x4000: "large_dir", 0x8000: "inline_data",
    0x10000: "encrypt", 0x20000: "casefold",
}

_RO_SPARSE_SUPER = 0x1
_RO_GDT_CSUM = 0x10
_RO_BIGALLOC = 0x200
_RO_METADATA_CSUM = 0x400
_COMPAT_SPARSE_SUPER2 = 0x200
_INCOMPAT_RECOVER = 0x4
_INCOMPAT_JOURNAL_DEV = 0x8
_INCOMPAT_META_BG = 0x10
_INCOMPAT_64BIT = 0x80
_INCOMPAT_FLEX_BG = 0x200

# Incompat features that leave "a set bit in the block bitmap = an allocated
# cluster" intact (they change inodes, directories or file mapping, or move
# metadata that the descriptors still point to).  Anything else incompat is
# refused: by definition an old reader cannot understand the filesystem.
# needs_recovery and journal_dev are known but refused with their own reason.
_INCOMPAT_OK = (0x2 | 0x10 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x1000
                | 0x2000 | 0x4000 | 0x8000 | 0x10000 | 0x20000)
# ro_compat features may change allocation semantics (bigalloc does), so
# only those known to keep bitmaps meaningful pass.  Refused: btree_dir and
# replica (never in mainline, semantics unknown), snapshot (next3 snapshots
# keep blocks outside the normal allocation rules).
_RO_COMPAT_OK = (0x1 | 0x2 | 0x8 | 0x10 | 0x20 | 0x40 | 0x100 | 0x200
                 | 0x400 | 0x1000 | 0x2000 | 0x4000 | 0x8000 | 0x10000)
# compat features are safe by definition: an old kernel may write to such a
# filesystem without knowing them, so they cannot change what bitmaps mean.
# The one exception is lazy_bg, the pre-uninit_bg experiment of old mke2fs
# that left bitmaps unwritten without any checksum telling so: refused.
_COMPAT_REFUSED = 0x40


class Ext4Unusable(MapUnusable):
    """The bitmaps cannot be trusted; copy the whole filesystem instead."""


Unusable = Ext4Unusable     # the name source.py's FILESYSTEMS readers share


@dataclass
class Ext4Layout:
    block_size: int
    blocks_count: int
    free_blocks: int  # s_free_blocks_count (in blocks, also with bigalloc)
    used_ranges: list[tuple[int, int]]  # (offset, length), sorted, merged
    scan_ranges: list[tuple[int, int]]  # usage unknown: read, keep non-zero
    fs_bytes: int
    facts: dict = field(default_factory=dict)


def probe(read_at: Callable[[int, int], bytes]) -> bool:
    """True if an ext2/3/4 superblock magic is at offset 1024.

    A short read (device smaller than that) is simply "no"; I/O errors from
    read_at propagate."""
    magic = read_at(SUPERBLOCK_OFFSET + 0x38, 2)
    return len(magic) == 2 and struct.unpack("<H", magic)[0] == EXT4_MAGIC


# --------------------------------------------------------------------------
# Superblock


@dataclass
class _Super:
    block_size: int
    cluster_ratio: int  # blocks per bitmap bit
    blocks_count: int
    free_blocks: int
    first_data_block: int
    blocks_per_group: int
    clusters_per_group: int
    inodes_per_group: int
    inode_size: int
    reserved_gdt_blocks: int
    desc_size: int
    first_meta_bg: int
    backup_bgs: tuple[int, int]
    compat: int
    ro_compat: int
    incompat: int
    state: int
    uuid: str
    label: str

    def has_super(self, group: int) -> bool:
        """Does this group hold a superblock (and descriptor) backup?

        Same rule as the kernel's ext4_bg_has_super: sparse_super2 names at
        most two backup groups; sparse_super keeps groups 0, 1 and powers of
        3, 5 and 7; without either every group has a backup."""
        if group == 0:
            return True
        if self.compat & _COMPAT_SPARSE_SUPER2:
            return group in self.backup_bgs
        if group <= 1 or not self.ro_compat & _RO_SPARSE_SUPER:
            return True
        if not group & 1:
            return False
        for base in (3, 5, 7):
            n = base
            while n < group:
                n *= base
            if n == group:
                return True
        return False


def _feature_names(compat: int, ro_compat: int, incompat: int) -> list[str]:
    names = []
    for mask, table, kind in ((compat, _COMPAT, "compat"),
                              (ro_compat, _RO_COMPAT, "ro_compat"),
                              (incompat, _INCOMPAT, "incompat")):
        bit = 1
        while bit <= mask:
            if mask & bit:
                names.append(table.get(bit, f"{kind}_0x{bit:x}"))
            bit <<= 1
    return names


def _parse_super(raw: bytes, size: int) -> _Super:
    if len(raw) < 1024:
        raise Ext4Unusable("device too small to hold an ext2/3/4 superblock")
    (_inodes, blocks_lo, _r_lo, free_lo, _free_inodes, first_data_block,
     log_block, log_cluster, blocks_per_group, clusters_per_group,
     inodes_per_group) = struct.unpack_from("<11I", raw, 0)
    magic, state = struct.unpack_from("<HH", raw, 0x38)
    rev_level, = struct.unpack_from("<I", raw, 0x4C)
    inode_size, = struct.unpack_from("<H", raw, 0x58)
    compat, incompat, ro_compat = struct.unpack_from("<III", raw, 0x5C)
    uuid_raw = raw[0x68:0x78]
    label_raw = raw[0x78:0x88]
    reserved_gdt, = struct.unpack_from("<H", raw, 0xCE)
    desc_size_field, = struct.unpack_from("<H", raw, 0xFE)
    first_meta_bg, = struct.unpack_from("<I", raw, 0x104)
    blocks_hi, _r_hi, free_hi = struct.unpack_from("<III", raw, 0x150)
    backup_bgs = struct.unpack_from("<II", raw, 0x24C)

    if magic != EXT4_MAGIC:
        raise Ext4Unusable(f"no ext2/3/4 superblock at byte 1024 (magic 0x{magic:04x}, expected 0xef53)")
    if rev_level == 0:
        # The original ext2 revision has no feature fields; what sits there
        # is undefined, so read them as zero.
        compat = ro_compat = incompat = 0
        inode_size = 128
    if incompat & _INCOMPAT_JOURNAL_DEV:
        raise Ext4Unusable("this is an external ext3/4 journal device, not a filesystem; it has no block bitmaps")
    if incompat & _INCOMPAT_RECOVER:
        raise Ext4Unusable("the journal needs recovery (filesystem mounted or not cleanly unmounted): "
                           "blocks allocated in the journal may be missing from the on-disk bitmaps; "
                           "mount and unmount it or run e2fsck first")
    bad_incompat = incompat & ~_INCOMPAT_OK
    bad_ro = ro_compat & ~_RO_COMPAT_OK
    bad_compat = compat & _COMPAT_REFUSED
    if bad_incompat or bad_ro or bad_compat:
        feats = _feature_names(bad_compat, bad_ro, bad_incompat)
        raise Ext4Unusable(f"filesystem uses feature(s) {', '.join(feats)} whose effect on block "
                           f"allocation this reader does not understand")
    if state & _STATE_ERROR:
        raise Ext4Unusable("the filesystem is marked as having errors; its bitmaps may be wrong (run e2fsck)")
    if not state & _STATE_VALID:
        raise Ext4Unusable("the filesystem was not cleanly unmounted (or is mounted); its bitmaps may be "
                           "stale (unmount it or run e2fsck)")

    if log_block > 6:
        raise Ext4Unusable(f"block size 2^{10 + log_block} is outside 1 KiB..64 KiB")
    block_size = 1024 << log_block
    is64 = bool(incompat & _INCOMPAT_64BIT)
    blocks_count = blocks_lo | (blocks_hi << 32 if is64 else 0)
    free_blocks = free_lo | (free_hi << 32 if is64 else 0)

    if ro_compat & _RO_BIGALLOC:
        if log_cluster < log_block or log_cluster - log_block > 16:
            raise Ext4Unusable(f"bigalloc cluster size 2^{10 + log_cluster} does not fit block size {block_size}")
        ratio = 1 << (log_cluster - log_block)
    else:
        # Without bigalloc this field is the old fragment size, which mke2fs
        # and the kernel insist equals the block size.
        if log_cluster != log_block:
            raise Ext4Unusable(f"fragment size 2^{10 + log_cluster} differs from block size {block_size}")
        ratio = 1

    if blocks_count == 0:
        raise Ext4Unusable("superblock says the filesystem has 0 blocks")
    if first_data_block not in (0, 1) or (first_data_block == 1 and block_size != 1024):
        raise Ext4Unusable(f"first data block {first_data_block} is impossible with {block_size}-byte blocks")
    if first_data_block >= blocks_count:
        raise Ext4Unusable(f"first data block {first_data_block} is beyond the {blocks_count} blocks")
    if not 0 < clusters_per_group <= 8 * block_size:
        raise Ext4Unusable(f"{clusters_per_group} clusters per group cannot be described by a "
                           f"{block_size}-byte bitmap")
    if blocks_per_group != clusters_per_group * ratio:
        raise Ext4Unusable(f"{blocks_per_group} blocks per group does not match {clusters_per_group} "
                           f"clusters of {ratio} blocks")
    if blocks_count * block_size > size:
        raise Ext4Unusable(f"filesystem claims {blocks_count * block_size} bytes ({blocks_count} blocks of "
                           f"{block_size}) but the partition has only {size} bytes")

    if is64:
        if desc_size_field < 64 or desc_size_field > 1024 or desc_size_field & (desc_size_field - 1):
            raise Ext4Unusable(f"64bit filesystem with invalid group descriptor size {desc_size_field}")
        desc_size = desc_size_field
    else:
        desc_size = 32

    try:
        label = label_raw.split(b"\0", 1)[0].decode("utf-8")
    except UnicodeDecodeError:
        label = label_raw.split(b"\0", 1)[0].decode("latin-1")
    return _Super(
        block_size=block_size, cluster_ratio=ratio, blocks_count=blocks_count,
        free_blocks=free_blocks, first_data_block=first_data_block,
        blocks_per_group=blocks_per_group, clusters_per_group=clusters_per_group,
        inodes_per_group=inodes_per_group, inode_size=inode_size,
        reserved_gdt_blocks=reserved_gdt, desc_size=desc_size,
        first_meta_bg=first_meta_bg, backup_bgs=tuple(backup_bgs),
        compat=compat, ro_compat=ro_compat, incompat=incompat, state=state,
        uuid=str(_uuid.UUID(bytes=uuid_raw)), label=label,
    )


# --------------------------------------------------------------------------
# Group descriptors

# Fields up to bg_flags; 64-byte descriptors add the high halves at 0x20.
_DESC32 = "<IIIHHHH"            # block/inode bitmap, inode table, free blocks, free inodes, dirs, flags
_DESC64_TAIL = "12xIIIH"        # 0x14..0x20 skipped; block/inode bitmap hi, table hi, free blocks hi


def _read_exact(read_at: Callable[[int, int], bytes], offset: int, length: int, what: str) -> bytes:
    data = read_at(offset, length)
    if len(data) != length:
        raise Ext4Unusable(f"short read of {what}: wanted {length} bytes at offset {offset}, got {len(data)}")
    return bytes(data)


def _descriptor_blocks(sb: _Super, groups: int) -> list[int]:
    """Block numbers of the primary descriptor blocks, in order.

    Mirrors the kernel's descriptor_loc(): the classic table starts in the
    block after the superblock's; with META_BG, descriptor block m (m >=
    s_first_meta_bg) lives at the start of group m*descs_per_block, after
    that group's superblock backup if it has one.  On a 1K-block filesystem
    whose groups start at block 0 (bigalloc) "after the superblock" is block
    2, hence the extra +1 for group 0."""
    bs = sb.block_size
    per_block = bs // sb.desc_size
    count = -(-groups // per_block)
    table_start = SUPERBLOCK_OFFSET // bs + 1
    meta = bool(sb.incompat & _INCOMPAT_META_BG)
    if meta and sb.first_meta_bg > count:
        raise Ext4Unusable(f"first meta block group {sb.first_meta_bg} is beyond the {count} descriptor blocks")
    blocks = []
    for m in range(count):
        if not meta or m < sb.first_meta_bg:
            blocks.append(table_start + m)
        else:
            group = m * per_block
            loc = sb.first_data_block + group * sb.blocks_per_group + sb.has_super(group)
            if bs == 1024 and m == 0 and sb.first_data_block == 0:
                loc += 1
            blocks.append(loc)
    return blocks


def _read_descriptors(read_at, sb: _Super, groups: int) -> list[tuple[int, int, int, int, int]]:
    """[(block_bitmap, inode_bitmap, inode_table, free_clusters, flags)] per group."""
    bs = sb.block_size
    blocks = _descriptor_blocks(sb, groups)
    for b in blocks:
        if not b < sb.blocks_count:
            raise Ext4Unusable(f"group descriptor block {b} lies outside the filesystem ({sb.blocks_count} blocks)")
    # Read consecutive descriptor blocks together: the classic table is one
    # read even for 8192 groups; META_BG blocks are one read each.
    parts, i = [], 0
    while i < len(blocks):
        j = i + 1
        while j < len(blocks) and blocks[j] == blocks[j - 1] + 1:
            j += 1
        parts.append(_read_exact(read_at, blocks[i] * bs, (j - i) * bs, "group descriptors"))
        i = j
    table = b"".join(parts)
    per_block = bs // sb.desc_size
    ds = sb.desc_size
    # A descriptor never straddles a block (desc_size divides block size), so
    # the concatenated blocks are simply an array of descriptors.
    assert per_block * ds == bs
    if ds == 32:
        fmt = struct.Struct(_DESC32 + "12x")
        return [(bb, ib, it, free, flags)
                for bb, ib, it, free, _fi, _d, flags in fmt.iter_unpack(table[:groups * ds])]
    fmt = struct.Struct(_DESC32 + _DESC64_TAIL + f"{ds - 0x2E}x")
    return [(bb | bb_hi << 32, ib | ib_hi << 32, it | it_hi << 32, free | free_hi << 16, flags)
            for bb, ib, it, free, _fi, _d, flags, bb_hi, ib_hi, it_hi, free_hi
            in fmt.iter_unpack(table[:groups * ds])]


# --------------------------------------------------------------------------
# BLOCK_UNINIT groups


def _derived_uninit_runs(sb: _Super, group: int, desc, groups: int, nclusters: int) -> list[list[int]]:
    """Used-cluster runs of a BLOCK_UNINIT group, computed the way the kernel
    does when it first touches the group (ext4_init_block_bitmap): the
    superblock/descriptor backup area at the start of the group, plus this
    group's own bitmaps and inode table if they lie inside it."""
    bpg, ratio, bs = sb.blocks_per_group, sb.cluster_ratio, sb.block_size
    per_block = bs // sb.desc_size
    start = sb.first_data_block + group * bpg
    end = min(start + bpg, sb.blocks_count)
    meta = bool(sb.incompat & _INCOMPAT_META_BG)
    has_super = sb.has_super(group)
    base = int(has_super)
    if not meta or group < sb.first_meta_bg * per_block:
        if has_super:
            gdb = sb.first_meta_bg if meta else -(-groups // per_block)
            base += gdb + sb.reserved_gdt_blocks
    elif group % per_block in (0, 1, per_block - 1):
        base += 1  # meta_bg keeps descriptor copies in groups 0, 1 and last of each meta group
    itable_blocks = -(-(sb.inodes_per_group * sb.inode_size) // bs)
    bb, ib, it = desc[0], desc[1], desc[2]
    spans = [(start, start + base), (bb, bb + 1), (ib, ib + 1), (it, it + itable_blocks)]
    clusters = []
    for lo, hi in spans:  # blocks -> clusters of this group, clipped to it
        lo, hi = max(lo, start), min(hi, end)
        if lo < hi:
            clusters.append([(lo - start) // ratio, -(-(hi - start) // ratio)])
    runs: list[list[int]] = []
    for lo, hi in sorted(clusters):
        if runs and lo <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], hi)
        else:
            runs.append([lo, hi])
    return runs


# --------------------------------------------------------------------------


def read_layout(read_at: Callable[[int, int], bytes], size: int, *,
                derive_uninit: bool = True) -> Ext4Layout:
    """Read the block allocation of the ext2/3/4 filesystem starting at offset 0.

    read_at(offset, length) reads from the filesystem start; size is the
    partition's byte size.  Raises Ext4Unusable (with .reason) whenever the
    bitmaps cannot be trusted.

    derive_uninit: for BLOCK_UNINIT groups, compute the used blocks the way
    the kernel would (superblock/descriptor backups, own bitmaps and inode
    table) and check them against the descriptor's free count, instead of
    putting the whole group into scan_ranges.  A group whose derived count
    does not match still goes to scan_ranges.  Worth it: mkfs leaves most
    groups of a large, fresh filesystem BLOCK_UNINIT (7671 of 8192 on 1 TiB).
    """
    sb = _parse_super(_read_exact(read_at, SUPERBLOCK_OFFSET, 1024, "superblock"), size)
    bs, bpg, ratio = sb.block_size, sb.blocks_per_group, sb.cluster_ratio
    cluster_bytes = bs * ratio
    fs_bytes = sb.blocks_count * bs
    groups = -(-(sb.blocks_count - sb.first_data_block) // bpg)
    descs = _read_descriptors(read_at, sb, groups)
    honour_uninit = bool(sb.ro_compat & (_RO_GDT_CSUM | _RO_METADATA_CSUM))

    # Blocks a bitmap may never sit in: the primary superblock and the primary
    # descriptor table (kernel ext4_check_descriptors does the same).
    sb_block = SUPERBLOCK_OFFSET // bs
    desc_blocks = set(_descriptor_blocks(sb, groups))
    flex = bool(sb.incompat & _INCOMPAT_FLEX_BG)
    unit = "clusters" if ratio > 1 else "blocks"  # what a bitmap bit and a descriptor count mean

    def group_clusters(g: int) -> int:
        if g < groups - 1:
            return sb.clusters_per_group
        blocks = sb.blocks_count - sb.first_data_block - g * bpg
        return -(-blocks // ratio)

    # Which groups need a bitmap read, and where.
    to_read: list[int] = []
    uninit: list[int] = []
    for g, (bb, _ib, _it, free, flags) in enumerate(descs):
        if free > group_clusters(g):
            raise Ext4Unusable(f"free block count of group {g} ({free}) is larger than the group "
                               f"({group_clusters(g)} {unit}): the descriptor does not match the filesystem")
        if honour_uninit and flags & _BG_BLOCK_UNINIT:
            uninit.append(g)
            continue
        if not sb.first_data_block <= bb < sb.blocks_count:
            raise Ext4Unusable(f"block bitmap of group {g} is at block {bb}, outside the filesystem "
                               f"(blocks {sb.first_data_block}..{sb.blocks_count - 1})")
        if bb == sb_block or bb in desc_blocks:
            raise Ext4Unusable(f"block bitmap of group {g} (block {bb}) overlaps the superblock or group descriptors")
        if not flex:
            gstart = sb.first_data_block + g * bpg
            if not gstart <= bb < gstart + bpg:
                raise Ext4Unusable(f"block bitmap of group {g} (block {bb}) is outside its group and flex_bg is off")
        to_read.append(g)

    used = Ranges()
    scan = Ranges()
    if sb.first_data_block == 1:
        used.add(0, SUPERBLOCK_OFFSET)  # boot block: in no group, but part of the filesystem
    total_free = 0  # clusters
    uninit_set = set(uninit)
    uninit_scanned = 0

    def add_runs(g: int, runs: list[list[int]]) -> None:
        gstart = (sb.first_data_block + g * bpg) * bs
        for s, e in runs:
            used.add(gstart + s * cluster_bytes, min(gstart + e * cluster_bytes, fs_bytes))

    # Bitmaps are read in batches of consecutive blocks (with flex_bg the
    # bitmaps of a flex group sit side by side: 16 groups, one read), at most
    # 1 MiB each, and consumed in group order so the output stays sorted and
    # only one batch is held in memory.
    max_batch = max(1, (1 << 20) // bs)
    batch_of: dict[int, list[int]] = {}
    batch: list[int] = []
    for g in to_read:
        if batch and len(batch) < max_batch and descs[g][0] == descs[batch[-1]][0] + 1:
            batch.append(g)
        else:
            batch = [g]
            batch_of[g] = batch  # keyed by the batch's first group
    bitmaps: dict[int, bytes] = {}

    for g in range(groups):
        nclusters = group_clusters(g)
        free_desc = descs[g][3]
        if g in uninit_set:
            runs = None
            if derive_uninit and g > 0:
                runs = _derived_uninit_runs(sb, g, descs[g], groups, nclusters)
                if nclusters - sum(e - s for s, e in runs) != free_desc:
                    runs = None  # we do not know what this group holds: let the caller look
            if runs is None:
                uninit_scanned += 1
                gstart = sb.first_data_block + g * bpg
                scan.add(gstart * bs, min(gstart + bpg, sb.blocks_count) * bs)
            else:
                add_runs(g, runs)
            total_free += free_desc
            continue
        if g in batch_of:
            members = batch_of.pop(g)
            data = _read_exact(read_at, descs[g][0] * bs, len(members) * bs, f"block bitmap of group {g}")
            bitmaps = {m: data[k * bs:(k + 1) * bs] for k, m in enumerate(members)}
        runs = bitmap_runs(bitmaps.pop(g), nclusters)
        free_bits = nclusters - sum(e - s for s, e in runs)
        if free_bits != free_desc:
            raise Ext4Unusable(f"free block count of group {g}: its bitmap has {free_bits} free {unit} but "
                               f"the group descriptor says {free_desc}; the bitmaps do not match the descriptors")
        total_free += free_bits
        add_runs(g, runs)

    # The superblock counts blocks even with bigalloc (the kernel stores
    # free clusters << cluster bits there).
    if total_free * ratio != sb.free_blocks:
        raise Ext4Unusable(f"free block count in the superblock ({sb.free_blocks}) does not match the sum over "
                           f"the group descriptors ({total_free * ratio})")

    used_ranges = used.result()
    scan_ranges = scan.result()
    facts = {
        "uuid": sb.uuid,
        "label": sb.label,
        "block_size": bs,
        "cluster_size": cluster_bytes,
        "blocks_count": sb.blocks_count,
        "free_blocks": sb.free_blocks,
        "groups": groups,
        "features": _feature_names(sb.compat, sb.ro_compat, sb.incompat),
        "used_bytes": sum(n for _, n in used_ranges),
        "uninit_groups": len(uninit),
        "uninit_scanned_groups": uninit_scanned,
        "scan_bytes": sum(n for _, n in scan_ranges),
    }
    return Ext4Layout(block_size=bs, blocks_count=sb.blocks_count, free_blocks=sb.free_blocks,
                      used_ranges=used_ranges, scan_ranges=scan_ranges, fs_bytes=fs_bytes, facts=facts)
