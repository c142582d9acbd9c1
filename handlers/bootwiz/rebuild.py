"""Check, build a new version of a configuration, switch to it, tell the PXE server.

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

import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable
from xml.sax.saxutils import quoteattr

from agent.plugin import Progress
from handlers.bootwiz.cpio import CHUNK, CpioError, InitrdInfo, NewcWriter, Output, scan_initrd
from handlers.bootwiz.errors import BootWizError, Cancelled, check_name, describe_oserror
from handlers.bootwiz.packages import (BaseTree, DriverFile, PackageChecker, merge_files,
                                       parent_dirs, tree_size)
from handlers.bootwiz.versions import (BUILDING, ConfigLock, forget_new_config, list_versions,
                                       new_version, prune, read_current, remove_version,
                                       safe_current, sweep, switch_current)
from handlers.shared import sbsdrop
from handlers.shared.durable import fsync_dir

Report = Callable[..., None]  # report(percent, message, **details)


def _now() -> datetime:
    """The build time; looked up at each build, so a test can freeze it."""
    return datetime.now(timezone.utc)


def _rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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
    total = sum(tree_size(os.path.join(req.package_store, pid)) for pid in req.drivers)
    total += os.path.getsize(initrd)
    progress = Progress(total, report, "checking driver packages and base", low=1, high=40,
                        min_step=1, min_interval_s=1)   # the cadence ctx.progress keeps anyway
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
    progress.what = "checking base initrd"
    hashed = progress.done  # scan_initrd counts from 0
    try:
        info = scan_initrd(initrd, on_bytes=lambda n: progress.update(hashed + n),
                           cancelled=cancelled)
    except CpioError as exc:
        if str(exc) == "cancelled":
            raise Cancelled("cancelled while checking the base initrd") from None
        raise BootWizError(f"base {req.base!r}: initrd.img is not a valid newc cpio archive "
                           f"(plain or gzip): {exc}") from None
    except OSError as exc:
        raise BootWizError(describe_oserror(exc, f"base {req.base!r}: cannot read {initrd}")
                           ) from None
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


def build_version(req: Request, folder: str, version: str, checked: Checked, moment: datetime,
                  report: Report, cancelled: Callable[[], bool]) -> dict[str, Any]:
    """Write every file of a version into ``folder`` (an empty temp folder)."""
    files, base_info = checked.files, checked.base_info
    kernel_src, initrd_src = checked.kernel, checked.initrd
    total = os.path.getsize(kernel_src) + base_info.size + sum(f.size for f in files)
    progress = Progress(total, report, "building", low=40, high=95, min_step=1, min_interval_s=1)
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
                        writer.add_file(item.initrd_path, item.size, min(item.mtime, mtime),
                                        item.mode, _chunks(fh, cancelled, progress.add, digest))
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
            task_id: str = "") -> dict[str, Any]:
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
        raise BootWizError(describe_oserror(exc, f"checking {req.config} failed")) from None
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
        raise BootWizError(describe_oserror(exc, f"cannot create {config_dir}")) from None
    switched = False
    try:
        with ConfigLock(config_dir, cancelled, report):
            sweep(config_dir)
            previous = read_current(config_dir)
            moment = _now()
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
        forget_new_config(config_dir, created and not switched)
        raise
    except OSError as exc:
        forget_new_config(config_dir, created and not switched)
        raise BootWizError(describe_oserror(exc, f"building {req.config} failed"),
                           {"current": safe_current(config_dir)}) from None
    except BaseException:
        forget_new_config(config_dir, created and not switched)
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


# ---- telling the PXE server (an SBS "update" file) ------------------------------

def sbs_payload(req: Request, version: str, previous: str | None, manifest: dict) -> bytes:
    """The §7 ``update`` file: ``<Update><Image config= version=/></Update>``;
    the other attributes say where the files are (§7: unknown ones are ignored)."""
    attrs = {
        "config": req.config, "version": version, "previous": previous or "",
        "base": req.base, "kernel": manifest["kernel"], "initrd": manifest["initrd"],
        "ipxe": f"{req.config}/{version}/boot.ipxe",
        "pxelinux": f"{req.config}/{version}/pxelinux.cfg/default",
        "current": f"{req.config}/current",
        "initrd_sha256": manifest["initrd_sha256"], "built_at": manifest["built_at"],
    }
    body = " ".join(f"{key}={quoteattr(value)}" for key, value in attrs.items())
    return f'<?xml version="1.0" encoding="utf-8"?>\n<Update><Image {body}/></Update>\n'.encode()


def pxe_update(req: Request, version: str, previous: str | None, manifest: dict,
               task_id: str = "") -> dict[str, Any]:
    """Write the ``update`` SBS file and run sbs_wake_command through the SBS
    drop UpdateSBSInfo uses (same rules for both); never raises: the build is
    done, a failure here is a warning."""
    if not req.sbs_dir:
        return {"written": False,
                "reason": "[handlers] sbs_dir is not configured; no SBS update file written"}
    payload = sbs_payload(req, version, previous, manifest)
    result: dict[str, Any] = {"written": False, "kind": "update"}
    try:
        written = sbsdrop.write_sbs_file(req.sbs_dir, "update", payload)
    except Exception as exc:  # noqa: BLE001 - the build is done; this is only a warning
        result["reason"] = str(exc)
        result["warning"] = (f"{exc}; the PXE server was not told about version {version} "
                             f"(it is current in the preboot store)")
        return result
    result.update(written=True, file=written.path, content=payload.decode())
    warnings = [written.warning] if written.warning else []
    if req.wake_command:
        problem = sbsdrop.wake_interface(req.wake_command, written.path, task_id)
        result["woken"] = not problem
        if problem:
            warnings.append(problem)
    if warnings:
        result["warning"] = "; ".join(warnings)
    return result
