"""A package's ``manifest.json`` at its source of truth, checked before
anything is written: every path relative and inside the package, each once,
a sha256 and a size for each."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from handlers.shared.relpath import rel_path_problem

MAX_MANIFEST = 16 << 20
SHA_RE = re.compile(r"[0-9a-fA-F]{64}")


class ManifestError(Exception):
    """The manifest cannot be used; nothing is changed here."""


@dataclass(frozen=True)
class PackageFile:
    path: str
    sha256: str
    size: int


def parse_manifest(raw: bytes, package: str) -> list[PackageFile]:
    """The files of ``raw`` (the manifest's bytes), or ManifestError naming the problem."""
    if len(raw) > MAX_MANIFEST:
        raise ManifestError(f"manifest.json is larger than {MAX_MANIFEST >> 20} MiB")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ManifestError(f"manifest.json is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        raise ManifestError("manifest.json must be an object with a 'files' list")
    if data.get("id") != package:
        raise ManifestError(f"manifest.json names package {data.get('id')!r}, not '{package}'")
    files: list[PackageFile] = []
    seen: set[str] = set()
    folders: set[str] = set()      # every folder a listed file is in (n × depth, not n²)
    for index, item in enumerate(data["files"]):
        if not isinstance(item, dict):
            raise ManifestError(f"files[{index}] is not an object")
        path, digest, size = item.get("path"), item.get("sha256"), item.get("size")
        why = rel_path_problem(path)
        if why is None and path == "manifest.json":
            why = "the manifest's own name"
        if why:
            raise ManifestError(f"files[{index}] path {path!r} is refused ({why})")
        if path in seen:
            raise ManifestError(f"files[{index}] path {path!r} repeats another")
        parents = ["/".join(path.split("/")[:n]) for n in range(1, path.count("/") + 1)]
        if path in folders or any(parent in seen for parent in parents):
            raise ManifestError(f"files[{index}] path {path!r} is a folder of another file "
                                "or inside one")
        if not isinstance(digest, str) or not SHA_RE.fullmatch(digest):
            raise ManifestError(f"files[{index}] ({path}) has no valid sha256 (64 hex digits)")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ManifestError(f"files[{index}] ({path}) has no valid size (bytes, >= 0)")
        seen.add(path)
        folders.update(parents)
        files.append(PackageFile(path, digest.lower(), size))
    return files
