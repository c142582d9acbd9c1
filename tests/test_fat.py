"""FAT12/16/32 used-cluster reader, against real mkfs.vfat + mtools volumes.

Round trips through the real capture and deploy onto random bytes: fsck.vfat
clean, every file equal, the stale data of deleted files (mdel) neither in the
image nor on the target, the image no larger than partclone's; a FAT32
partition of an MBR table; damaged volumes refused (zero-skip instead); the
reader fuzzed.  A missing tool fails the test, naming it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handlers.imaging import fat
from handlers.imaging.capture import capture
from handlers.imaging.deploy import deploy
from handlers.imaging.fat import FatUnusable, probe, read_layout
from handlers.imaging.store import ImageStore
from test_imaging import run, tool

MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "MTOOLSRC": "/dev/null"}


def mtool(name, spec, *args):
    return run(tool(name), "-i", spec, *args, env=MTOOLS_ENV)


def sha256_file(path, length=None):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read(length) if length is not None else fh.read())
    return h.hexdigest()


def random_file(path, size):
    with open(path, "wb") as fh:
        fh.write(os.urandom(size))
    return path


def make_fat(path, size_mb, *opts):
    run("truncate", "-s", f"{size_mb}M", path)
    run(tool("mkfs.vfat"), *opts, path)
    return path


def reader(path, base=0):
    data = Path(path).read_bytes()
    return lambda o, n: data[base + o:base + o + n]


def layout_of(path, base=0, size=None):
    return read_layout(reader(path, base), size if size is not None else os.path.getsize(path) - base)


def fsck_counts(path):
    """fsck.vfat -n must find nothing to fix; (used, total) clusters as it counts them."""
    out = subprocess.run([tool("fsck.vfat"), "-n", str(path)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    used, total = out.stdout.strip().splitlines()[-1].rsplit(" ", 2)[-2].split("/")
    return int(used), int(total)


def boot_geometry(raw: bytes):
    """(bytes/sector, reserved sectors, FATs, sectors per FAT, FSInfo sector)."""
    bps, _spc, rsvd, nfats = struct.unpack_from("<HBHB", raw, 11)
    fatsz = struct.unpack_from("<H", raw, 22)[0] or struct.unpack_from("<I", raw, 36)[0]
    return bps, rsvd, nfats, fatsz, struct.unpack_from("<H", raw, 48)[0]


def fill(spec: str, tmp: Path, rng: random.Random, big: int, fat32: bool):
    """Nested folders, long names, a big file over many clusters, a fragmented
    file, then files of random bytes deleted with mdel: their clusters keep
    their bytes (the stale data).  Returns ({path: content}, [stale content])."""
    local = tmp / "put"
    local.mkdir(exist_ok=True)

    def put(name, data):
        src = local / "f"
        src.write_bytes(data)
        mtool("mcopy", spec, src, f"::/{name}")
        return data

    mtool("mmd", spec, "::/DIR", "::/DIR/SUB", "::/DIR/SUB/DEEPEST", "::/Long Folder Name")
    files = {
        "big.bin": put("big.bin", rng.randbytes(big)),
        "text.txt": put("text.txt", "".join(f"line {i}\n" for i in range(20_000)).encode()),
        "empty": put("empty", b""),
        "DIR/small.bin": put("DIR/small.bin", rng.randbytes(5000)),
        "DIR/SUB/deeper.bin": put("DIR/SUB/deeper.bin", rng.randbytes(70_000)),
        "DIR/SUB/DEEPEST/tiny": put("DIR/SUB/DEEPEST/tiny", b"x"),
        "Long Folder Name/A file with a long name.dat": put(
            "Long Folder Name/A file with a long name.dat", rng.randbytes(3333)),
    }
    # Fragmented: A, B, delete A, then C (larger than A) fills A's clusters and
    # goes on after B.  mtools starts from FSInfo's next-free hint on FAT32:
    # "unknown" makes it start from the beginning.
    put("a.tmp", rng.randbytes(big // 4))
    files["b.bin"] = put("b.bin", rng.randbytes(10_000))
    mtool("mdel", spec, "::/a.tmp")
    if fat32:
        path, _, off = spec.partition("@@")
        with open(path, "r+b") as fh:
            base = int(off or 0)
            fh.seek(base)
            bps, *_, fsinfo = boot_geometry(fh.read(512))
            fh.seek(base + fsinfo * bps + 492)
            fh.write(b"\xff\xff\xff\xff")
    files["frag.bin"] = put("frag.bin", rng.randbytes(big // 2))
    stale = [put(f"doomed{i}.bin", rng.randbytes(big // 3)) for i in range(3)]
    for i in range(3):
        mtool("mdel", spec, f"::/doomed{i}.bin")
    return files, stale


def files_of(spec, out: Path):
    out.mkdir()
    mtool("mcopy", spec, "-s", "-n", "::/*", out)
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def assert_fragmented(image: bytes, content: bytes):
    first, last = image.find(content[:512]), image.find(content[-512:])
    assert first >= 0 and last >= 0
    assert last - first != len(content) - 512, "frag.bin was meant to be in two pieces"


def stale_spans(image: bytes, stale):
    """Where each deleted file's bytes still are in the source (written last
    on space never used before, so mtools put each in one piece)."""
    spans = []
    for content in stale:
        off = image.find(content[:512])
        assert off >= 0 and image[off:off + len(content)] == content, "the stale data must be on the source"
        spans.append((off, len(content)))
    return spans


def partclone_reference(kind, img, tmp: Path, files):
    """(size of partclone's used-block image (no checksums) compressed as ours
    is, whether that image restores every file).  partclone.fat12 0.3.23's
    does not: its restored volume is fsck-clean but files differ (it misplaces
    clusters), so its size is no yardstick."""
    pc, restored = tmp / "pc.img", tmp / "pc-restored.img"
    run(tool("partclone." + kind), "-a0", "-c", "-s", img, "-o", pc)
    size = int(subprocess.run(f"{tool('zstd')} -1 -T2 -c {pc} | wc -c", shell=True, capture_output=True,
                              text=True, check=True).stdout)
    run("truncate", "-s", os.path.getsize(img), restored)
    run(tool("partclone." + kind), "-r", "-s", pc, "-O", restored)
    return size, files_of(str(restored), tmp / "pc-files") == files


def zstd_size(path):
    return int(subprocess.run(f"{tool('zstd')} -1 -T2 -c {path} | wc -c", shell=True, capture_output=True,
                              text=True, check=True).stdout)


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    return ImageStore(root)


def meta_of(store_root: Path, name: str):
    version = (store_root / name / "current").read_text().strip()
    return json.loads((store_root / name / version / "meta.json").read_text())


def report(*_a, **_k):
    pass


ROUND_TRIPS = {  # fat type: (volume MiB, size of the big file, partclone's name)
    12: (8, 1_500_000, "fat12"),
    16: (32, 6_000_000, "fat16"),
    32: (64, 12_000_000, "fat32"),
}


@pytest.mark.parametrize("fat_type", sorted(ROUND_TRIPS))
def test_round_trip_onto_random_target(tmp_path, store, fat_type):
    size_mb, big, kind = ROUND_TRIPS[fat_type]
    img = make_fat(tmp_path / "vol.img", size_mb, "-F", str(fat_type))
    files, stale = fill(str(img), tmp_path, random.Random(fat_type), big, fat_type == 32)
    used, total = fsck_counts(img)
    source = img.read_bytes()
    assert_fragmented(source, files["frag.bin"])
    spans = stale_spans(source, stale)

    lay = layout_of(img)
    assert lay.fat_type == lay.facts["fat_type"] == fat_type
    assert (lay.facts["used_clusters"], lay.facts["clusters"]) == (used, total)
    assert lay.facts["directories"] == 5 and lay.facts["bad_clusters"] == 0
    if fat_type == 32:
        assert lay.facts["fsinfo_agrees"] is True
    for off, n in spans:  # the reader leaves the deleted files' clusters out
        assert not any(o < off + n and off < o + m for o, m in lay.used_ranges)

    made = capture(str(img), store, "vol", "capture", report)
    assert made["strategy"] == ["whole disk: fat-bitmap"]
    assert made["bytes_stored"] == lay.facts["used_bytes"] < len(source) - sum(n for _, n in spans)
    meta = meta_of(store.root, "vol")["source"]["filesystems"][0]
    assert meta["type"] == "fat" and meta["fat_type"] == fat_type

    target = random_file(tmp_path / "target.img", len(source) + (1 << 20))
    result = deploy(store, "vol", "capture", str(target), report)
    assert result["target_sha256"] == sha256_file(target, len(source))
    assert fsck_counts(target) == (used, total)
    assert files_of(str(target), tmp_path / "out") == files == files_of(str(img), tmp_path / "ref")
    written = target.read_bytes()
    for (off, n), content in zip(spans, stale):
        assert written[off:off + n] == bytes(n), "a freed cluster was not zeroed on the target"
        assert written.find(content[1000:1512]) < 0
    ours = made["compressed_size"]
    theirs, faithful = partclone_reference(kind, img, tmp_path, files)
    # The used-only volume (the target: free clusters zero) in one zstd -1 stream.
    used_only = zstd_size(tmp_path / "target.img")
    print(f"FAT{fat_type}: data.zst {ours} bytes; partclone.{kind} -a0 | zstd -1: {theirs} bytes "
          f"({'restores every file' if faithful else 'LOSES FILES on restore'}); "
          f"used-only volume | zstd -1: {used_only} bytes")
    assert ours <= (theirs if faithful else used_only) * 1.03, (ours, theirs, used_only)


def test_fat32_partition_of_an_mbr_table(tmp_path, store):
    disk = tmp_path / "disk.img"
    run("truncate", "-s", "100M", disk)
    subprocess.run([tool("sfdisk"), "-q", str(disk)], input="label: dos\nstart=2048, size=163840, type=c\n",
                   text=True, check=True, capture_output=True)
    run(tool("mkfs.vfat"), "-F", "32", "--offset", "2048", disk, 81920)
    start, length = 2048 * 512, 163840 * 512
    spec = f"{disk}@@{start}"
    files, stale = fill(spec, tmp_path, random.Random(5), 8_000_000, True)
    with open(disk, "r+b") as fh:  # something after the partition: scanned, kept
        fh.seek(start + length + (2 << 20))
        fh.write(os.urandom(1 << 20))
    source = disk.read_bytes()
    (tmp_path / "part.img").write_bytes(source[start:start + length])
    used, total = fsck_counts(tmp_path / "part.img")
    spans = stale_spans(source, stale)

    made = capture(str(disk), store, "mbr", "capture", report)
    assert made["strategy"] == [f"partition {disk}1: fat-bitmap"]
    lay = layout_of(disk, start, length)
    assert (lay.facts["used_clusters"], lay.facts["clusters"]) == (used, total)
    # + the pieces (aligned, up to 4 MiB) holding the MBR and the junk
    assert lay.facts["used_bytes"] < made["bytes_stored"] <= lay.facts["used_bytes"] + (5 << 20)

    target = random_file(tmp_path / "target.img", len(source))
    result = deploy(store, "mbr", "capture", str(target), report)
    written = target.read_bytes()
    assert result["target_sha256"] == hashlib.sha256(written).hexdigest()
    assert written[:start] == source[:start] and written[start + length:] == source[start + length:]
    (tmp_path / "tpart.img").write_bytes(written[start:start + length])
    assert fsck_counts(tmp_path / "tpart.img") == (used, total)
    assert files_of(f"{target}@@{start}", tmp_path / "out") == files
    for off, n in spans:
        assert written[off:off + n] == bytes(n)


def test_fat_copies_disagree_fall_back_to_zero_skip(tmp_path, store):
    """Decided: FATs that differ are a volume not cleanly written (fsck.vfat's
    business): the reader refuses them and the volume is read whole."""
    img = make_fat(tmp_path / "vol.img", 16, "-F", "16")
    fill(str(img), tmp_path, random.Random(9), 1_000_000, False)
    bps, rsvd, _nfats, fatsz, _ = boot_geometry(img.read_bytes()[:512])
    with open(img, "r+b") as fh:  # a free cluster's entry, in the second copy only
        fh.seek((rsvd + fatsz) * bps + 2 * 8000)
        fh.write(struct.pack("<H", 0xFFFF))
    with pytest.raises(FatUnusable, match=r"FAT #1 differs from FAT #0 .*cluster 8000"):
        layout_of(img)
    made = capture(str(img), store, "bad", "capture", report)
    assert made["strategy"] == ["whole disk: zero-skip"]
    fs = meta_of(store.root, "bad")["source"]["filesystems"][0]
    assert fs["type"] == "fat" and "differs" in fs["fallback_reason"]
    target = random_file(tmp_path / "target.img", os.path.getsize(img))
    result = deploy(store, "bad", "capture", str(target), report)
    assert result["target_sha256"] == sha256_file(img) == sha256_file(target)  # stale data and all


VARIANTS = {  # checked against fsck.vfat's count of used clusters
    "fat12_small": (4, "-F", "12"),
    "fat12_most_clusters": (8, "-F", "12"),          # 4081 clusters: just under FAT16
    "fat16_4k_sectors": (64, "-F", "16", "-S", "4096"),
    "fat16_one_fat": (32, "-F", "16", "-f", "1"),
    "fat16_big_root": (32, "-F", "16", "-r", "1024"),
    "fat32_4k_clusters": (300, "-F", "32", "-s", "8"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_used_clusters_match_fsck(tmp_path, variant):
    size, *opts = VARIANTS[variant]
    img = make_fat(tmp_path / "vol.img", size, *opts)
    local = tmp_path / "f"
    local.write_bytes(random.Random(1).randbytes(300_000))
    mtool("mmd", str(img), "::/D")
    mtool("mcopy", str(img), local, "::/D/one")
    mtool("mcopy", str(img), local, "::/two")
    lay = layout_of(img)
    json.dumps(lay.facts)
    assert (lay.facts["used_clusters"], lay.facts["clusters"]) == fsck_counts(img)
    assert lay.used_ranges[0][0] == 0 and probe(reader(img))
    for (o1, n1), (o2, _) in itertools.pairwise(lay.used_ranges):
        assert o1 + n1 < o2
    assert lay.fs_bytes <= size << 20


# ---- damage, on a FAT32 volume built once -----------------------------------


@pytest.fixture(scope="module")
def vol32(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vol32")
    img = make_fat(tmp / "vol.img", 40, "-F", "32", "-n", "ESP")
    fill(str(img), tmp, random.Random(3), 2_000_000, True)
    return img.read_bytes()


class Vol:
    """A FAT32 image in memory, with helpers to find and patch its structures."""

    def __init__(self, data: bytes):
        self.data = bytearray(data)
        self.bps, self.rsvd, self.nfats, self.fatsz, _ = boot_geometry(data[:512])
        self.spc = data[13]
        self.data_start = (self.rsvd + self.nfats * self.fatsz) * self.bps

    def put(self, offset, fmt, value):
        struct.pack_into(fmt, self.data, offset, value)

    def set_fat(self, cluster, value, copies=None):
        for c in copies if copies is not None else range(self.nfats):
            self.put((self.rsvd + c * self.fatsz) * self.bps + 4 * cluster, "<I", value)

    def get_fat(self, cluster):
        return struct.unpack_from("<I", self.data, self.rsvd * self.bps + 4 * cluster)[0] & 0x0FFFFFFF

    def entry(self, short_name: bytes):
        off = self.data.find(short_name.ljust(11))
        assert off >= 0 and off >= self.data_start
        hi, lo = struct.unpack_from("<H", self.data, off + 20)[0], struct.unpack_from("<H", self.data, off + 26)[0]
        return off, hi << 16 | lo

    def free_cluster(self):
        return next(c for c in range(1000, 60000) if self.get_fat(c) == 0)

    def layout(self, size=None):
        data = bytes(self.data)
        return read_layout(lambda o, n: data[o:o + n], size or len(data))


def _dirty(v):
    v.data[65] |= 1


def _unclean(v):
    v.set_fat(1, 0x0FFFFFFF & ~0x08000000)


def _hard_error(v):
    v.set_fat(1, 0x0FFFFFFF & ~0x04000000)


def _link_to_free(v):
    _, start = v.entry(b"BIG     BIN")
    v.set_fat(start, v.free_cluster())


def _link_out_of_range(v):
    _, start = v.entry(b"BIG     BIN")
    v.set_fat(start, 0x0FFFFF00)


def _link_to_bad(v):
    _, start = v.entry(b"BIG     BIN")
    v.set_fat(v.get_fat(start), 0x0FFFFFF7)


def _chain_cut_short(v):
    _, start = v.entry(b"BIG     BIN")
    v.set_fat(v.get_fat(start), 0x0FFFFFFF)  # the second cluster ends the chain


def _starts_on_free(v):
    off, _ = v.entry(b"TEXT    TXT")
    free = v.free_cluster()
    v.put(off + 20, "<H", free >> 16)
    v.put(off + 26, "<H", free & 0xFFFF)


def _dir_loop(v):
    off, _ = v.entry(b"SUB        ")
    v.put(off + 26, "<H", 2)  # DIR/SUB is the root directory again


DAMAGE = [
    (_dirty, "marked dirty"),
    (_unclean, "not cleanly unmounted"),
    (_hard_error, "disk error"),
    (_link_to_free, r"links to cluster \d+, which the FAT marks free"),
    (_link_out_of_range, "neither a cluster of the volume"),
    (_link_to_bad, "which the FAT marks bad"),
    (_chain_cut_short, r"'/BIG.BIN' holds 2000000 bytes but its cluster chain ends after 2 clusters"),
    (_starts_on_free, r"'/TEXT.TXT' starts at cluster \d+, which the FAT marks free"),
    (_dir_loop, "a second time"),
    (lambda v: v.set_fat(2, 0), "root directory's cluster 2 is marked free"),
    (lambda v: v.set_fat(4000, 0x0FFFFFFF, copies=[1]), "FAT #1 differs"),
    (lambda v: v.put(42, "<H", 1), "FAT32 version"),
    (lambda v: v.put(44, "<I", 0), "root directory cluster 0"),
    (lambda v: v.put(32, "<I", struct.unpack_from("<I", v.data, 32)[0] * 2), "partition has only"),
    (lambda v: v.put(21, "<B", 0xF0), "media byte"),
    (lambda v: v.put(40, "<H", 0x83), "active FAT is #3"),
    (lambda v: v.put(22, "<H", 100), "FAT12/16 fields"),
]


@pytest.mark.parametrize("damage,match", DAMAGE, ids=[m for _, m in DAMAGE])
def test_damage_is_refused(vol32, damage, match):
    v = Vol(vol32)
    v.layout()
    damage(v)
    with pytest.raises(FatUnusable, match=match) as e:
        v.layout()
    assert e.value.reason == str(e.value)


def test_bad_clusters_are_not_stored(vol32):
    """Decided: a bad-cluster mark is no data (no chain may lead to one) and
    its sectors are the unreadable ones: left out, zeroed by deploy."""
    v = Vol(vol32)
    before = v.layout()
    bad = v.free_cluster()
    v.set_fat(bad, 0x0FFFFFF7)
    after = v.layout()
    assert after.facts["bad_clusters"] == 1
    assert after.facts["free_clusters"] == before.facts["free_clusters"] - 1
    assert after.used_ranges == before.used_ranges
    assert after.facts["fsinfo_agrees"] is False  # FSInfo was not told; only a fact


def test_mirroring_off_reads_the_active_fat(vol32):
    v = Vol(vol32)
    before = v.layout()
    v.put(40, "<H", 0x81)              # only FAT #1 is in use
    v.set_fat(v.free_cluster(), 0x0FFFFFFF, copies=[0])  # stale FAT #0: ignored
    after = v.layout()
    assert after.facts["fat_read"] == 1 and not after.facts["fats_mirrored"]
    assert after.used_ranges == before.used_ranges


def test_facts(vol32):
    lay = Vol(vol32).layout()
    json.dumps(lay.facts)
    assert lay.facts["label"] == "ESP" and lay.facts["oem"] == "mkfs.fat"
    assert lay.facts["fat_type"] == 32 and lay.facts["fats"] == 2 and lay.facts["fsinfo_agrees"]


def test_partition_smaller_than_the_volume(vol32):
    with pytest.raises(FatUnusable, match="partition has only"):
        Vol(vol32).layout(size=len(vol32) - 512)


def test_tiny_fat32_layout_is_ambiguous(tmp_path):
    img = make_fat(tmp_path / "small.img", 8, "-F", "32")  # mkfs warns: too few clusters
    assert probe(reader(img))
    with pytest.raises(FatUnusable, match="ambiguous"):
        layout_of(img)


def test_probe_rejects_other_boot_sectors(vol32):
    rng = random.Random(3)
    for data in (bytes(1 << 16), rng.randbytes(1 << 16), b"", b"\xeb" * 600):
        assert not probe(lambda o, n, d=data: d[o:o + n])
        with pytest.raises(FatUnusable):
            read_layout(lambda o, n, d=data: d[o:o + n], len(data))
    for oem, match in ((b"NTFS    ", "NTFS"), (b"EXFAT   ", "exFAT")):
        data = vol32[:3] + oem + vol32[11:]
        assert not probe(lambda o, n, d=data: d[o:o + n])
        with pytest.raises(FatUnusable, match=match):
            read_layout(lambda o, n, d=data: d[o:o + n], len(data))
    for offset, value in ((11, 256), (13, 3), (14, 0), (16, 0), (16, 9), (21, 0x12)):
        v = Vol(vol32)
        v.put(offset, "<H" if offset in (11, 14) else "<B", value)
        assert not probe(lambda o, n, d=bytes(v.data): d[o:o + n])


# ---- fuzzing: garbage in boot sector, FATs, directories ----------------------


def _check(lay: fat.FatLayout, size: int):
    for ranges in (lay.used_ranges, lay.scan_ranges):
        for (o1, n1), (o2, _) in itertools.pairwise(ranges):
            assert o1 + n1 < o2, "ranges must be sorted and merged"
        for o, n in ranges:
            assert 0 <= o and n > 0 and o + n <= lay.fs_bytes <= size
    for o, n in lay.scan_ranges:
        assert not any(u < o + n and o < u + m for u, m in lay.used_ranges)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    target=st.sampled_from(["boot", "boot_keep_shape", "fats", "fat0", "dirs", "anywhere"]),
    which=st.integers(min_value=0, max_value=10 ** 6),
    payload=st.one_of(st.binary(min_size=1, max_size=16), st.binary(min_size=512, max_size=512),
                      st.sampled_from([b"\0\0\0\0", b"\xf7\xff\xff\x0f", b"\xff\xff\xff\x0f",
                                       b"\x02\0\0\0", b"\x01"])),
    pos=st.integers(min_value=0, max_value=511),
)
def test_garbage_only_ever_raises_fatunusable(vol32, target, which, payload, pos):
    v = Vol(vol32[:1 << 16])  # geometry only: the image itself is not copied
    fat_len = v.fatsz * v.bps
    if target.startswith("boot"):
        start = pos if len(payload) < 512 else 0
    elif target in ("fats", "fat0"):
        start = (which * 4) % fat_len
    elif target == "dirs":
        start = v.data_start + (which * 32) % (64 << 10)
    else:
        start = which * 37 % len(vol32)
    patches = {}
    for c in range(v.nfats) if target == "fats" else [0]:
        at = start + (v.rsvd + c * v.fatsz) * v.bps if target in ("fats", "fat0") else start
        patches[at] = payload[:len(vol32) - at]
    if target == "boot_keep_shape":  # keep what probe wants so the geometry gets parsed
        boot = bytearray(vol32[:512])
        boot[start:start + len(payload)] = payload[:512 - start]
        boot[0], boot[510:512], boot[11:17] = 0xEB, b"\x55\xaa", vol32[11:17]
        patches = {0: bytes(boot)}

    def read_at(o, n):
        buf = bytearray(vol32[o:o + n])
        for at, data in patches.items():
            lo, hi = max(o, at), min(o + n, at + len(data))
            if lo < hi:
                buf[lo - o:hi - o] = data[lo - at:hi - at]
        return bytes(buf)

    try:
        lay = read_layout(read_at, len(vol32))
    except FatUnusable as e:
        assert e.reason
    else:
        _check(lay, len(vol32))
