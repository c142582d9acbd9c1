"""The newc ("SVR4 no CRC", magic 070701) cpio format, as Linux's initramfs reads it.

Writer: :class:`NewcWriter` appends one archive (directories, regular files,
``TRAILER!!!``) to an :class:`Output`. Reader: :func:`scan_initrd` walks a
whole initrd the way ``init/initramfs.c`` does -- plain newc archives and
gzip members one after the other, zero bytes between them skipped, each
archive starting at a 4-byte aligned offset -- and checks every header, name,
size and (for 070702) checksum, so a truncated or corrupt image is refused
before it is used.

Entry layout: a 110-byte ASCII header (``070701`` and 13 fields of 8 hex
digits: ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
rdevmajor, rdevminor, namesize, check), the name with its NUL, padded so the
data starts at a multiple of 4 from the header, then the data, padded to 4.
"""

from __future__ import annotations

import hashlib
import os
import re
import zlib
from dataclasses import dataclass, field
from typing import Callable

HEADER_LEN = 110
MAGIC_NEWC = b"070701"
MAGIC_CRC = b"070702"
TRAILER = "TRAILER!!!"
PATH_MAX = 4096
MAX_FILE = 0xFFFFFFFF
CHUNK = 1 << 20

S_IFDIR = 0o040000
S_IFREG = 0o100000
S_IFLNK = 0o120000

_HEX_FIELDS = re.compile(rb"[0-9A-Fa-f]{104}")

# Compressions the kernel can unpack but this reader does not (magic -> name).
_OTHER_COMPRESSIONS = {
    b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bzip2",
    b"\x5d\x00\x00": "lzma", b"\x02\x21\x4c\x18": "lz4", b"\x89LZO": "lzo",
}


class CpioError(Exception):
    """The data is not a usable newc archive; the message says where and why."""


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


# ---------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------
class Output:
    """Buffered writes to a file descriptor, hashing and counting every byte."""

    def __init__(self, fd: int, buffer_size: int = CHUNK):
        self.fd = fd
        self.sha256 = hashlib.sha256()
        self.offset = 0
        self._buf = bytearray()
        self._limit = buffer_size

    def write(self, data: bytes) -> None:
        self.sha256.update(data)
        self.offset += len(data)
        self._buf += data
        if len(self._buf) >= self._limit:
            self.flush()

    def flush(self) -> None:
        view = memoryview(self._buf)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        view.release()
        self._buf.clear()

    def align(self, boundary: int = 4) -> None:
        """Write zero bytes up to the next multiple of ``boundary``."""
        self.write(b"\0" * ((boundary - self.offset % boundary) % boundary))


class NewcWriter:
    """Append one newc archive to ``out`` (which must be at a 4-byte boundary)."""

    def __init__(self, out: Output):
        if out.offset % 4:
            raise CpioError(f"a newc archive must start at a 4-byte aligned offset, not {out.offset}")
        self.out = out
        self.start = out.offset
        self._ino = 0
        self._closed = False

    def _header(self, name: str, mode: int, size: int, mtime: int, nlink: int, ino: int) -> None:
        encoded = name.encode("utf-8", "surrogateescape")
        if not encoded or b"\0" in encoded or len(encoded) + 1 > PATH_MAX:
            raise CpioError(f"name {name!r} cannot be stored in a newc archive")
        if not 0 <= size <= MAX_FILE:
            raise CpioError(f"{name}: {size} bytes is too large for a newc archive (max 4 GiB - 1)")
        namesize = len(encoded) + 1
        fields = (ino, mode, 0, 0, nlink, max(0, min(mtime, MAX_FILE)), size,
                  0, 0, 0, 0, namesize, 0)
        header = MAGIC_NEWC + b"".join(b"%08X" % value for value in fields)
        self.out.write(header + encoded + b"\0" + b"\0" * _pad4(HEADER_LEN + namesize))

    def add_directory(self, name: str, mtime: int, mode: int = 0o755) -> None:
        self._ino += 1
        self._header(name, S_IFDIR | (mode & 0o7777), 0, mtime, 2, self._ino)

    def add_file(self, name: str, size: int, mtime: int, mode: int,
                 chunks) -> None:
        """Add a regular file of ``size`` bytes; ``chunks`` yields its data."""
        self._ino += 1
        self._header(name, S_IFREG | (mode & 0o7777), size, mtime, 1, self._ino)
        written = 0
        for chunk in chunks:
            written += len(chunk)
            if written > size:
                raise CpioError(f"{name}: grew while it was being archived")
            self.out.write(chunk)
        if written != size:
            raise CpioError(f"{name}: shrank while it was being archived ({written} of {size} bytes)")
        self.out.write(b"\0" * _pad4(size))

    def close(self) -> None:
        """Write the ``TRAILER!!!`` entry; the archive then ends 4-byte aligned."""
        if not self._closed:
            self._header(TRAILER, 0, 0, 0, 1, 0)
            self._closed = True


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------
class _Source:
    """Bytes from ``fill()`` with peek/read/skip and an absolute offset."""

    def __init__(self, fill: Callable[[], bytes]):
        self._fill = fill
        self._buf = b""
        self._pos = 0
        self.offset = 0

    def _avail(self) -> int:
        return len(self._buf) - self._pos

    def _more(self) -> bool:
        chunk = self._fill()
        if not chunk:
            return False
        self._buf = self._buf[self._pos:] + chunk
        self._pos = 0
        return True

    def peek(self, n: int) -> bytes:
        while self._avail() < n and self._more():
            pass
        return self._buf[self._pos:self._pos + n]

    def read(self, n: int) -> bytes:
        data = self.peek(n)
        self._pos += len(data)
        self.offset += len(data)
        return data

    def read_some(self, limit: int = CHUNK) -> bytes:
        """Up to ``limit`` bytes, at least one unless at the end."""
        if not self._avail() and not self._more():
            return b""
        return self.read(min(limit, self._avail()))

    def skip(self, n: int, on_data: Callable[[bytes], None] | None = None) -> int:
        done = 0
        while done < n:
            if not self._avail() and not self._more():
                break
            take = min(n - done, self._avail())
            if on_data is not None:
                on_data(self._buf[self._pos:self._pos + take])
            self._pos += take
            self.offset += take
            done += take
        return done

    def skip_zeros(self) -> None:
        while True:
            if not self._avail() and not self._more():
                return
            rest = self._buf[self._pos:]
            stripped = rest.lstrip(b"\0")
            gone = len(rest) - len(stripped)
            self._pos += gone
            self.offset += gone
            if stripped:
                return

    def unread(self, data: bytes) -> None:
        """Put back bytes that were read from ``fill`` but belong to what follows."""
        if data:
            self._buf = data + self._buf[self._pos:]
            self._pos = 0
            self.offset -= len(data)


@dataclass
class Entry:
    name: str
    mode: int
    size: int
    target: str | None = None  # a symlink's target

    @property
    def is_dir(self) -> bool:
        return self.mode & 0o170000 == S_IFDIR

    @property
    def is_symlink(self) -> bool:
        return self.mode & 0o170000 == S_IFLNK


@dataclass
class Part:
    """One archive (``newc``) or compressed member (``gzip``) of an initrd."""

    kind: str
    offset: int          # where it starts in the file
    end: int             # where it ends (exclusive), before any zero padding
    entries: list[Entry] = field(default_factory=list)


@dataclass
class InitrdInfo:
    size: int
    sha256: str
    parts: list[Part]

    @property
    def entries(self) -> list[Entry]:
        return [entry for part in self.parts for entry in part.entries]

    @property
    def format(self) -> str:
        return "+".join(part.kind for part in self.parts)


def _parse_archive(src: _Source, where: str) -> list[Entry]:
    """One newc archive up to and including its TRAILER!!! entry."""
    entries: list[Entry] = []
    while True:
        at = src.offset
        header = src.read(HEADER_LEN)
        if len(header) < HEADER_LEN:
            raise CpioError(f"{where}: truncated cpio header at offset {at} "
                            "(archive ends without TRAILER!!!)")
        magic = header[:6]
        if magic not in (MAGIC_NEWC, MAGIC_CRC):
            raise CpioError(f"{where}: bad cpio magic {magic!r} at offset {at} (not newc)")
        if not _HEX_FIELDS.fullmatch(header[6:]):
            raise CpioError(f"{where}: cpio header at offset {at} has non-hex fields")
        fields = [int(header[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize, check = fields[1], fields[6], fields[11], fields[12]
        if not 1 <= namesize <= PATH_MAX:
            raise CpioError(f"{where}: cpio entry at offset {at} has a bad name size {namesize}")
        raw_name = src.read(namesize)
        if len(raw_name) < namesize:
            raise CpioError(f"{where}: truncated cpio name at offset {at}")
        if raw_name[-1:] != b"\0" or b"\0" in raw_name[:-1]:
            raise CpioError(f"{where}: cpio name at offset {at} is not NUL-terminated")
        name = raw_name[:-1].decode("utf-8", "surrogateescape")
        pad = _pad4(HEADER_LEN + namesize)
        if len(src.read(pad)) < pad:
            raise CpioError(f"{where}: truncated cpio entry {name!r} at offset {at}")
        total = [0]
        is_link = mode & 0o170000 == S_IFLNK
        if is_link and size > PATH_MAX:
            raise CpioError(f"{where}: symlink {name!r} at offset {at} has a {size}-byte target")
        link = bytearray()

        def take(chunk: bytes, total=total, link=link) -> None:
            if magic == MAGIC_CRC:
                total[0] += sum(chunk)
            if is_link:
                link.extend(chunk)

        got = src.skip(size, take if magic == MAGIC_CRC or is_link else None)
        if got < size:
            raise CpioError(f"{where}: cpio entry {name!r} at offset {at} is truncated "
                            f"({got} of {size} data bytes)")
        if magic == MAGIC_CRC and total[0] & 0xFFFFFFFF != check:
            raise CpioError(f"{where}: checksum mismatch in cpio entry {name!r} at offset {at}")
        pad = _pad4(size)
        if len(src.read(pad)) < pad:
            raise CpioError(f"{where}: truncated cpio entry {name!r} at offset {at}")
        if name == TRAILER:
            return entries
        target = bytes(link).decode("utf-8", "surrogateescape") if is_link else None
        entries.append(Entry(name, mode, size, target))


def _gzip_fill(src: _Source, where: str, start: int) -> Callable[[], bytes]:
    inflater = zlib.decompressobj(31)

    def fill() -> bytes:
        while not inflater.eof:
            data = inflater.unconsumed_tail or src.read_some()
            if not data:
                raise CpioError(f"{where}: gzip data starting at offset {start} is truncated")
            try:
                out = inflater.decompress(data, CHUNK)
            except zlib.error as exc:
                raise CpioError(f"{where}: gzip data starting at offset {start} is corrupt "
                                f"({exc})") from None
            if inflater.eof:
                src.unread(inflater.unused_data)
            if out:
                return out
        return b""

    return fill


def _parse_parts(src: _Source, where: str, compressed_ok: bool, parts: list[Part]) -> None:
    while True:
        src.skip_zeros()
        head = src.peek(6)
        if not head:
            return
        at = src.offset
        if head in (MAGIC_NEWC, MAGIC_CRC):
            if at % 4:
                raise CpioError(f"{where}: cpio archive at offset {at} is not 4-byte aligned")
            entries = _parse_archive(src, where)
            parts.append(Part("newc", at, src.offset, entries))
        elif compressed_ok and head[:2] == b"\x1f\x8b":
            inner = _Source(_gzip_fill(src, where, at))
            inner_parts: list[Part] = []
            _parse_parts(inner, f"{where} (gzip data at offset {at})", False, inner_parts)
            if not inner_parts:
                raise CpioError(f"{where}: gzip data at offset {at} holds no cpio archive")
            parts.append(Part("gzip", at, src.offset,
                              [e for p in inner_parts for e in p.entries]))
        else:
            other = next((name for magic, name in _OTHER_COMPRESSIONS.items()
                          if head.startswith(magic)), None)
            if compressed_ok and other:
                raise CpioError(f"{where}: {other}-compressed data at offset {at}; "
                                "only plain or gzip newc archives are supported")
            raise CpioError(f"{where}: unrecognised data at offset {at} ({head!r}): "
                            "not a newc cpio archive or gzip data")


def scan_initrd(path: str | os.PathLike, on_bytes: Callable[[int], None] | None = None,
                cancelled: Callable[[], bool] | None = None) -> InitrdInfo:
    """Parse a whole initrd (newc archives and gzip members); raise CpioError if unusable.

    ``on_bytes`` is called with the count of file bytes read so far.
    """
    where = os.fspath(path)
    digest = hashlib.sha256()
    size = [0]
    with open(path, "rb") as fh:
        def fill() -> bytes:
            if cancelled is not None and cancelled():
                raise CpioError("cancelled")
            chunk = fh.read(CHUNK)
            digest.update(chunk)
            size[0] += len(chunk)
            if on_bytes is not None and chunk:
                on_bytes(size[0])
            return chunk

        parts: list[Part] = []
        _parse_parts(_Source(fill), where, True, parts)
    if not parts:
        raise CpioError(f"{where}: holds no cpio archive (empty or only zero bytes)")
    return InitrdInfo(size[0], digest.hexdigest(), parts)
