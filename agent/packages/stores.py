"""Which ids and files of a store may be served, resolved safely.

A store is a folder: ``[handlers] package_store`` (driver packages) or
``[handlers] image_store`` when it is a folder (images). ``<store>/<id>`` is a
plain folder (a package placed by hand, an image captured here) or a symlink
to ``<store>/.replicas/<id>/<version>/`` made by ReplicatePackage, which is
followed. So that nothing but packages ever leaves the machine:

- an id is ``[A-Za-z0-9._-]{1,128}`` and does not start with ``.`` (so not
  ``.``, ``..`` or ``.replicas``);
- no component of a requested path starts with ``.`` (``.partial``,
  ``.staging-*``, ``.lock``, dot files), none is empty, none holds a
  backslash or NUL;
- a package folder must resolve inside its store, and a file inside its
  package folder (a symlink leaving it is not followed) and be a regular file
  (never a FIFO or a device, whose read could hang or leak);
- an image without a ``manifest.json`` of its own (captured here) offers only
  ``current`` and the files of its complete versions (those with
  ``meta.json``): a capture in progress is never served.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
MAX_PATH = 1024
MANIFEST = "manifest.json"


def id_ok(pid: str) -> bool:
    return bool(ID_RE.fullmatch(pid)) and not pid.startswith(".")


def path_parts(path: str) -> list[str] | None:
    """The components of a requested relative path, or None if it is refused."""
    if not path or len(path) > MAX_PATH:
        return None
    parts = path.split("/")
    if any(not p or p.startswith(".") or "\\" in p or "\0" in p for p in parts):
        return None
    return parts


def inside(folder: str, target: str) -> bool:
    """Whether ``target`` lies strictly below ``folder`` (both resolved)."""
    return target != folder and os.path.commonpath([folder, target]) == folder


def regular_inside(bound: str, path: str) -> tuple[str, os.stat_result] | None:
    """``path`` resolved, with its stat, if it is a regular file below ``bound``."""
    real = os.path.realpath(path)
    if not inside(bound, real):
        return None
    try:
        st = os.stat(real)
    except OSError:
        return None
    return (real, st) if stat.S_ISREG(st.st_mode) else None


def complete_version(package: str, name: str) -> bool:
    """Whether ``<package>/<name>`` is an image version with its ``meta.json``
    (written last by a capture: the version is complete only with it)."""
    if not id_ok(name):
        return False
    folder = os.path.realpath(os.path.join(package, name))
    return inside(package, folder) and os.path.isdir(folder) \
        and regular_inside(folder, os.path.join(folder, "meta.json")) is not None


class Store:
    """One store (``kind`` is ``drivers`` or ``images``), rooted at ``root``."""

    def __init__(self, kind: str, root: str | os.PathLike):
        self.kind = kind
        self.root = Path(root)

    def package(self, pid: str) -> str | None:
        """The resolved folder of package ``pid``, or None (refused or missing)."""
        if not id_ok(pid):
            return None
        root = os.path.realpath(self.root)
        folder = os.path.realpath(os.path.join(root, pid))
        return folder if inside(root, folder) and os.path.isdir(folder) else None

    def own_manifest(self, package: str) -> str | None:
        """The package's own ``manifest.json`` (a replicated package's), or None."""
        found = regular_inside(package, os.path.join(package, MANIFEST))
        return found[0] if found else None

    def file(self, package: str, rel: str) -> tuple[str, os.stat_result] | None:
        """The file ``rel`` of ``package`` (resolved, with its stat) if it is served."""
        parts = path_parts(rel)
        if parts is None:
            return None
        if self.kind == "images" and self.own_manifest(package) is None:
            whole = parts == ["current"]
            if not whole and (len(parts) < 2 or not complete_version(package, parts[0])):
                return None
        return regular_inside(package, os.path.join(package, *parts))

    def ids(self) -> list[str]:
        """The ids of the packages in the store (for support: ``GET /``)."""
        try:
            names = [entry.name for entry in os.scandir(self.root)]
        except OSError:
            return []
        return sorted(name for name in names if self.package(name) is not None)
