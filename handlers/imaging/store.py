"""The image store: one folder per image, complete versions only.

Layout (docs/image-format.md)::

    <image_store>/<name>/.lock           flock'd while a capture of <name> runs
    <image_store>/<name>/current         the version id in use (replaced atomically)
    <image_store>/<name>/<version>/data.zst    zstd frames, one per chunk
    <image_store>/<name>/<version>/index.bin   header + one record per chunk
    <image_store>/<name>/<version>/meta.json   written last: the version exists only with it

A capture writes a new version folder; only when its data, index and
metadata are on disk does ``current`` switch to it, so a killed capture
leaves nothing that looks usable and the previous image stays usable until
the new one is complete (the seed's "recorded before complete" fixed).

The store API capture.py and deploy.py use, which httpstore.py implements
for an http(s) URL with the same layout (``open_store`` picks one):

- ``store.begin_capture(name)`` -> a writer: ``.version``, ``.data()`` (a sink:
  ``write(frame) -> offset``, ``finish() -> size``), ``.index(frame_bytes)``
  (an IndexWriter), ``.commit(meta) -> details``, ``.abort()``, ``.close()``;
- ``store.open_current(name)`` -> a version: ``.meta``, ``.kind``, ``.version``,
  ``.chunks()`` (the verified index), ``.open_data()`` (a reader:
  ``read(offset, length) -> bytes``, ``stats()``, ``close()``), ``.close()``.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import struct
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from handlers.shared.durable import fsync_dir, write_atomic

NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
VERSION_RE = re.compile(r"[0-9]{8}T[0-9]{12}Z-[0-9a-f]{4}")  # what new_version makes
FORMAT = "dsagent-image/1"
INDEX_MAGIC = b"DSIDX002"
INDEX_RECORD = struct.Struct("<QIIQII32s")   # src_offset, length, flags, frame offset, frame length, reserved, frame sha256
INDEX_TRAILER = struct.Struct("<8sIIQQ")     # magic, frame_bytes, record_size, count, reserved
INDEX_READ = 4096 * INDEX_RECORD.size
KINDS = ("capture", "backup")
REPLICAS = ".replicas"      # ReplicatePackage's versions (handlers/replication/replica.py)


class ImageError(Exception):
    """An image cannot be used or made; the message says which and why."""


def is_url(location: str) -> bool:
    return location.lower().startswith(("http://", "https://"))


def open_store(location: str | os.PathLike):
    """The image store ``[handlers] image_store`` names: a folder, or an http(s) URL."""
    if is_url(str(location)):
        from handlers.imaging.httpstore import HttpImageStore
        return HttpImageStore(str(location))
    return ImageStore(location)


def version_id() -> str:
    """A new version's id: UTC timestamp + random suffix (matches VERSION_RE)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{stamp}-{secrets.token_hex(2)}"


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name or "") or name in (".", ".."):
        raise ImageError(f"image name {name!r} is not allowed "
                         "(1-128 of A-Z a-z 0-9 . _ -, and not '.' or '..')")
    return name


@dataclass(frozen=True)
class Chunk:
    """One stored run of source bytes, and the frame that holds it."""

    src_offset: int
    length: int
    data_offset: int    # where its frame starts in data.zst
    comp_length: int    # the frame's length
    sha256: bytes       # the frame's sha256 (as stored, compressed)


class ImageStore:
    """A local image store (a folder, or a mounted share)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    def folder(self, name: str, reading: bool = False) -> Path:
        """``<store>/<name>``. Only a reader may follow a symlink there, and only
        ReplicatePackage's (into ``<store>/.replicas/<name>/``, docs/replication.md):
        a replica is read as it is and never captured into."""
        folder = self.root / check_name(name)
        if folder.is_symlink():
            replicas = (self.root / REPLICAS / name).resolve()
            if reading and folder.resolve().parent == replicas:
                return folder.resolve()     # this version, whatever the next switch does
            raise ImageError(
                f"image folder {folder} is a symlink; refused (an image folder must be a real "
                f"folder inside {self.root}" + (", or a replica made by ReplicatePackage)"
                                                 if reading else "; a replicated image is "
                                                 "captured at its source of truth, not here)"))
        return folder

    # ---- reading -----------------------------------------------------------
    def open_current(self, name: str) -> "ImageVersion":
        """The complete version in use, or ImageError (missing or incomplete)."""
        folder = self.folder(name, reading=True)
        if not folder.is_dir():
            raise ImageError(f"image '{name}' does not exist in {self.root}")
        try:
            version = (folder / "current").read_text().strip()
        except FileNotFoundError:
            partial = [p.name for p in folder.iterdir() if p.is_dir()]
            raise ImageError(
                f"image '{name}' is incomplete: its capture did not finish"
                + (f" (partial version {', '.join(sorted(partial))} has no metadata)" if partial
                   else "")) from None
        if not VERSION_RE.fullmatch(version):  # a tampered pointer must not leave the folder
            raise ImageError(f"image '{name}': {folder / 'current'} names {version[:80]!r}, "
                             "not a version of this image; refused")
        vdir = folder / version
        if vdir.is_symlink():
            raise ImageError(f"image '{name}': version {vdir} is a symlink; refused")
        if not (vdir / "meta.json").is_file():
            raise ImageError(f"image '{name}' is incomplete: {vdir} has no meta.json")
        return ImageVersion(vdir)

    # ---- writing -----------------------------------------------------------
    def lock(self, name: str):
        """Exclusive lock for a capture of ``name``; ImageError if one is running."""
        folder = self.folder(name)
        folder.mkdir(parents=True, exist_ok=True)
        if folder.is_symlink():  # planted between the check and mkdir
            raise ImageError(f"image folder {folder} is a symlink; refused")
        fh = os.fdopen(os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
                               | os.O_CLOEXEC, 0o644), "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise ImageError(f"another capture of image '{name}' is running") from None
        return fh

    def new_version(self, name: str) -> Path:
        vdir = self.folder(name) / version_id()
        vdir.mkdir(parents=True)
        return vdir

    def begin_capture(self, name: str) -> "LocalCapture":
        """Lock ``name`` for a capture (ImageError if one is running)."""
        return LocalCapture(self, name)

    def publish(self, name: str, vdir: Path) -> list[str]:
        """Make ``vdir`` the image's current version; remove older versions not in use."""
        folder = self.folder(name)
        write_atomic(folder / "current", (vdir.name + "\n").encode())
        removed = []
        for other in folder.iterdir():
            if other.is_dir() and not other.is_symlink() and other.name != vdir.name \
                    and _unused(other):
                shutil.rmtree(other, ignore_errors=True)
                removed.append(other.name)
        return removed


def _unused(vdir: Path) -> bool:
    """True unless a deploy holds a shared lock on the version's metadata."""
    meta = vdir / "meta.json"
    if not meta.exists():
        return True  # a partial version: nobody can be reading it
    with open(meta, "rb") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


class ImageVersion:
    """A complete image version, opened for reading (holds a shared lock)."""

    def __init__(self, vdir: Path):
        self.dir = vdir
        self._meta_fh = open(vdir / "meta.json", "rb")
        fcntl.flock(self._meta_fh, fcntl.LOCK_SH)
        try:
            self.meta: dict[str, Any] = json.loads(self._meta_fh.read())
        except ValueError as exc:
            raise ImageError(f"{vdir}/meta.json is not valid JSON: {exc}") from None
        if self.meta.get("format") != FORMAT:
            raise ImageError(f"{vdir}: unknown image format {self.meta.get('format')!r}")

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def version(self) -> str:
        return self.dir.name

    def chunks(self) -> Iterator[Chunk]:
        """Stream the index, after checking it against the metadata's image_sha256."""
        path = self.dir / "index.bin"
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != self.meta.get("image_sha256"):
            raise ImageError(f"{path} does not match the image checksum (corrupt or altered index)")
        return _read_index_file(path)

    def open_data(self) -> "LocalData":
        return LocalData(self.dir / "data.zst")

    def close(self) -> None:
        self._meta_fh.close()


class LocalData:
    """data.zst of a local version, read frame by frame."""

    def __init__(self, path: Path):
        self.where = str(path)
        self._fh = open(path, "rb")

    def read(self, offset: int, length: int) -> bytes:
        buf = os.pread(self._fh.fileno(), length, offset)
        if len(buf) != length:
            raise ImageError(f"{self.where} is truncated: {length} bytes at {offset} wanted, "
                             f"{len(buf)} there")
        return buf

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        self._fh.close()


class LocalCapture:
    """A capture into a local store: the lock, the version folder, the switch."""

    def __init__(self, store: ImageStore, name: str):
        self.store, self.name = store, name
        self._lock = store.lock(name)
        self._vdir: Path | None = None
        self._index: IndexWriter | None = None

    @property
    def vdir(self) -> Path:
        if self._vdir is None:
            self._vdir = self.store.new_version(self.name)
        return self._vdir

    @property
    def version(self) -> str:
        return self.vdir.name

    def data(self) -> "LocalSink":
        return LocalSink(self.vdir / "data.zst")

    def index(self, frame_bytes: int) -> "IndexWriter":
        self._index = IndexWriter(open(self.vdir / "index.bin", "wb"), frame_bytes, fsync=True)
        return self._index

    def commit(self, meta: dict) -> dict:
        """Write the metadata (the version is complete), then switch ``current``."""
        if self._index is not None:
            self._index.close()
        write_atomic(self.vdir / "meta.json", json.dumps(meta, indent=1).encode())
        return {"replaced_versions": self.store.publish(self.name, self.vdir)}

    def abort(self) -> None:
        if self._index is not None:
            self._index.close()
        if self._vdir is not None:
            shutil.rmtree(self._vdir, ignore_errors=True)

    def close(self) -> None:
        self._lock.close()


class LocalSink:
    """data.zst being written: frames appended, written back as they come."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = open(path, "wb")
        self.size = 0

    def write(self, frame: bytes) -> int:
        offset = self.size
        self._fh.write(frame)
        self._fh.flush()
        start_writeback(self._fh.fileno(), offset, len(frame))
        self.size += len(frame)
        return offset

    def finish(self) -> int:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        fsync_dir(self.path.parent)
        return self.size

    def abort(self) -> None:
        self._fh.close()


_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a frame to disk now (no wait), so the final fsync has
    little left to do; durability still comes from that fsync."""
    _libc.sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


class IndexWriter:
    """Writes index.bin record by record into ``fh`` (memory stays flat however
    many runs), with a running sha256 that becomes the image's checksum."""

    def __init__(self, fh: BinaryIO, frame_bytes: int, fsync: bool = True):
        self.frame_bytes = frame_bytes
        self.fsync = fsync
        self._fh = fh
        self._sha = hashlib.sha256()
        self.count = 0
        self.stored = 0

    def add(self, chunk: Chunk) -> None:
        record = INDEX_RECORD.pack(chunk.src_offset, chunk.length, 0, chunk.data_offset,
                                   chunk.comp_length, 0, chunk.sha256)
        self._fh.write(record)
        self._sha.update(record)
        self.count += 1
        self.stored += chunk.length

    def finish(self) -> str:
        """Append the trailer, flush (and fsync); return the sha256 of the whole file."""
        trailer = INDEX_TRAILER.pack(INDEX_MAGIC, self.frame_bytes, INDEX_RECORD.size, self.count, 0)
        self._fh.write(trailer)
        self._sha.update(trailer)
        self._fh.flush()
        if self.fsync:
            os.fsync(self._fh.fileno())
        return self._sha.hexdigest()

    @property
    def file(self) -> BinaryIO:
        return self._fh

    def close(self) -> None:
        self._fh.close()


def _read_index_file(path: Path) -> Iterator[Chunk]:
    with open(path, "rb") as fh:
        yield from read_index(fh, str(path))


def read_index(fh: BinaryIO, path: str) -> Iterator[Chunk]:
    """The records of index.bin (open in ``fh``), streamed (the trailer is checked first)."""
    size = fh.seek(0, os.SEEK_END)
    if size < INDEX_TRAILER.size:
        raise ImageError(f"{path} is truncated")
    fh.seek(size - INDEX_TRAILER.size)
    magic, _frame, record_size, count, _ = INDEX_TRAILER.unpack(fh.read(INDEX_TRAILER.size))
    if magic != INDEX_MAGIC or record_size != INDEX_RECORD.size:
        raise ImageError(f"{path} has an unknown format")
    if size != INDEX_TRAILER.size + count * record_size:
        raise ImageError(f"{path} is truncated")
    fh.seek(0)
    left = count * record_size
    while left:
        block = fh.read(min(INDEX_READ, left))
        if not block:
            raise ImageError(f"{path} is truncated")
        left -= len(block)
        for src, length, _flags, data_off, comp_len, _res, digest in \
                INDEX_RECORD.iter_unpack(block):
            yield Chunk(src, length, data_off, comp_len, digest)
