"""Check driver packages, build a new preboot configuration version, switch to it.

Layout of the preboot store (docs/bootwiz.md)::

    <preboot_store>/<base>/vmlinuz, initrd.img       a base (read only here)
    <preboot_store>/<config>/.lock                   flock'd while a build runs
    <preboot_store>/<config>/<version>/              one complete build
        vmlinuz  initrd.img  boot.ipxe  pxelinux.cfg/default  manifest.json
    <preboot_store>/<config>/current -> <version>    relative symlink, replaced atomically

A version is built in ``.building-<rand>`` and renamed to its version name
only when every file is on disk, so a version folder is always complete; a
failed build removes its temp folder and leaves ``current`` alone. Paths in
boot.ipxe, pxelinux.cfg/default, manifest.json and the SBS update file are
relative to the preboot store (the TFTP/HTTP root).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import posixpath
import re
import secrets
import shlex
import shutil
import stat
import subprocess
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable
from xml.sax.saxutils import quoteattr

from handlers.shared.durable import fsync_dir
from handlers.bootwiz.cpio import CHUNK, CpioError, InitrdInfo, NewcWriter, Output, scan_initrd

NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
SHA_RE = re.compile(r"[0-9a-fA-F]{64}")
VERSION_RE = re.compile(r"(\d{8}T\d{6}\.\d{6}Z)-[0-9a-f]{8}")
STAMP_FORMAT = "%Y%m%dT%H%M%S.%fZ"
MAX_MANIFEST = 16 << 20
MAX_PATH_LEN = 1024
WAKE_TIMEOUT_S = 10
LOCK_NAME = ".lock"
BUILDING = ".building-"
DELETING = ".deleting-"

Report = Callable[..., None]  # report(percent, message, **details)


class BootWizError(Exception):
    """A rebuild cannot be done; the message names the cause (and the file)."""

    def __init__(self, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.details = dict(details or {})


class Cancelled(BootWizError):
    pass


def check_name(value: str | None, what: str) -> str:
    """``value`` as a store name (``[A-Za-z0-9._-]{1,64}``, not . or ..)."""
    if value is None or not NAME_RE.fullmatch(value) or value in (".", ".."):
        raise BootWizError(f"{what} {value!r} is not allowed (1-64 of A-Z a-z 0-9 . _ -, "
                           "and not '.' or '..'; no '/')")
    return value


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


def _oserror(exc: OSError, doing: str) -> str:
    what = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        what = "no space left on device"
    elif exc.errno == errno.EDQUOT:
        what = "disk quota exceeded"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        what = "permission denied"
    elif exc.errno == errno.EROFS:
        what = "read-only file system"
    name = f" ({exc.filename})" if exc.filename else ""
    return f"{doing}: {what}{name}"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---------------------------------------------------------------------------
# driver packages
# ---------------------------------------------------------------------------
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


def _check_rel_path(path: Any) -> str | None:
    """Why ``path`` is not an acceptable relative file path, or None."""
    if not isinstance(path, str) or not path:
        return "not a non-empty string"
    if any(ch in path for ch in "\0\n\r"):
        return "contains NUL or a line break"
    if len(path) > MAX_PATH_LEN:
        return f"longer than {MAX_PATH_LEN} characters"
    if path.startswith("/"):
        return "absolute"
    if "\\" in path:
        return "contains a backslash"
    parts = path.split("/")
    if ".." in parts:
        return "contains '..'"
    if posixpath.normpath(path) != path or "." in parts:
        return "not normalised"
    return None


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
            self._problem(pid, _oserror(exc, f"driver package '{pid}': cannot read manifest.json"),
                          "manifest.json")
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
            why = _check_rel_path(path)
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
                self._problem(pid, _oserror(exc, f"driver package '{pid}': cannot read {path}"),
                              path)
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
                self._problem(pid, _oserror(exc, f"driver package '{pid}': cannot read {path}"),
                              path)
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
                    raise BootWizError(f"the base initrd's symlinks loop at {'/'.join(resolved + [part])}")
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


# ---------------------------------------------------------------------------
# versions and the current link
# ---------------------------------------------------------------------------
def list_versions(config_dir: str) -> list[str]:
    try:
        names = os.listdir(config_dir)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if VERSION_RE.fullmatch(n)
                  and os.path.isdir(os.path.join(config_dir, n))
                  and not os.path.islink(os.path.join(config_dir, n)))


def new_version(existing: list[str], moment: datetime) -> str:
    """A version name later than every existing one (UTC microseconds + random)."""
    stamp = moment.strftime(STAMP_FORMAT)
    stamps = [VERSION_RE.fullmatch(v).group(1) for v in existing]
    if stamps and stamp <= max(stamps):
        latest = datetime.strptime(max(stamps), STAMP_FORMAT).replace(tzinfo=timezone.utc)
        stamp = (latest + timedelta(microseconds=1)).strftime(STAMP_FORMAT)
    return f"{stamp}-{secrets.token_hex(4)}"


def read_current(config_dir: str) -> str | None:
    link = os.path.join(config_dir, "current")
    try:
        return os.path.basename(os.readlink(link).rstrip("/"))
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise BootWizError(f"{link} exists but is not a symlink; refusing to replace it "
                               "(move it away)") from None
        raise


def switch_current(config_dir: str, version: str) -> None:
    """Point ``current`` at ``version`` atomically (symlink + rename + fsync)."""
    tmp = os.path.join(config_dir, f"current.tmp-{secrets.token_hex(4)}")
    os.symlink(version, tmp)
    try:
        os.replace(tmp, os.path.join(config_dir, "current"))
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(config_dir)


def remove_version(config_dir: str, version: str) -> None:
    """Make a version invisible at once (rename), then delete it."""
    doomed = os.path.join(config_dir, f"{DELETING}{version}-{secrets.token_hex(4)}")
    os.rename(os.path.join(config_dir, version), doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def prune(config_dir: str, keep: int, current: str) -> tuple[list[str], list[str], list[str]]:
    """Keep the newest ``keep`` versions (and current); return kept, removed, warnings."""
    versions = list_versions(config_dir)
    kept = set(versions[-keep:]) | {current}
    removed, warnings = [], []
    for version in versions:
        if version in kept:
            continue
        try:
            remove_version(config_dir, version)
            removed.append(version)
        except OSError as exc:
            warnings.append(_oserror(exc, f"could not remove old version {version}"))
    return [v for v in versions if v in kept], removed, warnings


def _sweep(config_dir: str) -> None:
    """Remove temp folders and links left by builds that were killed."""
    for name in os.listdir(config_dir):
        path = os.path.join(config_dir, name)
        if name.startswith((BUILDING, DELETING)):
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith("current.tmp-") and os.path.islink(path):
            try:
                os.unlink(path)
            except OSError:
                pass


class ConfigLock:
    """flock on ``<config>/.lock``: one build of a configuration at a time."""

    def __init__(self, config_dir: str, cancelled: Callable[[], bool], report: Report):
        self.path = os.path.join(config_dir, LOCK_NAME)
        self.cancelled = cancelled
        self.report = report
        self.fd = -1

    def __enter__(self) -> "ConfigLock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        told = False
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if self.cancelled():
                    os.close(self.fd)
                    raise Cancelled("cancelled while waiting for another build") from None
                if not told:
                    self.report(None, "waiting for another build of this configuration")
                    told = True
                time.sleep(0.2)

    def __exit__(self, *exc: Any) -> None:
        os.close(self.fd)


# ---------------------------------------------------------------------------
# the build
# ---------------------------------------------------------------------------
def _chunks(fh, cancelled: Callable[[], bool], on_bytes: Callable[[int], None], digest=None):
    while chunk := fh.read(CHUNK):
        if cancelled():
            raise Cancelled("cancelled while building")
        if digest is not None:
            digest.update(chunk)
        on_bytes(len(chunk))
        yield chunk


def _write_file(path: str, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        out = Output(fd)
        out.write(data)
        out.flush()
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy(src: str, dst: str, cancelled, on_bytes) -> tuple[str, int]:
    """Copy ``src`` to a new ``dst`` (fsync'd); return its sha256 and size."""
    with open(src, "rb") as fh:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            out = Output(fd)
            for chunk in _chunks(fh, cancelled, on_bytes):
                out.write(chunk)
            out.flush()
            os.fsync(fd)
        finally:
            os.close(fd)
    return out.sha256.hexdigest(), out.offset


def boot_ipxe(config: str, version: str, kernel: str, initrd: str) -> str:
    return (
        "#!ipxe\n"
        f"# dsagent BootWiz: preboot configuration {config}, version {version}\n"
        "# paths start with / so iPXE resolves them from the server root\n"
        "# (the preboot store), not from this script's folder\n"
        f"kernel /{kernel} initrd=initrd.img\n"
        f"initrd /{initrd}\n"
        "boot\n"
    )


def pxelinux_default(config: str, version: str, kernel: str, initrd: str) -> str:
    return (
        f"# dsagent BootWiz: preboot configuration {config}, version {version}\n"
        "# paths are relative to the TFTP root (the preboot store)\n"
        "DEFAULT dsagent\n"
        "PROMPT 0\n"
        "TIMEOUT 0\n"
        "LABEL dsagent\n"
        f"  MENU LABEL {config} ({version})\n"
        f"  KERNEL {kernel}\n"
        f"  INITRD {initrd}\n"
    )


@dataclass
class Request:
    preboot_store: str
    package_store: str
    config: str
    base: str
    drivers: list[str]
    keep_versions: int = 3
    sbs_dir: str | None = None
    wake_command: str | None = None


class Progress:
    """Maps bytes done in a phase onto a percent range."""

    def __init__(self, report: Report, low: float, high: float, total: int, message: str):
        self.report, self.low, self.high = report, low, high
        self.total = max(total, 1)
        self.done = 0
        self.message = message

    def add(self, n: int) -> None:
        self.done += n
        pct = self.low + (self.high - self.low) * min(self.done, self.total) / self.total
        self.report(pct, self.message, bytes_done=self.done, bytes_total=self.total)


@dataclass
class Checked:
    files: list[DriverFile]
    base_info: InitrdInfo
    base_tree: BaseTree
    kernel: str
    initrd: str
    replaces: list[str]


def check(req: Request, report: Report, cancelled: Callable[[], bool]) -> Checked:
    """Everything that can fail before anything is built; raise BootWizError."""
    store = req.preboot_store
    if not os.path.isdir(store):
        raise BootWizError(f"preboot_store {store} is not a folder")
    if not os.path.isdir(req.package_store):
        raise BootWizError(f"package_store {req.package_store} is not a folder")
    if req.config == req.base:
        raise BootWizError(f"config and base are both {req.base!r}; a configuration cannot be "
                           "built into its own base folder")
    base_dir = os.path.join(store, req.base)
    kernel = os.path.join(base_dir, "vmlinuz")
    initrd = os.path.join(base_dir, "initrd.img")
    if not os.path.isdir(base_dir):
        raise BootWizError(f"base {req.base!r}: folder {base_dir} is missing")
    for path in (kernel, initrd):
        if not os.path.isfile(path):
            raise BootWizError(f"base {req.base!r}: {path} is missing or not a regular file")
    if os.path.getsize(kernel) == 0:
        raise BootWizError(f"base {req.base!r}: {kernel} is empty")
    if req.sbs_dir and not os.path.isdir(req.sbs_dir):
        raise BootWizError(f"sbs_dir {req.sbs_dir} is not a folder; the PXE server could not "
                           "be told about the rebuilt configuration")
    config_dir = os.path.join(store, req.config)
    if os.path.islink(config_dir):
        raise BootWizError(f"{config_dir} is a symlink; refusing to build through it (a "
                           "configuration folder must be a real folder in the preboot store)")
    if os.path.lexists(config_dir) and not os.path.isdir(config_dir):
        raise BootWizError(f"{config_dir} exists and is not a folder")
    read_current(config_dir)  # refuses a 'current' that is not a symlink

    # progress: the bytes to hash (package folders' files, roughly) and the base initrd
    total = sum(_tree_size(os.path.join(req.package_store, pid)) for pid in req.drivers)
    total += os.path.getsize(initrd)
    progress = Progress(report, 1, 40, total, "checking driver packages and base")
    report(1, f"checking {len(req.drivers)} driver package(s) and base {req.base!r}")
    checker = PackageChecker(req.package_store, cancelled, progress.add)
    files: list[DriverFile] = []
    for pid in req.drivers:
        files += checker.check(pid)
    if checker.problems:
        first = checker.problems[0]["message"]
        more = len(checker.problems) - 1
        raise BootWizError(first + (f" (and {more} more problem(s))" if more else ""),
                           {"problems": checker.problems})
    progress.message = "checking base initrd"
    try:
        info = scan_initrd(initrd, on_bytes=_delta(progress.add), cancelled=cancelled)
    except CpioError as exc:
        if str(exc) == "cancelled":
            raise Cancelled("cancelled while checking the base initrd") from None
        raise BootWizError(f"base {req.base!r}: initrd.img is not a valid newc cpio archive "
                           f"(plain or gzip): {exc}") from None
    except OSError as exc:
        raise BootWizError(_oserror(exc, f"base {req.base!r}: cannot read {initrd}")) from None
    tree = BaseTree(info.entries)
    replaces, problems = [], []
    for item in files:
        try:
            item.initrd_path, replaced = tree.place(item.path)
        except BootWizError as exc:
            problems.append(f"driver package '{item.package}': {exc} (base {req.base!r})")
            continue
        if replaced:
            replaces.append(item.initrd_path)
    files, conflicts = merge_files(files)
    problems += conflicts
    if problems:
        raise BootWizError(problems[0], {"problems": [{"message": p} for p in problems]})
    return Checked(files, info, tree, kernel, initrd, sorted(set(replaces)))


def _tree_size(folder: str) -> int:
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


def _delta(add: Callable[[int], None]) -> Callable[[int], None]:
    last = [0]

    def on_total(total: int) -> None:
        add(total - last[0])
        last[0] = total

    return on_total


def build_version(req: Request, folder: str, version: str, checked: Checked, moment: datetime,
                  report: Report, cancelled: Callable[[], bool]) -> dict[str, Any]:
    """Write every file of a version into ``folder`` (an empty temp folder)."""
    files, base_info = checked.files, checked.base_info
    kernel_src, initrd_src = checked.kernel, checked.initrd
    total = os.path.getsize(kernel_src) + base_info.size + sum(f.size for f in files)
    progress = Progress(report, 40, 95, total, "building")
    prefix = f"{req.config}/{version}"
    kernel_sha, kernel_size = _copy(kernel_src, os.path.join(folder, "vmlinuz"), cancelled,
                                    progress.add)
    initrd_path = os.path.join(folder, "initrd.img")
    fd = os.open(initrd_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        out = Output(fd)
        base_digest = hashlib.sha256()
        with open(initrd_src, "rb") as fh:
            for chunk in _chunks(fh, cancelled, progress.add, base_digest):
                out.write(chunk)
        if base_digest.hexdigest() != base_info.sha256 or out.offset != base_info.size:
            raise BootWizError(f"base {req.base!r}: {initrd_src} changed while the "
                               "configuration was built; try again")
        drivers_offset = None
        drivers_size = 0
        if files:
            out.align(4)
            drivers_offset = out.offset
            writer = NewcWriter(out)
            mtime = int(moment.timestamp())
            for directory in parent_dirs([f.initrd_path for f in files]):
                writer.add_directory(directory, mtime, checked.base_tree.dir_mode(directory))
            for item in files:
                with open(item.source, "rb", opener=_nofollow) as fh:
                    digest = hashlib.sha256()
                    try:
                        writer.add_file(item.initrd_path, item.size, min(item.mtime, mtime), item.mode,
                                        _chunks(fh, cancelled, progress.add, digest))
                    except CpioError as exc:
                        raise BootWizError(f"driver package '{item.package}': {exc} "
                                           "(replication still running?)") from None
                if digest.hexdigest() != item.sha256:
                    raise BootWizError(f"driver package '{item.package}': {item.path} changed "
                                       "while the configuration was built (replication still "
                                       "running?)")
            writer.close()
            drivers_size = out.offset - drivers_offset
        out.flush()
        os.fsync(fd)
    finally:
        os.close(fd)
    initrd_sha = out.sha256.hexdigest()
    kernel_rel, initrd_rel = f"{prefix}/vmlinuz", f"{prefix}/initrd.img"
    _write_file(os.path.join(folder, "boot.ipxe"),
                boot_ipxe(req.config, version, kernel_rel, initrd_rel).encode())
    os.mkdir(os.path.join(folder, "pxelinux.cfg"), 0o755)
    _write_file(os.path.join(folder, "pxelinux.cfg", "default"),
                pxelinux_default(req.config, version, kernel_rel, initrd_rel).encode())
    fsync_dir(os.path.join(folder, "pxelinux.cfg"))
    by_package: dict[str, list[dict[str, Any]]] = {pid: [] for pid in req.drivers}
    for item in files:
        entry = {"path": item.path, "sha256": item.sha256, "size": item.size,
                 "mode": f"{item.mode:o}"}
        if item.initrd_path != item.path:
            entry["initrd_path"] = item.initrd_path
        by_package[item.package].append(entry)
    manifest = {
        "format": "dsagent-bootwiz/1",
        "config": req.config,
        "version": version,
        "built_at": _rfc3339(moment),
        "base": {"name": req.base, "vmlinuz_sha256": kernel_sha, "vmlinuz_size": kernel_size,
                 "initrd_sha256": base_info.sha256, "initrd_size": base_info.size,
                 "initrd_format": base_info.format, "initrd_entries": len(base_info.entries)},
        "drivers": [{"id": pid, "files": by_package[pid]} for pid in req.drivers],
        "replaces_base_files": checked.replaces,
        "drivers_offset": drivers_offset,
        "drivers_size": drivers_size,
        "kernel": kernel_rel,
        "initrd": initrd_rel,
        "initrd_sha256": initrd_sha,
        "initrd_size": out.offset,
    }
    _write_file(os.path.join(folder, "manifest.json"),
                (json.dumps(manifest, indent=2) + "\n").encode())
    fsync_dir(folder)
    return manifest


def _nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)


def _remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def rebuild(req: Request, report: Report, cancelled: Callable[[], bool] = lambda: False,
            now: Callable[[], datetime] = _now, task_id: str = "") -> dict[str, Any]:
    """Check, build, switch ``current``, prune, tell the PXE server; return details."""
    check_name(req.config, "config")
    check_name(req.base, "base")
    for pid in req.drivers:
        check_name(pid, "driver package id")
    if req.keep_versions < 1:
        raise BootWizError(f"[handlers] preboot_keep_versions must be at least 1, "
                           f"not {req.keep_versions}")
    try:
        checked = check(req, report, cancelled)
    except OSError as exc:
        raise BootWizError(_oserror(exc, f"checking {req.config} failed")) from None
    files = checked.files
    report(40, f"checked {len(files)} driver file(s) and the base initrd; building")

    config_dir = os.path.join(req.preboot_store, req.config)
    created = False
    try:
        os.mkdir(config_dir, 0o755)
        created = True
    except FileExistsError:
        pass
    except OSError as exc:
        raise BootWizError(_oserror(exc, f"cannot create {config_dir}")) from None
    switched = False
    try:
        with ConfigLock(config_dir, cancelled, report):
            _sweep(config_dir)
            previous = read_current(config_dir)
            moment = now()
            version = new_version(list_versions(config_dir), moment)
            tmp = os.path.join(config_dir, f"{BUILDING}{secrets.token_hex(6)}")
            final = os.path.join(config_dir, version)
            try:
                os.mkdir(tmp, 0o755)
                manifest = build_version(req, tmp, version, checked, moment, report, cancelled)
                os.rename(tmp, final)
            except BaseException:
                _remove_tree(tmp)
                raise
            try:
                fsync_dir(config_dir)
                report(96, f"switching {req.config}/current to {version}")
                switch_current(config_dir, version)
                switched = True
            except BaseException:
                try:
                    remove_version(config_dir, version)
                except OSError:
                    _remove_tree(final)
                raise
            kept, removed, warnings = prune(config_dir, req.keep_versions, version)
    except BootWizError:
        _forget_new_config(config_dir, created and not switched)
        raise
    except OSError as exc:
        _forget_new_config(config_dir, created and not switched)
        raise BootWizError(_oserror(exc, f"building {req.config} failed"),
                           {"current": safe_current(config_dir)}) from None
    except BaseException:
        _forget_new_config(config_dir, created and not switched)
        raise

    report(98, "telling the PXE server")
    pxe = pxe_update(req, version, previous, manifest, task_id)
    details: dict[str, Any] = {
        "config": req.config,
        "version": version,
        "previous": previous,
        "base": req.base,
        "initrd_sha256": manifest["initrd_sha256"],
        "initrd_size": manifest["initrd_size"],
        "drivers_offset": manifest["drivers_offset"],
        "drivers": req.drivers,
        "files": len(files),
        "replaces_base_files": checked.replaces,
        "kept_versions": kept,
        "removed_versions": removed,
        "pxe_update": pxe,
        "built_at": manifest["built_at"],
    }
    warnings += [pxe["warning"]] if pxe.get("warning") else []
    if warnings:
        details["warnings"] = warnings
    return details


def safe_current(config_dir: str) -> str | None:
    try:
        return read_current(config_dir)
    except (OSError, BootWizError):
        return None


def _forget_new_config(config_dir: str, created: bool) -> None:
    """A first build that failed leaves no empty configuration folder behind."""
    if not created:
        return
    try:
        _sweep(config_dir)
        os.unlink(os.path.join(config_dir, LOCK_NAME))
        os.rmdir(config_dir)
    except OSError:
        pass


# ---------------------------------------------------------------------------
# telling the PXE server (an SBS "update" file)
# ---------------------------------------------------------------------------
def sbs_payload(req: Request, version: str, previous: str | None, manifest: dict) -> bytes:
    attrs = {
        "name": req.config, "version": version, "previous": previous or "",
        "base": req.base, "kernel": manifest["kernel"], "initrd": manifest["initrd"],
        "ipxe": f"{req.config}/{version}/boot.ipxe",
        "pxelinux": f"{req.config}/{version}/pxelinux.cfg/default",
        "current": f"{req.config}/current",
        "initrd_sha256": manifest["initrd_sha256"], "built_at": manifest["built_at"],
    }
    body = " ".join(f"{key}={quoteattr(value)}" for key, value in attrs.items())
    return f'<?xml version="1.0" encoding="utf-8"?>\n<PrebootConfig {body}/>\n'.encode()


def write_update_sbs(sbs_dir: str, payload: bytes) -> str:
    """Write ``<uuid>.sbs`` atomically and exclusively; return its path."""
    for _ in range(8):
        name = f"{uuid.uuid4()}.sbs"
        final = os.path.join(sbs_dir, name)
        tmp = os.path.join(sbs_dir, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            _write_file(tmp, payload)
            try:
                os.link(tmp, final)
            except FileExistsError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                    raise
                if os.path.lexists(final):
                    continue
                os.rename(tmp, final)  # no hard links here: rename (not exclusive)
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        fsync_dir(sbs_dir)
        return final
    raise FileExistsError(errno.EEXIST, "no free update file name", sbs_dir)


def pxe_update(req: Request, version: str, previous: str | None, manifest: dict,
               task_id: str = "") -> dict[str, Any]:
    """Write the ``update`` SBS file (and run sbs_wake_command); never raises.

    Uses UpdateSBSInfo's writer (handlers.sbs) so both follow the same rules;
    falls back to :func:`write_update_sbs` if that module is not installed.
    """
    if not req.sbs_dir:
        return {"written": False,
                "reason": "[handlers] sbs_dir is not configured; no SBS update file written"}
    payload = sbs_payload(req, version, previous, manifest)
    result: dict[str, Any] = {"written": False, "kind": "update"}
    warnings: list[str] = []
    try:
        from handlers import sbs
    except ImportError:
        sbs = None
    try:
        if sbs is not None:
            written = sbs.write_sbs_file(req.sbs_dir, "update", payload)
            path = written.path
            if written.warning:
                warnings.append(written.warning)
        else:
            path = write_update_sbs(req.sbs_dir, payload)
    except Exception as exc:  # noqa: BLE001 - the build is done; this is only a warning
        reason = (_oserror(exc, "could not write the SBS update file into " + req.sbs_dir)
                  if isinstance(exc, OSError) else str(exc))
        result["reason"] = reason
        result["warning"] = (f"{reason}; the PXE server was not told about version {version} "
                             f"(it is current in the preboot store)")
        return result
    result.update(written=True, file=path, content=payload.decode())
    if req.wake_command:
        if sbs is not None:
            problem = sbs.wake_interface(req.wake_command, path, task_id)
        else:
            problem = _wake(req.wake_command, path)
        result["woken"] = not problem
        if problem:
            warnings.append(problem)
    if warnings:
        result["warning"] = "; ".join(warnings)
    return result


def _wake(command: str, path: str) -> str:
    """sbs_wake_command with the file's path appended; "" or a warning."""
    try:
        argv = shlex.split(command) + [path]
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=WAKE_TIMEOUT_S)
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        return f"sbs_wake_command could not run: {exc}"
    if done.returncode:
        tail = done.stderr.decode(errors="replace").strip()[-300:]
        return f"sbs_wake_command exited with code {done.returncode}" + (f": {tail}" if tail else "")
    return ""
