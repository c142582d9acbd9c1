"""The objecthost's log lines, rationed: a flood must not become a flood of log lines.

Peers are kept as raw addresses and formatted only when a line is written:
formatting every refused connection's address would cost more than the check.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

log = logging.getLogger("objecthost")


class LogBudget:
    """At most ``lines`` log lines per ``period`` seconds, then one summary line.

    The summary (``summary % suppressed_count``) is written when the period
    ends, by a one-shot timer that exists only while lines are being dropped.
    """

    def __init__(self, lines: int, period: float, summary: str):
        self.lines = lines
        self.period = period
        self.summary = summary
        self._window_start = -math.inf
        self._used = 0
        self._suppressed = 0
        self._timer: asyncio.TimerHandle | None = None

    def log(self, level: int, msg: str, *args) -> None:
        if self.allow():
            log.log(level, msg, *args)

    def allow(self) -> bool:
        """May one more line be written now? (If not, it is counted for the summary.)"""
        now = time.monotonic()
        if now - self._window_start >= self.period:
            self._flush()
            self._window_start = now
            self._used = 0
        if self._used < self.lines:
            self._used += 1
            return True
        self._suppressed += 1
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return False
            delay = max(0.0, self._window_start + self.period - now)
            self._timer = loop.call_later(delay, self._on_timer)
        return False

    def _on_timer(self) -> None:
        self._timer = None
        self._flush()

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._suppressed:
            log.warning(self.summary, self._suppressed)
            self._suppressed = 0

    def close(self) -> None:
        self._flush()


def format_peer(peername) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peername) if peername else "unknown-peer"


class Peer:
    """A peer address formatted only if a log line is actually written."""

    __slots__ = ("addr",)

    def __init__(self, addr):
        self.addr = addr

    def __str__(self) -> str:
        return format_peer(self.addr)
