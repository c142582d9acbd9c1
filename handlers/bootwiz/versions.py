"""Versions of a configuration and its ``current`` link (docs/bootwiz.md):
a version folder is complete or absent, ``current`` is switched atomically,
and one build of a configuration runs at a time (ConfigLock)."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import shutil
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from handlers.bootwiz.errors import BootWizError, Cancelled, describe_oserror
from handlers.shared.durable import fsync_dir

VERSION_RE = re.compile(r"(\d{8}T\d{6}\.\d{6}Z)-[0-9a-f]{8}")
STAMP_FORMAT = "%Y%m%dT%H%M%S.%fZ"
LOCK_NAME = ".lock"
BUILDING = ".building-"
DELETING = ".deleting-"


def list_versions(config_dir: str) -> list[str]:
    try:
        names = os.listdir(config_dir)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if VERSION_RE.fullmatch(n)
                  and os.path.isdir(os.path.join(config_dir, n))
                  and not os.path.islink(os.path.join(config_dir, n)))


def new_version(existing: list[str], moment: datetime) -> str:
    """A version name later than every existing one (UTC microseconds + random)."""
    stamp = moment.strftime(STAMP_FORMAT)
    stamps = [VERSION_RE.fullmatch(v).group(1) for v in existing]
    if stamps and stamp <= max(stamps):
        latest = datetime.strptime(max(stamps), STAMP_FORMAT).replace(tzinfo=timezone.utc)
        stamp = (latest + timedelta(microseconds=1)).strftime(STAMP_FORMAT)
    return f"{stamp}-{secrets.token_hex(4)}"


def read_current(config_dir: str) -> str | None:
    link = os.path.join(config_dir, "current")
    try:
        return os.path.basename(os.readlink(link).rstrip("/"))
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise BootWizError(f"{link} exists but is not a symlink; refusing to replace it "
                               "(move it away)") from None
        raise


def switch_current(config_dir: str, version: str) -> None:
    """Point ``current`` at ``version`` atomically (symlink + rename + fsync)."""
    tmp = os.path.join(config_dir, f"current.tmp-{secrets.token_hex(4)}")
    os.symlink(version, tmp)
    try:
        os.replace(tmp, os.path.join(config_dir, "current"))
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(config_dir)


def remove_version(config_dir: str, version: str) -> None:
    """Make a version invisible at once (rename), then delete it."""
    doomed = os.path.join(config_dir, f"{DELETING}{version}-{secrets.token_hex(4)}")
    os.rename(os.path.join(config_dir, version), doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def prune(config_dir: str, keep: int, current: str) -> tuple[list[str], list[str], list[str]]:
    """Keep the newest ``keep`` versions (and current); return kept, removed, warnings."""
    versions = list_versions(config_dir)
    kept = set(versions[-keep:]) | {current}
    removed, warnings = [], []
    for version in versions:
        if version in kept:
            continue
        try:
            remove_version(config_dir, version)
            removed.append(version)
        except OSError as exc:
            warnings.append(describe_oserror(exc, f"could not remove old version {version}"))
    return [v for v in versions if v in kept], removed, warnings


def sweep(config_dir: str) -> None:
    """Remove temp folders and links left by builds that were killed."""
    for name in os.listdir(config_dir):
        path = os.path.join(config_dir, name)
        if name.startswith((BUILDING, DELETING)):
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith("current.tmp-") and os.path.islink(path):
            try:
                os.unlink(path)
            except OSError:
                pass


class ConfigLock:
    """flock on ``<config>/.lock``: one build of a configuration at a time."""

    def __init__(self, config_dir: str, cancelled: Callable[[], bool], report: Callable[..., None]):
        self.path = os.path.join(config_dir, LOCK_NAME)
        self.cancelled = cancelled
        self.report = report
        self.fd = -1

    def __enter__(self) -> "ConfigLock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        told = False
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if self.cancelled():
                    os.close(self.fd)
                    raise Cancelled("cancelled while waiting for another build") from None
                if not told:
                    self.report(None, "waiting for another build of this configuration")
                    told = True
                time.sleep(0.2)

    def __exit__(self, *exc: Any) -> None:
        os.close(self.fd)


def safe_current(config_dir: str) -> str | None:
    """Where ``current`` points, None when that cannot be read (a failure's details)."""
    try:
        return read_current(config_dir)
    except (OSError, BootWizError):
        return None


def forget_new_config(config_dir: str, created: bool) -> None:
    """A first build that failed leaves no empty configuration folder behind."""
    if not created:
        return
    try:
        sweep(config_dir)
        os.unlink(os.path.join(config_dir, LOCK_NAME))
        os.rmdir(config_dir)
    except OSError:
        pass
