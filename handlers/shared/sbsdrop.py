"""The SBS folder drop: how a file reaches the PXE Interface service.

UpdateSBSInfo (handlers/sbs.py) and BootWizRebuild both write through here,
so every file in the SBS folder follows the same rules. See docs/sbs.md.

**Names.** No parameter ever goes into a path: names are made here from
random digits or a random UUID (or are one of the two fixed names), so
nothing can escape the SBS folder.

**Atomicity.** The content is written to a hidden temporary file in the same
folder (``.dsagent.<pid>.<hex>.tmp``, never ending in ``.sbs``) and fsync'ed;
the final name is then created *exclusively* with ``link(2)`` (never over an
existing file; ``renameat2(RENAME_NOREPLACE)`` where the file system has no
hard links), the temporary name is removed and the folder fsync'ed. A reader
listing the folder sees either no file or the complete file. A random name
that is taken is replaced by a new random name. A fixed name that is taken
(a file of that name still waiting for the Interface) is waited for, up to
``FIXED_NAME_WAIT_S``; if it is still there the write fails and says so --
the waiting file is never overwritten. Every error removes the temporary
file.

**The wake command** (``[handlers] sbs_wake_command``) is run with no shell,
``shlex`` split, the written file's path appended, within ``WAKE_TIMEOUT_S``;
its failure comes back as a warning, not an error: the file is there.

**The folder's state.** ``.sbs`` files that have waited in the folder for
over ``STALE_AFTER_S`` mean the PXE services are stopped (the seed: files
left in the SBS folder). Scanning also removes temporary files orphaned by
dead workers.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import hashlib
import math
import os
import re
import shlex
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

FIXED_NAMES = {"initial-config": "initialPXEConfigPath.sbs",
               "predefined": "PredefinedComputers.sbs"}
RANDOM_SUFFIXES = {"clients": "-client.sbs", "images": "-image.sbs"}
KINDS = ("initial-config", "clients", "images", "predefined", "update")

FIXED_NAME_WAIT_S = 10.0    # how long a fixed name already waiting is waited for
RANDOM_NAME_TRIES = 50      # new random names tried on collisions
WAKE_TIMEOUT_S = 10.0       # the wake command's time limit
STALE_AFTER_S = 60.0        # an .sbs file waiting longer means the PXE services are stopped
SCAN_BUDGET = 50            # rescan the folder after at least 50x the last scan's cost ...
SCAN_MAX_AGE_S = 1.0        # ... and at most this old (only a big folder makes scans costly)
ORPHAN_TMP_AGE_S = 600.0    # a temporary file of a dead worker older than this is removed
POLL_FIRST_S, POLL_MAX_S = 0.005, 0.1

TMP_PREFIX = ".dsagent."
TMP_RE = re.compile(r"\.dsagent\.(\d+)\.[0-9a-f]{16}\.tmp")
NO_HARDLINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}

_O_TMP = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class SBSError(Exception):
    """Writing the SBS file failed; the message names the cause."""


@dataclass
class Written:
    name: str
    path: str
    size: int
    sha256: str
    ino: int
    warning: str = ""


# ---- names -------------------------------------------------------------------

def make_name(kind: str) -> str:
    """A final file name for ``kind`` (new random digits / UUID each call)."""
    if kind in FIXED_NAMES:
        return FIXED_NAMES[kind]
    if kind in RANDOM_SUFFIXES:
        # 10 random digits, the first not 0, so the name is a 10-digit number
        digits = 10**9 + int.from_bytes(os.urandom(8), "big") % (9 * 10**9)
        return f"{digits}{RANDOM_SUFFIXES[kind]}"
    if kind == "update":
        return f"{uuid.uuid4()}.sbs"
    raise SBSError(f"unknown kind {kind!r}")


def encode_payload(payload: str | bytes) -> bytes:
    if isinstance(payload, bytes):
        return payload
    try:
        return payload.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SBSError(f"parameter 'payload' cannot be written as UTF-8: {exc.reason} "
                       f"(character {exc.object[exc.start]!r} at position {exc.start})") from None


# ---- errors ------------------------------------------------------------------

def _describe(exc: OSError, sbs_dir: str, what: str) -> str:
    code = exc.errno
    if code == errno.ENOENT:
        return f"SBS folder {sbs_dir} does not exist"
    if code == errno.ENOTDIR:
        return f"SBS folder {sbs_dir} is not a folder"
    if code in (errno.EACCES, errno.EPERM):
        return f"cannot write in the SBS folder {sbs_dir}: permission denied"
    if code == errno.EROFS:
        return f"cannot write in the SBS folder {sbs_dir}: read-only file system"
    if code == errno.ENOSPC:
        return f"no space left on the device of the SBS folder {sbs_dir} while {what}"
    if code == errno.EDQUOT:
        return f"disk quota exceeded in the SBS folder {sbs_dir} while {what}"
    name = errno.errorcode.get(code, str(code)) if code else "error"
    return f"{what} in the SBS folder {sbs_dir} failed: {exc.strerror or exc} ({name})"


# ---- exclusive creation --------------------------------------------------------

_renameat2: Callable | None = None


def _rename_noreplace(src: str, dst: str) -> None:
    """renameat2(RENAME_NOREPLACE): for file systems without hard links."""
    global _renameat2
    unsupported = SBSError(f"the file system of the SBS folder {os.path.dirname(dst)} supports "
                           "neither hard links nor RENAME_NOREPLACE: cannot create "
                           f"{os.path.basename(dst)} without risking writing over another file")
    if _renameat2 is None:
        libc = ctypes.CDLL(None, use_errno=True)
        func = getattr(libc, "renameat2", None)
        if func is None:
            raise unsupported
        func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                         ctypes.c_uint]
        _renameat2 = func
    at_fdcwd, rename_noreplace = -100, 1
    if _renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace):
        code = ctypes.get_errno()
        if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise unsupported
        raise OSError(code, os.strerror(code), dst)


def wait_gone(path: str, ino: int | None, timeout: float, stop: threading.Event) -> bool:
    """Poll (5 ms growing to 100 ms) until ``path`` is gone (or, with ``ino``,
    no longer that inode); False if ``timeout`` passes or ``stop`` is set."""
    deadline = time.monotonic() + timeout
    delay = POLL_FIRST_S
    while True:
        try:
            if ino is not None and os.stat(path).st_ino != ino:
                return True
            if ino is None:
                os.stat(path)
        except FileNotFoundError:
            return True
        left = deadline - time.monotonic()
        if left <= 0 or stop.is_set():
            return False
        if stop.wait(min(delay, left)):
            return False
        delay = min(delay * 1.5, POLL_MAX_S)


def _waiting_since(path: str) -> str:
    try:
        age = time.time() - os.stat(path).st_mtime
    except OSError:
        return ""
    return f", waiting for {age:.0f} s"


def write_sbs_file(sbs_dir: str, kind: str, payload: str | bytes, *,
                   stop: threading.Event | None = None,
                   fixed_wait_s: float | None = None,
                   on_fixed_taken: Callable[[str], None] | None = None) -> Written:
    """Write ``payload`` into ``sbs_dir`` as a new ``kind`` file, atomically
    and exclusively (see the module docstring); raise SBSError on failure.

    A fixed name already taken is waited for up to ``fixed_wait_s``
    (default ``FIXED_NAME_WAIT_S``) or until ``stop`` is set.

    ``on_fixed_taken(path)`` is called once when a fixed name is found taken,
    before waiting for it (UpdateSBSInfo wakes the Interface there).
    """
    if kind not in KINDS:
        raise SBSError(f"unknown kind {kind!r} (one of {', '.join(KINDS)})")
    data = encode_payload(payload)
    fixed_wait_s = FIXED_NAME_WAIT_S if fixed_wait_s is None else fixed_wait_s
    stop = stop or threading.Event()
    tmp = os.path.join(sbs_dir, f"{TMP_PREFIX}{os.getpid()}.{os.urandom(8).hex()}.tmp")
    stage = "creating a temporary file"
    tmp_exists = False
    try:
        fd = os.open(tmp, _O_TMP, 0o644)
        tmp_exists = True
        try:
            stage = f"writing {len(data)} bytes"
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            stage = "flushing the file to disk (fsync)"
            os.fsync(fd)
            ino = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        stage = "creating the final name"
        path, name, tmp_exists = _link_exclusively(tmp, sbs_dir, kind, stop, fixed_wait_s,
                                                   on_fixed_taken)
    except OSError as exc:
        raise SBSError(_describe(exc, sbs_dir, stage)) from None
    finally:
        if tmp_exists:
            try:
                os.unlink(tmp)
                tmp_exists = False
            except OSError:
                pass
    # From here on the file is complete and visible: nothing fails the task any more.
    warning = ""
    if tmp_exists:
        warning = (f"the temporary file {os.path.basename(tmp)} could not be removed from the "
                   "SBS folder (a later task removes it); ")
    try:  # a failure here only weakens durability
        dfd = os.open(sbs_dir, _O_DIR)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        warning += (f"the SBS folder could not be flushed to disk ({exc.strerror}); "
                    f"{name} may not survive a power loss")
    return Written(name, path, len(data), hashlib.sha256(data).hexdigest(), ino,
                   warning.rstrip("; "))


def _link_exclusively(tmp: str, sbs_dir: str, kind: str, stop: threading.Event,
                      fixed_wait_s: float, on_fixed_taken) -> tuple[str, str, bool]:
    """Give the temporary file its final name; (path, name, tmp_still_there)."""
    deadline = time.monotonic() + fixed_wait_s
    woke = False
    tries = 0
    while True:
        name = make_name(kind)
        path = os.path.join(sbs_dir, name)
        try:
            try:
                os.link(tmp, path, follow_symlinks=False)
                return path, name, True
            except OSError as exc:
                if exc.errno not in NO_HARDLINKS:
                    raise
            _rename_noreplace(tmp, path)
            return path, name, False
        except FileExistsError:
            pass
        if kind not in FIXED_NAMES:
            tries += 1
            if tries >= RANDOM_NAME_TRIES:
                raise SBSError(f"no free name for a new {kind} file in the SBS folder "
                               f"{sbs_dir} after {tries} tries")
            continue  # a new random name
        # a fixed name still waiting for the Interface: wait for it, never replace it
        if on_fixed_taken and not woke:
            woke = True
            on_fixed_taken(path)
        left = deadline - time.monotonic()
        if left <= 0 or not wait_gone(path, None, left, stop):
            raise SBSError(
                f"{name} is already waiting in the SBS folder {sbs_dir}{_waiting_since(path)}, "
                f"and the PXE Interface did not take it within {fixed_wait_s:g} s: the PXE "
                f"services look stopped. The waiting file is left as it is (never overwritten); "
                f"start the PXE services, then run this task again")


# ---- the folder's state ----------------------------------------------------------

@dataclass
class _Scan:
    at: float = -math.inf       # monotonic time of the scan
    cost: float = 0.0
    mtimes: dict | None = None  # .sbs name -> mtime (files never change in the folder)
    ordered: list | None = None  # the mtimes, sorted


_scans: dict[str, _Scan] = {}


def waiting_files(sbs_dir: str, exclude: str, fresh: bool = False) -> tuple[int, int]:
    """(.sbs files waiting in the folder, those waiting over STALE_AFTER_S),
    ``exclude`` not counted.

    A scan costs ~1 µs per entry (10 ms for 10,000 files), so the result of
    the last scan is reused while it is younger than 50x its cost (and 1 s):
    a small folder is always scanned afresh, a huge one at most a few times a
    second per worker; a reused scan costs O(log n). Orphaned temporary files
    of dead workers are removed.
    """
    scan = _scans.setdefault(sbs_dir, _Scan())
    now = time.monotonic()
    if fresh or now - scan.at > min(SCAN_MAX_AGE_S, SCAN_BUDGET * scan.cost):
        old = scan.mtimes or {}
        mtimes = {}
        try:
            names = os.listdir(sbs_dir)
        except OSError:
            names = []
        for entry in names:
            if entry[-4:].lower() == ".sbs":
                mtime = old.get(entry)
                if mtime is None:
                    try:
                        mtime = os.stat(os.path.join(sbs_dir, entry)).st_mtime
                    except OSError:
                        continue
                mtimes[entry] = mtime
            elif entry.startswith(TMP_PREFIX):
                _remove_orphan(sbs_dir, entry)
        scan.mtimes, scan.ordered = mtimes, sorted(mtimes.values())
        scan.at = time.monotonic()
        scan.cost = scan.at - now
    stale_before = time.time() - STALE_AFTER_S
    mine = scan.mtimes.get(exclude)
    waiting = len(scan.ordered) - (mine is not None)
    stale = bisect.bisect_left(scan.ordered, stale_before)
    stale -= mine is not None and mine < stale_before
    return waiting, stale


def waiting_mtimes(sbs_dir: str) -> dict[str, float]:
    """Each .sbs file waiting in the folder and its mtime, from a fresh scan
    (``dsagent doctor`` names the files that pile up)."""
    waiting_files(sbs_dir, "", fresh=True)
    return dict(_scans[sbs_dir].mtimes)


def _remove_orphan(sbs_dir: str, entry: str) -> None:
    match = TMP_RE.fullmatch(entry)
    if not match or int(match.group(1)) == os.getpid():
        return
    try:
        os.kill(int(match.group(1)), 0)
        return  # its writer is alive
    except ProcessLookupError:
        pass
    except OSError:
        return
    path = os.path.join(sbs_dir, entry)
    try:
        if time.time() - os.stat(path).st_mtime > ORPHAN_TMP_AGE_S:
            os.unlink(path)
    except OSError:
        pass


# ---- the wake command -----------------------------------------------------------

_split_cache: dict[str, list[str]] = {}
_wake_procs: dict[str, subprocess.Popen] = {}


def wake_interface(command: str, path: str, task_id: str = "",
                   timeout: float | None = None) -> str:
    """Run ``command`` with ``path`` appended (``WAKE_TIMEOUT_S`` unless
    ``timeout``); return "" or a warning."""
    timeout = WAKE_TIMEOUT_S if timeout is None else timeout
    argv = _split_cache.get(command)
    if argv is None:
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            return f"sbs_wake_command cannot be parsed ({exc}); the PXE Interface was not woken"
        if not argv:
            return "sbs_wake_command is empty; the PXE Interface was not woken"
        _split_cache[command] = argv
    env = dict(os.environ, DSAGENT_TASK_ID=task_id) if task_id else None
    try:
        proc = subprocess.Popen([*argv, path], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True, env=env)
    except OSError as exc:
        return (f"wake command {argv[0]} could not be started ({exc.strerror}); "
                "the PXE Interface was not woken")
    _wake_procs[task_id] = proc
    try:
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return f"wake command {argv[0]} did not finish within {timeout:g} s and was killed"
    finally:
        _wake_procs.pop(task_id, None)
    if proc.returncode != 0:
        how = (f"was killed by signal {-proc.returncode}" if proc.returncode < 0
               else f"exited with code {proc.returncode}")
        tail = err.decode("utf-8", "replace").strip()[-300:]
        return f"wake command {argv[0]} {how}" + (f": {tail}" if tail else "")
    return ""


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 9)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.communicate(timeout=5)
    except (subprocess.TimeoutExpired, ValueError, OSError):
        pass


def stop_wake(task_id: str) -> None:
    """Kill the wake command running for ``task_id``, if any (a cancelled task)."""
    proc = _wake_procs.get(task_id)
    if proc is not None and proc.poll() is None:
        _kill_group(proc)
