"""The PXE process (``python -m agent.pxe --config FILE``), started by
``dsagent run`` only when the config has ``[pxe]``: the seed's four PXE
services in one loop.

- **Signal** (startup.py): at start, and after dnsmasq had to be restarted,
  the startup answer is written as the initial SBS files;
- **Interface** (interface.py): the SBS folder is scanned at start and
  whenever it changes, every file applied to the durable state (state.py);
- **Server + TFTP** (bootfiles.py, dnsmasq.py): the decisions are rendered
  into files and dnsmasq is HUPed after each change; dnsmasq starts only
  after the startup files are applied, and is restarted with back-off
  (1 s doubling to 60 s) if it dies;
- **Health** (health.py): every change, and every poll interval, goes to the
  task server; the status file ``pxe.json`` feeds ``dsagent status``.

If the task server cannot be reached at start, a site server that has
applied a startup answer before serves its saved state (clients still boot
while the task server is down) and asks again every ``STARTUP_RETRY_S``; one
that never had an answer does not serve until it gets one.

Waking (wake.py): inotify on the SBS folder wakes the loop the moment a
``.sbs`` file arrives, else it looks every ``POLL_S`` (0.5 s), when dnsmasq
is also checked; a full scan also runs every ``RESCAN_S`` in case a change
was missed, and after a failed scan every ``RETRY_S``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

from agent.common.config import Config, pxe_tftp_root
from agent.common.errors import ConfigError, DsagentError
from agent.common.serverapi import ServerAPI
from agent.common.statusfile import StatusFile
from agent.pxe.bootfiles import BootFiles
from agent.pxe.dnsmasq import Dnsmasq, EngineError
from agent.pxe.health import HealthReporter, state_body
from agent.pxe.interface import (PRUNE_EVERY_S, InterfaceError, ScanResult, prune, scan,
                                 store_dir)
from agent.pxe.startup import StartupError, write_startup_files
from agent.pxe.state import PXEState
from agent.pxe.wake import FolderWatch

log = logging.getLogger("dsagent.pxe")

POLL_S = 0.5
RESCAN_S = 30.0
RETRY_S = 5.0
STARTUP_RETRY_S = 10.0
BACKOFF_FIRST_S, BACKOFF_MAX_S = 1.0, 60.0
HEALTHY_AFTER_S = 60.0      # a dnsmasq up this long resets the back-off
SERVER_TIMEOUT_S = 10.0


def run_dir_for(state_dir: Path) -> Path:
    """dnsmasq's own folder (its hosts file): outside the 0700 state dir, since
    dnsmasq drops root and re-reads the file as its own user on SIGHUP."""
    tag = hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:12]
    base = Path("/run/dsagent") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir())
    return base / f"pxe-{tag}"


class PXEService:
    def __init__(self, config: Config):
        creds = config.credentials()
        if creds is None:
            raise ConfigError(f"{config.path}: no client_id/token and no registration in "
                              f"{config.state_dir}; run `dsagent run` to register")
        self.sbs_dir = Path(config.get("handlers", "sbs_dir"))
        self.interface = config.get("pxe", "interface")
        self.tftp_root = Path(pxe_tftp_root(config))
        self.state = PXEState(config.state_dir)
        self.status = StatusFile(config.state_dir, "pxe")
        self.api = ServerAPI(config.get("agent", "server_url"), creds.client_id, creds.token,
                             timeout=SERVER_TIMEOUT_S)
        self.health = HealthReporter(self.api, float(config.get("cta", "poll_interval_s")))
        self.files = BootFiles(run_dir_for(config.state_dir), self.tftp_root)
        self.engine = Dnsmasq(self.interface, self.tftp_root, self.files.hosts_path)
        self.stop = threading.Event()
        self.watch = FolderWatch(self.sbs_dir)
        self.applied = 0
        self.rejected = 0
        self.next_prune = 0.0
        self.last_error: str | None = None
        self.serving = False
        self.reason = "starting"
        self.need_startup = True        # fetch the startup answer before (re)starting dnsmasq
        self.next_startup = 0.0
        self.restart_at = 0.0
        self.backoff = 0.0
        self.restarts = 0
        self.unbuilt: dict[str, list[str]] = {}
        self.answered = 0

    # ---- Interface ------------------------------------------------------------------
    def scan_once(self) -> bool:
        """One scan, logged, rendered and published; False if it could not finish."""
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
                 "waiting": len(result.waiting), "sbs_dir": str(self.sbs_dir)}
        if result.rejected:
            facts["last_rejected"] = {"file": result.rejected[-1][0],
                                      "reason": result.rejected[-1][1], "at": time.time()}
        facts["last_error"] = {"message": error, "at": time.time()} if error else None
        self.status.update(**facts)
        if result.applied:
            self.render()
        self.publish()
        if time.monotonic() >= self.next_prune:
            self.next_prune = time.monotonic() + PRUNE_EVERY_S
            deleted = prune(store_dir(self.sbs_dir))
            if deleted:
                log.info("pruned %d old file(s) from %s", deleted, store_dir(self.sbs_dir))
        return error is None

    # ---- Server ---------------------------------------------------------------------
    def render(self) -> bool:
        """Render every decision into the boot files; HUP dnsmasq if they changed."""
        decisions, unknown = self.state.decisions()
        try:
            rendered = self.files.render(decisions, unknown)
        except OSError as exc:
            log.error("cannot write the PXE boot files: %s", exc)
            return False
        self.answered = rendered.answered
        if rendered.unbuilt != self.unbuilt:
            for config, macs in rendered.unbuilt.items():
                log.warning("configuration %s has no current build in %s: %d computer(s) set "
                            "to automation with it cannot boot (run BootWizRebuild)",
                            config, self.tftp_root, len(macs))
        self.unbuilt = rendered.unbuilt
        if rendered.written or rendered.deleted or rendered.hosts_changed:
            log.info("boot files rendered: %d written, %d removed; answering %s",
                     rendered.written, rendered.deleted,
                     "every MAC" if rendered.answered < 0 else f"{rendered.answered} MAC(s)")
            if rendered.hosts_changed:
                self.engine.reload()
        return True

    def fetch_startup(self) -> bool:
        """Signal: the startup answer, written as SBS files and applied."""
        try:
            answer = self.api.pxe_startup()
        except DsagentError as exc:
            self.next_startup = time.monotonic() + STARTUP_RETRY_S
            saved = self.state.startup_applied()
            log.warning("cannot get the PXE startup information from the task server%s: %s",
                        f" (serving the state applied {time.ctime(saved)})" if saved else "",
                        exc)
            self.reason = f"waiting for the startup information: {exc}"
            return False
        for _attempt in range(3):
            try:
                names = write_startup_files(self.sbs_dir, answer)
                break
            except StartupError as exc:
                if not exc.waiting:
                    self.next_startup = time.monotonic() + STARTUP_RETRY_S
                    log.error("%s", exc)
                    self.reason = str(exc)
                    return False
                self.scan_once()   # apply the older file first, then write ours
        log.info("startup information received: %s", ", ".join(names) or "nothing")
        self.scan_once()
        if any((self.sbs_dir / name).exists() for name in names):   # not applied yet
            self.next_startup = time.monotonic() + STARTUP_RETRY_S
            self.reason = "the startup information is not applied yet (see the log)"
            return False
        self.state.mark_startup_applied()
        self.need_startup = False
        return True

    def start_engine(self) -> None:
        try:
            self.files.prepare()
        except OSError as exc:
            self._engine_failed(f"cannot prepare the boot files: {exc}")
            return
        if not self.render():
            self._engine_failed("cannot write the boot files")
            return
        try:
            self.engine.start()
        except (EngineError, OSError) as exc:
            self._engine_failed(str(exc))
            return
        self.serving = True
        self.reason = f"dnsmasq pid {self.engine.pid} answering on {self.interface}"
        self.publish()

    def _engine_failed(self, why: str) -> None:
        self.backoff = min(BACKOFF_MAX_S, max(BACKOFF_FIRST_S, self.backoff * 2))
        self.restart_at = time.monotonic() + self.backoff
        log.error("PXE not served: %s; trying again in %g s", why, self.backoff)
        self.serving = False
        self.reason = why
        self.publish()

    def watch_engine(self) -> None:
        """Start dnsmasq when due; notice it died (and plan its restart)."""
        if self.engine.running():
            if self.backoff and time.time() - (self.engine.started_at or 0) > HEALTHY_AFTER_S:
                self.backoff = 0.0
            if self.need_startup and time.monotonic() >= self.next_startup:
                self.fetch_startup()   # serving saved state; the answer is still wanted
            return
        if self.serving:   # it was up: it died
            self.restarts += 1
            self.need_startup = True
            self._engine_failed(self.engine.exit_description())
            return
        if time.monotonic() < self.restart_at:
            return
        if self.need_startup and time.monotonic() >= self.next_startup:
            self.fetch_startup()
        if self.need_startup and not self.state.startup_applied():
            self.restart_at = time.monotonic() + STARTUP_RETRY_S
            self.publish()
            return
        self.start_engine()

    # ---- Health ---------------------------------------------------------------------
    def publish(self) -> None:
        counts = self.state.counts()
        last = self.state.last_applied()
        self.status.update(
            **counts, last_applied=last, serving=self.serving, reason=self.reason,
            interface=self.interface, tftp_root=str(self.tftp_root),
            dnsmasq_pid=self.engine.pid if self.engine.running() else None,
            address=str(self.engine.address) if self.engine.address else None,
            answered=self.answered, restarts=self.restarts,
            unbuilt={c: len(m) for c, m in self.unbuilt.items()},
            health_error=self.health.last_error)
        self.health.report(state_body(self.serving, self.reason, counts, last))

    def run(self) -> None:
        counts = self.state.counts()
        log.info("PXE process started for %s, SBS folder %s: %d computer(s), %d predefined, "
                 "%d image(s) in %s", self.interface, self.sbs_dir, counts["computers"],
                 counts["predefined"], counts["images"], self.state.path)
        self.health.start()
        ok = self.scan_once()
        last_scan = time.monotonic()
        self.watch_engine()
        while not self.stop.is_set():
            # armed before the scan: a file added during it wakes us again
            changed = self.watch.wait(POLL_S)
            if self.stop.is_set():
                break
            since = time.monotonic() - last_scan
            if changed or since >= RESCAN_S or (not ok and since >= RETRY_S):
                ok = self.scan_once()
                last_scan = time.monotonic()
            self.watch_engine()

    def close(self) -> None:
        self.watch.close()
        self.engine.stop()
        self.files.remove_run_dir()
        self.serving = False
        self.reason = "the PXE process stopped"
        self.publish()
        self.health.stop()
        self.status.update(stopped_at=time.time())
        self.status.close()
        self.state.close()
        self.api.close()


def main(argv: list[str] | None = None) -> int:
    import sqlite3

    from agent.common import process

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
