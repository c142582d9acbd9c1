"""ext4 used-block reader, checked against what e2fsprogs says about real mkfs output."""

from __future__ import annotations

import os
import random
import re
import shutil
import struct
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handlers.imaging import ext4
from handlers.imaging.ext4 import Ext4Unusable, probe, read_layout
from handlers.imaging.fsmap import bitmap_runs


def _tool(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which(name, path=path)


MKFS, DEBUGFS, DUMPE2FS = _tool("mkfs.ext4"), _tool("debugfs"), _tool("dumpe2fs")


@pytest.fixture(autouse=True)
def _e2fsprogs():
    if not (MKFS and DEBUGFS and DUMPE2FS):
        pytest.fail("e2fsprogs (mkfs.ext4, debugfs, dumpe2fs) is not installed: cannot build "
                    "reference filesystems (make test installs it)")


FILES = {  # path -> size; random content, some sizes odd, some spanning groups
    "a.bin": 3_000_000,
    "b.bin": 50_000,
    "sub/c.bin": 700_000,
    "sub/deeper/d.bin": 12_345,
    "tiny": 1,
    "empty": 0,
}


def _run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def make_fs(tmp_path, size: int, *opts: str, files: dict[str, int] = FILES, seed: int = 1):
    src = tmp_path / "src"
    rng = random.Random(seed)
    for name, n in files.items():
        p = src / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(n))
    img = tmp_path / "fs.img"
    with open(img, "wb") as f:
        f.truncate(size)
    _run(MKFS, "-q", "-F", *opts, "-d", str(src), str(img))
    return img


def reader(img):
    fd = os.open(img, os.O_RDONLY)

    def read_at(offset: int, length: int) -> bytes:
        return os.pread(fd, length, offset)

    return read_at


def layout_of(img, **kw):
    return read_layout(reader(img), os.path.getsize(img), **kw)


def dumpe2fs_groups(img):
    """[(group, first_block, last_block, flags, free [(a, b_inclusive)])] as dumpe2fs sees them."""
    out = _run(DUMPE2FS, str(img))
    groups = []
    for line in out.splitlines():
        m = re.match(r"Group (\d+): \(Blocks (\d+)-(\d+)\)[^\[]*(?:\[(.*)\])?", line)
        if m:
            flags = set(f.strip() for f in (m.group(4) or "").split(",") if f.strip())
            groups.append([int(m.group(1)), int(m.group(2)), int(m.group(3)), flags, []])
            continue
        m = re.match(r"\s+Free blocks: ?(.*)$", line)
        if m and groups:
            for part in filter(None, (p.strip() for p in m.group(1).split(","))):
                a, _, b = part.partition("-")
                groups[-1][4].append((int(a), int(b or a)))
    return groups


def file_blocks(img, path: str) -> list[int]:
    out = _run(DEBUGFS, "-R", f"blocks /{path}", str(img))
    return [int(x) for x in out.split()]


def blocks_of(ranges, block_size: int, nblocks: int) -> bytearray:
    marks = bytearray(nblocks)
    for off, n in ranges:
        assert n > 0
        first, end = off // block_size, -(-(off + n) // block_size)
        marks[first:end] = b"\1" * (end - first)
    return marks


def check_invariants(lay: ext4.Ext4Layout):
    for ranges in (lay.used_ranges, lay.scan_ranges):
        for (o1, n1), (o2, _) in zip(ranges, ranges[1:]):
            assert o1 + n1 < o2, "ranges must be sorted and merged"
        for o, n in ranges:
            assert 0 <= o and n > 0 and o + n <= lay.fs_bytes
    scan = blocks_of(lay.scan_ranges, 1024, -(-lay.fs_bytes // 1024))
    used = blocks_of(lay.used_ranges, 1024, -(-lay.fs_bytes // 1024))
    assert not any(a and b for a, b in zip(scan, used)), "used and scan ranges overlap"


def check_against_e2fsprogs(img, derive: bool):
    lay = layout_of(img, derive_uninit=derive)
    check_invariants(lay)
    bs = lay.block_size
    ratio = lay.facts["cluster_size"] // bs
    ours = blocks_of(lay.used_ranges, bs, lay.blocks_count)
    scan = blocks_of(lay.scan_ranges, bs, lay.blocks_count)
    for off, n in lay.used_ranges:
        assert off % bs == 0 or off == 0, "used ranges are whole blocks"
    expected = bytearray(lay.blocks_count)
    expected_scan = bytearray(lay.blocks_count)
    groups = dumpe2fs_groups(img)
    assert len(groups) == lay.facts["groups"]
    if groups[0][1] == 1:
        expected[0] = 1  # boot block of a 1K filesystem
    uninit_blocks = 0
    for _g, first, last, flags, free in groups:
        target = expected_scan if ("BLOCK_UNINIT" in flags and not derive) else expected
        target[first:last + 1] = b"\1" * (last + 1 - first)
        if target is expected_scan:
            uninit_blocks += last + 1 - first - sum(min(b + ratio, last + 1) - a for a, b in free)
            continue
        for a, b in free:  # with bigalloc dumpe2fs names the first block of each cluster
            end = min(b + ratio, last + 1)
            expected[a:end] = bytes(end - a)
    if ours != expected:
        diff = next(i for i in range(lay.blocks_count) if ours[i] != expected[i])
        pytest.fail(f"block {diff}: reader says {'used' if ours[diff] else 'free'}, "
                    f"dumpe2fs says {'used' if expected[diff] else 'free'}")
    assert scan == expected_scan
    # The reader's used bytes are exactly the filesystem's non-free blocks
    # (minus those of groups left for scanning).
    assert lay.facts["used_bytes"] == (lay.blocks_count - lay.free_blocks - uninit_blocks) * bs
    for name in FILES:
        for blk in file_blocks(img, name):
            assert ours[blk], f"data block {blk} of {name} is not in used_ranges"
    return lay, groups


VARIANTS = {
    "4k": (128 << 20, "-b", "4096", "-g", "8192"),
    "1k": (64 << 20, "-b", "1024"),
    "2k": (64 << 20, "-b", "2048", "-g", "4096"),
    "no_flex_bg": (128 << 20, "-b", "1024", "-O", "^flex_bg"),
    "64bit_4k": (128 << 20, "-b", "4096", "-g", "4096", "-O", "64bit"),
    "32bit_desc": (128 << 20, "-b", "1024", "-O", "^64bit"),
    "meta_bg_64bit": (64 << 20, "-b", "1024", "-g", "1024", "-O", "meta_bg,^resize_inode,64bit"),
    "meta_bg_32bit": (64 << 20, "-b", "1024", "-g", "1024", "-O", "meta_bg,^resize_inode,^64bit"),
    "meta_bg_4k": (128 << 20, "-b", "4096", "-g", "256", "-O", "meta_bg,^resize_inode"),
    "meta_bg_no_flex": (64 << 20, "-b", "1024", "-g", "1024", "-O", "meta_bg,^resize_inode,^flex_bg"),
    "sparse_super2": (128 << 20, "-b", "1024", "-O", "sparse_super2"),
    "sparse_super2_one": (128 << 20, "-b", "1024", "-O", "sparse_super2", "-E", "num_backup_sb=1"),
    "no_sparse_super": (64 << 20, "-b", "1024", "-O", "^sparse_super,^resize_inode"),
    "lazy_itable_init": (128 << 20, "-b", "1024", "-E", "lazy_itable_init=1"),
    "many_uninit": (300 << 20, "-b", "1024", "-g", "4096"),
    "gdt_csum": (128 << 20, "-b", "1024", "-g", "4096", "-O", "^metadata_csum,uninit_bg"),
    "partial_last_group": ((100 << 20) + 12 * 4096, "-b", "4096", "-g", "8192"),
    "partial_last_1k": ((70 << 20) + 3 * 1024, "-b", "1024"),
    "bigalloc_1k": (64 << 20, "-b", "1024", "-O", "bigalloc", "-C", "4096"),
    "bigalloc_4k": (256 << 20, "-b", "4096", "-O", "bigalloc", "-C", "65536"),
    "ext2": (64 << 20, "-t", "ext2"),
    "ext3": (64 << 20, "-t", "ext3"),
}
MUST_HAVE_UNINIT = {"many_uninit", "gdt_csum", "lazy_itable_init", "meta_bg_64bit", "no_flex_bg"}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_dumpe2fs(tmp_path, variant):
    size, *opts = VARIANTS[variant]
    img = make_fs(tmp_path, size, *opts)
    lay, groups = check_against_e2fsprogs(img, derive=False)
    uninit = sum("BLOCK_UNINIT" in g[3] for g in groups)
    if variant in MUST_HAVE_UNINIT:
        assert uninit > 0, "this variant is meant to exercise BLOCK_UNINIT groups"
    if variant in ("ext2", "ext3"):
        assert uninit == 0 and not lay.scan_ranges
    assert lay.facts["uninit_groups"] == uninit
    assert bool(lay.scan_ranges) == bool(uninit)
    # Deriving BLOCK_UNINIT groups must give exactly what libext2fs computes.
    lay2, _ = check_against_e2fsprogs(img, derive=True)
    assert not lay2.scan_ranges and lay2.facts["uninit_scanned_groups"] == 0
    assert lay2.facts["used_bytes"] == (lay2.blocks_count - lay2.free_blocks) * lay2.block_size


def test_facts_are_json_and_meaningful(tmp_path):
    import json

    img = make_fs(tmp_path, 64 << 20, "-b", "4096", "-L", "root fs", "-U", "12345678-1234-5678-1234-567812345678")
    lay = layout_of(img)
    json.dumps(lay.facts)
    assert lay.facts["label"] == "root fs"
    assert lay.facts["uuid"] == "12345678-1234-5678-1234-567812345678"
    assert {"extent", "has_journal"} <= set(lay.facts["features"])
    assert lay.fs_bytes == lay.blocks_count * 4096 == 64 << 20
    assert probe(reader(img))


def test_deleted_file_blocks_are_not_used(tmp_path):
    files = {"keep.bin": 400_000, "victim.bin": 2_000_000}
    img = make_fs(tmp_path, 64 << 20, "-b", "1024", files=files, seed=7)
    victim = file_blocks(img, "victim.bin")
    assert len(victim) > 1000
    before = layout_of(img)
    _run(DEBUGFS, "-w", "-R", "rm /victim.bin", str(img))
    after = layout_of(img)  # free counts still add up, or this raises
    assert after.free_blocks >= before.free_blocks + len(victim)
    # The stale data is still on disk: exactly what must stay out of images.
    rng = random.Random(7)
    rng.randbytes(files["keep.bin"])
    assert reader(img)(victim[0] * 1024, 1024) == rng.randbytes(1024)
    used = blocks_of(after.used_ranges, 1024, after.blocks_count)
    assert not any(used[b] for b in victim)
    assert all(blocks_of(before.used_ranges, 1024, before.blocks_count)[b] for b in victim)
    for name in ("keep.bin",):
        assert all(used[b] for b in file_blocks(img, name))


def _patch(img, offset: int, fmt: str, fn):
    with open(img, "r+b") as f:
        f.seek(offset)
        raw = f.read(struct.calcsize(fmt))
        f.seek(offset)
        f.write(struct.pack(fmt, fn(*struct.unpack(fmt, raw))))


@pytest.fixture(scope="module")
def small_image(tmp_path_factory):
    """8 MiB, 1K blocks, 8 groups, several files: the victim of corruption tests."""
    tmp = tmp_path_factory.mktemp("small")
    img = make_fs(tmp, 8 << 20, "-b", "1024", "-g", "1024", "-N", "256",
                  files={"x": 300_000, "y": 90_000, "z/w": 1_500_000})
    return img.read_bytes()


def _copy(tmp_path, data: bytes):
    img = tmp_path / "copy.img"
    img.write_bytes(data)
    return img


GDT_1K = 2 * 1024  # descriptor table of a 1K filesystem starts at block 2


def test_descriptor_free_count_mismatch(tmp_path, small_image):
    img = _copy(tmp_path, small_image)
    layout_of(img)
    _patch(img, GDT_1K + 0x0C, "<H", lambda v: v + 1)  # group 0 bg_free_blocks_count_lo
    with pytest.raises(Ext4Unusable, match="free block count of group 0") as e:
        layout_of(img)
    assert "descriptor says" in e.value.reason


def test_superblock_free_count_mismatch(tmp_path, small_image):
    img = _copy(tmp_path, small_image)
    _patch(img, 1024 + 0x0C, "<I", lambda v: v - 3)  # s_free_blocks_count_lo
    with pytest.raises(Ext4Unusable, match="free block count in the superblock"):
        layout_of(img)


def test_bitmap_bit_flipped_is_caught(tmp_path, small_image):
    img = _copy(tmp_path, small_image)
    bitmap_block, = struct.unpack_from("<I", small_image, GDT_1K + 64 * 3)  # group 3 block bitmap
    _patch(img, bitmap_block * 1024 + 100, "<B", lambda v: v ^ 0x10)
    with pytest.raises(Ext4Unusable, match="free block count of group 3"):
        layout_of(img)


@pytest.mark.parametrize("offset,fmt,fn,match", [
    (1024 + 0x60, "<I", lambda v: v | 0x4, "journal needs recovery"),          # INCOMPAT_RECOVER
    (1024 + 0x60, "<I", lambda v: v | 0x8, "journal device"),                  # INCOMPAT_JOURNAL_DEV
    (1024 + 0x60, "<I", lambda v: v | 0x1, "compression"),                     # unknown to us
    (1024 + 0x60, "<I", lambda v: v | 0x800000, "incompat_0x800000"),          # unknown to anyone
    (1024 + 0x64, "<I", lambda v: v | 0x80, "snapshot"),                       # ro_compat we refuse
    (1024 + 0x5C, "<I", lambda v: v | 0x40, "lazy_bg"),                        # compat we refuse
    (1024 + 0x3A, "<H", lambda v: v | 0x2, "errors"),                          # s_state ERROR_FS
    (1024 + 0x3A, "<H", lambda v: v & ~0x1, "not cleanly unmounted"),          # s_state !VALID_FS
    (1024 + 0x18, "<I", lambda v: 9, "block size"),                            # 512 KiB blocks
    (1024 + 0x38, "<H", lambda v: 0x1234, "magic"),
    (GDT_1K + 64, "<I", lambda v: 0xFFFFFF00, "outside the filesystem"),       # group 1 bitmap
    (GDT_1K + 64, "<I", lambda v: 1, "overlaps the superblock"),
    (1024 + 0x04, "<I", lambda v: v * 2, "partition has only"),                # fs larger than device
])
def test_refusals(tmp_path, small_image, offset, fmt, fn, match):
    img = _copy(tmp_path, small_image)
    _patch(img, offset, fmt, fn)
    with pytest.raises(Ext4Unusable, match=match) as e:
        layout_of(img)
    assert e.value.reason == str(e.value)


def test_partition_smaller_than_fs(tmp_path, small_image):
    img = _copy(tmp_path, small_image)
    with pytest.raises(Ext4Unusable, match="partition has only"):
        read_layout(reader(img), len(small_image) - 1024)


def test_probe_rejects_other_data(tmp_path):
    rng = random.Random(3)
    for data in (bytes(1 << 20), rng.randbytes(1 << 20), b"", b"\xef\x53" * 600):
        read_at = lambda o, n, d=data: d[o:o + n]  # noqa: E731
        assert not probe(read_at)
        with pytest.raises(Ext4Unusable):
            read_layout(read_at, len(data))
    # The magic alone is not enough for read_layout: garbage around it is refused.
    data = b"\x53\xef" * 600
    assert probe(lambda o, n: data[o:o + n])
    with pytest.raises(Ext4Unusable):
        read_layout(lambda o, n: data[o:o + n], len(data))


def test_bitmap_runs_match_naive():
    rng = random.Random(5)
    for _ in range(300):
        kind = rng.random()
        n = rng.randrange(1, 200)
        if kind < 0.3:
            data = bytes(rng.choice((0, 255)) for _ in range(n))
        elif kind < 0.6:
            data = bytes(rng.choice((0, 255, rng.randrange(256))) for _ in range(n))
        else:
            data = rng.randbytes(n)
        nbits = rng.randrange(0, n * 8 + 1)
        bits = [data[i // 8] >> (i % 8) & 1 for i in range(nbits)]
        naive, i = [], 0
        while i < nbits:
            if bits[i]:
                j = i
                while j < nbits and bits[j]:
                    j += 1
                naive.append([i, j])
                i = j
            else:
                i += 1
        assert bitmap_runs(data, nbits) == naive


def test_large_sparse_fs(tmp_path):
    """A 64 GiB filesystem (512 groups) on a sparse file: exact and quick."""
    import time

    img = tmp_path / "big.img"
    try:
        with open(img, "wb") as f:
            f.truncate(64 << 30)
    except OSError as e:
        pytest.skip(f"cannot create a 64 GiB sparse file here: {e}")
    _run(MKFS, "-q", "-F", "-b", "4096", str(img))
    for derive in (False, True):
        t = time.perf_counter()
        lay = layout_of(img, derive_uninit=derive)
        assert time.perf_counter() - t < 5
    assert lay.facts["groups"] == 512 and lay.facts["uninit_groups"] > 400
    ours = blocks_of(lay.used_ranges, 4096, lay.blocks_count)
    free = sum(g[2] - g[1] + 1 - sum(b - a + 1 for a, b in g[4]) for g in dumpe2fs_groups(img))
    assert sum(ours) == free == lay.blocks_count - lay.free_blocks


# ---- fuzzing: garbage where descriptors, bitmaps or superblock fields were


def _descs(data: bytes):
    sb = ext4._parse_super(data[1024:2048], len(data))
    groups = -(-(sb.blocks_count - sb.first_data_block) // sb.blocks_per_group)
    return sb, ext4._read_descriptors(lambda o, n: data[o:o + n], sb, groups)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    target=st.sampled_from(["descriptors", "bitmap", "superblock", "anywhere"]),
    which=st.integers(min_value=0, max_value=10 ** 6),
    payload=st.one_of(st.binary(min_size=1024, max_size=1024), st.binary(min_size=1, max_size=16)),
    pos=st.integers(min_value=0, max_value=1023),
)
def test_garbage_only_ever_raises_ext4unusable(small_image, target, which, payload, pos):
    data = bytearray(small_image)
    sb, descs = _descs(small_image)
    if target == "descriptors":
        base = GDT_1K
    elif target == "bitmap":
        base = descs[which % len(descs)][0] * 1024
    elif target == "superblock":
        base = 1024
    else:
        base = (which % (len(data) // 1024)) * 1024
    start = base + (0 if len(payload) == 1024 else pos)
    data[start:start + len(payload)] = payload[:len(data) - start]
    if target == "superblock":
        # Keep the magic and a clean state so the geometry behind them gets
        # parsed; sometimes keep the geometry too, so only counts/features vary.
        data[1024 + 0x38:1024 + 0x3A] = b"\x53\xef"
        data[1024 + 0x3A] |= 0x1
        data[1024 + 0x3A] &= ~0x2 & 0xFF
        if which % 2:
            data[1024 + 0x14:1024 + 0x2C] = small_image[1024 + 0x14:1024 + 0x2C]
    read_at = lambda o, n: bytes(data[o:o + n])  # noqa: E731
    for derive in (False, True):
        try:
            lay = read_layout(read_at, len(data), derive_uninit=derive)
        except Ext4Unusable as e:
            assert e.reason
        else:
            check_invariants(lay)
