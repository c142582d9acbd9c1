"""The upload loop (``python -m ctdataloader --config FILE``).

Sleeps until the CTA signals a new event (no polling delay on the hot path;
a 30 s safety-net wake covers a lost signal), uploads batches in order,
deletes only the ids the server accepted, and on failure backs off
exponentially with full jitter (a delay drawn from [0, b], b 0.5 s doubling
to 60 s) so a server outage sees a trickle of retries, not a storm. A 503 or
429 with ``Retry-After: S`` is obeyed: no post for S seconds plus up to 10 %
(PROTOCOL.md §3). The CTA's "server back" signal (a pull succeeded after
failed ones) cuts short only a back-off for an unreachable server, never one
the server asked for or one after an answer of the status endpoint itself:
a working pull says nothing about ``/status``.
"""

from __future__ import annotations

import logging
import random
import signal
import sqlite3
import sys
import threading
import time

from agent.common.config import Config
from agent.common.errors import AuthError, DsagentError, ServerBusy, ServerError
from agent.common import process
from agent.common.statusfile import StatusFile
from agent.common.notify import SERVER_BACK, Notifier, NotifyListener
from agent.common.statedb import db_path

from ctdataloader.outbox import Outbox

log = logging.getLogger("dsagent.ctdataloader")

BATCH = 500
SAFETY_NET_S = 30.0
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 60.0
REFUSED_RETRY_S = 300.0   # an event the server did not accept is offered again this late


def unreachable(exc: BaseException) -> bool:
    """The post never got an answer (the server is down or cut off), as opposed
    to an answer refusing it: only then may a working pull end the back-off."""
    from agent.common.serverapi import failure_kind

    return isinstance(exc, ServerError) and failure_kind(exc) in ("unreachable", "timeout")


class Uploader:
    def __init__(self, config: Config):
        creds = config.credentials()
        if creds is None:
            raise DsagentError(f"{config.path}: agent not registered yet (no token)")
        self.state_dir = config.state_dir
        self.outbox = Outbox(db_path(config.state_dir))
        self.listener = NotifyListener(config.state_dir)
        self.status = StatusFile(config.state_dir, "ctdataloader")
        self.creds = creds
        self.server_url = config.get("agent", "server_url")
        self._api = None
        self.stop = threading.Event()
        self.backoff = 0.0
        self.uploaded = 0
        # task_id -> when to offer its events again: the server did not accept
        # one of them. Its later events wait too (per-task order), other tasks'
        # events go on, so a refused event never holds up the rest.
        self.held: dict[str, float] = {}

    @property
    def api(self):
        """The HTTP client, made on first use: an agent with nothing to send
        never loads the HTTP and TLS stack (idle memory)."""
        if self._api is None:
            from agent.common.serverapi import ServerAPI

            self._api = ServerAPI(self.server_url, self.creds.client_id, self.creds.token)
        return self._api

    def _back_off(self, delay: float, cut_short: bool) -> None:
        """Sleep ``delay`` s, unless ``cut_short`` and the CTA says the server is
        back (or we stop).

        New-event notifications do not end it: during an outage they would
        make a hot retry loop."""
        deadline = time.monotonic() + delay
        while not self.stop.is_set() and (left := deadline - time.monotonic()) > 0:
            if SERVER_BACK in self.listener.wait(left) and cut_short:
                log.info("the CTA reached the server again: uploading now")
                return

    def upload_once(self) -> int:
        """Upload one batch; return how many events the server accepted.

        Raises ServerError when the server accepted none of them (back off).
        """
        now = time.monotonic()
        self.held = {tid: until for tid, until in self.held.items() if until > now}
        events = self.outbox.batch(BATCH, skip_tasks=set(self.held))
        if not events:
            return 0
        accepted = set(self.api.post_status(events))
        sent = [e["event_id"] for e in events]
        removed = self.outbox.delete([eid for eid in sent if eid in accepted])
        self.uploaded += removed
        self.status.update(last_upload_ok_at=time.time(), uploaded=self.uploaded)
        for event in events:
            if event["event_id"] in accepted:
                log.info("server accepted seq %s %s", event.get("seq"), event.get("state"),
                         extra={"task_id": event.get("task_id"), "event_id": event["event_id"]})
        refused = [e for e in events if e["event_id"] not in accepted]
        if refused and not removed:  # the server took nothing: its problem, back off
            raise ServerError(f"server accepted none of {len(sent)} event(s); they stay in "
                              "the outbox")
        if refused:  # it took others: hold these tasks so they do not block the rest
            for event in refused:
                self.held[event["task_id"]] = now + REFUSED_RETRY_S
            log.warning("server did not accept %d of %d event(s), e.g. %s of task %s; they stay "
                        "in the outbox and are offered again in %.0f s", len(refused), len(sent),
                        refused[0]["event_id"], refused[0]["task_id"], REFUSED_RETRY_S)
        log.debug("uploaded %d event(s)", removed)
        return removed

    def run(self) -> None:
        log.info("ctdataloader started; %d event(s) waiting", self.outbox.depth().waiting)
        while not self.stop.is_set():
            try:
                if self.upload_once() == BATCH:
                    continue  # more waiting: keep going
                self.backoff = 0.0
            except (ServerError, OSError, sqlite3.Error) as exc:
                self.backoff = min(max(self.backoff * 2, BACKOFF_MIN_S), BACKOFF_MAX_S)
                after = exc.retry_after if isinstance(exc, ServerBusy) else None
                if after is not None:
                    delay = after + random.uniform(0, max(1.0, 0.1 * after))
                else:
                    delay = random.uniform(0, self.backoff)
                depth = self.outbox.depth()
                what = ("token refused" if isinstance(exc, AuthError) else
                        "cannot update the outbox (uploaded events will be sent again)"
                        if isinstance(exc, sqlite3.Error) else "upload failed")
                log.error("%s: %s; %d event(s) waiting (oldest %.0f s); retry in %.1f s%s",
                          what, exc, depth.waiting, depth.oldest_s or 0, delay,
                          " (as the server asked)" if after is not None else "")
                self.status.update(last_upload_error={"at": time.time(),
                                                      "message": f"{what}: {exc}"})
                self._back_off(delay, cut_short=after is None and unreachable(exc))
                continue
            if self.outbox.depth().waiting > self.outbox.depth_of(set(self.held)):
                continue
            self.listener.wait(SAFETY_NET_S)
        if self.backoff == 0.0:  # server reachable: send what the CTA's shutdown recorded
            try:
                while self.upload_once():
                    pass
            except (ServerError, OSError) as exc:
                log.warning("final upload failed (%s); events stay in the outbox", exc)

    def close(self) -> None:
        if self._api is not None:
            self._api.close()
        self.outbox.close()
        self.listener.close()
        self.status.close()


def main(argv: list[str] | None = None) -> int:
    try:
        uploader = Uploader(process.start("ctdataloader", argv, "ctdataloader"))
    except (DsagentError, OSError) as exc:
        log.error("%s", exc)
        return 2
    waker = Notifier(uploader.state_dir)

    def on_signal(*_):
        uploader.stop.set()
        waker.notify()  # ends a wait at once

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    uploader.run()
    uploader.close()
    log.info("ctdataloader stopped; %d event(s) uploaded", uploader.uploaded)
    return 0


if __name__ == "__main__":
    sys.exit(main())
