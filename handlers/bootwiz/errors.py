"""What every BootWiz step raises, and the one rule for store names."""

from __future__ import annotations

import errno
import re
from typing import Any

NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


class BootWizError(Exception):
    """A rebuild cannot be done; the message names the cause (and the file)."""

    def __init__(self, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.details = dict(details or {})


class Cancelled(BootWizError):
    """The task was cancelled; raised where the work stops, so cleanup runs as for a failure."""


def check_name(value: str | None, what: str) -> str:
    """``value`` as a store name (``[A-Za-z0-9._-]{1,64}``, not . or ..)."""
    if value is None or not NAME_RE.fullmatch(value) or value in (".", ".."):
        raise BootWizError(f"{what} {value!r} is not allowed (1-64 of A-Z a-z 0-9 . _ -, "
                           "and not '.' or '..'; no '/')")
    return value


def describe_oserror(exc: OSError, doing: str) -> str:
    """``doing: what went wrong (file)``, in words an operator reads."""
    what = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        what = "no space left on device"
    elif exc.errno == errno.EDQUOT:
        what = "disk quota exceeded"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        what = "permission denied"
    elif exc.errno == errno.EROFS:
        what = "read-only file system"
    name = f" ({exc.filename})" if exc.filename else ""
    return f"{doing}: {what}{name}"
