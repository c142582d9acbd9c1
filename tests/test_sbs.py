"""UpdateSBSInfo (handlers/sbs.py and its drop, handlers/shared/sbsdrop.py):
names, bytes, atomicity, collisions, confirmation, warnings, wake command,
failures -- on real files in tmp folders, plus the whole chain on loopback
and ``dsagent run-task``."""

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agent.common.errors import BadParameters, TaskFailed
from agent.common.task import Task
from agent.plugin.manager import load_handlers
from agent.plugin.tasks import TaskContext
from conftest import wait_until
from handlers import sbs
from handlers.shared import sbsdrop
from handlers.shared.sbsdrop import SBSError, write_sbs_file

REPO = Path(__file__).resolve().parent.parent
UUID_NAME = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\.sbs")
PATTERNS = {
    "initial-config": re.compile(r"initialPXEConfigPath\.sbs"),
    "clients": re.compile(r"[1-9][0-9]{9}-client\.sbs"),
    "images": re.compile(r"[1-9][0-9]{9}-image\.sbs"),
    "predefined": re.compile(r"PredefinedComputers\.sbs"),
    "update": UUID_NAME,
}
PAYLOADS = ["", "<Computer mac=\"00:11:22:33:44:55\" action=\"boot-automation\"/>",
            "line 1\r\nline 2\r\n\r\nend\n", "Müller — 東京 — \u00e9\u0301 — 🖥️\r\n",
            "\t \x00 tail"]


@pytest.fixture
def sbs_dir(tmp_path):
    path = tmp_path / "SBS"
    path.mkdir()
    return path


def listing(folder):
    return sorted(os.listdir(folder))


def task_of(params, timeout=None):
    return Task(str(uuid.uuid4()), "UpdateSBSInfo", dict(params), timeout)


REGISTRY = load_handlers(entry_points=False, extra_plugins=[("sbs", sbs)])


class Run:
    """Validate (the core's parameter check, then the hook) + run one task in
    this process, like a worker does."""

    def __init__(self, sbs_dir, wake=None):
        self.config = {"sbs_dir": str(sbs_dir), "sbs_wake_command": wake}
        self.progress = []

    def __call__(self, params, timeout=None):
        task = task_of(params, timeout)
        REGISTRY.validate(task, self.config)
        ctx = TaskContext(task, self.config,
                          lambda pct, msg, details: self.progress.append((pct, msg)),
                          logging.LoggerAdapter(logging.getLogger("test.sbs"), {}))
        return sbs.dsagent_run_task(task=task, ctx=ctx)


# ---- names and bytes ------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(PATTERNS))
@pytest.mark.parametrize("payload", PAYLOADS, ids=["empty", "xml", "crlf", "unicode", "nul"])
def test_every_kind_names_and_bytes(sbs_dir, kind, payload):
    details = Run(sbs_dir)({"kind": kind, "payload": payload})
    assert PATTERNS[kind].fullmatch(details["file"]), details
    assert listing(sbs_dir) == [details["file"]]  # no temporary file left
    data = (sbs_dir / details["file"]).read_bytes()
    assert data == payload.encode("utf-8")
    assert details["path"] == str(sbs_dir / details["file"])
    assert details["bytes"] == len(data)
    assert details["sha256"] == hashlib.sha256(data).hexdigest()
    assert details["waiting_sbs_files"] == 0
    assert "warning" not in details and "consumed" not in details


def test_random_names_are_random():
    for kind in ("clients", "images", "update"):
        names = {sbsdrop.make_name(kind) for _ in range(2000)}
        assert len(names) == 2000
        assert all(PATTERNS[kind].fullmatch(n) for n in names)
    digits = "".join(sbsdrop.make_name("clients")[:10] for _ in range(2000))
    assert set(digits) == set("0123456789")


def test_names_never_come_from_parameters(sbs_dir):
    for kind in ("../evil", "/etc/passwd", "update/../../x", "UPDATE", ""):
        with pytest.raises(BadParameters, match="'kind' (must match|is empty)"):
            Run(sbs_dir)({"kind": kind, "payload": "x"})
    assert listing(sbs_dir) == []


def test_file_mode_and_no_tmp_name_ending_in_sbs(sbs_dir, monkeypatch):
    seen = []
    real_open = os.open

    def spy(path, flags, mode=0o777, **kw):
        seen.append(os.path.basename(path))
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(os, "open", spy)
    written = write_sbs_file(str(sbs_dir), "update", "x")
    tmp_names = [n for n in seen if n.startswith(".dsagent.")]
    assert len(tmp_names) == 1 and sbsdrop.TMP_RE.fullmatch(tmp_names[0])
    assert not tmp_names[0].lower().endswith(".sbs")
    assert oct(os.stat(written.path).st_mode & 0o777) == oct(0o644 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- atomicity and concurrency ------------------------------------------------------

def test_reader_never_sees_a_partial_file(sbs_dir):
    payload = ("<Computer/>\r\n" * 40_000) + "é"   # ~520 KB: many write() calls' worth
    expected = payload.encode()
    stop = threading.Event()
    problems, checked = [], []

    def reader():
        while not stop.is_set():
            for name in os.listdir(sbs_dir):
                if name.endswith(".sbs") and name not in checked:
                    data = (sbs_dir / name).read_bytes()
                    if data != expected:
                        problems.append((name, len(data)))
                    checked.append(name)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            names = list(pool.map(lambda i: write_sbs_file(str(sbs_dir), "update", payload).name,
                                  range(40)))
    finally:
        stop.set()
        thread.join()
    assert problems == []
    assert len(checked) > 0
    assert sorted(names) == listing(sbs_dir)


def test_200_concurrent_writes_give_200_distinct_files(sbs_dir):
    kinds = ["update", "clients", "images"]
    jobs = [(kinds[i % 3], f"payload {i}\r\n") for i in range(200)]
    with ThreadPoolExecutor(32) as pool:
        written = list(pool.map(lambda job: write_sbs_file(str(sbs_dir), *job), jobs))
    assert len({w.name for w in written}) == 200
    assert listing(sbs_dir) == sorted(w.name for w in written)
    for (kind, payload), w in zip(jobs, written):
        assert PATTERNS[kind].fullmatch(w.name)
        assert Path(w.path).read_bytes() == payload.encode()


def test_taken_random_name_gets_a_new_one(sbs_dir, monkeypatch):
    (sbs_dir / "1234567890-client.sbs").write_text("someone else's")
    names = iter(["1234567890-client.sbs", "1234567890-client.sbs", "2222222222-client.sbs"])
    monkeypatch.setattr(sbsdrop, "make_name", lambda kind: next(names))
    written = write_sbs_file(str(sbs_dir), "clients", "mine")
    assert written.name == "2222222222-client.sbs"
    assert (sbs_dir / "1234567890-client.sbs").read_text() == "someone else's"
    assert (sbs_dir / written.name).read_text() == "mine"
    assert listing(sbs_dir) == ["1234567890-client.sbs", "2222222222-client.sbs"]


def test_no_free_random_name_fails_cleanly(sbs_dir, monkeypatch):
    (sbs_dir / "1234567890-image.sbs").write_text("old")
    monkeypatch.setattr(sbsdrop, "make_name", lambda kind: "1234567890-image.sbs")
    with pytest.raises(SBSError, match="no free name"):
        write_sbs_file(str(sbs_dir), "images", "new")
    assert listing(sbs_dir) == ["1234567890-image.sbs"]
    assert (sbs_dir / "1234567890-image.sbs").read_text() == "old"


# ---- fixed names ---------------------------------------------------------------------

@pytest.mark.parametrize("kind,name", [("initial-config", "initialPXEConfigPath.sbs"),
                                       ("predefined", "PredefinedComputers.sbs")])
def test_fixed_name_waiting_is_never_overwritten(sbs_dir, kind, name):
    (sbs_dir / name).write_text("old, not read yet")
    t0 = time.monotonic()
    with pytest.raises(SBSError) as info:
        write_sbs_file(str(sbs_dir), kind, "new", fixed_wait_s=0.3)
    assert 0.3 <= time.monotonic() - t0 < 2
    message = str(info.value)
    assert f"{name} is already waiting in the SBS folder" in message
    assert "never overwritten" in message and "PXE services look stopped" in message
    assert listing(sbs_dir) == [name]
    assert (sbs_dir / name).read_text() == "old, not read yet"


def test_fixed_name_is_written_once_the_waiting_one_is_consumed(sbs_dir):
    name = "initialPXEConfigPath.sbs"
    (sbs_dir / name).write_text("old")
    store = sbs_dir.parent / "SBSStore"
    store.mkdir()
    woken = []

    def wake(path):  # the woken "PXE Interface" takes the waiting file a moment later
        woken.append(path)
        threading.Timer(0.2, os.rename, (sbs_dir / name, store / "old.sbs")).start()

    written = write_sbs_file(str(sbs_dir), "initial-config", "new", fixed_wait_s=5,
                             on_fixed_taken=wake)
    assert woken == [str(sbs_dir / name)]
    assert written.name == name and (sbs_dir / name).read_text() == "new"
    assert (store / "old.sbs").read_text() == "old"


def test_concurrent_fixed_name_writes_are_delivered_in_turn(sbs_dir):
    """Four tasks write PredefinedComputers.sbs at once; a PXE Interface moves
    each away: every content arrives, none is overwritten."""
    store = sbs_dir.parent / "SBSStore"
    store.mkdir()
    stop = threading.Event()
    moved = []

    def interface():
        while not stop.is_set():
            for entry in os.listdir(sbs_dir):
                if entry.endswith(".sbs"):
                    moved.append((sbs_dir / entry).read_text())
                    os.rename(sbs_dir / entry, store / f"{len(moved)}-{entry}")
            time.sleep(0.02)  # a stand-in service polling its folder, not a wait

    thread = threading.Thread(target=interface)
    thread.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: write_sbs_file(str(sbs_dir), "predefined", f"list {i}",
                                                   fixed_wait_s=5), range(4)))
        wait_until(lambda: len(moved) >= 4, 5, "the Interface to move all four files")
    finally:
        stop.set()
        thread.join()
    assert sorted(moved) == [f"list {i}" for i in range(4)]
    assert listing(sbs_dir) == []


def test_fixed_name_collision_through_the_handler_wakes_and_fails(sbs_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sbsdrop, "FIXED_NAME_WAIT_S", 0.2)
    (sbs_dir / "PredefinedComputers.sbs").write_text("old")
    argv_file = tmp_path / "argv.txt"
    run = Run(sbs_dir, wake=f"{wake_script(tmp_path)} {argv_file}")
    with pytest.raises(TaskFailed, match="PredefinedComputers.sbs is already waiting"):
        run({"kind": "predefined", "payload": "new"})
    # the Interface was woken once for the waiting file
    assert argv_file.read_text().splitlines()[-1] == str(sbs_dir / "PredefinedComputers.sbs")
    assert listing(sbs_dir) == ["PredefinedComputers.sbs"]


# ---- confirmation and warnings ---------------------------------------------------------

class Interface(threading.Thread):
    """A stand-in PXE Interface service: moves every .sbs file to SBSStore."""

    def __init__(self, sbs_dir):
        super().__init__(daemon=True)
        self.sbs_dir = sbs_dir
        self.store = sbs_dir.parent / "SBSStore"
        self.store.mkdir(exist_ok=True)
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            for entry in os.listdir(self.sbs_dir):
                if entry.endswith(".sbs"):
                    os.rename(self.sbs_dir / entry, self.store / entry)
            time.sleep(0.01)  # a stand-in service polling its folder, not a wait

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.halt.set()
        self.join()


def test_confirm_consumed(sbs_dir):
    with Interface(sbs_dir) as interface:
        t0 = time.monotonic()
        details = Run(sbs_dir)({"kind": "update", "payload": "x", "confirm_s": "5"})
        assert time.monotonic() - t0 < 1
    assert details["consumed"] is True
    assert "warning" not in details
    assert details["waiting_sbs_files"] == 0
    assert (interface.store / details["file"]).read_text() == "x"


def test_confirm_not_consumed_warns(sbs_dir):
    run = Run(sbs_dir)
    t0 = time.monotonic()
    details = run({"kind": "images", "payload": "x", "confirm_s": "0.3"})
    assert 0.3 <= time.monotonic() - t0 < 1.5
    assert details["consumed"] is False
    assert "still waiting in the SBS folder after 0.3 s" in details["warning"]
    assert "PXE services look stopped" in details["warning"]
    assert run.progress == []  # the warning travels in details and the succeeded message
    assert listing(sbs_dir) == [details["file"]]


def test_confirm_zero_checks_once(sbs_dir):
    details = Run(sbs_dir)({"kind": "update", "payload": "x", "confirm_s": "0"})
    assert details["consumed"] is False and "warning" in details


def test_files_piling_up_warn(sbs_dir):
    old = time.time() - 120
    for i in range(3):
        path = sbs_dir / f"{uuid.uuid4()}.sbs"
        path.write_text("left behind")
        os.utime(path, (old, old))
    (sbs_dir / "1111111111-client.sbs").write_text("young")  # waiting, but not for long
    (sbs_dir / "notes.txt").write_text("not an SBS file")
    run = Run(sbs_dir)
    details = run({"kind": "update", "payload": "x"})
    assert details["waiting_sbs_files"] == 4
    assert details["stale_sbs_files"] == 3
    assert "3 other .sbs file(s) have waited over 60 s" in details["warning"]
    assert "piling up" in details["warning"] and "PXE Interface service looks stopped" \
        in details["warning"]


def test_young_waiting_files_are_counted_without_warning(sbs_dir):
    for _ in range(2):
        write_sbs_file(str(sbs_dir), "update", "x")
    details = Run(sbs_dir)({"kind": "update", "payload": "x"})
    assert details["waiting_sbs_files"] == 2
    assert "warning" not in details and "stale_sbs_files" not in details


def test_orphaned_temporary_files_are_swept(sbs_dir):
    dead = _dead_pid()
    old = time.time() - 3600
    orphan = sbs_dir / f".dsagent.{dead}.{'a' * 16}.tmp"
    young = sbs_dir / f".dsagent.{dead}.{'b' * 16}.tmp"
    mine = sbs_dir / f".dsagent.{os.getpid()}.{'c' * 16}.tmp"
    other = sbs_dir / ".somebody-elses.tmp"
    for path in (orphan, young, mine, other):
        path.write_text("partial")
    for path in (orphan, mine, other):
        os.utime(path, (old, old))
    sbsdrop.waiting_files(str(sbs_dir), "", fresh=True)
    assert listing(sbs_dir) == sorted(p.name for p in (young, mine, other))


def _dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# ---- wake command ------------------------------------------------------------------------

def wake_script(tmp_path):
    script = tmp_path / "wake.sh"
    script.write_text('#!/bin/sh\nout="$1"; shift\nprintf "%s\\n" "$@" >> "$out"\n')
    script.chmod(0o755)
    return script


def test_wake_command_gets_the_path(sbs_dir, tmp_path):
    argv_file = tmp_path / "argv.txt"
    run = Run(sbs_dir, wake=f"{wake_script(tmp_path)} {argv_file} --event 'SBS update'")
    details = run({"kind": "update", "payload": "x"})
    assert argv_file.read_text().splitlines() == ["--event", "SBS update", details["path"]]
    assert details["woken"] is True and "warning" not in details


@pytest.mark.parametrize("command,expected", [
    ("/bin/sh -c 'echo boom >&2; exit 3' wake", "wake command /bin/sh exited with code 3: boom"),
    ("/nonexistent/wake-pxe", "wake command /nonexistent/wake-pxe could not be started"),
    ("'unbalanced", "sbs_wake_command cannot be parsed"),
    ("/bin/sh -c 'kill -9 $$' wake", "wake command /bin/sh was killed by signal 9"),
])
def test_failing_wake_command_is_a_warning(sbs_dir, command, expected):
    run = Run(sbs_dir, wake=command)
    details = run({"kind": "clients", "payload": "x"})
    assert expected in details["warning"]
    assert details.get("woken", False) is False
    assert (sbs_dir / details["file"]).read_text() == "x"  # the file is there all the same


def test_hanging_wake_command_is_killed(sbs_dir, monkeypatch):
    monkeypatch.setattr(sbsdrop, "WAKE_TIMEOUT_S", 0.3)
    t0 = time.monotonic()
    details = Run(sbs_dir, wake="/bin/sh -c 'sleep 30' wake")({"kind": "update", "payload": "x"})
    assert time.monotonic() - t0 < 3
    assert "did not finish within 0.3 s and was killed" in details["warning"]


# ---- bad inputs ------------------------------------------------------------------------------

@pytest.mark.parametrize("params,message", [
    ({"payload": "x"}, "parameter 'kind' is missing"),
    ({"kind": "client", "payload": "x"}, "parameter 'kind' must match initial-config|clients|"
                                         "images|predefined|update, got 'client'"),
    ({"kind": "update"}, "parameter 'payload' is missing"),
    ({"kind": "update", "payload": "x", "confirm_s": "abc"}, "'confirm_s' must be a number"),
    ({"kind": "update", "payload": "x", "confirm_s": "-1"}, "'confirm_s' must be a number"),
    ({"kind": "update", "payload": "x", "confirm_s": "3601"}, "from 0 to 3600"),
    ({"kind": "update", "payload": "x", "confirm_s": "nan"}, "'confirm_s' must be a number"),
    ({"kind": "update", "payload": "x", "confirm_s": "inf"}, "'confirm_s' must be a number"),
    ({"kind": "update", "payload": "x", "confirm_s": ""}, "'confirm_s' must be a number"),
    ({"kind": "update", "payload": "x", "confirm_s": "300"},
     "'confirm_s' (300 s) must be shorter than the task's timeout (300 s)"),
    ({"kind": "update", "payload": "x", "file": "a.sbs"},
     "unknown parameter 'file' (UpdateSBSInfo takes kind, payload, confirm_s)"),
    ({"kind": "update", "payload": "bad \udc80 text"}, "'payload' cannot be written as UTF-8"),
])
def test_bad_parameters(sbs_dir, params, message):
    with pytest.raises(BadParameters) as info:
        Run(sbs_dir)(params)
    assert message in str(info.value)
    assert listing(sbs_dir) == []


def test_confirm_within_a_longer_timeout_is_fine(sbs_dir):
    details = Run(sbs_dir)({"kind": "update", "payload": "x", "confirm_s": "0.05"}, timeout=3600)
    assert details["consumed"] is False


@pytest.mark.parametrize("setup,message", [
    (lambda d: None, "needs [handlers] sbs_dir"),
    (lambda d: "relative/SBS", "must be an absolute path"),
    (lambda d: str(d / "missing"), "does not exist"),
    (lambda d: (d / "afile").write_text("x") and str(d / "afile"), "is not a folder"),
])
def test_bad_sbs_dir_config(tmp_path, setup, message):
    config = {"sbs_dir": setup(tmp_path), "sbs_wake_command": None}
    with pytest.raises(BadParameters, match=re.escape(message)):
        sbs.dsagent_validate_task(task=task_of({"kind": "update", "payload": "x"}), config=config)


def test_payload_not_encodable_in_the_write_function(sbs_dir):
    with pytest.raises(SBSError,
                       match=r"surrogates not allowed \(character '\\udc80' at position 4\)"):
        write_sbs_file(str(sbs_dir), "update", "bad \udc80")
    assert listing(sbs_dir) == []


def test_sbs_dir_removed_after_validation(sbs_dir):
    run = Run(sbs_dir)
    task = task_of({"kind": "update", "payload": "x"})
    sbs.dsagent_validate_task(task=task, config=run.config)
    sbs_dir.rmdir()
    ctx = TaskContext(task, run.config, lambda *a: None,
                      logging.LoggerAdapter(logging.getLogger("t"), {}))
    with pytest.raises(TaskFailed, match=f"SBS folder {re.escape(str(sbs_dir))} does not exist"):
        sbs.dsagent_run_task(task=task, ctx=ctx)


def _fail_with(code):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return fail


@pytest.mark.parametrize("func,code,message", [
    ("open", errno.EACCES, "cannot write in the SBS folder {d}: permission denied"),
    ("open", errno.EROFS, "cannot write in the SBS folder {d}: read-only file system"),
    ("write", errno.ENOSPC, "no space left on the device of the SBS folder {d} while writing"),
    ("write", errno.EDQUOT, "disk quota exceeded in the SBS folder {d} while writing"),
    ("fsync", errno.EIO, "flushing the file to disk (fsync) in the SBS folder {d} failed: "
                         "Input/output error (EIO)"),
    ("link", errno.ENOSPC, "no space left on the device of the SBS folder {d} while creating "
                           "the final name"),
])
def test_injected_os_errors_fail_clearly_and_leave_nothing(sbs_dir, monkeypatch, func, code,
                                                           message):
    real = getattr(os, func)
    fail = _fail_with(code)
    tmp_prefix = str(sbs_dir / ".dsagent.")

    def injected(*args, **kwargs):
        # only the calls on the handler's temporary file fail (not pytest's own writes)
        target = args[0] if func in ("open", "link") else os.readlink(f"/proc/self/fd/{args[0]}")
        if str(target).startswith(tmp_prefix):
            return fail(*args, **kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(os, func, injected)
    run = Run(sbs_dir)
    with pytest.raises(TaskFailed) as info:
        run({"kind": "update", "payload": "some payload"})
    monkeypatch.undo()
    assert message.format(d=sbs_dir) in str(info.value)
    assert listing(sbs_dir) == []


def test_folder_fsync_failure_is_a_warning(sbs_dir, monkeypatch):
    real = os.fsync

    def fsync(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    details = Run(sbs_dir)({"kind": "update", "payload": "x"})
    monkeypatch.undo()
    assert "could not be flushed to disk" in details["warning"]
    assert (sbs_dir / details["file"]).read_text() == "x"


def test_file_system_without_hard_links_uses_rename_noreplace(sbs_dir, monkeypatch):
    monkeypatch.setattr(os, "link", _fail_with(errno.EPERM))
    written = write_sbs_file(str(sbs_dir), "update", "via rename")
    (sbs_dir / "PredefinedComputers.sbs").write_text("old")
    with pytest.raises(SBSError, match="already waiting"):
        write_sbs_file(str(sbs_dir), "predefined", "new", fixed_wait_s=0.1)
    monkeypatch.undo()
    assert listing(sbs_dir) == sorted(["PredefinedComputers.sbs", written.name])
    assert (sbs_dir / written.name).read_text() == "via rename"
    assert (sbs_dir / "PredefinedComputers.sbs").read_text() == "old"


def test_no_hard_links_and_no_rename_noreplace_fails_clearly(sbs_dir, monkeypatch):
    import ctypes

    def renameat2(*args):
        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(os, "link", _fail_with(errno.EOPNOTSUPP))
    monkeypatch.setattr(sbsdrop, "_renameat2", renameat2)
    with pytest.raises(SBSError, match="supports neither hard links nor RENAME_NOREPLACE"):
        write_sbs_file(str(sbs_dir), "update", "x")
    monkeypatch.undo()
    assert listing(sbs_dir) == []


def test_temporary_file_not_removable_after_linking_is_a_warning(sbs_dir, monkeypatch):
    monkeypatch.setattr(os, "unlink", _fail_with(errno.EIO))
    written = write_sbs_file(str(sbs_dir), "update", "delivered")
    monkeypatch.undo()
    assert "could not be removed from the SBS folder" in written.warning
    assert (sbs_dir / written.name).read_text() == "delivered"
    leftovers = [n for n in listing(sbs_dir) if n != written.name]
    assert len(leftovers) == 1 and sbsdrop.TMP_RE.fullmatch(leftovers[0])


# real file systems: a full tmpfs, a read-only bind mount, an unprivileged writer

def _mount(*args):
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root and mount(8)")
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"mount failed: {result.stderr.strip()}")


@pytest.fixture
def mounted(tmp_path):
    points = []
    yield points
    for point in reversed(points):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_real_full_disk(tmp_path, mounted):
    folder = tmp_path / "tiny"
    folder.mkdir()
    _mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder))
    mounted.append(folder)
    write_sbs_file(str(folder), "update", "fits")
    before = listing(folder)
    with pytest.raises(SBSError, match=f"no space left on the device of the SBS folder "
                                       f"{re.escape(str(folder))} while writing 200000 bytes"):
        write_sbs_file(str(folder), "update", "x" * 200_000)
    assert listing(folder) == before


def test_real_read_only_folder(tmp_path, mounted):
    source, folder = tmp_path / "src", tmp_path / "ro"
    source.mkdir()
    folder.mkdir()
    _mount("--bind", str(source), str(folder))
    mounted.append(folder)
    _mount("-o", "remount,ro,bind", str(folder))
    with pytest.raises(SBSError, match="read-only file system"):
        write_sbs_file(str(folder), "update", "x")
    assert listing(folder) == [] and listing(source) == []


@pytest.fixture
def open_tmp():
    top = Path(tempfile.mkdtemp(prefix="dsagent-sbs-"))
    top.chmod(0o755)  # others may enter (pytest's tmp_path is 0700)
    yield top
    shutil.rmtree(top)


def test_real_permission_denied_as_an_unprivileged_user(open_tmp):
    """A forked child drops to nobody and writes into a folder it may enter, not write."""
    if os.geteuid() != 0:
        pytest.skip("needs root to become nobody")
    folder = open_tmp / "SBS"
    folder.mkdir()
    folder.chmod(0o755)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here on
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                write_sbs_file(str(folder), "update", "x")
                answer = "written"
            except SBSError as exc:
                answer = str(exc)
            os.write(write_end, answer.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        answer = fh.read().decode()
    os.waitpid(pid, 0)
    assert answer == f"cannot write in the SBS folder {folder}: permission denied"
    assert listing(folder) == []


# ---- cancel ----------------------------------------------------------------------------------

def test_cancel_stops_the_confirm_wait(sbs_dir):
    run = Run(sbs_dir)
    task = task_of({"kind": "update", "payload": "x", "confirm_s": "30"})
    ctx = TaskContext(task, run.config, lambda *a: None,
                      logging.LoggerAdapter(logging.getLogger("t"), {}))
    threading.Timer(0.2, sbs.dsagent_cancel_task, kwargs={"task": task}).start()
    t0 = time.monotonic()
    details = sbs.dsagent_run_task(task=task, ctx=ctx)
    assert time.monotonic() - t0 < 2
    assert details["consumed"] is False
    assert sbs._cancel == {}


# ---- through the real dispatch ------------------------------------------------------------------

def test_end_to_end_through_the_loopback_chain(tmp_path):
    from taskserver.loopback import LoopbackChain

    folder = tmp_path / "SBS"
    folder.mkdir()
    payload = "<Computer mac=\"00:11:22:33:44:55\" name=\"Müller-PC\"/>\r\n"
    with LoopbackChain(tmp_path / "chain", handlers={"sbs_dir": str(folder)}) as chain:
        ok = chain.queue("UpdateSBSInfo", {"kind": "update", "payload": payload})
        waits = chain.queue("UpdateSBSInfo", {"kind": "clients", "payload": "c",
                                              "confirm_s": "0.2"})
        bad = chain.queue("UpdateSBSInfo", {"kind": "update", "payload": "x", "path": "/etc"})
        assert chain.tickle() == "OK"
        assert chain.wait([ok, waits, bad], 30)
        events = chain.events(ok)
        assert [e["state"] for e in events] == ["received", "running", "succeeded"]
        details = events[-1]["details"]
        assert UUID_NAME.fullmatch(details["file"])
        assert (folder / details["file"]).read_bytes() == payload.encode()
        assert details["sha256"] == hashlib.sha256(payload.encode()).hexdigest()
        assert details["bytes"] == len(payload.encode())

        events = chain.events(waits)
        assert [e["state"] for e in events] == ["received", "running", "succeeded"]
        assert events[-1]["details"]["consumed"] is False
        assert "PXE services look stopped" in events[-1]["details"]["warning"]
        assert events[-1]["message"] == events[-1]["details"]["warning"]  # §4: in the message too

        events = chain.events(bad)
        assert [e["state"] for e in events] == ["received", "failed"]
        assert "unknown parameter 'path'" in events[-1]["message"]
        files = [chain.events(t)[-1]["details"]["file"] for t in (ok, waits)]
    assert sorted(os.listdir(folder)) == sorted(files)


def test_run_task_command(tmp_path):
    folder = tmp_path / "SBS"
    folder.mkdir()
    config = tmp_path / "agent.toml"
    config.write_text(f'[handlers]\nsbs_dir = "{folder}"\n')
    doc = tmp_path / "tasks.xml"
    doc.write_text(textwrap.dedent(f"""\
        <ClientTasks>
          <Task id="{uuid.uuid4()}" type="UpdateSBSInfo">
            <Parameters>
              <Parameter name="kind">predefined</Parameter>
              <Parameter name="payload">a&#13;
        b é</Parameter>
            </Parameters>
          </Task>
        </ClientTasks>
        """), encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "agent", "run-task", str(doc), "--config",
                             str(config), "--json"], capture_output=True, text=True, cwd=REPO,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["state"] for e in events] == ["received", "running", "succeeded"]
    assert events[-1]["details"]["file"] == "PredefinedComputers.sbs"
    assert (folder / "PredefinedComputers.sbs").read_bytes() == "a\r\nb é".encode()
