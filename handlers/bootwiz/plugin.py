"""BootWizRebuild (PROTOCOL.md §4) as an ordinary handler plugin.

Parameters: ``config`` and ``base`` (names, ``[A-Za-z0-9._-]{1,64}``, not
``.``/``..``), ``drivers`` (optional, comma-separated package ids; empty: the
new version's initrd is the base's, byte for byte). Needs ``[handlers]
package_store`` and ``preboot_store``; uses ``preboot_keep_versions``
(default 3), ``sbs_dir`` and ``sbs_wake_command`` when set. See docs/bootwiz.md.
"""

from __future__ import annotations

import os

from agent.plugin import (BadParameters, CheckResult, DoctorCheck, Param, TaskFailed, TaskType,
                          hookimpl)

from handlers.bootwiz.errors import BootWizError, check_name
from handlers.bootwiz.packages import PackageChecker, parse_drivers
from handlers.bootwiz.rebuild import Request, rebuild
from handlers.bootwiz.versions import safe_current
from handlers.shared.checks import configured_folder

TASK_TYPE = "BootWizRebuild"
DEFAULT_TIMEOUT_S = 1800
NAMES = "1-64 of A-Z a-z 0-9 . _ -, not . or .."
PARAMETERS = (
    Param("config", required=True, description=f"the configuration to rebuild ({NAMES})"),
    Param("base", required=True, description=f"the base folder in the preboot store ({NAMES})"),
    Param("drivers", description="comma-separated driver package ids (none: the base's initrd)"),
)


@hookimpl
def dsagent_task_types(register):
    register(TaskType(TASK_TYPE, DEFAULT_TIMEOUT_S,
                      "rebuild a Linux preboot configuration with driver packages",
                      parameters=PARAMETERS))


# the PXE process's own folder in the TFTP root (agent/pxe/bootfiles.py BOOT_DIR;
# a handler imports only agent.plugin, so it is named here, and a test checks both)
PXE_FOLDER = "dsagent-pxe"


@hookimpl
def dsagent_validate_task(task, config):
    params = task.parameters  # present and not empty: checked by the core
    try:
        check_name(params["config"], "parameter 'config'")
        if params["config"] == PXE_FOLDER:
            raise BootWizError(f"parameter 'config' {PXE_FOLDER!r} is reserved: the PXE "
                               "process keeps its boot scripts in that folder of the TFTP root")
        check_name(params["base"], "parameter 'base'")
        parse_drivers(params.get("drivers"))
    except BootWizError as exc:
        message = str(exc)
        if message.startswith("driver package id"):
            message = "parameter 'drivers': " + message
        raise BadParameters(message) from None
    for key in ("package_store", "preboot_store"):
        if not config.get(key):
            raise BadParameters(f"{TASK_TYPE} needs [handlers] {key} in the agent's config")
    keep = config.get("preboot_keep_versions", 3)
    if not isinstance(keep, int) or keep < 1:
        raise BadParameters(f"[handlers] preboot_keep_versions must be at least 1, not {keep!r}")


def request_from(params: dict[str, str], config: dict) -> Request:
    return Request(
        preboot_store=config["preboot_store"],
        package_store=config["package_store"],
        config=params["config"],
        base=params["base"],
        drivers=parse_drivers(params.get("drivers")),
        keep_versions=config.get("preboot_keep_versions") or 3,
        sbs_dir=config.get("sbs_dir"),
        wake_command=config.get("sbs_wake_command"),
    )


def current_version(req: Request) -> str | None:
    """Where ``<config>/current`` points (None if nowhere)."""
    return safe_current(os.path.join(req.preboot_store, req.config))


@hookimpl
def dsagent_run_task(task, ctx):
    req = request_from(task.parameters, ctx.config)
    try:
        details = rebuild(req, ctx.progress, ctx.cancelled, task_id=task.id)
    except BootWizError as exc:
        info = {"config": req.config, "base": req.base, "drivers": req.drivers,
                "current": current_version(req), **exc.details}
        raise TaskFailed(str(exc), info) from None
    ctx.log.info("%s/%s built, current switched from %s", req.config, details["version"],
                 details["previous"])
    if details.get("warnings"):
        details["warning"] = "; ".join(details["warnings"])  # also the succeeded message
        ctx.log.warning("%s", details["warning"])
    return details


# ---- dsagent doctor ---------------------------------------------------------------

def check_drivers(config: dict) -> CheckResult:
    """The seed: BootWiz run before the driver packages replicated to the site server."""
    store, unusable = configured_folder(config, "package_store", "package store", (
        "no BootWiz here", "on a site server that rebuilds preboot configurations"))
    if unusable:
        return unusable
    packages = sorted(e for e in os.listdir(store)
                      if not e.startswith(".") and os.path.isdir(os.path.join(store, e)))
    checker = PackageChecker(store, lambda: False, lambda _n: None)
    files = sum(len(checker.check(pid)) for pid in packages)
    if checker.problems:
        bad = sorted({p["package"] for p in checker.problems})
        more = len(checker.problems) - 1
        return CheckResult("fail", checker.problems[0]["message"]
                           + (f" (and {more} more problem(s); packages: {', '.join(bad)})"
                              if more else ""),
                           "wait for package replication to finish (or replicate "
                           f"{', '.join(bad)} again), then run BootWizRebuild")
    return CheckResult("ok", f"{len(packages)} driver package(s) in {store} complete "
                       f"({files} file(s) match their manifests)")


@hookimpl
def dsagent_doctor_checks(register):
    register(DoctorCheck("drivers", check_drivers))
