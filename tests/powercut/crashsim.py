"""Rebuild what a disk could hold after a power cut, from an iolog (iolog.c).

The durability model (conservative; ext4 ``data=ordered`` on a disk with a
volatile write cache that honours flushes):

- **File data**: everything written to a file before its last completed
  ``fsync``/``fdatasync`` is on disk, size included. Of the writes and
  truncates issued since, any subset may be on disk (the cache may write back
  in any order), each write whole, missing, or torn at 512-byte sector
  boundaries (only the sectors it covered change: SQLite's "powersafe
  overwrite" assumption, which a disk that writes whole sectors meets).
- **Names** (create, unlink, rename in the directory): durable only up to the
  last ``fsync`` of the directory itself. The ones since are a *prefix* of
  their order (the ext4 journal commits metadata in order), possibly empty.
  Not even an ``fsync`` of a new file makes its name durable here: POSIX does
  not promise it, and although ext4's journal does it in practice, this model
  does not count on it.
- The ``-shm`` file is not logged and not part of any state: SQLite rebuilds
  it from the WAL when it finds none.

A file whose name is not durable is simply absent; a name whose unlink is not
durable still shows the file's durable data plus any subset of its later
writes, like any other file.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field
from pathlib import Path

REC = struct.Struct("<IIQqQ")
OPEN, WRITE, TRUNC, SYNC, UNLINK, RENAME, MARK = range(1, 8)
SECTOR = 512
HOW = ("all", "none", "prefix", "subset")   # how many pending operations survive


@dataclass(frozen=True)
class Op:
    kind: int
    ino: int = 0
    off: int = 0
    path: str = ""
    data: bytes = b""


def read_log(path: str | Path) -> list[Op]:
    """The log's records; a record cut short by the kill is left out."""
    raw = Path(path).read_bytes()
    ops, pos = [], 0
    while pos + REC.size <= len(raw):
        kind, plen, ino, off, dlen = REC.unpack_from(raw, pos)
        end = pos + REC.size + plen + dlen
        if end > len(raw):
            break
        name = raw[pos + REC.size:pos + REC.size + plen].decode()
        ops.append(Op(kind, ino, off, name, raw[pos + REC.size + plen:end]))
        pos = end
    return ops


def _write(buf: bytearray, off: int, data: bytes) -> None:
    if len(buf) < off:
        buf.extend(bytes(off - len(buf)))
    buf[off:off + len(data)] = data


def _apply(buf: bytearray, op: tuple) -> None:
    if op[0] == "w":
        _write(buf, op[1], op[2])
    else:
        del buf[op[1]:]
        buf.extend(bytes(op[1] - len(buf)))


def _torn(op: tuple, rng: random.Random) -> list[tuple]:
    """The pieces of one write that reached the disk: all, none, or some sectors."""
    if op[0] != "w":
        return [op] if rng.random() < 0.5 else []
    roll = rng.random()
    if roll < 0.5:
        return [op]
    if roll < 0.75:
        return []
    _, off, data = op
    pieces, start = [], off
    while start < off + len(data):
        stop = min((start // SECTOR + 1) * SECTOR, off + len(data))
        if rng.random() < 0.5:
            pieces.append(("w", start, data[start - off:stop - off]))
        start = stop
    return pieces


@dataclass(eq=False)
class Inode:
    ino: int
    durable: bytearray = field(default_factory=bytearray)
    live: bytearray = field(default_factory=bytearray)   # every write applied
    pending: list[tuple] = field(default_factory=list)   # since the last sync


class Disk:
    """The watched directory as the replay goes: durable part and pending part."""

    def __init__(self, start: dict[str, tuple[int, bytes]]):
        self.by_ino: dict[int, Inode] = {}
        self.dir_inos: set[int] = set()
        self.names: dict[str, Inode] = {}          # durable names
        self.live_names: dict[str, Inode] = {}
        self.pending_names: list[tuple] = []       # ("link", name, inode) | ("unlink", name) | ("rename", a, b)
        for name, (ino, data) in start.items():
            inode = Inode(ino, bytearray(data), bytearray(data))
            self.by_ino[ino] = self.names[name] = self.live_names[name] = inode

    def apply(self, op: Op) -> None:
        if op.kind == OPEN:
            self._open(op)
        elif op.kind in (WRITE, TRUNC):
            inode = self.by_ino[op.ino]
            change = ("w", op.off, op.data) if op.kind == WRITE else ("t", op.off)
            inode.pending.append(change)
            _apply(inode.live, change)
        elif op.kind == SYNC:
            self._sync(op.ino)
        elif op.kind == UNLINK:
            del self.live_names[op.path]
            self.pending_names.append(("unlink", op.path))
        elif op.kind == RENAME:
            if op.off != 3:
                raise NotImplementedError(f"rename into or out of the watched directory: {op.path!r}")
            old, new = op.path.split("\0")
            self.live_names[new] = self.live_names.pop(old)
            self.pending_names.append(("rename", old, new))
        elif op.kind != MARK:
            raise ValueError(f"unknown log record {op.kind}")

    def _open(self, op: Op) -> None:
        if op.off:                       # the directory itself
            self.dir_inos.add(op.ino)
            return
        known = self.live_names.get(op.path)
        if known is not None and known.ino == op.ino:
            return
        inode = Inode(op.ino)            # created (an inode number may be reused)
        self.by_ino[op.ino] = self.live_names[op.path] = inode
        self.pending_names.append(("link", op.path, inode))

    def _sync(self, ino: int) -> None:
        if ino in self.dir_inos:
            self._names_durable(len(self.pending_names))
            return
        inode = self.by_ino[ino]
        for change in inode.pending:
            _apply(inode.durable, change)
        inode.pending.clear()

    def _names_durable(self, n: int) -> None:
        for change in self.pending_names[:n]:
            self._rename(self.names, change)
        del self.pending_names[:n]

    @staticmethod
    def _rename(names: dict[str, Inode], change: tuple) -> None:
        if change[0] == "link":
            names[change[1]] = change[2]
        elif change[0] == "unlink":
            names.pop(change[1], None)
        else:
            names[change[2]] = names.pop(change[1])

    def live_files(self) -> dict[str, bytes]:
        """What the files hold with every write applied (what a plain kill leaves)."""
        return {name: bytes(inode.live) for name, inode in self.live_names.items()}

    def crash(self, rng: random.Random, how: str) -> dict[str, bytes]:
        """One possible disk content after a power cut now (``how``: see HOW)."""
        names = dict(self.names)
        for change in self.pending_names[:self._keep(len(self.pending_names), rng, how)]:
            self._rename(names, change)
        files = {}
        for name, inode in names.items():
            buf = bytearray(inode.durable)
            pending = inode.pending
            if how == "subset":
                survivors = [piece for change in pending for piece in _torn(change, rng)]
            else:
                survivors = pending[:self._keep(len(pending), rng, how)]
            for change in survivors:
                _apply(buf, change)
            files[name] = bytes(buf)
        return files

    @staticmethod
    def _keep(n: int, rng: random.Random, how: str) -> int:
        return {"all": n, "none": 0}.get(how, rng.randint(0, n) if n else 0)
