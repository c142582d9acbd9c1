"""``dsagent logs``: the agent's log files merged in time order.

Each process writes JSON lines to ``<log dir>/<process>.log`` (rotated to
``.1``, ``.2``...; see agent/common/logsetup.py). This module reads them back: the
whole history merged by timestamp, filtered by task or time, and a follower
that tails every file (new ones and rotated ones included), which the remote
trace stream uses too.
"""

from __future__ import annotations

import collections
import heapq
import json
import os
import re
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

from agent.common.errors import ConfigError
from agent.common.logsetup import utc_timestamp

Record = dict[str, Any]
_ROTATED = re.compile(r"^(?P<base>[A-Za-z0-9_.-]+\.log)(?:\.(?P<n>[0-9]{1,3}))?$")
_SINCE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*(s|m|h|d)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float | None = None) -> str:
    """``30s``/``10m``/``2h``/``1d`` ago, or an ISO 8601 time (naive = local), as a log timestamp."""
    now = time.time() if now is None else now
    match = _SINCE.match(text.strip())
    if match:
        return utc_timestamp(now - float(match.group(1)) * _UNITS[match.group(2)])
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"--since: expected e.g. 10m, 2h, 1d or 2026-12-01T18:00, got {text!r}") \
            from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # naive: the machine's local time, as journalctl reads it
    return utc_timestamp(moment.astimezone(timezone.utc).timestamp())


def parse_line(line: str) -> Record | None:
    """One JSON log line as a record; None for a torn or foreign line."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("ts"), str):
        return None
    return record


def log_files(log_dir: Path) -> list[Path]:
    """Every log file, rotated ones first (oldest generation first)."""
    return [path for gens in _generations(log_dir).values() for path in gens]


def _generations(log_dir: Path) -> dict[str, list[Path]]:
    """Per process file (``cta.log``), its generations oldest first (``.5`` ... ``.1``, itself)."""
    found: dict[str, list[tuple[int, Path]]] = {}
    for path in log_dir.iterdir() if log_dir.is_dir() else ():
        match = _ROTATED.match(path.name)
        if match and path.is_file():
            found.setdefault(match.group("base"), []).append((int(match.group("n") or 0), path))
    return {base: [path for _, path in sorted(gens, key=lambda g: -g[0])]
            for base, gens in sorted(found.items())}


def matches(record: Record, task: str | None = None, since: str | None = None) -> bool:
    """``task`` matches a task id or its prefix (a support engineer pastes the start)."""
    if since and record["ts"] < since:
        return False
    if task and not (record.get("task_id") or "").startswith(task):
        return False
    return True


def _read(paths: list[Path], since: str | None) -> Iterator[Record]:
    """The records of one process's generations, in file order."""
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    record = parse_line(line)
                    if record is not None and (not since or record["ts"] >= since):
                        yield record
        except OSError:
            continue  # rotated away while we read: its lines are in the next generation


def iter_records(log_dir: Path, task: str | None = None,
                 since: str | None = None) -> Iterator[Record]:
    """Matching records of every file, merged in time order, streamed.

    Memory stays flat whatever the size of the logs: each process's file is
    in time order already, so the files are merged, not sorted. With
    ``task``, the objecthost's lines of the tickle that made the CTA pull the
    task come too (the task's ``received`` line names that tickle); finding
    those takes one more pass over the CTA's file.
    """
    gens = _generations(log_dir)
    tickles: set[str] = set()
    if task:
        tickles = {r["tickle"] for r in _read(gens.get("cta.log", []), since)
                   if r.get("tickle") and matches(r, task)}
    merged = heapq.merge(*(_read(paths, since) for paths in gens.values()),
                         key=lambda r: r["ts"])
    for record in merged:
        if matches(record, task) or (record.get("tickle") in tickles
                                     and not record.get("task_id")):
            yield record


def read_records(log_dir: Path, task: str | None = None, since: str | None = None) -> list[Record]:
    """:func:`iter_records` as a list (for small logs: tests, the demo)."""
    return list(iter_records(log_dir, task, since))


class LogFollower:
    """Tail every ``*.log`` in a folder: new lines as they are written.

    Starts at the current end of each file; a file that appears later (a
    first worker) or is rotated (its inode changes) is read from its start.
    """

    def __init__(self, log_dir: Path, poll_s: float = 0.2):
        self.log_dir = log_dir
        self.poll_s = poll_s
        self._files: dict[Path, tuple[int, Any, str]] = {}   # path -> (inode, file, partial line)
        for path in self._current():
            self._open(path, at_end=True)

    def _current(self) -> list[Path]:
        return [p for p in log_files(self.log_dir) if p.name.endswith(".log")]

    def _open(self, path: Path, at_end: bool) -> None:
        try:
            fh = open(path, encoding="utf-8", errors="replace")
        except OSError:
            return
        if at_end:
            fh.seek(0, os.SEEK_END)
        self._files[path] = (os.fstat(fh.fileno()).st_ino, fh, "")

    def poll(self) -> list[Record]:
        """The records written since the last call, in time order."""
        out: list[Record] = []
        for path in self._current():
            entry = self._files.get(path)
            try:
                inode = os.stat(path).st_ino
            except OSError:
                continue
            if entry is not None and entry[0] != inode:  # rotated: finish the old file first
                out += self._drain(path)
                entry[1].close()
                entry = None
            if entry is None:
                self._open(path, at_end=False)
            out += self._drain(path)
        out.sort(key=lambda r: r["ts"])
        return out

    def _drain(self, path: Path) -> list[Record]:
        inode, fh, partial = self._files[path]
        records = []
        for line in (partial + fh.read()).splitlines(keepends=True):
            if not line.endswith("\n"):
                partial = line  # the writer is mid-line: keep it for the next poll
                break
            record = parse_line(line)
            if record is not None:
                records.append(record)
        else:
            partial = ""
        self._files[path] = (inode, fh, partial)
        return records

    def follow(self, stop: threading.Event) -> Iterator[Record]:
        while not stop.is_set():
            yield from self.poll()
            stop.wait(self.poll_s)

    def close(self) -> None:
        for _, fh, _ in self._files.values():
            fh.close()
        self._files.clear()


def format_record(record: Record) -> str:
    """A record as the human-readable line of agent/common/logsetup.py's text format."""
    tags = "".join(f" {name}={record[key]}" for name, key in (("task", "task_id"),
                                                                ("event", "event_id"),
                                                                ("tickle", "tickle"))
                   if record.get(key))
    text = (f"{record['ts']} {record.get('level', '?')} {record.get('process', '?')}"
            f"[{record.get('pid', '?')}]{tags}: {record.get('msg', '')}")
    if record.get("exc"):
        text += "\n" + str(record["exc"])
    return text


def _key(record: Record) -> str:
    return json.dumps(record, sort_keys=True)


def render(record: Record, as_json: bool) -> str:
    return (json.dumps(record, ensure_ascii=False) if as_json else format_record(record)) + "\n"


def print_records(records: Iterable[Record], as_json: bool, out=sys.stdout) -> None:
    for record in records:
        out.write(render(record, as_json))
    out.flush()


def _silence(out) -> None:
    """After EPIPE, point stdout at /dev/null so the exit's flush does not complain."""
    if out is sys.stdout:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def show(log_dir: Path, *, task: str | None = None, since: str | None = None,
         follow: bool = False, as_json: bool = False, lines: int | None = None,
         stop: threading.Event | None = None, out=sys.stdout) -> int:
    """Print the matching history (its last ``lines``), then, with ``follow``, new lines."""
    if not log_dir.is_dir():
        print(f"dsagent logs: no log folder at {log_dir} (has the agent run with this config?)",
              file=sys.stderr)
        return 1
    if not os.access(log_dir, os.R_OK | os.X_OK):
        print(f"dsagent logs: cannot read {log_dir}: permission denied (run it as root or as a "
              "member of the log folder's group)", file=sys.stderr)
        return 2
    started = utc_timestamp(time.time() - 1.0)
    follower = LogFollower(log_dir) if follow else None  # before reading: no gap between the two
    recent: collections.deque[Record] = collections.deque(maxlen=None)
    history = iter_records(log_dir, task, since)
    if lines:
        history = collections.deque(history, maxlen=lines)
    try:
        for record in history:
            out.write(render(record, as_json))
            if follower is not None and record["ts"] >= started:
                recent.append(record)
        out.flush()
    except BrokenPipeError:   # `dsagent logs | head`: stop quietly
        _silence(out)
        return 0
    if follower is None:
        return 0
    # a line written between the follower's start and the history read is in both
    seen = {_key(r) for r in recent}
    stop = stop or threading.Event()
    try:
        for record in follower.follow(stop):
            if matches(record, task) and _key(record) not in seen:
                print_records([record], as_json, out)
    except BrokenPipeError:
        _silence(out)
    finally:
        follower.close()
    return 0
