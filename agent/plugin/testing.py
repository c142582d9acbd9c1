"""pytest fixtures for handler authors (a pytest plugin, entry point ``pytest11``).

Installed with dsagent, so any handler package's tests can use them::

    def test_echo(dsagent_run):
        run = dsagent_run("Example.Echo", {"text": "abc"}, timeout=30)
        assert run.states == ["received", "running", "progress", "succeeded"]
        assert run.details == {"reversed": "cba"}

``dsagent_run`` runs tasks through ``dsagent run-task --json`` in a child
process: the real dispatch (entry-point discovery in a worker process, the
validation hook, the timeout, the process-tree kill, the orphan sweep), not a
stand-in, so a test passes only if the handler works once installed. The
child process also keeps the sweep of escaped processes (a subreaper) out of
the test process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.common.config import render_config
from agent.common.events import TERMINAL

DEFAULT_WAIT_S = 600.0
WAIT_MARGIN_S = 60.0


class DsagentRunError(AssertionError):
    """``dsagent run-task`` could not run the tasks at all (exit 2, or it hung)."""


@dataclass
class TaskRun:
    """The §3 status events one task produced, with accessors for assertions.

    ``log`` is everything the run logged (handler logs included, at INFO);
    ``exit_code`` is that of ``dsagent run-task`` (0 only if every task of the
    run succeeded).
    """

    task_id: str
    events: list[dict[str, Any]]
    log: str
    exit_code: int

    @property
    def states(self) -> list[str]:
        return [event["state"] for event in self.events]

    @property
    def final(self) -> dict[str, Any]:
        """The terminal event (AssertionError if the task has none)."""
        if not self.events or self.events[-1]["state"] not in TERMINAL:
            raise AssertionError(f"task {self.task_id} has no terminal event: {self.states}")
        return self.events[-1]

    @property
    def state(self) -> str:
        return self.final["state"]

    @property
    def message(self) -> str:
        return self.final["message"]

    @property
    def details(self) -> dict[str, Any]:
        return self.final["details"]

    @property
    def progress_events(self) -> list[dict[str, Any]]:
        return [event for event in self.events if event["state"] == "progress"]

    @property
    def progress(self) -> list[float | None]:
        """The percent of each progress event, in order."""
        return [event["progress"] for event in self.progress_events]

    @property
    def log_lines(self) -> list[str]:
        """The log lines tagged with this task (``task=<id>``)."""
        tag = re.compile(rf" task={re.escape(self.task_id)}[ :]")
        return [line for line in self.log.splitlines() if tag.search(line)]

    def __repr__(self) -> str:
        last = self.events[-1]["message"] if self.events else ""
        return f"TaskRun({self.task_id}, states={self.states}, last message={last!r})"


class DsagentRunner:
    """The ``dsagent_run`` fixture: run tasks, get their events back."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.plugin_dir = workdir / "plugins"
        self._runs = 0

    def __call__(self, task_type: str, parameters: dict[str, str] | None = None, *,
                 timeout: int | None = None, task_id: str | None = None,
                 handlers: dict[str, Any] | None = None,
                 wait_s: float | None = None) -> TaskRun:
        """Run one task; ``timeout`` None leaves the handler's default timeout.

        ``task_id`` must be a UUID (default: a new one); ``handlers`` is the
        [handlers] config section (e.g. tmp dirs); ``wait_s`` bounds the whole
        run (default: timeout + 60 s, else 600 s).
        """
        from agent.common.taskxml import render_client_tasks  # lazy: pytest loads this plugin in every run

        task_id = task_id or str(uuid.uuid4())
        document = render_client_tasks("local", [{"task_id": task_id, "type": task_type,
                                           "timeout": timeout, "params": parameters or {}}])
        if wait_s is None and timeout is not None:
            wait_s = timeout + WAIT_MARGIN_S
        code, out, log = self._run_task(document, handlers, wait_s)
        runs = _collect(code, out, log)
        if task_id not in runs:
            raise DsagentRunError(f"task {task_id} produced no event; dsagent run-task "
                                  f"logged:\n{log}")
        return runs[task_id]

    def xml(self, document: str | bytes, *, handlers: dict[str, Any] | None = None,
            wait_s: float | None = None) -> dict[str, TaskRun]:
        """Run a whole ``<ClientTasks>`` document; its tasks' runs by task id, in order."""
        return _collect(*self._run_task(document, handlers, wait_s))

    def _run_task(self, document: str | bytes, handlers: dict[str, Any] | None,
                  wait_s: float | None) -> tuple[int, str, str]:
        self._runs += 1
        tasks_path = self.workdir / f"tasks-{self._runs}.xml"
        tasks_path.write_bytes(document if isinstance(document, bytes) else document.encode())
        config_path = self.workdir / f"config-{self._runs}.toml"
        config_path.write_text(render_config({"handlers": handlers or {}}, []))
        env = dict(os.environ)
        if self.plugin_dir.is_dir():
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [str(self.plugin_dir), env.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "agent", "run-task", str(tasks_path), "--json",
                   "--verbose", "--config", str(config_path)]
        code, out, log = _run_bounded(command, env, DEFAULT_WAIT_S if wait_s is None else wait_s)
        if code == 2:
            raise DsagentRunError(f"dsagent run-task could not run the tasks:\n{log}")
        return code, out, log

    def plugin(self, name: str, source: str, version: str = "0") -> None:
        """Install ``source`` as module ``name`` with an entry point ``name`` in
        ``dsagent.handlers``, on a path only this fixture's runs see.

        A real distribution (``dist-info`` with ``entry_points.txt``), found
        by the workers' entry-point discovery like any installed handler.
        """
        write_distribution(self.plugin_dir, name, textwrap.dedent(source), name, version)


def write_distribution(root: Path, module: str, source: str, entry_name: str,
                       version: str = "0") -> Path:
    """Write module ``module`` and an installed distribution's metadata naming
    it in ``dsagent.handlers`` under ``root``, as pip would install them."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(source)
    info = root / f"{module}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[dsagent.handlers]\n{entry_name} = {module}\n")
    return root


def _collect(code: int, out: str, log: str) -> dict[str, TaskRun]:
    runs: dict[str, TaskRun] = {}
    for line in out.splitlines():
        event = json.loads(line)
        runs.setdefault(event["task_id"], TaskRun(event["task_id"], [], log, code)) \
            .events.append(event)
    return runs


def _run_bounded(command: list[str], env: dict[str, str], wait_s: float) -> tuple[int, str, str]:
    """Run ``command``; past ``wait_s`` kill its whole process tree and fail the test."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, env=env, start_new_session=True)
    try:
        out, log = proc.communicate(timeout=wait_s)
    except subprocess.TimeoutExpired:
        try:
            victims = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            victims = []
        for victim in [*victims, proc]:
            try:
                victim.kill()
            except psutil.NoSuchProcess:
                pass
        out, log = proc.communicate()
        raise DsagentRunError(f"dsagent run-task did not finish within {wait_s:.0f} s (killed); "
                              f"pass the task a timeout, or wait_s=. It logged:\n{log}") from None
    return proc.returncode, out, log


@pytest.fixture
def dsagent_run(tmp_path_factory) -> DsagentRunner:
    """Run tasks through dsagent's real dispatch and return their status events."""
    return DsagentRunner(tmp_path_factory.mktemp("dsagent_run"))
