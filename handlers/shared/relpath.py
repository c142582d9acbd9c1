"""The one rule for a relative file path given by someone else (a driver
manifest, a replicated package's manifest): it must stay inside its folder."""

from __future__ import annotations

import posixpath
from typing import Any

MAX_PATH_LEN = 1024


def rel_path_problem(path: Any) -> str | None:
    """Why ``path`` is not an acceptable relative file path, or None."""
    if not isinstance(path, str) or not path:
        return "not a non-empty string"
    if any(ch in path for ch in "\0\n\r"):
        return "contains NUL or a line break"
    if len(path) > MAX_PATH_LEN:
        return f"longer than {MAX_PATH_LEN} characters"
    if path.startswith("/"):
        return "absolute"
    if "\\" in path:
        return "contains a backslash"
    parts = path.split("/")
    if ".." in parts:
        return "contains '..'"
    if posixpath.normpath(path) != path or "." in parts:
        return "not normalised"
    return None
