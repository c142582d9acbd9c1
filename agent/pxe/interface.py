"""The seed's PXE Interface: one scan of the SBS folder.

Every ``*.sbs`` file (hidden names are UpdateSBSInfo's temporary files, never
read) is parsed; the good ones are applied to the state in one transaction,
whole lists first, then updates by mtime (PROTOCOL.md §7), and only after
that commit is each moved to the sibling folder ``SBSStore/``: a file that
left the SBS folder has been applied, which is what UpdateSBSInfo's
``confirm_s`` reports. A file that does not parse goes to
``SBSStore/rejected/`` with ``<name>.reason`` beside it; the others apply.
A name already taken in SBSStore gets a suffix (``-1``, ``-2``, ...): nothing
is ever overwritten.

Nothing is lost on errors: a file that cannot be read, or a scan whose state
cannot be committed or whose files cannot be moved, leaves the files where
they are for the next scan (applying a file again changes nothing more), and
raises InterfaceError naming the folder and the cause.

SBSStore is pruned (the seed: "there is no schedule to delete these") of
files older than ``STORE_MAX_AGE_S``, then of the oldest until it holds at
most ``STORE_MAX_BYTES``, at most every ``PRUNE_EVERY_S``.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.common.errors import DsagentError
from agent.pxe.sbsdoc import WHOLE, SBSParseError, kind_of, parse_sbs
from agent.pxe.state import PXEState

log = logging.getLogger("dsagent.pxe")

STORE = "SBSStore"
REJECTED = "rejected"
STORE_MAX_AGE_S = 30 * 24 * 3600          # a month of applied files, for support
STORE_MAX_BYTES = 512 * 1024 * 1024       # and never more than this
PRUNE_EVERY_S = 600.0
MAX_SUFFIX = 10_000


class InterfaceError(DsagentError):
    """A scan could not finish; its files wait in the SBS folder for the next one."""


@dataclass
class ScanResult:
    applied: list[tuple[str, str]] = field(default_factory=list)    # (file, what changed)
    rejected: list[tuple[str, str]] = field(default_factory=list)   # (file, reason)
    waiting: list[tuple[str, str]] = field(default_factory=list)    # (file, why not read)


def _describe(exc: OSError, what: str) -> str:
    names = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
             errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on the device",
             errno.EDQUOT: "disk quota exceeded", errno.ENOTDIR: "not a folder",
             errno.ENOENT: "does not exist"}
    return f"{what}: {names.get(exc.errno, exc.strerror or str(exc))}"


def store_dir(sbs_dir: str | Path) -> Path:
    """The sibling folder ``SBSStore/`` of the SBS folder."""
    return Path(sbs_dir).resolve().parent / STORE


def waiting_files(sbs_dir: Path) -> list[tuple[str, int]]:
    """(name, mtime_ns) of each .sbs file in the folder; InterfaceError if unreadable."""
    found = []
    try:
        with os.scandir(sbs_dir) as entries:
            for entry in entries:
                # any case, as UpdateSBSInfo counts them: a bad name is set aside, not left
                if entry.name.startswith(".") or entry.name[-4:].lower() != ".sbs":
                    continue
                try:
                    if entry.is_file(follow_symlinks=False):
                        found.append((entry.name, entry.stat(follow_symlinks=False).st_mtime_ns))
                except OSError:
                    continue  # gone since the listing
    except OSError as exc:
        raise InterfaceError(_describe(exc, f"cannot list the SBS folder {sbs_dir}")) from None
    return found


def _order(kind: str | None, mtime_ns: int, name: str) -> tuple:
    return (0 if kind in WHOLE else 1, mtime_ns, name)


def scan(sbs_dir: str | Path, state: PXEState) -> ScanResult:
    """Apply every file waiting in ``sbs_dir`` (see the module docstring)."""
    sbs_dir = Path(sbs_dir)
    result = ScanResult()
    files = sorted(waiting_files(sbs_dir), key=lambda f: _order(kind_of(f[0]), f[1], f[0]))
    if not files:
        return result
    store = store_dir(sbs_dir)
    _ensure_folder(store)
    good, bad = [], []
    for name, _ in files:
        try:
            data = (sbs_dir / name).read_bytes()
        except OSError as exc:
            result.waiting.append((name, _describe(exc, "cannot read it")))
            continue
        try:
            good.append((name, parse_sbs(name, data)))
        except SBSParseError as exc:
            bad.append((name, str(exc)))
    try:
        changes = state.apply_all(good)
    except (sqlite3.Error, OSError) as exc:  # the state stays as it was
        raise InterfaceError(f"cannot apply {len(good)} SBS file(s) from {sbs_dir} to the PXE "
                             f"state {state.path}: {exc}; they stay in the SBS folder") from None
    moved_error = None
    for (name, _), change in zip(good, changes):
        try:
            _move(sbs_dir / name, store)
        except OSError as exc:
            moved_error = moved_error or _describe(exc, f"cannot move {name} to {store}")
            result.waiting.append((name, "applied, but " + moved_error))
            continue
        result.applied.append((name, change))
    if bad:
        rejected = store / REJECTED
        try:
            _ensure_folder(rejected)
        except InterfaceError as exc:
            moved_error = moved_error or str(exc)
            result.waiting.extend(bad)
            bad = []
        for name, reason in bad:
            try:
                final = _move(sbs_dir / name, rejected)
            except OSError as exc:
                moved_error = moved_error or _describe(exc, f"cannot set {name} aside in "
                                                             f"{rejected}")
                result.waiting.append((name, reason))
                continue
            result.rejected.append((name, reason))   # set aside: the log keeps the reason
            try:
                _write_reason(rejected / f"{final}.reason", reason)
            except OSError as exc:
                moved_error = moved_error or _describe(exc, f"cannot write {final}.reason "
                                                             f"in {rejected}")
    _fsync_dirs(sbs_dir, store)
    if moved_error:
        raise _Partial(moved_error, result)
    return result


class _Partial(InterfaceError):
    """Some files were handled, others wait; ``result`` says which."""

    def __init__(self, message: str, result: ScanResult):
        super().__init__(f"{message}; {len(result.waiting)} file(s) stay in the SBS folder "
                         "for the next scan")
        self.result = result


def _ensure_folder(path: Path) -> None:
    try:
        path.mkdir(mode=0o755, parents=True, exist_ok=True)
        if not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(path))
    except FileExistsError:
        raise InterfaceError(f"cannot use {path}: it exists and is not a folder; the SBS files "
                             "stay in the SBS folder") from None
    except OSError as exc:
        raise InterfaceError(_describe(exc, f"cannot create {path}") +
                             "; the SBS files stay in the SBS folder") from None


def _move(src: Path, folder: Path) -> str:
    """Move ``src`` into ``folder`` under its name, or a free suffixed one; the final name."""
    stem, suffix = os.path.splitext(src.name)
    for n in range(MAX_SUFFIX):
        name = src.name if n == 0 else f"{stem}-{n}{suffix}"
        target = folder / name
        try:
            os.link(src, target, follow_symlinks=False)
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV):
                raise
            if os.path.lexists(target):  # no hard links: we are SBSStore's only writer
                continue
            os.rename(src, target)
            return name
        os.unlink(src)
        return name
    raise OSError(errno.EEXIST, f"no free name for {src.name}", str(folder))


def _write_reason(path: Path, reason: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(reason + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _fsync_dirs(*folders: Path) -> None:
    for folder in folders:
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def prune(store: Path, max_age_s: float = STORE_MAX_AGE_S,
          max_bytes: int = STORE_MAX_BYTES) -> int:
    """Delete SBSStore files (rejected ones and their reasons included) older
    than ``max_age_s``, then the oldest until the rest fit in ``max_bytes``;
    return how many were deleted."""
    files = []
    for folder in (store, store / REJECTED):
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    try:
                        if entry.is_file(follow_symlinks=False):
                            st = entry.stat(follow_symlinks=False)
                            files.append((st.st_mtime, st.st_size, entry.path))
                    except OSError:
                        continue
        except OSError:
            continue
    files.sort()
    total = sum(size for _, size, _ in files)
    cutoff = time.time() - max_age_s
    deleted = 0
    for mtime, size, path in files:
        if mtime >= cutoff and total <= max_bytes:
            break
        try:
            os.unlink(path)
        except OSError:
            continue
        total -= size
        deleted += 1
    return deleted

