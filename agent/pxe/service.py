"""The PXE process (``python -m agent.pxe --config FILE``), started by
``dsagent run`` only when the config has ``[pxe]``. For now it runs the
seed's Interface service: scan the SBS folder at start, then whenever it
changes, and publish what was applied (status file ``pxe.json``).

Waking: the folder's mtime is polled every ``POLL_S`` (0.5 s): a stat per
poll, no new dependency, and it works on every file system; a full scan
also runs every ``RESCAN_S`` in case an mtime change was missed, and after
a failed scan every ``RETRY_S``. inotify is a later improvement.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

from agent.common.config import Config
from agent.common.statusfile import StatusFile
from agent.pxe.interface import (PRUNE_EVERY_S, InterfaceError, ScanResult, prune, scan,
                                 store_dir)
from agent.pxe.state import PXEState

log = logging.getLogger("dsagent.pxe")

POLL_S = 0.5
RESCAN_S = 30.0
RETRY_S = 5.0


class PXEService:
    def __init__(self, config: Config):
        self.sbs_dir = Path(config.get("handlers", "sbs_dir"))
        self.state = PXEState(config.state_dir)
        self.status = StatusFile(config.state_dir, "pxe")
        self.stop = threading.Event()
        self.applied = 0
        self.rejected = 0
        self.next_prune = 0.0
        self.last_error: str | None = None

    def scan_once(self) -> bool:
        """One scan, logged and published; False if it could not finish."""
        error = None
        try:
            result = scan(self.sbs_dir, self.state)
        except InterfaceError as exc:
            result = getattr(exc, "result", ScanResult())
            error = str(exc)
        for name, change in result.applied:
            log.info("applied %s: %s", name, change)
        for name, reason in result.rejected:
            log.error("rejected %s (set aside in %s/rejected with its reason): %s",
                      name, store_dir(self.sbs_dir), reason)
        for name, why in result.waiting:
            log.warning("%s stays in the SBS folder for the next scan: %s", name, why)
        if error and error != self.last_error:  # a folder still missing is said once
            log.error("%s", error)
        elif self.last_error and not error:
            log.info("the SBS folder is usable again")
        self.last_error = error
        self.applied += len(result.applied)
        self.rejected += len(result.rejected)
        facts = {"applied": self.applied, "rejected": self.rejected,
                 "waiting": len(result.waiting), **self.state.counts(),
                 "last_applied": self.state.last_applied(), "sbs_dir": str(self.sbs_dir)}
        if result.rejected:
            facts["last_rejected"] = {"file": result.rejected[-1][0],
                                      "reason": result.rejected[-1][1], "at": time.time()}
        facts["last_error"] = {"message": error, "at": time.time()} if error else None
        self.status.update(**facts)
        if time.monotonic() >= self.next_prune:
            self.next_prune = time.monotonic() + PRUNE_EVERY_S
            deleted = prune(store_dir(self.sbs_dir))
            if deleted:
                log.info("pruned %d old file(s) from %s", deleted, store_dir(self.sbs_dir))
        return error is None

    def _mtime(self) -> int | None:
        try:
            return os.stat(self.sbs_dir).st_mtime_ns
        except OSError:
            return None

    def run(self) -> None:
        counts = self.state.counts()
        log.info("PXE Interface started on %s: %d computer(s), %d predefined, %d image(s) "
                 "in %s", self.sbs_dir, counts["computers"], counts["predefined"],
                 counts["images"], self.state.path)
        seen = self._mtime()
        ok = self.scan_once()
        last_scan = time.monotonic()
        while not self.stop.wait(POLL_S):
            mtime = self._mtime()
            since = time.monotonic() - last_scan
            if mtime != seen or since >= RESCAN_S or (not ok and since >= RETRY_S):
                seen = mtime  # taken before the scan: a file added during it wakes us again
                ok = self.scan_once()
                last_scan = time.monotonic()

    def close(self) -> None:
        self.status.update(stopped_at=time.time())
        self.status.close()
        self.state.close()


def main(argv: list[str] | None = None) -> int:
    import sqlite3

    from agent.common import process
    from agent.common.errors import DsagentError

    try:
        service = PXEService(process.start("pxe", argv, "python -m agent.pxe"))
    except (DsagentError, OSError, sqlite3.Error) as exc:
        log.error("%s", exc)
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: service.stop.set())
    try:
        service.run()
    finally:
        service.close()
    log.info("PXE process stopped; %d file(s) applied, %d rejected", service.applied,
             service.rejected)
    return 0
