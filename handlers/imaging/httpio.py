"""HTTP for an image store at an http(s) URL: ranged reads that resume,
streamed uploads, and errors that name the URL and what happened.

- ``RangeReader``: one file fetched by a thread of its own, extent by extent
  (deploy's frames), each read straight into its own bytes, read-ahead
  bounded by ``AHEAD_BYTES``; one ``GET`` with ``Range: bytes=N-END`` covers
  them all. When the connection drops (or the server answers 5xx) it asks
  again from the byte where it stopped (``If-Range`` with the first answer's
  ETag, so a file replaced meanwhile is noticed), after a back-off, at most
  ``RETRIES`` times in a row (each byte that arrives makes the budget whole).
- ``Upload``: one ``PUT`` whose chunked body is written by the calling thread
  while a thread of its own sends it: a capture streams its data without
  knowing its size, and without a local copy.
- ``Session.get_bytes`` / ``head_status`` / ``put_bytes``: the small files
  (``current``, ``meta.json``, ``index.bin``), on one keep-alive connection,
  retried like reads.

The standard library's http.client, not httpx: ``response.read(n)`` fills
one bytes object straight from the socket, with no copy beyond the kernel's,
where httpx's parser copies every byte several times in 64 KiB pieces
(measured on loopback: 0.22 s of CPU per 180 MB against 0.03 s, as much as
a third of a whole deploy), and it costs no import time (httpx: ~50 ms). https is checked against the system's CA store
(Debian: /etc/ssl/certs, or ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``). No proxy
is used: the image store is on the site's network.

Credentials in the URL (``https://user:password@host/images/``) are sent as
HTTP Basic auth and never appear in a message.
"""

from __future__ import annotations

import base64
import errno
import http.client
import logging
import queue
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from typing import BinaryIO, Iterator
from urllib.parse import unquote, urlsplit, urlunsplit

from agent import __version__
from handlers.imaging.store import ImageError

log = logging.getLogger("dsagent.imaging")

RETRIES = 6                      # failed attempts in a row before giving up (progress resets it)
BACKOFF_S = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
AHEAD_BYTES = 32 << 20           # read ahead of the writer at most this much
UPLOAD_QUEUE = 4                 # frames (<= 4 MiB each) queued for the uploading thread
RETRY_STATUS = {408, 429, 500, 502, 503, 504}
TIMEOUT_S = 60.0                 # connect, and each read or write
CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
NET_ERRORS = (OSError, http.client.HTTPException)

_EOF = object()


class _Retry(Exception):
    """A transient failure: ask again after a back-off."""


class _Aborted(Exception):
    """The capture gave up: cut the upload."""


def split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """``url`` without its user:password, and those as a Basic auth pair (or None)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    clean = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return clean, (unquote(parts.username or ""), unquote(parts.password or ""))


def _chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


def describe(exc: BaseException, url: str) -> str:
    """What went wrong talking to ``url``, in words (TLS, refused, timeout...)."""
    host = urlsplit(url).netloc
    for err in _chain(exc):
        if isinstance(err, ssl.SSLCertVerificationError):
            return (f"TLS: the certificate of {host} is not trusted ({err.verify_message}); "
                    "add its CA to the system's store or set SSL_CERT_FILE")
        if isinstance(err, ssl.SSLError):
            hint = " (is it an http:// server?)" if "WRONG_VERSION" in str(err) else ""
            return f"TLS with {host} failed: {err.reason or err}{hint}"
        if isinstance(err, ConnectionRefusedError) or (
                isinstance(err, OSError) and err.errno == errno.ECONNREFUSED):
            return f"connection refused by {host} (no server listening there?)"
        if isinstance(err, socket.gaierror):
            return f"cannot resolve {urlsplit(url).hostname}: {err.strerror or err}"
    if isinstance(exc, TimeoutError):
        return f"{host} did not answer within {TIMEOUT_S:.0f} s"
    if isinstance(exc, (http.client.RemoteDisconnected, http.client.IncompleteRead,
                        BrokenPipeError)):
        return f"{host} closed the connection"
    if isinstance(exc, ConnectionResetError):
        return f"{host} reset the connection"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{host}: {exc.strerror}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


HINTS = {
    401: "the server wants credentials: give them in [handlers] image_store as "
         "http(s)://USER:PASSWORD@host/...",
    403: "the server refuses access (file permissions, or credentials not allowed to do this)",
    405: "the server does not take this method here (nginx: dav_methods PUT)",
    409: "the server has no such folder (nginx: create_full_put_path on)",
    411: "the server wants a Content-Length (it takes no chunked upload)",
    413: "the server refuses a body this large (nginx: client_max_body_size 0)",
    416: "the file on the server is shorter than the image says",
}


def status_error(method: str, url: str, response: http.client.HTTPResponse,
                 what: str = "") -> ImageError:
    code = response.status
    hint = HINTS.get(code, "")
    if 300 <= code < 400:
        hint = (f"redirected to {response.getheader('location', '?')}; set image_store to "
                "the final URL")
    return ImageError(f"{what}{method} {url}: HTTP {code} {response.reason or ''}".rstrip()
                      + (f": {hint}" if hint else ""))


class Session:
    """One image operation's HTTP: the server, credentials, TLS, a keep-alive
    connection for the small requests, and the retry policy."""

    def __init__(self, url: str):
        self.url, auth = split_credentials(url)
        parts = urlsplit(self.url)
        self.https = parts.scheme.lower() == "https"
        self.ssl = ssl.create_default_context() if self.https else None
        self.headers = {"User-Agent": f"dsagent/{__version__}",
                        "Accept-Encoding": "identity"}   # Range offsets count stored bytes
        if auth:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"
        self.answered = False      # the server answered once: a refused connect is transient
        self.retries = 0
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def connection(self) -> http.client.HTTPConnection:
        parts = urlsplit(self.url)
        if self.https:
            return http.client.HTTPSConnection(parts.hostname, parts.port, timeout=TIMEOUT_S,
                                               context=self.ssl)
        return http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT_S)

    @staticmethod
    def target(url: str) -> str:
        parts = urlsplit(url)
        return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    def backoff(self, attempt: int, url: str, why: str, stop: threading.Event | None = None,
                what: str = "") -> None:
        """Sleep before attempt number ``attempt`` (1-based); ImageError after RETRIES."""
        if attempt > RETRIES:
            raise ImageError(f"{what}{url}: {why}; gave up after {RETRIES} retries")
        delay = BACKOFF_S[min(attempt, len(BACKOFF_S)) - 1]
        self.retries += 1
        log.warning("%s: %s; retrying in %.2f s (%d of %d)", url, why, delay, attempt, RETRIES)
        if stop is not None:
            stop.wait(delay)
        else:
            time.sleep(delay)

    def transient(self, exc: BaseException) -> bool:
        """Worth retrying? Not an untrusted certificate, not a name that does not
        resolve, and neither a failed handshake nor a refused connect before the
        server ever answered (those are not going to change in a few seconds)."""
        chain = _chain(exc)
        if any(isinstance(e, (ssl.SSLCertVerificationError, socket.gaierror)) for e in chain):
            return False
        if self.answered:
            return True
        return not any(isinstance(e, (ssl.SSLError, ConnectionRefusedError)) for e in chain)

    def exchange(self, method: str, url: str, body: bytes | BinaryIO | None = None,
                 headers: dict | None = None, limit: int = 1 << 20
                 ) -> tuple[http.client.HTTPResponse, bytes]:
        """One request on the keep-alive connection (a fresh one if the server
        closed it while idle); the response and its body (at most ``limit`` bytes)."""
        for reused in (self._conn is not None, False):
            if self._conn is None:
                self._conn = self.connection()
            if body is not None and not isinstance(body, bytes):
                body.seek(0)                    # a file sent again from its start
            try:
                self._conn.request(method, self.target(url), body=body,
                                   headers={**self.headers, **(headers or {})})
                response = self._conn.getresponse()
                self.answered = True
                data = response.read(limit + 1) if method != "HEAD" else b""
                if len(data) > limit:
                    raise ImageError(f"{method} {url}: more than {limit} bytes; refused")
                if not response.isclosed():
                    response.read()             # the rest (a small error page): keep-alive
                return response, data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if not reused:
                    raise
            except BaseException:
                self.close()
                raise
        raise AssertionError("unreachable")

    def _retried(self, method: str, url: str, what: str, **kwargs):
        attempt = 0
        while True:
            try:
                response, data = self.exchange(method, url, **kwargs)
                if response.status not in RETRY_STATUS:
                    return response, data
                why = f"HTTP {response.status}"
            except NET_ERRORS as exc:
                if not self.transient(exc):
                    raise ImageError(f"{what}{method} {url}: {describe(exc, url)}") from None
                why = describe(exc, url)
            attempt += 1
            self.backoff(attempt, url, why, what=f"{what}{method} ")

    def get_bytes(self, url: str, limit: int, what: str = "") -> bytes | None:
        """A small file's bytes, or None on 404; retried on drops and 5xx."""
        response, data = self._retried("GET", url, what, limit=limit,
                                       headers={"Cache-Control": "no-cache"})
        if response.status == 404:
            return None
        if response.status != 200:
            raise status_error("GET", url, response, what)
        return data

    def head_status(self, url: str) -> int:
        return self._retried("HEAD", url, "")[0].status

    def put_bytes(self, url: str, body: bytes | BinaryIO, size: int) -> None:
        """PUT a small file with Content-Length; retried (a PUT is idempotent)."""
        response, _ = self._retried("PUT", url, "", body=body,
                                    headers={"Content-Length": str(size)})
        if response.status not in (200, 201, 204):
            raise status_error("PUT", url, response)


class RangeReader:
    """The file at ``url`` (``size`` bytes), fetched by a thread of its own in
    ``extents`` ((offset, length), increasing; default: 1 MiB blocks), each read
    straight from the socket into its own bytes, and handed over, in that
    order, by ``read(offset, length)``."""

    def __init__(self, session: Session, url: str, size: int, what: str,
                 extents: Iterable[tuple[int, int]] | None = None):
        self.session, self.url, self.size, self.what = session, url, size, what
        self.where = url
        self.requests = 0
        self.resumes = 0
        self._extents = extents if extents is not None else blocks(size)
        self._q: queue.Queue = queue.Queue(maxsize=max(2, AHEAD_BYTES // (4 << 20)))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: http.client.HTTPConnection | None = None

    # -- the consumer ---------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        if self._thread is None:
            self._thread = threading.Thread(target=self._fetch, name="image-fetch", daemon=True)
            self._thread.start()
        item = self._q.get()
        if isinstance(item, BaseException):
            self._q.put(item)                   # every later read fails the same way
            raise item
        if item is _EOF:
            raise ImageError(f"{self.what}: nothing more to read from {self.url} "
                             f"(byte {offset} wanted)")
        got_offset, buf = item
        if (got_offset, len(buf)) != (offset, length):
            raise ImageError(f"{self.what}: {self.url}: bytes {offset}+{length} wanted, "
                             f"{got_offset}+{len(buf)} fetched")
        return buf

    def stats(self) -> dict:
        return {"http_requests": self.requests, "http_resumes": self.resumes,
                "http_retries": self.session.retries}

    def close(self) -> None:
        self._stop.set()
        conn = self._conn
        if conn is not None and conn.sock is not None:
            try:                               # unblock a read waiting on the network
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            while self._thread.is_alive():
                try:                           # unblock a put() waiting for room
                    while True:
                        self._q.get_nowait()
                except queue.Empty:
                    pass
                self._thread.join(0.01)
        self._disconnect()

    # -- the fetching thread ----------------------------------------------------

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _fetch(self) -> None:
        try:
            self._fetch_all()
            self._put(_EOF)
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc if isinstance(exc, ImageError) else
                      ImageError(f"{self.what}: GET {self.url}: {describe(exc, self.url)}"))
        finally:
            self._disconnect()

    def _fetch_all(self) -> None:
        response = None
        attempt, etag, at = 0, None, 0
        for offset, length in self._extents:
            if offset < at or length < 0 or offset + length > self.size:
                raise ImageError(f"{self.what}: the index points at bytes {offset}+{length} of "
                                 f"{self.url} ({self.size} bytes, {at} read): the image is corrupt")
            if offset != at and response is not None:   # a gap: ask from there
                response.close()
                response = None
            at = offset + length
            pieces: list[bytes] = []
            got = 0
            while got < length:
                if self._stop.is_set():
                    return
                try:
                    if response is None:
                        response, skip = self._request(offset + got, etag)
                        etag = etag or _strong_etag(response.getheader("etag"))
                        while skip:            # the server sent the file from its start
                            dropped = response.read(min(skip, 4 << 20))
                            if not dropped:
                                raise _Retry("the answer ended early")
                            skip -= len(dropped)
                    # read(n) fills one new bytes object straight from the socket
                    # (no zero-filled buffer, no copy): usually the whole extent at once
                    piece = response.read(length - got)
                    if not piece:
                        raise _Retry(f"the connection closed before the end ({self.size} "
                                     "bytes)")
                    pieces.append(piece)
                    got += len(piece)
                    attempt = 0                 # progress: the retry budget is whole again
                except (*NET_ERRORS, _Retry) as exc:
                    if self._stop.is_set():
                        return
                    if not isinstance(exc, _Retry) and not self.session.transient(exc):
                        raise
                    response = None
                    self._disconnect()
                    attempt += 1
                    why = str(exc) if isinstance(exc, _Retry) else describe(exc, self.url)
                    self.session.backoff(attempt, self.url, f"{why} (at byte {offset + got})",
                                         self._stop, f"{self.what}: GET ")
            buf = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            self._put((offset, buf))
        if response is not None:
            response.close()

    def _request(self, start: int, etag: str | None):
        """GET bytes start..size-1; return the response and how many bytes to drop."""
        if self._conn is None:
            self._conn = self.session.connection()
        headers = {**self.session.headers, "Range": f"bytes={start}-{self.size - 1}"}
        if etag and start:
            headers["If-Range"] = etag
        self.requests += 1
        if start:
            self.resumes += 1
        self._conn.request("GET", self.session.target(self.url), headers=headers)
        response = self._conn.getresponse()
        self.session.answered = True
        try:
            return response, self._check(response, start, etag)
        except BaseException:
            response.close()
            raise

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _check(self, r: http.client.HTTPResponse, start: int, etag: str | None) -> int:
        """Check an answer to a ranged GET; return how many leading bytes to drop."""
        if r.status in RETRY_STATUS:
            raise _Retry(f"HTTP {r.status}")
        if r.status == 404:
            raise ImageError(f"{self.what}: GET {self.url}: HTTP 404: the file is not there "
                             "(the image is incomplete or was removed)")
        coding = (r.getheader("content-encoding") or "identity").strip().lower()
        if coding != "identity":
            raise ImageError(f"{self.what}: GET {self.url}: Content-Encoding {coding!r} refused")
        if r.status == 206:
            m = CONTENT_RANGE_RE.fullmatch((r.getheader("content-range") or "").strip())
            if not m or int(m.group(1)) != start:
                raise ImageError(f"{self.what}: GET {self.url}: asked for bytes from {start}, "
                                 f"got Content-Range {r.getheader('content-range')!r}")
            if m.group(3) != "*" and int(m.group(3)) != self.size:
                raise ImageError(f"{self.what}: {self.url} is {m.group(3)} bytes on the server; "
                                 f"the image's metadata says {self.size}")
            return 0
        if r.status == 200:                   # Range ignored, or If-Range failed
            if etag and start and _strong_etag(r.getheader("etag")) != etag:
                raise ImageError(f"{self.what}: {self.url} changed on the server during the "
                                 "transfer (its ETag is not the same)")
            length = r.getheader("content-length")
            if length is not None and length.strip().isdigit() and int(length) != self.size:
                raise ImageError(f"{self.what}: {self.url} is {length} bytes on the server; "
                                 f"the image's metadata says {self.size}")
            return start
        raise status_error("GET", self.url, r, f"{self.what}: ")


def blocks(size: int, block: int = 1 << 20) -> Iterator[tuple[int, int]]:
    """[0, size) as consecutive (offset, length) blocks."""
    return ((offset, min(block, size - offset)) for offset in range(0, size, block))


def _strong_etag(etag: str | None) -> str | None:
    return etag if etag and not etag.startswith("W/") else None


class Upload:
    """One PUT of a body of unknown size (chunked), streamed from ``write()``.

    An empty PUT of the same file goes first, so a refusal (401, 403, 405,
    409...) is answered plainly before any data is sent: a server that
    refuses a streamed body may close the connection before its answer can
    be read."""

    def __init__(self, session: Session, url: str):
        self.session, self.url = session, url
        self.size = 0
        session.put_bytes(url, b"", 0)
        self._q: queue.Queue = queue.Queue(maxsize=UPLOAD_QUEUE)
        self._done = threading.Event()
        self._error: ImageError | None = None
        self._conn: http.client.HTTPConnection | None = None
        self._thread = threading.Thread(target=self._send, name="image-upload", daemon=True)
        self._thread.start()

    def _body(self) -> Iterator[bytes]:
        while True:
            item = self._q.get()
            if item is None:
                return
            if item is _EOF:            # abort: the request is cut, the server keeps nothing
                raise _Aborted()
            yield item

    def _send(self) -> None:
        conn = self._conn = self.session.connection()
        try:
            try:
                conn.request("PUT", self.session.target(self.url), body=self._body(),
                             headers=self.session.headers, encode_chunked=True)
            except NET_ERRORS as exc:
                try:                    # the server may have said why before it closed
                    response = conn.getresponse()
                except NET_ERRORS:
                    raise exc from None
            else:
                response = conn.getresponse()
            if response.status not in (200, 201, 204):
                self._error = status_error("PUT", self.url, response)
        except _Aborted:
            pass
        except NET_ERRORS as exc:
            self._error = ImageError(f"PUT {self.url}: {describe(exc, self.url)} after "
                                     f"{self.size} bytes were queued")
        except Exception as exc:  # noqa: BLE001 - reported to the capture
            self._error = ImageError(f"PUT {self.url}: {exc}")
        finally:
            conn.close()
            self._done.set()

    def _push(self, item) -> None:
        while True:
            if self._done.is_set():
                raise self._error or ImageError(
                    f"PUT {self.url}: the server answered before the body was complete")
            try:
                self._q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def write(self, data: bytes) -> int:
        offset = self.size
        self._push(data)
        self.size += len(data)
        return offset

    def finish(self) -> int:
        self._push(None)
        self._done.wait()
        self._thread.join()
        if self._error:
            raise self._error
        return self.size

    def abort(self) -> None:
        """Cut the upload (the server keeps nothing of a body cut short)."""
        if self._done.is_set():
            return
        conn = self._conn
        if conn is not None and conn.sock is not None:
            try:                        # a send blocked on the network stops now
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        while not self._done.wait(0.05):
            try:                        # a generator waiting for data stops too
                self._q.put_nowait(_EOF)
            except queue.Full:
                try:
                    self._q.get_nowait()
                except queue.Empty:
                    pass
        self._thread.join()
