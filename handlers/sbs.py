"""UpdateSBSInfo (PROTOCOL.md §4): write one PXE-server information file.

The file goes into ``[handlers] sbs_dir`` (the SBS folder), where the PXE
Interface service reads it, hands it to the PXE Server service and moves it
to SBSStore. How it is written (names, atomicity, the wake command) is
handlers.shared.sbsdrop, shared with BootWizRebuild. Parameters:

- ``kind``: ``initial-config`` -> ``initialPXEConfigPath.sbs``; ``clients``
  -> ``<10 digits>-client.sbs``; ``images`` -> ``<10 digits>-image.sbs``;
  ``predefined`` -> ``PredefinedComputers.sbs``; ``update`` -> ``<uuid>.sbs``.
- ``payload``: the file's content, written byte for byte as the UTF-8 of the
  parameter's text.
- ``confirm_s`` (optional, 0..3600): wait that long for the file to leave the
  folder; details then carry ``consumed: true|false``.

**Warnings**, not failures (the file is there): the wake command failing, a
file not consumed within ``confirm_s``, and other ``.sbs`` files waiting
over ``STALE_AFTER_S``. They go into details (``warning``), which the agent
also makes the succeeded event's message.

See docs/sbs.md.
"""

from __future__ import annotations

import math
import os
import threading
import time

from agent import __version__  # noqa: F401 - the plugin's version when registered directly (tests)
from agent.plugin import (BadParameters, CheckResult, DoctorCheck, Param, TaskFailed, TaskType,
                          hookimpl)

from handlers.shared.checks import configured_folder
from handlers.shared.sbsdrop import (KINDS, STALE_AFTER_S, SBSError, encode_payload, stop_wake,
                                     wait_gone, waiting_files, waiting_mtimes, wake_interface,
                                     write_sbs_file)

TASK_TYPE = "UpdateSBSInfo"
DEFAULT_TIMEOUT_S = 300
MAX_CONFIRM_S = 3600.0
PARAMETERS = (
    Param("kind", required=True, pattern="|".join(KINDS), description="which file to write"),
    Param("payload", required=True, allow_empty=True,
          description="the file's content, written as UTF-8 byte for byte"),
    Param("confirm_s", type="number",
          description=f"wait up to that many seconds (0..{MAX_CONFIRM_S:g}) for the file "
                      "to be taken"),
)


# ---- hooks ------------------------------------------------------------------------

_cancel: dict[str, threading.Event] = {}


@hookimpl
def dsagent_task_types(register):
    register(TaskType(TASK_TYPE, default_timeout=DEFAULT_TIMEOUT_S,
                      description="write a PXE information file into the SBS folder",
                      parameters=PARAMETERS))


def parse_confirm(value: str) -> float:
    try:
        seconds = float(value.strip())
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_CONFIRM_S:
        raise BadParameters(f"parameter 'confirm_s' must be a number of seconds from 0 to "
                            f"{MAX_CONFIRM_S:g}, got {value!r}")
    return seconds


@hookimpl
def dsagent_validate_task(task, config):
    params = task.parameters  # kind, payload and confirm_s's shape: checked by the core
    try:
        encode_payload(params["payload"])
    except SBSError as exc:
        raise BadParameters(str(exc)) from None
    if "confirm_s" in params:
        confirm = parse_confirm(params["confirm_s"])
        timeout = task.timeout or DEFAULT_TIMEOUT_S
        if confirm >= timeout:
            raise BadParameters(f"parameter 'confirm_s' ({confirm:g} s) must be shorter than "
                                f"the task's timeout ({timeout} s)")
    sbs_dir = config.get("sbs_dir")
    if not sbs_dir:
        raise BadParameters(f"{TASK_TYPE} needs [handlers] sbs_dir (the PXE server's SBS "
                            "folder) in the agent's config")
    if not os.path.isabs(sbs_dir):
        raise BadParameters(f"[handlers] sbs_dir must be an absolute path, got {sbs_dir!r}")
    if not os.path.isdir(sbs_dir):
        what = "is not a folder" if os.path.lexists(sbs_dir) else "does not exist"
        raise BadParameters(f"SBS folder {sbs_dir} ([handlers] sbs_dir) {what}")


@hookimpl
def dsagent_run_task(task, ctx):
    params = task.parameters
    sbs_dir = ctx.config["sbs_dir"]
    command = ctx.config.get("sbs_wake_command")
    confirm = parse_confirm(params["confirm_s"]) if "confirm_s" in params else None
    stop = _cancel.setdefault(task.id, threading.Event())
    warnings: list[str] = []

    def wake_for_waiting(path: str) -> None:
        if command:
            problem = wake_interface(command, path, task.id)
            if problem:
                ctx.log.warning("%s", problem)

    try:
        try:
            written = write_sbs_file(sbs_dir, params["kind"], params["payload"], stop=stop,
                                     on_fixed_taken=wake_for_waiting)
        except SBSError as exc:
            raise TaskFailed(str(exc), {"kind": params["kind"]}) from None
        ctx.log.info("wrote %s (%d bytes, sha256 %s)", written.path, written.size, written.sha256)
        details = {"file": written.name, "path": written.path, "bytes": written.size,
                   "sha256": written.sha256}
        if written.warning:
            warnings.append(written.warning)
        if command:
            problem = wake_interface(command, written.path, task.id)
            details["woken"] = not problem
            if problem:
                warnings.append(f"{problem}; {written.name} is written and waits for the "
                                "next scan of the PXE Interface")
        if confirm is not None:
            consumed = wait_gone(written.path, written.ino, confirm, stop)
            details["consumed"] = consumed
            if not consumed:
                warnings.append(f"{written.name} is still waiting in the SBS folder after "
                                f"{confirm:g} s: the PXE services look stopped (the PXE "
                                "Interface service reads and moves SBS files within a second)")
        waiting, stale = waiting_files(sbs_dir, written.name, fresh=confirm is not None)
        details["waiting_sbs_files"] = waiting
        if stale:
            details["stale_sbs_files"] = stale
            warnings.append(f"{stale} other .sbs file(s) have waited over {STALE_AFTER_S:g} s "
                            f"in the SBS folder {sbs_dir}: files are piling up, the PXE "
                            "Interface service looks stopped")
    finally:
        _cancel.pop(task.id, None)
    if warnings:
        details["warning"] = "; ".join(warnings)
        ctx.log.warning("%s", details["warning"])
    return details


@hookimpl
def dsagent_cancel_task(task):
    stop = _cancel.get(task.id)
    if stop is not None:
        stop.set()
    stop_wake(task.id)


# ---- dsagent doctor ---------------------------------------------------------------

def check_sbs(config: dict) -> CheckResult:
    """The seed: .sbs files left in the SBS folder mean the PXE services are stopped."""
    folder, unusable = configured_folder(config, "sbs_dir", "SBS folder",
                                         ("not a PXE server", "on a PXE server"))
    if unusable:
        return unusable
    if not os.access(folder, os.W_OK):
        return CheckResult("fail", f"SBS folder {folder} is not writable by this user",
                           f"let the agent's user write in {folder}")
    now = time.time()
    waiting = waiting_mtimes(folder)
    stale = sorted((mtime, file) for file, mtime in waiting.items()
                   if now - mtime > STALE_AFTER_S)
    if stale:
        mtime, oldest = stale[0]
        return CheckResult("fail", f"{len(stale)} .sbs file(s) waited over {STALE_AFTER_S:g} s "
                           f"in {folder} (oldest {oldest}, {now - mtime:.0f} s): the PXE "
                           "services look stopped",
                           "on this product's site server: give the config a [pxe] section so "
                           "that `dsagent run` starts the PXE process (docs/pxe.md); it takes "
                           "the files within a second")
    if waiting:
        return CheckResult("ok", f"{len(waiting)} .sbs file(s) in {folder}, all younger than "
                           f"{STALE_AFTER_S:g} s (being taken)")
    return CheckResult("ok", f"{folder} holds no waiting .sbs file")


@hookimpl
def dsagent_doctor_checks(register):
    register(DoctorCheck("sbs", check_sbs))
