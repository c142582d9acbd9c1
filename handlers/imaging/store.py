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
"""

from __future__ import annotations

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
from typing import Any, Iterator

NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
FORMAT = "dsagent-image/1"
INDEX_MAGIC = b"DSIDX001"
INDEX_HEADER = struct.Struct("<8sIIQQ")          # magic, chunk_size, record_size, count, reserved
INDEX_RECORD = struct.Struct("<QIIQII32s")       # src_offset, length, flags, data_offset, comp_len, reserved, sha256
KINDS = ("capture", "backup")


class ImageError(Exception):
    """An image cannot be used or made; the message says which and why."""


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name or "") or name in (".", ".."):
        raise ImageError(f"image name {name!r} is not allowed "
                         "(1-128 of A-Z a-z 0-9 . _ -, and not '.' or '..')")
    return name


@dataclass(frozen=True)
class Chunk:
    """One stored run of source bytes."""

    src_offset: int
    length: int
    data_offset: int
    comp_length: int
    sha256: bytes


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class ImageStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def folder(self, name: str) -> Path:
        return self.root / check_name(name)

    # ---- reading -----------------------------------------------------------
    def open_current(self, name: str) -> "ImageVersion":
        """The complete version in use, or ImageError (missing or incomplete)."""
        folder = self.folder(name)
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
        vdir = folder / version
        if not (vdir / "meta.json").is_file():
            raise ImageError(f"image '{name}' is incomplete: {vdir} has no meta.json")
        return ImageVersion(vdir)

    # ---- writing -----------------------------------------------------------
    def lock(self, name: str):
        """Exclusive lock for a capture of ``name``; ImageError if one is running."""
        folder = self.folder(name)
        folder.mkdir(parents=True, exist_ok=True)
        fh = open(folder / ".lock", "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise ImageError(f"another capture of image '{name}' is running") from None
        return fh

    def new_version(self, name: str) -> Path:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        vdir = self.folder(name) / f"{stamp}-{secrets.token_hex(2)}"
        vdir.mkdir(parents=True)
        return vdir

    def publish(self, name: str, vdir: Path) -> list[str]:
        """Make ``vdir`` the image's current version; remove older versions not in use."""
        folder = self.folder(name)
        write_atomic(folder / "current", (vdir.name + "\n").encode())
        removed = []
        for other in folder.iterdir():
            if other.is_dir() and other.name != vdir.name and _unused(other):
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

    def chunks(self) -> list[Chunk]:
        """The chunk index, checked against the metadata's image_sha256."""
        raw = (self.dir / "index.bin").read_bytes()
        if hashlib.sha256(raw).hexdigest() != self.meta.get("image_sha256"):
            raise ImageError(f"{self.dir}/index.bin does not match the image checksum "
                             "(corrupt or altered index)")
        return list(read_index(raw))

    def close(self) -> None:
        self._meta_fh.close()


def pack_index(chunk_size: int, chunks: list[Chunk]) -> bytes:
    parts = [INDEX_HEADER.pack(INDEX_MAGIC, chunk_size, INDEX_RECORD.size, len(chunks), 0)]
    parts += [INDEX_RECORD.pack(c.src_offset, c.length, 0, c.data_offset, c.comp_length, 0, c.sha256)
              for c in chunks]
    return b"".join(parts)


def read_index(raw: bytes) -> Iterator[Chunk]:
    if len(raw) < INDEX_HEADER.size:
        raise ImageError("index.bin is truncated")
    magic, _chunk_size, record_size, count, _ = INDEX_HEADER.unpack_from(raw)
    if magic != INDEX_MAGIC or record_size != INDEX_RECORD.size:
        raise ImageError("index.bin has an unknown format")
    if len(raw) != INDEX_HEADER.size + count * record_size:
        raise ImageError("index.bin is truncated")
    for src, length, _flags, data_off, comp_len, _res, digest in INDEX_RECORD.iter_unpack(
            raw[INDEX_HEADER.size:]):
        yield Chunk(src, length, data_off, comp_len, digest)
