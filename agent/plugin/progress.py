"""Progress of long byte-counting work, for handlers (one helper for all).

A handler hands ``ctx.progress`` (or any ``report(percent, message,
**details)``) to a ``Progress`` and calls ``update(done)`` or ``add(n)`` as
bytes go by. Reports are thinned to at least every ``min_step`` percent or
``min_interval_s`` seconds (§4 asks for at least every 5 % or 2 s) and carry
``bytes_done``, ``bytes_total`` and ``bytes_per_s``. ``low``/``high`` map
the work onto part of the task's percent range, for tasks with phases.
"""

from __future__ import annotations

import time
from typing import Callable


class Progress:
    def __init__(self, total: int, report: Callable[..., None], what: str, *,
                 low: float = 0.0, high: float = 100.0,
                 min_step: float = 5.0, min_interval_s: float = 2.0):
        self.total = max(total, 1)
        self.report = report
        self.what = what
        self.low, self.high = low, high
        self.min_step, self.min_interval_s = min_step, min_interval_s
        self.started = time.monotonic()
        self.done = 0
        self._last_pct = -100.0
        self._last_at = 0.0

    def add(self, n: int) -> None:
        """``n`` more bytes are done."""
        self.update(self.done + n)

    def update(self, done: int, force: bool = False) -> None:
        """``done`` bytes of ``total`` are done; report if due (or ``force``)."""
        self.done = done
        now = time.monotonic()
        pct = self.low + (self.high - self.low) * min(done, self.total) / self.total
        if not force and pct - self._last_pct < self.min_step \
                and now - self._last_at < self.min_interval_s:
            return
        self._last_pct, self._last_at = pct, now
        rate = done / max(now - self.started, 1e-6)
        self.report(round(pct, 1), f"{self.what}: {human_bytes(done)} of "
                                   f"{human_bytes(self.total)} ({human_bytes(rate)}/s)",
                    bytes_done=done, bytes_total=self.total, bytes_per_s=round(rate))


def human_bytes(n: float) -> str:
    """``n`` bytes in the unit that reads best: 512 B, 117 KiB, 3.4 MiB, 1.0 GiB."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{n:.0f} B"
