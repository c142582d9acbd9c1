"""What wakes the Interface: a ``.sbs`` file arriving in the SBS folder.

inotify (through ``inotify_simple``, a small pure-Python binding: the
standard library has none) wakes the PXE process the moment a file is
linked or moved into the folder, whoever wrote it: UpdateSBSInfo on this
machine, BootWizRebuild, the PXE process's own startup files, or a copy by
hand. A console change therefore reaches dnsmasq in milliseconds, not a
poll interval later (the seed: ~36 s a computer file).

Where inotify cannot be used (the folder does not exist yet, a file system
without it, the watch limit reached), ``wait`` falls back to the folder's
mtime, looked at every call, and inotify is tried again on the next call
after ``REARM_S``. The caller also rescans on a timer, so a missed event
costs at most that.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from inotify_simple import INotify, flags

log = logging.getLogger("dsagent.pxe")

MASK = (flags.CREATE | flags.MOVED_TO | flags.CLOSE_WRITE | flags.DELETE_SELF
        | flags.MOVE_SELF)
REARM_S = 5.0


class FolderWatch:
    """``wait(timeout)``: True as soon as a ``.sbs`` file may have arrived."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._inotify: INotify | None = None
        self._next_try = 0.0
        self._mtime: int | None = self._stat()
        self.using_inotify = False

    def _stat(self) -> int | None:
        try:
            return os.stat(self.folder).st_mtime_ns
        except OSError:
            return None

    def _arm(self) -> None:
        if self._inotify is not None or time.monotonic() < self._next_try:
            return
        self._next_try = time.monotonic() + REARM_S
        try:
            watcher = INotify()
        except OSError as exc:
            log.warning("inotify unavailable (%s): the SBS folder is polled", exc)
            return
        try:
            watcher.add_watch(self.folder, MASK)
        except OSError:
            watcher.close()   # the folder is missing (said by the scan): try again later
            return
        self._inotify = watcher
        self.using_inotify = True

    def _disarm(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
        self._inotify = None
        self.using_inotify = False

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s; True if the folder changed in a way that
        may bring a ``.sbs`` file (or it was replaced: rescan it)."""
        self._arm()
        changed = False
        if self._inotify is not None:
            for event in self._inotify.read(timeout=int(timeout * 1000)):
                if event.mask & (flags.DELETE_SELF | flags.MOVE_SELF | flags.IGNORED):
                    self._disarm()
                    changed = True
                elif event.name.endswith(".sbs"):
                    changed = True
        else:
            time.sleep(timeout)
        mtime = self._stat()
        if mtime != self._mtime:
            self._mtime = mtime
            changed = True
        return changed

    def close(self) -> None:
        self._disarm()
