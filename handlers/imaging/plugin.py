"""The four imaging task types (PROTOCOL.md §4), as an ordinary handler plugin.

CreateImage / CreateBackupImage: ``source`` (block device or disk file),
``image`` (name). DeployImage / RestoreBackupImage: ``image``, ``target``,
optional ``grow`` (``true``|``false``: fill a larger target with the last
partition and its file system, deploy.py and grow.py); DeployImage also one
stream to many (multicast.py: ``multicast=true`` on each receiver,
``targets`` on the sender).
Capture images go only with DeployImage, backup images only with
RestoreBackupImage. Needs ``[handlers] image_store``: a folder, or an
http(s) URL of a web server that serves files and takes PUT (httpstore.py).
"""

from __future__ import annotations

import errno
import os
import shutil

from agent.plugin import (BadParameters, CheckResult, DoctorCheck, Param, TaskFailed, TaskType,
                          hookimpl)

from handlers.imaging import multicast
from handlers.imaging.store import ImageError, check_name, is_url, open_store
from handlers.shared.checks import configured_folder

DEFAULT_TIMEOUT_S = 6 * 3600
CREATE = {"CreateImage": "capture", "CreateBackupImage": "backup"}
WRITE = {"DeployImage": "capture", "RestoreBackupImage": "backup"}
IMAGE = Param("image", required=True,
              description="the image's name in the store (1-128 of A-Z a-z 0-9 . _ -)")
SOURCE = Param("source", required=True, type="path",
               description="the disk read: a block device or a disk file")
TARGET = Param("target", required=True, type="path",
               description="the disk written: a block device or a disk file")
GROW = Param("grow", pattern="true|false",
             description="true: on a larger target, grow the last partition and its file "
                         "system (ext4, NTFS) to fill it (default false)")
DEPLOY_TARGET = Param("target", type="path", description="the disk written: a block device or "
                      "a disk file (required, but for a multicast sender, which has 'targets')")


@hookimpl
def dsagent_task_types(register):
    register(TaskType("CreateImage", DEFAULT_TIMEOUT_S, "capture a disk into the image store",
                      parameters=(SOURCE, IMAGE)))
    register(TaskType("CreateBackupImage", DEFAULT_TIMEOUT_S, "back up a disk into the image store",
                      parameters=(SOURCE, IMAGE)))
    register(TaskType("DeployImage", DEFAULT_TIMEOUT_S, "write a capture image onto a disk",
                      parameters=(IMAGE, DEPLOY_TARGET, GROW, *multicast.PARAMS)))
    register(TaskType("RestoreBackupImage", DEFAULT_TIMEOUT_S, "write a backup image onto a disk",
                      parameters=(IMAGE, TARGET, GROW)))


@hookimpl
def dsagent_validate_task(task, config):
    store = config.get("image_store")
    if not store:
        raise BadParameters(f"{task.type} needs [handlers] image_store in the agent's config")
    if is_url(store):
        from handlers.imaging.httpstore import HttpImageStore
        try:
            HttpImageStore(store)
        except ImageError as exc:
            raise BadParameters(str(exc)) from None
    elif not os.path.isdir(store):
        raise BadParameters(f"image_store {store} is not a folder")
    try:
        check_name(task.parameters["image"])  # the store's rule; the rest is checked by the core
    except ImageError as exc:
        raise BadParameters(str(exc)) from None
    if task.type == "DeployImage":
        multicast.validate(task.parameters)   # target / targets / multicast together


@hookimpl
def dsagent_run_task(task, ctx):
    from handlers.imaging.capture import capture
    from handlers.imaging.deploy import deploy

    try:
        store = open_store(ctx.config["image_store"])
    except ImageError as exc:
        raise TaskFailed(str(exc)) from None
    params = task.parameters

    def report(percent, message, **details):
        ctx.progress(percent, message, **details)

    try:
        if task.type in CREATE:
            details = capture(params["source"], store, params["image"], CREATE[task.type],
                              report, ctx.cancelled)
        elif task.type == "DeployImage" and multicast.role(params):
            details = multicast.run(store, params, report, ctx.cancelled)
        else:
            details = deploy(store, params["image"], WRITE[task.type], params["target"],
                             report, ctx.cancelled, grow=params.get("grow") == "true")
    except ImageError as exc:
        raise TaskFailed(str(exc)) from None
    except OSError as exc:
        raise TaskFailed(f"{exc.filename or 'I/O'}: {exc.strerror or exc}") from None
    ctx.log.info("%s of image '%s' done: %s", task.type, params["image"], details)
    return details


# ---- dsagent doctor ---------------------------------------------------------------

LOW_FREE_FRACTION = 0.10   # the image store warns under 10 % free ...
LOW_FREE_BYTES = 4 << 30   # ... or under 4 GiB free
PROBE_BYTES = 4096


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_http_store(location: str) -> CheckResult:
    """An http(s) store: the server answers (TLS, credentials); writes are not probed
    (nothing may be left behind on a server that takes no DELETE)."""
    from handlers.imaging.httpstore import HttpImageStore

    try:
        store = HttpImageStore(location)
        session = store.session()
    except ImageError as exc:
        return CheckResult("fail", str(exc), "fix [handlers] image_store in the agent's config")
    try:
        status = session.head_status(store.base)
    except ImageError as exc:
        return CheckResult("fail", f"image store {store.base} does not answer: {exc}",
                           "start the web server, or fix the URL, TLS or network")
    finally:
        session.close()
    if status in (401, 407):
        return CheckResult("fail", f"image store {store.base} wants credentials (HTTP {status})",
                           "give them in the URL: http(s)://USER:PASSWORD@host/...")
    return CheckResult("ok", f"image store {store.base} answers (HTTP {status}); uploads are "
                       "checked by the first capture")


def check_image_store(config: dict) -> CheckResult:
    """Captures fail late on a read-only or full store: probe a write, look at free space."""
    if config.get("image_store") and is_url(config["image_store"]):
        return check_http_store(config["image_store"])
    store, unusable = configured_folder(config, "image_store", "image store", (
        "no imaging here", "where images are captured or deployed"))
    if unusable:
        return unusable
    probe = os.path.join(store, f".dsagent-doctor.{os.getpid()}.{os.urandom(4).hex()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, b"\0" * PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        code = errno.errorcode.get(exc.errno or 0, "")
        return CheckResult("fail", f"cannot write in the image store {store}: "
                           f"{exc.strerror or exc}" + (f" ({code})" if code else ""),
                           "mount it read-write and let the agent's user write there")
    usage = shutil.disk_usage(store)
    share = usage.free / usage.total if usage.total else 0.0
    free = f"{_size(usage.free)} free ({share:.0%} of {_size(usage.total)})"
    if share < LOW_FREE_FRACTION or usage.free < LOW_FREE_BYTES:
        return CheckResult("warn", f"image store {store} is nearly full: {free}",
                           "free space or grow it: a capture needs room for its compressed image")
    return CheckResult("ok", f"image store {store} is writable; {free}")


@hookimpl
def dsagent_doctor_checks(register):
    register(DoctorCheck("image-store", check_image_store))
