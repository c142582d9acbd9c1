"""A replicated package on disk, switched whole:

    <store>/<id>                          -> .replicas/<id>/<version>  (a symlink)
    <store>/.replicas/<id>/<version>/     the files and manifest.json, read-only
    <store>/.replicas/<id>/.partial/<sha256>   downloads in progress (resumable)
    <store>/.replicas/<id>/.staging-<n>/  the next version while it is made

A reader resolves ``<store>/<id>`` once (BootWizRebuild does: realpath) and
keeps the version it found until it is done; the switch is one rename of a
symlink (``rename(2)`` is atomic), so a reader sees the old package or the new
one whole. Files unchanged since the version in place are hard links to it
(no copy, no download). The version in place and the one before it are kept;
older ones are removed. A package folder that is a plain folder (made by
hand, or before replication) is exchanged with the symlink in one
``renameat2(RENAME_EXCHANGE)`` and kept as the previous version.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import secrets
import shutil
import time
from pathlib import Path

from handlers.replication.manifest import PackageFile
from handlers.shared.durable import fsync_dir

REPLICAS = ".replicas"
KEEP_VERSIONS = 2
CHUNK = 1 << 20
RENAME_EXCHANGE = 2


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class Replica:
    """The package ``package`` in ``store`` (a folder)."""

    def __init__(self, store: str, package: str):
        self.store = Path(store)
        self.package = package
        self.link = self.store / package
        self.root = self.store / REPLICAS / package
        self.partial = self.root / ".partial"

    def current(self) -> Path | None:
        """The folder in place now (a version, or a plain folder), or None."""
        return self.link.resolve() if self.link.is_dir() else None

    def in_place(self, files: list[PackageFile]) -> set[str]:
        """The paths whose file in the version in place has the manifest's size and
        sha256 (each hashed once: reused as they are, or proof nothing changed)."""
        current = self.current()
        if current is None:
            return set()
        same = set()
        for f in files:
            path = current / f.path
            try:
                if path.is_file() and path.stat().st_size == f.size \
                        and sha256_file(path) == f.sha256:
                    same.add(f.path)
            except OSError:
                pass
        return same

    def unchanged(self, files: list[PackageFile], in_place: set[str], manifest: bytes) -> bool:
        """Whether the package in place is exactly this manifest's (bytes and files)."""
        if len(in_place) != len(files):
            return False
        try:
            return (self.link / "manifest.json").read_bytes() == manifest
        except OSError:
            return False

    def start(self) -> Path:
        """A fresh staging folder for the next version (leftovers of a killed run gone)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.partial.mkdir(exist_ok=True)
        for old in self.root.glob(".staging-*"):
            shutil.rmtree(old, ignore_errors=True)
        staging = self.root / f".staging-{os.getpid()}"
        staging.mkdir()
        return staging

    def switch(self, staging: Path, manifest: bytes) -> str:
        """Write the manifest last, make ``staging`` the version in place; its name."""
        (staging / "manifest.json").write_bytes(manifest)
        for path in sorted(staging.rglob("*"), reverse=True):
            if path.is_file():
                path.chmod(0o444)
        version = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{secrets.token_hex(3)}"
        final = self.root / version
        staging.rename(final)
        fsync_dir(self.root)
        tmp = self.store / f".{self.package}.switch"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(Path(REPLICAS) / self.package / version)
        if self.link.is_symlink() or not self.link.exists():
            os.replace(tmp, self.link)
        else:                                 # a plain folder: exchange, keep it as the previous
            _exchange(tmp, self.link)
            tmp.rename(self.root / f"{version}-before")
        fsync_dir(self.store)
        self._prune(final)
        return version

    def _prune(self, keep: Path) -> None:
        versions = sorted((p for p in self.root.iterdir()
                           if p.is_dir() and not p.name.startswith(".")),
                          key=lambda p: p.stat().st_mtime, reverse=True)
        kept = [keep] + [p for p in versions if p != keep][:KEEP_VERSIONS - 1]
        for old in versions:
            if old not in kept:
                _remove_tree(old)

    def delete(self) -> bool:
        """Remove the package (deleted at its source); True if there was one."""
        existed = self.link.is_symlink() or self.link.exists()
        if self.link.is_symlink():
            self.link.unlink()
        elif self.link.is_dir():
            _remove_tree(self.link)
        if self.root.exists():
            _remove_tree(self.root)
        fsync_dir(self.store)
        return existed


def _remove_tree(path: Path) -> None:
    for sub in [path, *path.rglob("*")]:
        if sub.is_dir() and not sub.is_symlink():
            sub.chmod(0o755)
    shutil.rmtree(path, ignore_errors=True)


def _exchange(a: Path, b: Path) -> None:
    """Swap two names atomically (Linux renameat2 RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(b))
