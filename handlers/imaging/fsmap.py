"""What the file system readers of source.py's FILESYSTEMS (ext4.py, ntfs.py,
fat.py) share: the exception that sends a volume to zero-skip (its reason
recorded in the image's facts), allocation bitmaps read as runs, and byte
ranges merged as they are found."""

from __future__ import annotations

import re


class MapUnusable(Exception):
    """The allocation map cannot be trusted; the volume is read whole instead."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# Bitmap -> runs of set bits (ext4's block bitmaps, NTFS's $Bitmap: bit i = LSB-first
# bit i%8 of byte i//8).
#
# Bitmaps of large filesystems are mostly 0x00 (free) or 0xFF (used) bytes, so
# a regex finds runs of 0xFF and single mixed bytes at C speed and skips 0x00
# runs entirely; only mixed bytes are split into bit runs, via a table.

_USED_BYTES_RE = re.compile(rb"\xff+|[\x01-\xfe]")


def _byte_runs(value: int) -> tuple[tuple[int, int], ...]:
    runs, bit = [], 0
    while bit < 8:
        if value >> bit & 1:
            start = bit
            while bit < 8 and value >> bit & 1:
                bit += 1
            runs.append((start, bit))
        else:
            bit += 1
    return tuple(runs)


_BYTE_RUNS = tuple(_byte_runs(v) for v in range(256))


def bitmap_runs(bitmap: bytes, nbits: int) -> list[list[int]]:
    """Merged [start, end) runs of set bits among the first nbits bits."""
    runs: list[list[int]] = []

    def add(start: int, end: int) -> None:
        if runs and runs[-1][1] == start:
            runs[-1][1] = end
        else:
            runs.append([start, end])

    full, rest = divmod(nbits, 8)
    for m in _USED_BYTES_RE.finditer(bitmap, 0, full):
        s, e = m.span()
        if e - s > 1 or bitmap[s] == 0xFF:
            add(s * 8, e * 8)
        else:
            base = s * 8
            for a, b in _BYTE_RUNS[bitmap[s]]:
                add(base + a, base + b)
    if rest:  # bits past nbits are padding (last group) and must not count
        base = full * 8
        for a, b in _BYTE_RUNS[bitmap[full] & ((1 << rest) - 1)]:
            add(base + a, base + b)
    return runs


class Ranges:
    """Byte ranges appended in ascending order, merged on the fly."""

    def __init__(self) -> None:
        self._r: list[list[int]] = []

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        if self._r and self._r[-1][1] >= start:
            self._r[-1][1] = max(self._r[-1][1], end)
        else:
            self._r.append([start, end])

    def result(self) -> list[tuple[int, int]]:
        return [(s, e - s) for s, e in self._r]
