"""``dsagent run``: register if needed, then supervise the agent's processes.

objecthost, CTA and ctdataloader run as child processes, the PXE process
(agent/pxe/) too when the config has ``[pxe]``, and the package server
(agent/packages/) when it has ``[packages]``; one that dies is
logged with its exit status and restarted with backoff (1 s doubling to 30 s,
reset after a minute of good health). SIGTERM/SIGINT stop the children
gracefully (SIGTERM, then SIGKILL after a grace period).

The environment variable ``DSAGENT_RESTART_BACKOFF_MAX_S`` (seconds, a float
> 0, default 30) caps the restart backoff; tests and soaks set it low so a
killed child is back within a second. A value below 1 s is also the first
delay.

``[agent] mode = "automation"`` (PROTOCOL.md §8, docs/automation.md): the
agent registers at every start, saying each attempt's outcome on stderr (the
automation environment's console) and retrying while the server is
unreachable or does not know the computer.

A Reboot task (handlers/reboot.py) ends with the CTA writing
``<state_dir>/reboot-request.json`` (agent/cta/reboot.py). The supervisor then
stops the objecthost and the CTA (no new task), waits until the outbox is
empty -- every status, the Reboot's ``succeeded`` included, accepted by the
server -- saying so every 30 s, and only then stops the rest and runs
``[agent] reboot_command``. It never restarts the machine with a status unsent.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.common.config import Config, load_config, parse_hostport, reboot_command
from agent.common.errors import AuthError, DsagentError, ServerError
from agent.common.logsetup import log_dir, setup_logging
from agent.common.reaper import become_subreaper, kill_adopted
from agent.common.serverapi import (RegistrationRefused, ServerAPI, failure_kind, machine_macs,
                                    machine_uuid)
from agent.common.statusfile import StatusFile, read_all
from agent.common.tickle import load_hop_key

log = logging.getLogger("dsagent.supervisor")

CHILDREN = (("objecthost", "objecthost"), ("cta", "agent.cta"), ("ctdataloader", "ctdataloader"))
PXE_CHILD = ("pxe", "agent.pxe")   # only with [pxe]
PACKAGES_CHILD = ("packages", "agent.packages")   # only with [packages]; stops within 5 s
BACKOFF_MAX_S = 30.0
BACKOFF_MAX_ENV = "DSAGENT_RESTART_BACKOFF_MAX_S"
SWEEP_EVERY_S = 10.0
HEALTHY_AFTER_S = 60.0
STOP_GRACE_S = 20.0
REGISTER_RETRY_MAX_S = 60.0       # back-off cap while the server cannot be reached
UNKNOWN_RETRY_S = 60.0            # automation: a computer the server does not know asks again
REBOOT_REQUEST = "reboot-request.json"   # written by the CTA: agent/cta/reboot.py
REBOOT_CHECK_S = 0.5
REBOOT_SAY_EVERY_S = 30.0
REBOOT_COMMAND_TIMEOUT_S = 120.0
HELD_FOR_REBOOT = ("objecthost", "cta")
BOOT_ID = "/proc/sys/kernel/random/boot_id"


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
    """Register with the server when there are no credentials (in automation mode:
    always); retry while it is down. False if stopped, or refused (managed mode)."""
    automation = config.get("agent", "mode") == "automation"
    if not automation and config.credentials() is not None:
        return True
    url = config.get("agent", "server_url")
    macs, uuid_ = machine_macs(), machine_uuid()
    tickle_addr = objecthost_address(config) if automation else None
    if automation:
        log.info("automation mode: registering with %s as this computer (MACs %s, uuid %s)",
                 url, ", ".join(macs) or "none found", uuid_)
    api = ServerAPI(url)
    delay, attempt = 1.0, 0
    try:
        while not stop.is_set():
            attempt += 1
            try:
                answer = api.register(config.get("agent", "enrollment_key"),
                                      mode="automation" if automation else None,
                                      tickle_addr=tickle_addr)
            except AuthError as exc:
                if not automation:
                    log.error("registration refused: %s (check [agent] enrollment_key in %s)",
                              exc, config.path)
                    return False
                reason = exc.reason if isinstance(exc, RegistrationRefused) else str(exc)
                wait = UNKNOWN_RETRY_S * random.uniform(0.8, 1.2)
                log.error("registration attempt %d refused: this computer (MACs %s, uuid %s) is "
                          "not known to the task server %s: %s; asking again in %.0f s (add it "
                          "to the computer lists on the console meanwhile)", attempt,
                          ", ".join(macs) or "none", uuid_, url, reason, wait)
                stop.wait(wait)
                continue
            except ServerError as exc:
                wait = delay * random.uniform(0.8, 1.2)
                what = ("the task server answered with an error" if failure_kind(exc) == "answer"
                        else "cannot reach the task server")
                log.error("registration attempt %d failed: %s: %s; retrying in %.0f s",
                          attempt, what, exc, wait)
                stop.wait(wait)
                delay = min(delay * 2, REGISTER_RETRY_MAX_S)
                continue
            path = config.save_credentials(answer["client_id"], answer["token"],
                                           answer["tickle_key"])
            log.info("registered as %s%s; credentials in %s", answer["client_id"],
                     " (automation)" if automation else "", path)
            return True
    finally:
        api.close()
    return False


def objecthost_address(config: Config) -> str | None:
    """Where the task server can tickle this agent: ``[objecthost] listen``, its
    wildcard host replaced by the address this machine reaches the server from."""
    try:
        host, port = parse_hostport(config.get("objecthost", "listen"), "[objecthost] listen")
        if host in ("0.0.0.0", "::", ""):
            server = urlsplit(config.get("agent", "server_url"))
            family, _, _, _, addr = socket.getaddrinfo(
                server.hostname, server.port or 443, type=socket.SOCK_DGRAM)[0]
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect(addr)            # a UDP "connect" sends nothing: it picks a route
                host = probe.getsockname()[0]
    except (OSError, DsagentError) as exc:
        log.warning("cannot tell the task server where to tickle this agent: %s; it relies on "
                    "the poll ([cta] poll_interval_s)", exc)
        return None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
        started = CHILDREN + ((PXE_CHILD,) if config.has_section("pxe") else ()) \
            + ((PACKAGES_CHILD,) if config.has_section("packages") else ())
        self.children = [Child(name, module) for name, module in started]
        self.stop = threading.Event()
        self.next_sweep = 0.0
        self.status: StatusFile | None = None
        self.trace = None
        self.reboot: dict[str, Any] | None = None   # the CTA's request, once seen
        self.held: set[str] = set()                 # children stopped for the reboot
        self.next_reboot_check = 0.0
        self.reboot_said: tuple[float, str] | None = None   # when, and the reason said

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
        self.reboot = read_reboot_request(state_dir)
        if self.reboot is not None:      # asked before a restart of the agent (not the machine)
            self.held = set(HELD_FOR_REBOOT)
            log.info("reboot to %s requested by task %s before this start; the objecthost and "
                     "the CTA stay stopped", self.reboot["to"], self.reboot.get("task_id"))
        for child in self.children:
            if child.name not in self.held:
                self._start(child)
        self.trace = start_trace(self.config)
        if not become_subreaper():
            log.warning("cannot become a child subreaper: orphaned handler processes "
                        "will not be cleaned up")
        while not self.stop.wait(0.2):
            for child in self.children:
                if child.name not in self.held:
                    self._check(child)
            self._sweep()
            if self._reboot_step():
                break
        self.shutdown()
        return 0

    # ---- Reboot: wait until every status is accepted, then restart the machine ----------
    def _reboot_step(self) -> bool:
        """One look at the reboot request; True once the reboot command ran."""
        now = time.monotonic()
        if now < self.next_reboot_check:
            return False
        self.next_reboot_check = now + REBOOT_CHECK_S
        state_dir = self.config.state_dir
        if self.reboot is None:
            self.reboot = read_reboot_request(state_dir)
            if self.reboot is None:
                return False
            log.info("reboot to %s requested by task %s; stopping the objecthost and the CTA "
                     "(no new task starts)", self.reboot["to"], self.reboot.get("task_id"))
        if self.held != set(HELD_FOR_REBOOT):
            self.held = set(HELD_FOR_REBOOT)
            for child in self.children:
                if child.name in self.held:
                    self._stop(child)
            self._publish()
        waiting, why = outbox_waiting(state_dir)
        if self.status is not None:
            self.status.update(reboot={**self.reboot, "statuses_waiting": waiting})
        if waiting != 0:   # said every 30 s, and at once when the reason changes
            if (self.reboot_said is None or now - self.reboot_said[0] >= REBOOT_SAY_EVERY_S
                    or why != self.reboot_said[1]):
                self.reboot_said = (now, why)
                log.warning("reboot to %s requested by task %s; waiting for %s status(es) to "
                            "reach the server before restarting%s", self.reboot["to"],
                            self.reboot.get("task_id"), "?" if waiting is None else waiting,
                            f" ({why})" if why else "")
            return False
        return self._run_reboot()

    def _run_reboot(self) -> bool:
        command = reboot_command(self.config)
        log.info("all statuses accepted by the server; rebooting (to %s): %s",
                 self.reboot["to"], " ".join(command))
        for child in self.children:
            self._stop(child)
        forget_reboot_request(self.config.state_dir)
        os.sync()
        try:
            done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=REBOOT_COMMAND_TIMEOUT_S)
            failure = None if done.returncode == 0 else (
                f"exit code {done.returncode}: {(done.stderr or done.stdout).strip()[-500:]}")
        except (OSError, subprocess.SubprocessError) as exc:
            failure = str(exc)
        if failure is None:
            log.info("reboot command done; the agent stops while the machine restarts")
            return True
        log.error("reboot command %s failed (%s): the machine is NOT restarting; the agent "
                  "goes on (restart the machine by hand, or fix [agent] reboot_command)",
                  command, failure)
        self.reboot, self.held, self.reboot_said = None, set(), None
        if self.status is not None:
            self.status.update(reboot=None)
        return False

    def _stop(self, child: Child) -> None:
        """Stop one child (SIGTERM, SIGKILL after the grace period); not restarted
        until it is started again (``_check`` of a child not held)."""
        if child.proc and child.proc.poll() is None:
            log.info("stopping %s", child.name)
            child.proc.terminate()
            try:
                child.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                log.error("%s did not stop within %.0f s; killing it", child.name, STOP_GRACE_S)
                child.proc.kill()
                child.proc.wait()
        child.proc, child.restart_at = None, 0.0

    def shutdown(self) -> None:
        """Stop in chain order: no more tickles, then the CTA drains its tasks,
        then the uploader (which has been sending their final events)."""
        for child in self.children:
            self._stop(child)
        kill_adopted(set())
        if self.trace is not None:
            self.trace.close()
        if self.status is not None:
            self.status.update(stopped_at=time.time())
            self.status.close()
        log.info("agent stopped")


def boot_id() -> str:
    try:
        return Path(BOOT_ID).read_text().strip()
    except OSError:
        return ""


def read_reboot_request(state_dir: Path) -> dict[str, Any] | None:
    """The CTA's reboot request, if there is one for this boot of the machine (a
    request from before the machine restarted is done: it is removed)."""
    path = Path(state_dir) / REBOOT_REQUEST
    try:
        request = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        request = {"unreadable": str(exc)}
    if not isinstance(request, dict) or request.get("to") not in ("production", "automation"):
        log.error("%s is not a reboot request (%.200s); removing it", path, request)
        forget_reboot_request(state_dir)
        return None
    if request.get("boot_id") and request["boot_id"] != boot_id():
        log.info("%s was written before the machine last restarted: done; removing it", path)
        forget_reboot_request(state_dir)
        return None
    return request


def forget_reboot_request(state_dir: Path) -> None:
    path = Path(state_dir) / REBOOT_REQUEST
    try:
        path.unlink(missing_ok=True)
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        log.error("cannot remove %s: %s", path, exc)


def outbox_waiting(state_dir: Path) -> tuple[int | None, str]:
    """(events not yet accepted by the server, or None if unknown; why they wait)."""
    from agent.tools.status import read_state_db   # the outbox's read-only summary

    facts = read_state_db(Path(state_dir))
    if "error" in facts:
        return None, f"cannot read the outbox: {facts['error']}"
    waiting = facts["outbox_depth"]
    loader = read_all(state_dir).get("ctdataloader", {})
    error, ok_at = loader.get("last_upload_error"), loader.get("last_upload_ok_at") or 0
    why = ""
    if waiting and isinstance(error, dict) and (error.get("at") or 0) > ok_at:
        why = f"the server does not take them: {error.get('message')}"
    return waiting, why


def run(config_path: str) -> int:
    try:
        config = load_config(config_path)
    except DsagentError as exc:
        log.error("%s", exc)
        return 2
    setup_logging("dsagent", config=config)
    return Supervisor(config).serve()
