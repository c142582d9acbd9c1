"""Fetching a package's files from its source of truth: resumed with a range
request where a partial download stopped, verified against the manifest's
sha256 before it is used, fetched whole once more if a byte came wrong,
paced to ``[handlers] replication_kbps``.

Files are read with the standard library's ``http.client`` on one keep-alive
connection per task, 1 MiB at a time straight into reused buffers
(``readinto``), and hashed as they arrive, on a second core for a big file
(hashlib releases the GIL): no second read of the file to verify it. httpx,
which reads in 64 KiB pieces through h11, ran at half of curl's speed on a
1 GiB image; this runs at curl's (bench/replication.py). The manifest, one
small request, still comes through httpx (plugin.py).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import queue
import ssl
import threading
import time
from pathlib import Path
from typing import Callable
from urllib.parse import quote, unquote, urlsplit

from handlers.replication.manifest import PackageFile

ATTEMPTS = 4                     # connection drops resumed per file
RETRY_PAUSE_S = (0.2, 1.0, 3.0)
TIMEOUT_S = 30.0
BUFFER = 1 << 20
BUFFERS = 8                      # in flight between the socket, the file and the hasher
HASH_INLINE = 4 << 20            # a file up to this size is hashed in the loop
NETWORK = (OSError, http.client.HTTPException)    # from the socket: a cut, a reset, a timeout


class FetchError(Exception):
    """A file could not be fetched whole and verified; the message names it."""


class _Cut(Exception):
    """The connection failed or the answer ended early: resumed. ``arrived``:
    the bytes that came before."""

    def __init__(self, why: BaseException | str, arrived: int = 0):
        super().__init__(why if isinstance(why, str) else f"{type(why).__name__}: {why}")
        self.arrived = arrived


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


class _Hasher:
    """sha256 of a stream on another thread: the next buffer is read from the
    socket while this one is hashed. Buffers come back once hashed."""

    def __init__(self, digest, buffers: list[bytearray]):
        self.digest = digest
        self.todo: queue.SimpleQueue = queue.SimpleQueue()
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        for buf in buffers:
            self.free.put(buf)
        self.thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.todo.get()) is not None:
            buf, n = item
            self.digest.update(memoryview(buf)[:n])
            self.free.put(buf)

    def finish(self) -> None:
        self.todo.put(None)
        self.thread.join()


class Fetcher:
    """The files of one package from ``source`` (an http(s) folder URL), on one
    keep-alive connection; ``fetch`` one file at a time."""

    def __init__(self, source: str, pacer: Pacer, on_bytes: Callable[[int], None],
                 cancelled: Callable[[], bool]):
        parts = urlsplit(source)
        self.source, self.scheme, self.base = source, parts.scheme, parts.path
        self.host, self.port = parts.hostname, parts.port
        self.headers = {"Accept-Encoding": "identity"}
        if parts.username is not None:      # as httpx does with user:password@ in the URL
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self.headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        self.pacer, self.on_bytes, self.cancelled = pacer, on_bytes, cancelled
        self.buffers = [bytearray(BUFFER) for _ in range(BUFFERS)]
        # paced: about ten reads a second, so the pace holds within a tenth of a second
        self.read_size = max(4096, min(BUFFER, pacer.rate // 10)) if pacer.rate else BUFFER
        self.conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def __enter__(self) -> "Fetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def fetch(self, f: PackageFile, partial: Path) -> tuple[int, bool]:
        """Download ``f`` to ``partial`` (resuming what is there) and verify it;
        ``(bytes fetched, resumed)``. Raises FetchError naming the file and URL."""
        url = file_url(self.source, f.path)
        fetched, resumed, wrong = 0, False, 0
        for attempt in range(ATTEMPTS + 1):
            have = partial.stat().st_size if partial.exists() else 0
            if have > f.size:
                partial.unlink()
                have = 0
            try:
                got, ranged, digest = self._download(f, url, partial, have)
            except _Cut as cut:
                self.close()
                fetched += cut.arrived
                if attempt == ATTEMPTS:
                    raise FetchError(f"{f.path}: {url}: the connection failed {ATTEMPTS + 1} "
                                     f"times ({cut})") from None
                time.sleep(RETRY_PAUSE_S[min(attempt, len(RETRY_PAUSE_S) - 1)])
                continue
            fetched += got
            resumed |= ranged
            if digest == f.sha256:
                return fetched, resumed
            wrong += 1
            partial.unlink()
            if wrong > 1:
                raise FetchError(f"{f.path}: {url}: its sha256 differs from the manifest's "
                                 "twice (the source's file and manifest disagree?)")
        raise FetchError(f"{f.path}: {url}: not complete after {ATTEMPTS + 1} attempts")

    def _download(self, f: PackageFile, url: str, partial: Path,
                  have: int) -> tuple[int, bool, str]:
        """GET ``url`` into ``partial`` from byte ``have``: (bytes that arrived,
        whether it resumed, the sha256 of the whole file). A transport error
        is a _Cut; a local error (a full disk) an OSError."""
        digest = hashlib.sha256()
        if have == f.size:                  # complete already (a killed run's, or empty)
            partial.touch()
            _hash_file(partial, digest)
            return 0, False, digest.hexdigest()
        try:
            response = self._request(url, have)
        except NETWORK as exc:
            raise _Cut(exc) from None
        if response.status == 200:
            have, mode = 0, "wb"            # the server ignored the range: from the start
        elif response.status == 206 and have:
            mode = "ab"
            _hash_file(partial, digest)
        else:
            self.close()
            raise FetchError(f"{url}: HTTP {response.status} {response.reason}")
        hasher = _Hasher(digest, self.buffers) if f.size - have > HASH_INLINE else None
        arrived = 0
        try:
            with open(partial, mode) as fh:
                while True:
                    if self.cancelled():
                        raise FetchError(f"{url}: cancelled")
                    buf = hasher.free.get() if hasher else self.buffers[0]
                    try:
                        n = response.readinto(memoryview(buf)[:self.read_size])
                    except NETWORK as exc:
                        raise _Cut(exc, arrived) from None
                    if not n:
                        if hasher:
                            hasher.free.put(buf)
                        break
                    view = memoryview(buf)[:n]
                    fh.write(view)          # as it comes: a cut keeps what arrived
                    if hasher:
                        hasher.todo.put((buf, n))
                    else:
                        digest.update(view)
                    arrived += n
                    self.on_bytes(n)
                    self.pacer.took(n)
                fh.flush()
                os.fsync(fh.fileno())
        except FetchError:
            self.close()                    # the answer was not read to its end
            raise
        finally:
            if hasher:
                hasher.finish()
        if have + arrived < f.size:         # the answer ended early: resume
            raise _Cut(f"the answer ended {f.size - have - arrived} bytes early", arrived)
        if response.will_close:
            self.close()
        return arrived, mode == "ab", digest.hexdigest()

    def _request(self, url: str, have: int) -> http.client.HTTPResponse:
        if self.conn is None:
            if self.scheme == "https":
                self.conn = http.client.HTTPSConnection(
                    self.host, self.port, timeout=TIMEOUT_S,
                    context=ssl.create_default_context())
            else:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT_S)
        headers = dict(self.headers, **({"Range": f"bytes={have}-"} if have else {}))
        self.conn.request("GET", urlsplit(url).path, headers=headers)
        return self.conn.getresponse()


def file_url(source: str, path: str) -> str:
    return source + "/".join(quote(part) for part in path.split("/"))


def _hash_file(path: Path, digest) -> None:
    with open(path, "rb") as fh:
        while chunk := fh.read(BUFFER):
            digest.update(chunk)
