"""The reference server's image store over HTTP (PROTOCOL.md §8 ``image_store``).

``dsagent-server serve --image-store DIR`` serves DIR under ``/images/``,
the way any web server that serves files and takes ``PUT`` would (the agent
needs nothing more: docs/image-store-http.md)::

    GET  /images/<path>    200, or 206 with one Range (Content-Range; 416 past the end);
                           If-Range (ETag or Last-Modified); sent with sendfile
    HEAD /images/<path>    the same headers, no body; a folder answers 403 (it exists,
                           nothing is listed), like nginx without autoindex
    PUT  /images/<path>    Content-Length or chunked body, written to a temporary file
                           in the same folder, fsync'd, renamed over <path> only when
                           the body is complete (201 new, 204 replaced): a PUT cut short
                           leaves nothing; missing folders are created

Paths: each segment is decoded once and must be non-empty, must not start
with ``.`` (no ``..``, no hidden or temporary files) and hold no ``\\`` or
control character; the resolved file must stay inside DIR (symlinks that
lead out are refused). Anything else is 400 or 404.

Auth: reads are open (like TFTP on the PXE network: bare computers in
automation fetch images); a PUT needs HTTP Basic with an enrolled client's
id and token (``http://ID:TOKEN@server/images/`` as the agent's
``image_store``), else 401. Only the reference server does this; a plain nginx
store has whatever its config says (none by default).

For tests: ``fail_after(n, method, suffix)`` makes the next GET (or PUT) of a
path ending in ``suffix`` stop after ``n`` body bytes and close the connection;
``requests`` lists (method, path, Range) of the last requests.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import secrets
import socket
import stat
import threading
from collections import deque
from email.utils import formatdate
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

log = logging.getLogger("taskserver.images")

PREFIX = "/images/"
BLOCK = 1 << 20
RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")
BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")
UNSATISFIABLE = "unsatisfiable"


def parse_range(header: str, size: int):
    """(start, end) inclusive, UNSATISFIABLE, or None (no usable range: send it all).
    Several ranges are answered with the whole file, which RFC 9110 allows."""
    m = RANGE_RE.fullmatch(header.strip())
    if not m or not (m.group(1) or m.group(2)):
        return None
    if m.group(1):
        start = int(m.group(1))
        end = int(m.group(2)) if m.group(2) else size - 1
        if m.group(2) and end < start:
            return None
        if start >= size:
            return UNSATISFIABLE
        return start, min(end, size - 1)
    suffix = int(m.group(2))
    if suffix == 0 or size == 0:
        return UNSATISFIABLE
    return max(0, size - suffix), size - 1


class _Fault:
    def __init__(self, nbytes: int, method: str, suffix: str, times: int):
        self.nbytes, self.method, self.suffix, self.times = nbytes, method, suffix, times


class ImageStoreHTTP:
    """Serves one folder under ``/images/`` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, store: Any):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"image store {self.root} is not a folder")
        self.real_root = os.path.realpath(self.root)
        self.store = store                 # TaskStore: PUT credentials
        self.requests: deque = deque(maxlen=1000)
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()

    # -- tests ----------------------------------------------------------------
    def fail_after(self, nbytes: int, method: str = "GET", suffix: str = "",
                   times: int = 1) -> None:
        """The next ``times`` GETs (or PUTs) of a path ending in ``suffix`` stop after
        ``nbytes`` body bytes and the connection is closed."""
        with self._lock:
            self._faults.append(_Fault(nbytes, method, suffix, times))

    def _fault(self, method: str, path: str) -> int | None:
        with self._lock:
            for fault in self._faults:
                if fault.method == method and path.endswith(fault.suffix):
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    return fault.nbytes
        return None

    # -- dispatch ---------------------------------------------------------------
    @staticmethod
    def handles(raw_path: str) -> bool:
        path = urlsplit(raw_path).path
        return path.startswith(PREFIX) or path == PREFIX.rstrip("/")

    def serve(self, h) -> None:
        """Answer one request of the task server's handler ``h`` (a _Handler)."""
        path = urlsplit(h.path).path
        self.requests.append((h.command, path, h.headers.get("Range")))
        if h.command not in ("GET", "HEAD", "PUT"):
            h.close_connection = bool(h.headers.get("Content-Length")
                                      or h.headers.get("Transfer-Encoding"))
            h._error(405, f"{path}: the image store takes GET, HEAD and PUT",
                     [("Allow", "GET, HEAD, PUT")])
            return
        segments = self._segments(path)
        if segments is None:
            h.close_connection = h.command == "PUT"
            h._error(400, f"{path}: not a path inside the image store (empty, hidden, "
                          "'..' or control characters in a segment)")
            return
        if h.command == "PUT":
            self._put(h, path, segments)
        else:
            self._get(h, path, segments)

    def _segments(self, path: str) -> list[str] | None:
        rel = path[len(PREFIX):] if path.startswith(PREFIX) else ""
        parts = rel.split("/")
        folder = parts[-1] == ""
        parts = parts[:-1] if folder else parts
        try:
            decoded = [unquote(p, errors="strict") if "%" in p else p for p in parts]
        except UnicodeDecodeError:
            return None
        for seg in decoded:
            if not seg or seg.startswith(".") or "/" in seg or BAD_CHARS.search(seg):
                return None
        return decoded + ([""] if folder else [])

    def _inside(self, path: str) -> bool:
        real = os.path.realpath(path)
        return real == self.real_root or real.startswith(self.real_root + os.sep)

    # -- reading ----------------------------------------------------------------
    def _get(self, h, path: str, segments: list[str]) -> None:
        full = os.path.join(self.root, *segments)
        if not self._inside(full):
            h._error(404, f"{path}: no such file")
            return
        try:
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            h._error(404, f"{path}: no such file")
            return
        except OSError as exc:
            h._error(403, f"{path}: {exc.strerror}")
            return
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or segments[-1] == "":
            os.close(fd)
            if stat.S_ISDIR(st.st_mode):
                h._error(403, f"{path}: a folder (folders are not listed)")
            else:
                h._error(404, f"{path}: no such file")
            return
        with os.fdopen(fd, "rb") as fh:
            self._send_file(h, path, fh, st)

    def _send_file(self, h, path: str, fh, st: os.stat_result) -> None:
        size = st.st_size
        etag = f'"{size:x}-{st.st_mtime_ns:x}"'
        modified = formatdate(st.st_mtime, usegmt=True)
        start, end, code = 0, size - 1, 200
        wanted, if_range = h.headers.get("Range"), h.headers.get("If-Range")
        if wanted and (if_range is None or if_range.strip() in (etag, modified)):
            parsed = parse_range(wanted, size)
            if parsed == UNSATISFIABLE:
                h._error(416, f"{path}: range {wanted!r} is past the end ({size} bytes)",
                         [("Content-Range", f"bytes */{size}")])
                return
            if parsed:
                (start, end), code = parsed, 206
        count = end - start + 1
        headers = [("Accept-Ranges", "bytes"), ("ETag", etag), ("Last-Modified", modified)]
        if code == 206:
            headers.append(("Content-Range", f"bytes {start}-{end}/{size}"))
        ctype = "application/json" if path.endswith(".json") else "application/octet-stream"
        self._head(h, code, ctype, count, headers)
        if h.command == "HEAD" or count <= 0:
            return
        cut = self._fault("GET", path)
        h.connection.sendfile(fh, start, count if cut is None else min(cut, count))
        if cut is not None and cut < count:
            log.info("image store: fault: GET %s cut after %d bytes", path, cut)
            self._drop(h)

    @staticmethod
    def _head(h, code: int, ctype: str, length: int, headers: list[tuple[str, str]]) -> None:
        reason = h.responses.get(code, ("",))[0]
        lines = [f"HTTP/1.1 {code} {reason}", f"Server: {h.server_version}",
                 f"Date: {h.date_time_string()}", f"Content-Type: {ctype}",
                 f"Content-Length: {length}"]
        lines += [f"{name}: {value}" for name, value in headers]
        if h.close_connection:
            lines.append("Connection: close")
        h.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        h.log_request(code, length)

    @staticmethod
    def _drop(h) -> None:
        h.close_connection = True
        try:
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- writing ----------------------------------------------------------------
    def _client(self, h) -> str | None:
        """The enrolled client whose id:token came as Basic auth, or None."""
        scheme, _, value = h.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, sep, token = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return user if sep and self.store.auth(user, token) else None

    def _put(self, h, path: str, segments: list[str]) -> None:
        if segments[-1] == "":
            h.close_connection = True
            h._error(405, f"{path}: a folder cannot be PUT", [("Allow", "GET, HEAD")])
            return
        client = self._client(h)
        if client is None:
            h.close_connection = True
            h._error(401, "PUT to the image store needs an enrolled client's id and token "
                          "as HTTP Basic auth", [("WWW-Authenticate", 'Basic realm="dsagent images"')])
            return
        chunked = "chunked" in h.headers.get("Transfer-Encoding", "").lower()
        length = h.headers.get("Content-Length")
        if not chunked and (length is None or not length.strip().isdigit()):
            h.close_connection = True
            h._error(411, "PUT needs Content-Length or a chunked body")
            return
        target = os.path.join(self.root, *segments)
        parent = os.path.dirname(target)
        try:
            self._make_folders(segments[:-1])
        except OSError as exc:
            h.close_connection = True
            h._error(409, f"{path}: cannot create its folder: {exc.strerror or exc}")
            return
        if not self._inside(parent) or os.path.isdir(target) or os.path.islink(target):
            h.close_connection = True
            h._error(409, f"{path}: not a file this store can write")
            return
        tmp = os.path.join(parent, f".put-{secrets.token_hex(6)}.{segments[-1]}")
        existed = os.path.exists(target)
        cut: int | None = None
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        done = False
        try:
            with os.fdopen(fd, "wb") as out:
                body = _chunked(h.rfile) if chunked else _sized(h.rfile, int(length))
                received = 0
                for block in body:
                    if not received:            # a test's fault applies to a body, not to none
                        cut = self._fault("PUT", path)
                    if cut is not None and received + len(block) >= cut:
                        log.info("image store: fault: PUT %s cut after %d bytes", path, cut)
                        self._drop(h)
                        return
                    out.write(block)
                    received += len(block)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
            done = True
        except _ShortBody:
            log.warning("image store: PUT %s from %s cut short; nothing kept", path, client)
            self._drop(h)
            return
        finally:
            if not done:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
        dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        log.info("image store: %s PUT %s (%d bytes)", client, path, received)
        h._send(204 if existed else 201, b"", "application/octet-stream")

    def _make_folders(self, folders: list[str]) -> None:
        here = str(self.root)
        for name in folders:
            here = os.path.join(here, name)
            try:
                os.mkdir(here, 0o755)
            except FileExistsError:
                pass
            if os.path.islink(here) or not os.path.isdir(here):
                raise NotADirectoryError(0, f"{name} is not a folder")


class _ShortBody(Exception):
    pass


def _sized(rfile, length: int):
    buf = bytearray(min(BLOCK, max(length, 1)))
    view = memoryview(buf)
    left = length
    while left:
        n = rfile.readinto(view[:min(len(buf), left)])
        if not n:
            raise _ShortBody()
        left -= n
        yield view[:n]


def _chunked(rfile):
    while True:
        line = rfile.readline(1024)
        if not line.endswith(b"\n"):
            raise _ShortBody()
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise _ShortBody() from None
        if size == 0:
            while True:                       # trailers, up to the empty line
                line = rfile.readline(1024)
                if not line.endswith(b"\n"):
                    raise _ShortBody()
                if line in (b"\r\n", b"\n"):
                    return
        left = size
        while left:
            block = rfile.read(min(BLOCK, left))
            if not block:
                raise _ShortBody()
            left -= len(block)
            yield block
        if rfile.readline(3) not in (b"\r\n", b"\n"):
            raise _ShortBody()
