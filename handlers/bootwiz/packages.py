"""Driver packages: the replication check (every file against its package's
manifest, before anything is built; the seed's classic failure is building
before replication finished) and where each file goes in the base initrd."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import posixpath
import re
import stat
from dataclasses import dataclass
from typing import Callable

from handlers.bootwiz.cpio import CHUNK
from handlers.bootwiz.errors import BootWizError, Cancelled, check_name, describe_oserror
from handlers.shared.relpath import rel_path_problem

SHA_RE = re.compile(r"[0-9a-fA-F]{64}")
MAX_MANIFEST = 16 << 20


def parse_drivers(text: str | None) -> list[str]:
    """Comma-separated package ids; blanks around commas and empty items ignored,
    repeats dropped (first kept)."""
    ids: list[str] = []
    for item in (text or "").split(","):
        item = item.strip()
        if item:
            check_name(item, "driver package id")
            if item not in ids:
                ids.append(item)
    return ids


@dataclass
class DriverFile:
    package: str
    path: str        # inside the package folder and inside the initrd
    source: str      # resolved absolute path, inside the package folder
    sha256: str
    size: int
    mode: int        # 0o755 or 0o644
    mtime: int
    initrd_path: str = ""  # where it goes in the initrd (path, through the base's symlinks)

    def __post_init__(self) -> None:
        self.initrd_path = self.initrd_path or self.path


class PackageChecker:
    """Checks that driver packages have replicated completely (seed: run BootWiz
    only after replication finished), collecting every problem."""

    def __init__(self, package_store: str, cancelled: Callable[[], bool],
                 on_bytes: Callable[[int], None]):
        self.store = package_store
        self.cancelled = cancelled
        self.on_bytes = on_bytes
        self.problems: list[dict[str, str]] = []

    def _problem(self, package: str, message: str, file: str | None = None, **extra: str) -> None:
        entry = {"package": package, "message": message, **extra}
        if file is not None:
            entry["file"] = file
        self.problems.append(entry)

    def _manifest(self, pid: str, folder: str, real_folder: str) -> dict | None:
        path = os.path.join(folder, "manifest.json")
        not_yet = f"driver package '{pid}' has not replicated yet"
        try:
            real = os.path.realpath(path)
            if not real.startswith(real_folder + os.sep):
                self._problem(pid, f"driver package '{pid}': manifest.json resolves outside "
                              f"the package folder ({real})", "manifest.json")
                return None
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as fh:
                if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                    self._problem(pid, f"driver package '{pid}': manifest.json is not a regular "
                                  "file", "manifest.json")
                    return None
                raw = fh.read(MAX_MANIFEST + 1)
        except FileNotFoundError:
            self._problem(pid, f"{not_yet}: {path} is missing", "manifest.json")
            return None
        except OSError as exc:
            self._problem(pid, describe_oserror(
                exc, f"driver package '{pid}': cannot read manifest.json"), "manifest.json")
            return None
        if len(raw) > MAX_MANIFEST:
            self._problem(pid, f"driver package '{pid}': manifest.json is larger than "
                          f"{MAX_MANIFEST >> 20} MiB", "manifest.json")
            return None
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            self._problem(pid, f"driver package '{pid}': manifest.json is not valid JSON "
                          f"(half-replicated?): {exc}", "manifest.json")
            return None
        if not isinstance(data, dict) or not isinstance(data.get("files"), list):
            self._problem(pid, f"driver package '{pid}': manifest.json must be an object with "
                          "a 'files' list", "manifest.json")
            return None
        if data.get("id") != pid:
            self._problem(pid, f"driver package '{pid}': manifest.json names package "
                          f"{data.get('id')!r}, not '{pid}'", "manifest.json")
            return None
        return data

    def check(self, pid: str) -> list[DriverFile]:
        folder = os.path.join(self.store, pid)
        not_yet = f"driver package '{pid}' has not replicated yet"
        if not os.path.isdir(folder):
            self._problem(pid, f"{not_yet}: its folder {folder} is missing")
            return []
        real_folder = os.path.realpath(folder)
        manifest = self._manifest(pid, folder, real_folder)
        if manifest is None:
            return []
        files: list[DriverFile] = []
        seen: set[str] = set()
        for index, item in enumerate(manifest["files"]):
            if self.cancelled():
                raise Cancelled("cancelled while checking driver packages")
            path = item.get("path") if isinstance(item, dict) else None
            digest = item.get("sha256") if isinstance(item, dict) else None
            why = rel_path_problem(path)
            if why:
                self._problem(pid, f"driver package '{pid}': manifest.json files[{index}] path "
                              f"{path!r} is not allowed ({why})", str(path))
                continue
            if not isinstance(digest, str) or not SHA_RE.fullmatch(digest):
                self._problem(pid, f"driver package '{pid}': manifest.json gives {path} no valid "
                              "sha256 (64 hex digits)", path)
                continue
            if path in seen:
                self._problem(pid, f"driver package '{pid}': {path} is listed twice in "
                              "manifest.json", path)
                continue
            seen.add(path)
            found = self._file(pid, path, digest.lower(), real_folder)
            if found is not None:
                files.append(found)
        return files

    def _file(self, pid: str, path: str, expected: str, real_folder: str) -> DriverFile | None:
        not_yet = f"driver package '{pid}' has not replicated yet"
        real = os.path.realpath(os.path.join(real_folder, path))
        if not real.startswith(real_folder + os.sep):
            self._problem(pid, f"driver package '{pid}': {path} resolves outside the package "
                          f"folder ({real}); refused", path)
            return None
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            self._problem(pid, f"{not_yet}: {path} is missing", path)
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                self._problem(pid, f"driver package '{pid}': {path} is a symlink that changed "
                              "while checked; refused", path)
            else:
                self._problem(pid, describe_oserror(
                    exc, f"driver package '{pid}': cannot read {path}"), path)
            return None
        with os.fdopen(fd, "rb") as fh:
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode):
                self._problem(pid, f"driver package '{pid}': {path} is not a regular file", path)
                return None
            digest = hashlib.sha256()
            try:
                while chunk := fh.read(CHUNK):
                    if self.cancelled():
                        raise Cancelled("cancelled while checking driver packages")
                    digest.update(chunk)
                    self.on_bytes(len(chunk))
            except OSError as exc:
                self._problem(pid, describe_oserror(
                    exc, f"driver package '{pid}': cannot read {path}"), path)
                return None
        actual = digest.hexdigest()
        if actual != expected:
            self._problem(pid, f"{not_yet}: {path} sha256 mismatch (half-replicated?)", path,
                          expected=expected, actual=actual)
            return None
        mode = 0o755 if info.st_mode & 0o111 else 0o644
        return DriverFile(pid, path, real, actual, info.st_size, mode, int(info.st_mtime))


def merge_files(files: list[DriverFile]) -> tuple[list[DriverFile], list[str]]:
    """One entry per initrd path; the problems when two packages disagree."""
    by_path: dict[str, DriverFile] = {}
    problems: list[str] = []
    for item in files:
        other = by_path.get(item.initrd_path)
        if other is None:
            by_path[item.initrd_path] = item
        elif other.sha256 != item.sha256:
            problems.append(f"driver packages '{other.package}' and '{item.package}' both "
                            f"provide {item.initrd_path} with different content")
    for path, item in by_path.items():
        parent = posixpath.dirname(path)
        while parent:
            if parent in by_path:
                problems.append(f"driver package '{by_path[parent].package}' provides {parent} "
                                f"as a file, but '{item.package}' needs it as a folder for {path}")
            parent = posixpath.dirname(parent)
    return sorted(by_path.values(), key=lambda f: f.initrd_path), problems


class BaseTree:
    """The paths the base initrd leaves in the rootfs, as Linux unpacks it.

    Linux's unpacker replaces an existing path of another type (it lstat()s
    and unlinks), so a folder entry for ``lib`` would delete a base's merged-
    /usr symlink ``lib -> usr/lib``. Driver files are therefore placed
    through the base's symlinks (``lib/modules/...`` is stored as
    ``usr/lib/modules/...``, the same file once booted), and the drivers'
    folder entries carry the base's mode for folders the base already has.
    """

    MAX_HOPS = 40

    def __init__(self, entries) -> None:
        self.nodes = {}
        for entry in entries:  # later entries win, as when unpacking
            name = posixpath.normpath("/" + entry.name).lstrip("/")
            if name:
                self.nodes[name] = entry

    def _resolve(self, parts: list[str]) -> list[str]:
        resolved: list[str] = []
        todo = list(parts)
        hops = 0
        while todo:
            part = todo.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if resolved:
                    resolved.pop()
                continue
            node = self.nodes.get("/".join(resolved + [part]))
            if node is not None and node.is_symlink and node.target:
                hops += 1
                if hops > self.MAX_HOPS:
                    loop = "/".join(resolved + [part])
                    raise BootWizError(f"the base initrd's symlinks loop at {loop}")
                if node.target.startswith("/"):
                    resolved = []
                todo = node.target.split("/") + todo
                continue
            resolved.append(part)
        return resolved

    def place(self, path: str) -> tuple[str, bool]:
        """Where ``path`` goes in the initrd, and whether it replaces a base file."""
        folder = self._resolve(path.split("/")[:-1])
        for depth in range(1, len(folder) + 1):
            prefix = "/".join(folder[:depth])
            node = self.nodes.get(prefix)
            if node is not None and not node.is_dir:
                raise BootWizError(f"the base initrd holds {prefix} as a file, but {path} "
                                   "needs it to be a folder")
        stored = "/".join(folder + [path.split("/")[-1]])
        node = self.nodes.get(stored)
        if node is not None and node.is_dir:
            raise BootWizError(f"the base initrd holds {stored} as a folder; {path} cannot "
                               "replace it")
        return stored, node is not None

    def dir_mode(self, path: str) -> int:
        node = self.nodes.get(path)
        return node.mode & 0o7777 if node is not None and node.is_dir else 0o755


def parent_dirs(paths: list[str]) -> list[str]:
    """Every parent folder of ``paths``, parents before children."""
    dirs: set[str] = set()
    for path in paths:
        parent = posixpath.dirname(path)
        while parent and parent not in dirs:
            dirs.add(parent)
            parent = posixpath.dirname(parent)
    return sorted(dirs)


def tree_size(folder: str) -> int:
    """Bytes in the regular files under ``folder`` (0 for what cannot be read)."""
    total, stack = 0, [folder]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except OSError:
                        pass
        except OSError:
            pass
    return total
