"""The CTA's side of the worker processes: start, talk to, reuse, kill.

A worker that timed out, died, or said something unreadable is killed with
its whole process tree (psutil) and replaced; a healthy one goes back to the
pool for the next task.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from typing import Any

import psutil

log = logging.getLogger("dsagent.workers")

READY_TIMEOUT_S = 60.0


class WorkerDied(Exception):
    """The worker process went away (or spoke garbage) mid-conversation."""


class WorkerProcess:
    """One ``python -m agent.cta.worker`` child and its JSON-lines channel."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cta.worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, start_new_session=True, bufsize=0,
            env=dict(os.environ, DSAGENT_WORKER_PARENT=str(os.getpid())))
        self.pid = self.proc.pid
        self._buffer = b""
        self._lines: list[bytes] = []
        self.ready = False
        self.running = False  # the handler was told to go (not just validating)
        self.dirty = False    # timed out or cancelled: never reuse

    def send(self, obj: dict[str, Any]) -> None:
        try:
            self.proc.stdin.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
        except (BrokenPipeError, ValueError, OSError) as exc:
            raise WorkerDied(self.describe_exit()) from exc

    def recv(self, timeout: float | None) -> dict[str, Any] | None:
        """The next message, or None if ``timeout`` seconds pass first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while not self._lines:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([fd], [], [], wait)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise WorkerDied(self.describe_exit())
            self._buffer += chunk
            *lines, self._buffer = self._buffer.split(b"\n")
            self._lines.extend(lines)
        line = self._lines.pop(0)
        try:
            message = json.loads(line)
            if not isinstance(message, dict) or "op" not in message:
                raise ValueError("no op")
        except ValueError:
            raise WorkerDied(f"worker {self.pid} sent an unreadable message: {line[:120]!r}") from None
        return message

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        if self.ready:
            return
        message = self.recv(timeout)
        if message is None or message.get("op") != "ready":
            raise WorkerDied(f"worker {self.pid} did not start ({message!r})")
        self.ready = True

    def describe_exit(self) -> str:
        try:
            code = self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return f"worker {self.pid} stopped talking"
        if code < 0:
            return f"handler process {self.pid} was killed by signal {-code}"
        return f"handler process {self.pid} exited with code {code}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill_tree(self) -> None:
        """SIGKILL the worker and every descendant (they may have left its group)."""
        try:
            root = psutil.Process(self.pid)
            victims = root.children(recursive=True) + [root]
        except psutil.NoSuchProcess:
            victims = []
        for proc in victims:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(victims, timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.error("worker %s did not die after SIGKILL", self.pid)

    def stop(self, timeout: float = 5.0) -> None:
        """Ask an idle worker to exit (EOF on its stdin), kill it if it lingers."""
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill_tree()


class WorkerPool:
    """At most ``size`` workers in use at once (``acquire`` blocks beyond
    that), idle ones kept warm for the next task."""

    def __init__(self, size: int):
        self.size = size
        self._idle: list[WorkerProcess] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(size)
        self._closed = False

    def prestart(self) -> None:
        """Start ``size`` workers now so the first tasks find them ready.

        The processes are started by the calling thread, which must live as
        long as the pool: a worker asks Linux to kill it when the *thread*
        that started it exits (PR_SET_PDEATHSIG). Waiting for them to be
        ready happens in the background.
        """
        workers = [WorkerProcess() for _ in range(self.size)]

        def wait_ready() -> None:
            for worker in workers:
                try:
                    worker.wait_ready()
                except WorkerDied as exc:
                    log.error("%s", exc)
                    worker.kill_tree()
                    continue
                self._park(worker)

        threading.Thread(target=wait_ready, name="workers-ready", daemon=True).start()

    def acquire(self) -> WorkerProcess:
        """A ready worker (waiting for a free slot); call from a long-lived thread."""
        self._slots.acquire()
        try:
            with self._lock:
                while self._idle:
                    worker = self._idle.pop()
                    if worker.alive():
                        return worker
                    worker.kill_tree()
            worker = WorkerProcess()
            try:
                worker.wait_ready()
            except WorkerDied:
                worker.kill_tree()
                raise
            return worker
        except BaseException:
            self._slots.release()
            raise

    def _park(self, worker: WorkerProcess) -> None:
        with self._lock:
            if not self._closed and worker.alive() and len(self._idle) < self.size:
                self._idle.append(worker)
                return
        worker.stop()

    def release(self, worker: WorkerProcess) -> None:
        """Give a healthy worker back after its task."""
        self._park(worker)
        self._slots.release()

    def discard(self, worker: WorkerProcess) -> None:
        """Kill a worker that timed out, died or misbehaved, and free its slot."""
        worker.kill_tree()
        self._slots.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.stop()
