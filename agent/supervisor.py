"""``dsagent run``: register if needed, then supervise the agent's processes.

objecthost, CTA and ctdataloader run as child processes, and the PXE process
(agent/pxe/) as a fourth when the config has ``[pxe]``; one that dies is
logged with its exit status and restarted with backoff (1 s doubling to 30 s,
reset after a minute of good health). SIGTERM/SIGINT stop the children
gracefully (SIGTERM, then SIGKILL after a grace period).

The environment variable ``DSAGENT_RESTART_BACKOFF_MAX_S`` (seconds, a float
> 0, default 30) caps the restart backoff; tests and soaks set it low so a
killed child is back within a second. A value below 1 s is also the first
delay.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from agent.common.config import Config, load_config, parse_hostport
from agent.common.errors import AuthError, DsagentError, ServerError
from agent.common.logsetup import log_dir, setup_logging
from agent.common.reaper import become_subreaper, kill_adopted
from agent.common.serverapi import ServerAPI
from agent.common.statusfile import StatusFile
from agent.common.tickle import load_hop_key

log = logging.getLogger("dsagent.supervisor")

CHILDREN = (("objecthost", "objecthost"), ("cta", "agent.cta"), ("ctdataloader", "ctdataloader"))
PXE_CHILD = ("pxe", "agent.pxe")   # only with [pxe]
BACKOFF_MAX_S = 30.0
BACKOFF_MAX_ENV = "DSAGENT_RESTART_BACKOFF_MAX_S"
SWEEP_EVERY_S = 10.0
HEALTHY_AFTER_S = 60.0
STOP_GRACE_S = 20.0


@dataclass
class Child:
    name: str
    module: str
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    backoff: float = 0.0
    restart_at: float = 0.0
    restarts: int = 0


def ensure_registered(config: Config, stop: threading.Event) -> bool:
    """Register with the server when there are no credentials; retry while it is down."""
    if config.credentials() is not None:
        return True
    delay = 1.0
    while not stop.is_set():
        api = ServerAPI(config.get("agent", "server_url"))
        try:
            answer = api.register(config.get("agent", "enrollment_key"))
        except AuthError as exc:
            log.error("registration refused: %s (check [agent] enrollment_key in %s)",
                      exc, config.path)
            return False
        except ServerError as exc:
            log.error("registration failed: %s; retrying in %.0f s", exc, delay)
            stop.wait(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, 60.0)
            continue
        finally:
            api.close()
        path = config.save_credentials(answer["client_id"], answer["token"], answer["tickle_key"])
        log.info("registered as %s; credentials in %s", answer["client_id"], path)
        return True
    return False


def start_trace(config: Config):
    """The remote trace server when ``[trace] listen`` is set; a failure only costs the trace."""
    listen = config.get("trace", "listen")
    if not listen:
        return None
    from agent.tools.trace import TraceServer, load_trace_key  # only when the trace is on

    try:
        host, port = parse_hostport(listen, "[trace] listen")
        return TraceServer(host, port, load_trace_key(config.state_dir, create=True),
                           log_dir(config)).start()
    except (OSError, ValueError) as exc:
        log.error("remote trace not started: cannot listen on %s: %s", listen, exc)
        return None


def restart_backoff_max() -> float:
    """The restart backoff cap: ``$DSAGENT_RESTART_BACKOFF_MAX_S`` or 30 s."""
    raw = os.environ.get(BACKOFF_MAX_ENV, "").strip()
    if not raw:
        return BACKOFF_MAX_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (0 < value < float("inf")):
        log.warning("ignoring %s=%r: not a number of seconds > 0; using %.0f s",
                    BACKOFF_MAX_ENV, raw, BACKOFF_MAX_S)
        return BACKOFF_MAX_S
    return value


class Supervisor:
    def __init__(self, config: Config):
        self.config = config
        self.backoff_max = restart_backoff_max()
        started = CHILDREN + ((PXE_CHILD,) if config.has_section("pxe") else ())
        self.children = [Child(name, module) for name, module in started]
        self.stop = threading.Event()
        self.next_sweep = 0.0
        self.status: StatusFile | None = None
        self.trace = None

    def _start(self, child: Child) -> None:
        cmd = [sys.executable, "-m", child.module, "--config", self.config.path]
        child.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        child.started_at = time.monotonic()
        log.info("started %s (pid %d)", child.name, child.proc.pid)
        self._publish()

    def _publish(self) -> None:
        """Tell ``dsagent status`` which children run, and how often each restarted."""
        if self.status is not None:
            self.status.update(children={
                c.name: {"pid": c.proc.pid if c.proc else None, "restarts": c.restarts}
                for c in self.children})

    def _check(self, child: Child) -> None:
        now = time.monotonic()
        if child.proc is None:
            if now >= child.restart_at:
                self._start(child)
            return
        code = child.proc.poll()
        if code is None:
            if child.backoff and now - child.started_at > HEALTHY_AFTER_S:
                child.backoff = 0.0
            return
        how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        child.backoff = min(max(child.backoff * 2, 1.0), self.backoff_max)
        child.restart_at = now + child.backoff
        child.restarts += 1
        child.proc = None
        log.error("%s %s; restarting in %.3g s (restart #%d)", child.name, how,
                  child.backoff, child.restarts)
        self._publish()
        self.next_sweep = 0.0  # its handler processes are ours now: kill them at once

    def _sweep(self) -> None:
        """Kill handler processes orphaned by a dead worker or left behind."""
        now = time.monotonic()
        if now < self.next_sweep:
            return
        self.next_sweep = now + SWEEP_EVERY_S
        kill_adopted({c.proc.pid for c in self.children if c.proc})

    def serve(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())
        state_dir = self.config.state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(state_dir, 0o700)
        load_hop_key(state_dir, create=True)
        self.status = StatusFile(state_dir, "dsagent")
        if not ensure_registered(self.config, self.stop):
            return 0 if self.stop.is_set() else 2
        for child in self.children:
            self._start(child)
        self.trace = start_trace(self.config)
        if not become_subreaper():
            log.warning("cannot become a child subreaper: orphaned handler processes "
                        "will not be cleaned up")
        while not self.stop.wait(0.2):
            for child in self.children:
                self._check(child)
            self._sweep()
        self.shutdown()
        return 0

    def shutdown(self) -> None:
        """Stop in chain order: no more tickles, then the CTA drains its tasks,
        then the uploader (which has been sending their final events)."""
        for child in self.children:
            if not child.proc or child.proc.poll() is not None:
                continue
            log.info("stopping %s", child.name)
            child.proc.terminate()
            try:
                child.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                log.error("%s did not stop within %.0f s; killing it", child.name, STOP_GRACE_S)
                child.proc.kill()
                child.proc.wait()
        kill_adopted(set())
        if self.trace is not None:
            self.trace.close()
        if self.status is not None:
            self.status.update(stopped_at=time.time())
            self.status.close()
        log.info("agent stopped")


def run(config_path: str) -> int:
    try:
        config = load_config(config_path)
    except DsagentError as exc:
        log.error("%s", exc)
        return 2
    setup_logging("dsagent", config=config)
    return Supervisor(config).serve()
