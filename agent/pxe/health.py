"""The PXE server's health, reported to the task server (PROTOCOL.md §7).

The seed: "there is no server-based status on if the PXE Services are
functional". Here the task server gets ``POST …/pxe/state`` on every change
and at least every poll interval: serving or not and why, the counts, the
last file applied. Posting runs in its own thread so that a slow or absent
task server never holds up a scan or a dnsmasq restart; only the newest
state is sent (a state is a snapshot, not an event: nothing is lost by
skipping one that was overtaken). A failure is logged once per outage.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any

from agent.common.errors import DsagentError

log = logging.getLogger("dsagent.pxe")

SETTLE_S = 0.2        # changes within this are sent as one state
RETRY_S = 10.0        # after a failed post


def rfc3339(at: float) -> str:
    return datetime.fromtimestamp(at, timezone.utc).isoformat(timespec="seconds") \
        .replace("+00:00", "Z")


def state_body(serving: bool, reason: str, counts: dict[str, int],
               last_applied: dict | None) -> dict[str, Any]:
    """The §7 body from what the PXE process knows."""
    last = ({"file": last_applied["file"], "at": rfc3339(last_applied["at"])}
            if last_applied else None)
    return {"serving": serving, "reason": reason,
            "computers": counts.get("computers", 0) + counts.get("predefined", 0),
            "images": counts.get("images", 0), "last_applied": last, "at": rfc3339(time.time())}


class HealthReporter:
    """Sends the newest state: soon after each change, and every ``every_s``."""

    def __init__(self, api, every_s: float):
        self.api = api
        self.every_s = every_s
        self._state: dict[str, Any] | None = None
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._failing = False
        self.sent = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="pxe-health", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def report(self, state: dict[str, Any]) -> None:
        """Queue ``state`` to be sent; a newer one replaces it."""
        self._state = state
        self._changed.set()

    def stop(self, flush_within: float = 3.0) -> None:
        """Stop; the last state (e.g. "stopped") is sent if it can be within ``flush_within``."""
        self._stop.set()
        self._changed.set()
        self._thread.join(flush_within)

    def _run(self) -> None:
        next_due = 0.0
        while True:
            self._changed.wait(max(0.0, next_due - time.monotonic()))
            stopping = self._stop.is_set()
            if self._changed.is_set() and not stopping:
                time.sleep(SETTLE_S)
            self._changed.clear()
            state = self._state
            if state is not None:
                ok = self._send(dict(state, at=rfc3339(time.time())))
                next_due = time.monotonic() + (self.every_s if ok else min(RETRY_S, self.every_s))
            else:
                next_due = time.monotonic() + self.every_s
            if stopping:
                return

    def _send(self, state: dict[str, Any]) -> bool:
        try:
            self.api.post_pxe_state(state)
        except DsagentError as exc:
            self.last_error = str(exc)
            if not self._failing:
                log.warning("cannot report the PXE state to the task server (retrying every "
                            "%g s): %s", min(RETRY_S, self.every_s), exc)
            self._failing = True
            return False
        if self._failing:
            log.info("PXE state reported to the task server again")
        self._failing = False
        self.last_error = None
        self.sent += 1
        return True
