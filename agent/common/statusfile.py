"""What each agent process is doing, published for ``dsagent status``.

Each process keeps one small JSON file, ``<state_dir>/status/<process>.json``:
when it started, its last contact with the server, the last tickle accepted
and refused... These are advisory facts, not state: they are replaced
atomically (a reader never sees half a file) but not fsync'd, and written at
most once a second however often they change, so a tickle flood costs no
disk writes to speak of. Standard library only (the objecthost uses it).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

MIN_INTERVAL_S = 1.0


def status_dir(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / "status"


class StatusFile:
    """Facts of one process; :meth:`update` merges and writes (coalesced)."""

    def __init__(self, state_dir: str | os.PathLike, process: str,
                 min_interval: float = MIN_INTERVAL_S):
        self.path = status_dir(state_dir) / f"{process}.json"
        self.min_interval = min_interval
        self.facts: dict[str, Any] = {"process": process, "pid": os.getpid(),
                                      "started_at": time.time()}
        self._lock = threading.Lock()
        self._last_write = 0.0
        self._timer: threading.Timer | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.flush()

    def update(self, **facts: Any) -> None:
        with self._lock:
            self.facts.update(facts)
            wait = self._last_write + self.min_interval - time.monotonic()
            if wait > 0:
                if self._timer is None:  # one pending write carries every change until then
                    self._timer = threading.Timer(wait, self.flush)
                    self._timer.daemon = True
                    self._timer.start()
                return
        self.flush()

    def count(self, key: str, **facts: Any) -> None:
        """Add one to the counter ``key`` (and merge ``facts``, like :meth:`update`)."""
        with self._lock:
            self.facts[key] = self.facts.get(key, 0) + 1
        self.update(**facts)

    def flush(self) -> None:
        with self._lock:
            self._timer = None
            self._last_write = time.monotonic()
            body = json.dumps(self.facts, default=str)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(body)
            os.replace(tmp, self.path)
        except OSError:
            pass  # advisory: a full disk must not stop the process that publishes it

    def close(self) -> None:
        with self._lock:
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        self.flush()


def read_all(state_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Every process's facts, by process name (a missing or torn file is left out)."""
    out = {}
    folder = status_dir(state_dir)
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:
            facts = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(facts, dict):
            out[path.stem] = facts
    return out
