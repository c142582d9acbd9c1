"""The four imaging task types (PROTOCOL.md §4), as an ordinary handler plugin.

CreateImage / CreateBackupImage: ``source`` (block device or disk file),
``image`` (name). DeployImage / RestoreBackupImage: ``image``, ``target``.
Capture images go only with DeployImage, backup images only with
RestoreBackupImage. Needs ``[handlers] image_store``.
"""

from __future__ import annotations

import os

from agent.plugin import BadParameters, TaskFailed, TaskType, hookimpl

from handlers.imaging.store import ImageError, ImageStore, check_name

DEFAULT_TIMEOUT_S = 6 * 3600
CREATE = {"CreateImage": "capture", "CreateBackupImage": "backup"}
WRITE = {"DeployImage": "capture", "RestoreBackupImage": "backup"}
PARAMETERS = {**{t: ("source", "image") for t in CREATE}, **{t: ("image", "target") for t in WRITE}}


@hookimpl
def dsagent_task_types(register):
    register(TaskType("CreateImage", DEFAULT_TIMEOUT_S, "capture a disk into the image store"))
    register(TaskType("CreateBackupImage", DEFAULT_TIMEOUT_S, "back up a disk into the image store"))
    register(TaskType("DeployImage", DEFAULT_TIMEOUT_S, "write a capture image onto a disk"))
    register(TaskType("RestoreBackupImage", DEFAULT_TIMEOUT_S, "write a backup image onto a disk"))


@hookimpl
def dsagent_validate_task(task, config):
    expected = PARAMETERS[task.type]
    params = task.parameters
    unknown = sorted(set(params) - set(expected))
    if unknown:
        raise BadParameters(f"unknown parameter '{unknown[0]}' ({task.type} takes "
                            f"{', '.join(expected)})")
    for name in expected:
        if not params.get(name):
            raise BadParameters(f"parameter '{name}' is missing or empty")
    store = config.get("image_store")
    if not store:
        raise BadParameters(f"{task.type} needs [handlers] image_store in the agent's config")
    if not os.path.isdir(store):
        raise BadParameters(f"image_store {store} is not a folder")
    try:
        check_name(params["image"])
    except ImageError as exc:
        raise BadParameters(str(exc)) from None
    disk = params.get("source") or params.get("target")
    if not os.path.isabs(disk) or "\0" in disk or "\n" in disk:
        which = "source" if "source" in params else "target"
        raise BadParameters(f"parameter '{which}' must be an absolute path, got {disk!r}")


@hookimpl
def dsagent_run_task(task, ctx):
    from handlers.imaging.capture import capture
    from handlers.imaging.deploy import deploy

    store = ImageStore(ctx.config["image_store"])
    params = task.parameters

    def report(percent, message, **details):
        ctx.progress(percent, message, **details)

    try:
        if task.type in CREATE:
            details = capture(params["source"], store, params["image"], CREATE[task.type],
                              report, ctx.cancelled)
        else:
            details = deploy(store, params["image"], WRITE[task.type], params["target"],
                             report, ctx.cancelled)
    except ImageError as exc:
        raise TaskFailed(str(exc)) from None
    except OSError as exc:
        raise TaskFailed(f"{exc.filename or 'I/O'}: {exc.strerror or exc}") from None
    ctx.log.info("%s of image '%s' done: %s", task.type, params["image"], details)
    return details
