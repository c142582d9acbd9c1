"""BootWizRebuild (PROTOCOL.md §4) as an ordinary handler plugin.

Parameters: ``config`` and ``base`` (names, ``[A-Za-z0-9._-]{1,64}``, not
``.``/``..``), ``drivers`` (optional, comma-separated package ids; empty: the
new version's initrd is the base's, byte for byte). Needs ``[handlers]
package_store`` and ``preboot_store``; uses ``preboot_keep_versions``
(default 3), ``sbs_dir`` and ``sbs_wake_command`` when set. See docs/bootwiz.md.
"""

from __future__ import annotations

import os

from agent.plugin import BadParameters, TaskFailed, TaskType, hookimpl

from handlers.bootwiz.build import BootWizError, Request, safe_current, check_name, parse_drivers, rebuild

TASK_TYPE = "BootWizRebuild"
DEFAULT_TIMEOUT_S = 1800
PARAMETERS = ("config", "base", "drivers")


@hookimpl
def dsagent_task_types(register):
    register(TaskType(TASK_TYPE, DEFAULT_TIMEOUT_S,
                      "rebuild a Linux preboot configuration with driver packages "
                      "(config, base, drivers)"))


@hookimpl
def dsagent_validate_task(task, config):
    params = task.parameters
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise BadParameters(f"unknown parameter '{unknown[0]}' ({TASK_TYPE} takes "
                            f"{', '.join(PARAMETERS)})")
    for name in ("config", "base"):
        if not params.get(name):
            raise BadParameters(f"parameter '{name}' is missing or empty")
    try:
        check_name(params["config"], "parameter 'config'")
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
