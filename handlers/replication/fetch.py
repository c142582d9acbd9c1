"""Fetching one package file from its source of truth (httpx): resumed with a
range request where a partial download stopped, verified against the
manifest's sha256 before it is used, fetched whole once more if a byte came
wrong, paced to ``[handlers] replication_kbps``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable
from urllib.parse import quote

import httpx

from handlers.replication.manifest import PackageFile
from handlers.replication.replica import sha256_file

ATTEMPTS = 4                     # connection drops resumed per file
RETRY_PAUSE_S = (0.2, 1.0, 3.0)


class FetchError(Exception):
    """A file could not be fetched whole and verified; the message names it."""


class Pacer:
    """At most ``kbps`` kilobytes a second over everything fetched (0: no limit)."""

    def __init__(self, kbps: int):
        self.rate = kbps * 1000
        self.start = time.monotonic()
        self.sent = 0

    def took(self, n: int) -> None:
        if not self.rate:
            return
        self.sent += n
        ahead = self.sent / self.rate - (time.monotonic() - self.start)
        if ahead > 0:
            time.sleep(ahead)


def file_url(source: str, path: str) -> str:
    return source + "/".join(quote(part) for part in path.split("/"))


def fetch_file(http: httpx.Client, source: str, f: PackageFile, partial: Path,
               pacer: Pacer, on_bytes: Callable[[int], None],
               cancelled: Callable[[], bool]) -> tuple[int, bool]:
    """Download ``f`` to ``partial`` (resuming what is there); ``(bytes fetched,
    resumed)``. Raises FetchError naming the file and the URL."""
    url = file_url(source, f.path)
    fetched, resumed, wrong = 0, False, 0

    def arrived(n: int) -> None:              # counted as it comes: a cut part too
        nonlocal fetched
        fetched += n
        on_bytes(n)

    if f.size == 0:
        partial.touch()                       # nothing to fetch; still checked below
    for attempt in range(ATTEMPTS + 1):
        have = partial.stat().st_size if partial.exists() else 0
        if have > f.size:
            partial.unlink()
            have = 0
        if have < f.size:
            try:
                ranged = _download(http, url, partial, have, pacer, arrived, cancelled)
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                if attempt == ATTEMPTS:
                    raise FetchError(f"{f.path}: {url}: the connection failed {ATTEMPTS + 1} "
                                     f"times ({type(exc).__name__}: {exc})") from None
                time.sleep(RETRY_PAUSE_S[min(attempt, len(RETRY_PAUSE_S) - 1)])
                continue
            resumed |= ranged
            if partial.stat().st_size < f.size:
                continue                      # the answer ended early: resume
        if sha256_file(partial) == f.sha256:
            return fetched, resumed
        wrong += 1
        partial.unlink()
        if wrong > 1:
            raise FetchError(f"{f.path}: {url}: its sha256 differs from the manifest's twice "
                             "(the source's file and manifest disagree?)")
    raise FetchError(f"{f.path}: {url}: not complete after {ATTEMPTS + 1} attempts")


def _download(http: httpx.Client, url: str, partial: Path, have: int, pacer: Pacer,
              on_bytes: Callable[[int], None], cancelled: Callable[[], bool]) -> bool:
    """GET ``url`` into ``partial`` from byte ``have``; whether it resumed."""
    headers = {"Range": f"bytes={have}-"} if have else {}
    with http.stream("GET", url, headers=headers) as response:
        if response.status_code == 200:
            have, mode = 0, "wb"              # the server ignored the range: from the start
        elif response.status_code == 206 and have:
            mode = "ab"
        else:
            raise FetchError(f"{url}: HTTP {response.status_code}")
        with open(partial, mode) as fh:
            for chunk in response.iter_raw():     # as it comes: a cut keeps what arrived
                if cancelled():
                    raise FetchError(f"{url}: cancelled")
                fh.write(chunk)
                on_bytes(len(chunk))
                pacer.took(len(chunk))
            fh.flush()
            os.fsync(fh.fileno())
    return mode == "ab"

