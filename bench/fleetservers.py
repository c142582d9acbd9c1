"""The two task servers the fleet bench (bench/fleet.py) measures: started,
stopped for an outage, started again, and watched.

Both run exactly as an admin runs them, ``dsagent-server serve`` in a
subprocess of its own, so the bench holds no switch the product lacks:

- ``builtin``: ``--db FILE`` (SQLite; ``http.server``, a thread per
  connection, one process);
- ``asgi``: ``--db postgresql://… --workers W`` (Starlette on uvicorn worker
  processes), on a PostgreSQL cluster the bench starts for the run with
  tests/pgcluster.py's ``PgCluster`` (imported as ``tests.pgcluster``, the way
  bench/pxe.py and bench/deployment.py use tests/pxelab.py: ``python -m bench``
  runs from the repository's root, where tests/ is a namespace package).

The outage is the real one: SIGTERM (as systemd stops a service), the port
closed until ``start()`` serves again on the same port. ``TreeWatch`` samples
the CPU time of a process and its descendants (uvicorn's workers, the
postmaster's backends) across such restarts.
"""

from __future__ import annotations

import contextlib
import http.client
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
SERVERS = ("builtin", "asgi")
START_TIMEOUT_S = 60.0


@dataclass
class Database:
    target: str                 # ``--db``
    engine: str                 # what it is, for the table
    postmaster: int | None      # PostgreSQL's root process, watched for its CPU


@contextlib.contextmanager
def database(kind: str, workdir: Path) -> Iterator[Database]:
    """A new SQLite file for ``builtin``; for ``asgi`` a database on a PostgreSQL
    cluster of the run's own (durability off, as in the tests), stopped and
    removed afterwards."""
    if kind == "builtin":
        yield Database(str(workdir / "fleet.db"), "SQLite", None)
        return
    from tests.pgcluster import PgCluster

    cluster = PgCluster()
    with contextlib.redirect_stdout(sys.stderr):      # stdout is for the tables
        cluster.start()
    try:
        yield Database(cluster.create_database("fleet"), f"PostgreSQL {cluster.version}",
                       cluster.pid)
    finally:
        cluster.stop()


class ServerProcess:
    """``dsagent-server serve`` for ``db``: ``start()`` on a free port, then on
    the same one after ``stop()``; its stderr appended to ``log``."""

    def __init__(self, db: str, log: Path, poll_s: float, workers: int | None = None):
        self.db, self.log, self.workers = db, log, workers
        self.poll_s = int(poll_s)
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def start(self) -> float:
        """Start serving; the time it first answered an HTTP request."""
        command = [sys.executable, "-m", "taskserver", "serve", "--db", self.db,
                   "--listen", f"127.0.0.1:{self.port}", "--poll-interval", str(self.poll_s)]
        if self.workers:
            command += ["--workers", str(self.workers)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=log,
                                         text=True)
        url = self.proc.stdout.readline().strip()
        if not url.startswith("http://"):
            self.stop()
            raise RuntimeError(f"dsagent-server serve printed {url!r}; see {self.log}")
        self.port = int(url.rsplit(":", 1)[1])
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:                     # uvicorn's workers accept once started
            try:
                probe = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                probe.request("GET", "/api/v1/ready")
                probe.getresponse().read()
                probe.close()
                return time.time()
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"{url} never answered; see {self.log}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM, and wait until it has exited (killed after 30 s)."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.proc = None


@dataclass
class Sample:
    at: float
    cpu: dict[tuple[int, float], float]     # (pid, create time) -> user + system seconds
    rss: int
    threads: int


class TreeWatch(threading.Thread):
    """Every 0.5 s, the CPU time, RSS and threads of each named group of process
    trees (``roots()``: name -> root pids, asked anew each time since a restart
    changes them). Busy time sums each process's own CPU between samples (a new
    one's from its start), so neither a restart nor reaped children (whose time
    also lands in their parent's ``children_*``) counts twice."""

    def __init__(self, roots: Callable[[], dict[str, list[int | None]]]):
        super().__init__(daemon=True)
        self.roots = roots
        self.samples: dict[str, list[Sample]] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            for name, pids in self.roots().items():
                self.samples.setdefault(name, []).append(self._sample(pids))

    @staticmethod
    def _sample(pids: list[int | None]) -> Sample:
        sample = Sample(time.time(), {}, 0, 0)
        for pid in filter(None, pids):
            try:
                root = psutil.Process(pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for process in tree:
                try:
                    with process.oneshot():
                        cpu = process.cpu_times()
                        key = (process.pid, process.create_time())
                        sample.cpu[key] = cpu.user + cpu.system
                        sample.rss += process.memory_info().rss
                        sample.threads += process.num_threads()
                except psutil.Error:
                    pass
        return sample

    def between(self, name: str, start: float, end: float) -> tuple[float, int, int]:
        """(cores busy on average, peak RSS, peak threads) of group ``name`` over [start, end]."""
        inside = [s for s in self.samples.get(name, []) if start <= s.at <= end]
        if len(inside) < 2:
            return 0.0, 0, 0
        busy = 0.0
        for before, after in zip(inside, inside[1:]):
            for key, cpu in after.cpu.items():
                if key in before.cpu:
                    busy += cpu - before.cpu[key]
                elif key[1] >= before.at:
                    busy += cpu
        return (busy / (inside[-1].at - inside[0].at), max(s.rss for s in inside),
                max(s.threads for s in inside))

