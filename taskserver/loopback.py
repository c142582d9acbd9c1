"""The whole chain on one machine: reference task server + ``dsagent run``.

Used by the demo (``make demo``), the end-to-end tests and the benches, so
all three exercise real TCP, real HTTP and real processes on loopback.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from taskserver.app import TaskServer
from taskserver.store import TaskStore

CHILD_MODULES = {"objecthost": "objecthost", "cta": "agent.cta", "ctdataloader": "ctdataloader",
                 "pxe": "agent.pxe", "packages": "agent.packages"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.02)
    return False


class LoopbackChain:
    """Start a task server and an agent enrolled with it, on loopback ports."""

    def __init__(self, workdir: str | os.PathLike, *, client_id: str = "demo-pc",
                 poll_interval_s: int = 300, max_concurrent_tasks: int = 2,
                 handlers: dict[str, Any] | None = None, enrollment_key: str | None = None,
                 extra_config: str = "", db: str | None = None):
        """With ``enrollment_key`` the agent is not enrolled in advance: it
        registers itself through POST /api/v1/register at start.
        ``extra_config`` is TOML appended to the agent's config (e.g. a [trace] section).
        ``db``: the server's database (default ``<workdir>/server.db``; a
        ``postgresql://`` URL too)."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.client_id = client_id
        self.poll_interval_s = poll_interval_s
        self.max_concurrent_tasks = max_concurrent_tasks
        self.handlers = handlers or {}
        self.enrollment_key = enrollment_key
        self.extra_config = extra_config
        self.store = TaskStore(db or str(self.workdir / "server.db"))
        self.server: TaskServer | None = None
        self.agent: subprocess.Popen | None = None
        self.objecthost_port = free_port()
        self.cta_port = free_port()
        self.config_path = self.workdir / "agent.toml"
        self.log_path = self.workdir / "agent.log"
        self.creds: dict[str, str] = {}
        self.server_url: str | None = None  # another peer instead of our server

    # ---- server ------------------------------------------------------------
    def start_server(self, port: int = 0) -> None:
        """With ``port`` 0 the kernel picks one, and may pick a port free_port() handed
        out for the objecthost or the CTA (released until the agent binds it): then
        the server moves, or a tickle would reach the server instead."""
        while True:
            self.server = TaskServer(self.store, host="127.0.0.1", port=port,
                                     enrollment_key=self.enrollment_key)
            self.server.start()
            if port or self.server.port not in (self.objecthost_port, self.cta_port):
                return
            self.server.stop()

    def stop_server(self) -> None:
        if self.server:
            self.server.stop()
            self.server = None

    # ---- agent ---------------------------------------------------------------
    def write_config(self) -> None:
        if self.enrollment_key:
            identity = f'enrollment_key = "{self.enrollment_key}"\n'
        else:
            if not self.creds:
                self.creds = self.store.enroll(self.client_id,
                                               tickle_addr=f"127.0.0.1:{self.objecthost_port}")
            identity = (f'client_id = "{self.creds["client_id"]}"\n'
                        f'token = "{self.creds["token"]}"\n'
                        f'tickle_key = "{self.creds["tickle_key"]}"\n')
        handlers = "".join(f'{key} = {_toml(value)}\n' for key, value in self.handlers.items())
        text = (
            "[agent]\n"
            f'server_url = "{self.server_url or self.server.url}"\n'
            f"{identity}"
            f'state_dir = "{self.workdir / "state"}"\n\n'
            "[objecthost]\n"
            f'listen = "127.0.0.1:{self.objecthost_port}"\n\n'
            "[cta]\n"
            f'listen = "127.0.0.1:{self.cta_port}"\n'
            f"poll_interval_s = {self.poll_interval_s}\n"
            f"max_concurrent_tasks = {self.max_concurrent_tasks}\n\n"
            f"[handlers]\n{handlers}\n"
            f"{self.extra_config}"
        )
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)

    def start_agent(self, timeout: float = 30.0) -> None:
        self.write_config()
        log = open(self.log_path, "ab")
        self.agent = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        if not (wait_port(self.objecthost_port, timeout) and wait_port(self.cta_port, timeout)):
            raise RuntimeError(f"agent did not start within {timeout} s; see {self.log_path}")
        if self.enrollment_key:  # learn who the agent registered as, and where to tickle it
            creds = json.loads((self.workdir / "state" / "credentials.json").read_text())
            self.client_id = creds["client_id"]
            self.store.set_tickle_addr(self.client_id, f"127.0.0.1:{self.objecthost_port}")

    def wait_first_pull(self, timeout: float = 30.0) -> None:
        """Wait until the CTA's start-up pull is done, so that tasks queued now
        come with a tickle's pull (as in production), not with that one."""
        from agent.common.statusfile import read_all

        deadline = time.monotonic() + timeout
        while "last_pull_ok_at" not in read_all(self.workdir / "state").get("cta", {}):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the CTA did not pull within {timeout:.0f} s; see {self.log_path}")
            time.sleep(0.05)

    def stop_agent(self, timeout: float = 30.0) -> int | None:
        if self.agent is None:
            return None
        self.agent.terminate()
        try:
            code = self.agent.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for proc in psutil.Process(self.agent.pid).children(recursive=True):
                proc.kill()
            self.agent.kill()
            code = self.agent.wait()
        self.agent = None
        return code

    def child(self, name: str) -> psutil.Process | None:
        """The live agent child process ``name`` (objecthost, cta, ctdataloader)."""
        if self.agent is None:
            return None
        module = CHILD_MODULES[name]
        for proc in psutil.Process(self.agent.pid).children():
            try:
                cmdline = proc.cmdline()
            except psutil.NoSuchProcess:
                continue
            if "-m" in cmdline and module in cmdline:
                return proc
        return None

    def start(self) -> "LoopbackChain":
        self.start_server()
        self.start_agent()
        return self

    def stop(self) -> None:
        self.stop_agent()
        self.stop_server()
        self.store.close()

    def __enter__(self) -> "LoopbackChain":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- tasks ---------------------------------------------------------------
    def queue(self, type_: str, params: dict[str, str] | None = None,
              timeout: int | None = None, task_id: str | None = None) -> str:
        return self.store.queue_task(self.client_id, type_, params or {}, timeout=timeout,
                                     task_id=task_id)

    def tickle(self) -> str:
        return self.server.tickle(self.client_id)

    def wait(self, task_ids: list[str], timeout: float = 60.0) -> bool:
        return self.store.wait_terminal(task_ids, timeout)

    def events(self, task_id: str) -> list[dict]:
        return self.store.events(task_id)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
