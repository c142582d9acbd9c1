"""One redrawn status line for long CLI work, on a terminal only.

``dsagent run-task``, ``enroll`` and ``doctor`` show what they are doing on
stderr when stderr is a terminal; piped or logged, they write nothing here,
so no carriage returns or escape codes end up in files. stdout is never
touched (``run-task --json`` keeps exactly one §3 event per line).
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

CLEAR = "\r\x1b[K"          # back to column 0, erase to the end of the line
MIN_REDRAW_S = 0.1          # a busy caller does not flood the terminal
BAR_WIDTH = 20


class ProgressBar:
    """``update(percent, message)`` redraws the line; ``clear()`` removes it
    (before other output goes to the same terminal, and at the end)."""

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.started = time.monotonic()
        self.shown = False
        self._drawn_at = -MIN_REDRAW_S
        self._last: tuple[float | None, str] | None = None

    def update(self, percent: float | None, message: str, force: bool = False) -> None:
        if not self.enabled:
            return
        self._last = (percent, message)
        now = time.monotonic()
        if not force and self.shown and now - self._drawn_at < MIN_REDRAW_S:
            return
        self._drawn_at = now
        self._draw(percent, message, now - self.started)

    def _draw(self, percent: float | None, message: str, elapsed: float) -> None:
        minutes, seconds = divmod(int(elapsed), 60)
        clock = f"{minutes}:{seconds:02d}"
        if percent is None:
            head = ""
        else:
            pct = max(0.0, min(100.0, float(percent)))
            filled = round(BAR_WIDTH * pct / 100)
            head = f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {pct:3.0f}% "
        width = shutil.get_terminal_size((80, 24)).columns - 1
        text = f"{head}{' '.join(message.split())} {clock}"
        if len(text) > width:  # one line only: a wrapped line cannot be redrawn
            keep = max(width - len(head) - len(clock) - 2, 0)
            text = f"{head}{' '.join(message.split())[:keep]}… {clock}"[:width]
        self.stream.write(CLEAR + text)
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        """Erase the line; the next update draws it again."""
        if self.enabled and self.shown:
            self.stream.write(CLEAR)
            self.stream.flush()
            self.shown = False

    def redraw(self) -> None:
        """Draw the last state again (after other output was written)."""
        if self.enabled and self._last is not None:
            self.update(*self._last, force=True)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.clear()
