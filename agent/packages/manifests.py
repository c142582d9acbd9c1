"""The manifest of a package that has none of its own (a driver package placed
by hand, an image captured here), in ReplicatePackage's format (PROTOCOL.md
§4): ``{"id": "<id>", "files": [{"path", "sha256", "size"}]}``, sorted by path.

- A driver package lists every regular file under its folder: no hidden
  component, no symlink leaving the folder, no symlinked folder descended,
  no path ReplicatePackage would refuse (it would refuse the whole manifest).
- An image lists ``current`` and the files of the version it names, and only
  if that version has ``meta.json`` (a capture writes it last): a capture in
  progress, or an image that never completed, is never offered
  (:class:`NotOffered`, answered 503 with ``Retry-After``, not 404, which
  would tell replicas it was deleted), so no replica is ever made of an image
  "recorded before it was complete". If ``current`` changes while the files
  are hashed, the manifest is made again.

The output is deterministic (same files, same bytes): ReplicatePackage takes
a manifest byte-identical to the one in place as "nothing changed". File
hashes are cached (:class:`HashCache`), so a 1 GiB image is read once, not
once per request; this module is called from a worker thread, never on the
event loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import stat
import threading
import time
from dataclasses import dataclass

from agent.packages.stores import MANIFEST, complete_version, id_ok, inside

CHUNK = 1 << 20
HASH_ATTEMPTS = 3          # a file written while it is hashed is hashed again
CURRENT_ATTEMPTS = 5       # an image's `current` switching while it is hashed
MAX_CACHED = 200_000       # file hashes kept (paths); the oldest go first


class NotOffered(Exception):
    """The package is not offered now (503: not complete yet); the message says why."""


class Changing(Exception):
    """The package kept changing while it was hashed (503: ask again soon)."""


@dataclass
class Made:
    body: bytes
    files: int
    size: int          # bytes of all its files
    hashed: int        # bytes read to make it (0: every hash was cached)
    seconds: float


class HashCache:
    """sha256 of files, keyed by (path, st_dev, st_ino, st_size, st_mtime_ns).

    One lock per path: two requests (or a request and the warm-up) that need
    the same file read it once, the second waiting for the first."""

    def __init__(self, max_entries: int = MAX_CACHED):
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._known: dict[str, tuple[tuple[int, int, int, int], str]] = {}
        self._busy: dict[str, threading.Lock] = {}

    def digest(self, path: str) -> tuple[int, str, int]:
        """``(size, sha256 hex, bytes read now)`` of the regular file ``path``."""
        with self._lock:
            busy = self._busy.setdefault(path, threading.Lock())
        with busy:
            for _attempt in range(HASH_ATTEMPTS):
                st = os.stat(path)
                key = _key(st)
                with self._lock:
                    known = self._known.get(path)
                if known and known[0] == key:
                    return st.st_size, known[1], 0
                with open(path, "rb") as fh:
                    if _key(os.fstat(fh.fileno())) != key:
                        continue                          # replaced since the stat
                    sha = hashlib.sha256()
                    while chunk := fh.read(CHUNK):
                        sha.update(chunk)
                    if _key(os.fstat(fh.fileno())) != key:
                        continue                          # written while it was read
                self._remember(path, key, sha.hexdigest())
                return st.st_size, sha.hexdigest(), st.st_size
        raise Changing(f"{path} changed while it was hashed, {HASH_ATTEMPTS} times")

    def _remember(self, path: str, key: tuple[int, int, int, int], digest: str) -> None:
        with self._lock:
            self._known.pop(path, None)
            self._known[path] = (key, digest)
            while len(self._known) > self.max_entries:
                oldest = next(iter(self._known))
                del self._known[oldest]
                self._busy.pop(oldest, None)


def _key(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def rel_ok(rel: str) -> bool:
    """Whether ReplicatePackage takes ``rel`` as a path (handlers/shared/relpath.py's
    rule, which it applies to every entry: one bad path would refuse the whole)."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return (0 < len(rel) <= 1024 and not any(ch in rel for ch in "\0\n\r\\")
            and posixpath.normpath(rel) == rel and not rel.startswith("/"))


def walk(top: str, bound: str, prefix: str = "") -> tuple[list[tuple[str, str]], list[str]]:
    """``([(path in the manifest, resolved file)], [paths left out])`` of the regular
    files under ``top``; a symlink must resolve below ``bound``."""
    found, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]   # symlinks: not descended
        for name in filenames:
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            rel = prefix + os.path.relpath(full, top)
            real = os.path.realpath(full)
            try:
                regular = inside(bound, real) and stat.S_ISREG(os.stat(real).st_mode)
            except OSError:
                regular = False
            if not regular:
                continue
            if rel == MANIFEST or not rel_ok(rel):
                skipped.append(rel)
                continue
            found.append((rel, real))
    return sorted(found), skipped


def render(pid: str, entries: list[dict]) -> bytes:
    return json.dumps({"id": pid, "files": entries}, indent=1).encode() + b"\n"


def _hash_all(files: list[tuple[str, str]], cache: HashCache) -> tuple[list[dict], int, int]:
    entries, size, hashed = [], 0, 0
    for rel, real in files:
        length, digest, read = cache.digest(real)
        entries.append({"path": rel, "sha256": digest, "size": length})
        size += length
        hashed += read
    return entries, size, hashed


def driver_manifest(pid: str, package: str, cache: HashCache) -> tuple[Made, list[str]]:
    """The manifest of a driver package folder; also the paths left out."""
    started = time.monotonic()
    files, skipped = walk(package, package)
    entries, size, hashed = _hash_all(files, cache)
    return Made(render(pid, entries), len(entries), size, hashed,
                time.monotonic() - started), skipped


def read_current(pid: str, package: str) -> tuple[bytes, str]:
    """An image's ``current`` (its bytes, the version it names) if that version is
    complete; NotOffered saying why otherwise."""
    path = os.path.join(package, "current")
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise NotOffered(f"image '{pid}': its 'current' is not a regular file; refused")
        with open(path, "rb") as fh:
            raw = fh.read(4096)
    except FileNotFoundError:
        raise NotOffered(f"image '{pid}' has no complete version yet (no 'current': its "
                         "first capture has not finished); an image is offered only "
                         "once complete") from None
    version = raw.decode("utf-8", "replace").strip()
    if not id_ok(version) or not os.path.isdir(os.path.join(package, version)):
        raise NotOffered(f"image '{pid}': 'current' names {version[:80]!r}, which is not a "
                         "version folder of this image; not offered")
    if not complete_version(package, version):
        raise NotOffered(f"image '{pid}': its current version {version} has no meta.json "
                         "(incomplete: a capture in progress is never offered)")
    return raw, version


def image_manifest(pid: str, package: str, cache: HashCache) -> tuple[Made, list[str]]:
    """The manifest of an image captured here: ``current`` and its version's files."""
    started = time.monotonic()
    for _attempt in range(CURRENT_ATTEMPTS):
        raw, version = read_current(pid, package)
        files, skipped = walk(os.path.join(package, version), package, version + "/")
        files = sorted([("current", os.path.realpath(os.path.join(package, "current")))]
                       + files)
        entries, size, hashed = _hash_all(files, cache)
        try:
            with open(os.path.join(package, "current"), "rb") as fh:
                again = fh.read(4096)
        except OSError:
            again = None
        if again == raw:
            return Made(render(pid, entries), len(entries), size, hashed,
                        time.monotonic() - started), skipped
    raise Changing(f"image '{pid}': 'current' changed while its files were hashed, "
                   f"{CURRENT_ATTEMPTS} times")


def make_manifest(kind: str, pid: str, package: str, cache: HashCache) -> tuple[Made, list[str]]:
    """The generated manifest of package ``pid`` (resolved folder ``package``)."""
    if kind == "images":
        return image_manifest(pid, package, cache)
    return driver_manifest(pid, package, cache)
