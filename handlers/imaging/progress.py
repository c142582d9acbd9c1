"""Progress of long imaging work: at least every 5 % or every 2 s (§4)."""

from __future__ import annotations

import time
from typing import Callable


class Progress:
    def __init__(self, total: int, report: Callable[..., None], what: str):
        self.total = max(total, 1)
        self.report = report
        self.what = what
        self.started = time.monotonic()
        self._last_pct = -100.0
        self._last_at = 0.0

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        pct = min(100.0, 100.0 * done / self.total)
        if not force and pct - self._last_pct < 5 and now - self._last_at < 2:
            return
        self._last_pct, self._last_at = pct, now
        elapsed = max(now - self.started, 1e-6)
        rate = done / elapsed
        self.report(round(pct, 1), f"{self.what}: {done / 2**20:.0f} of {self.total / 2**20:.0f} MiB "
                                   f"({rate / 2**20:.0f} MiB/s)",
                    bytes_done=done, bytes_total=self.total, bytes_per_s=round(rate))
