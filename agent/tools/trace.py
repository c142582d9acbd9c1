"""Remote trace: the agent's log lines, streamed live (the seed's port-415 Remote Trace).

Off unless ``[trace] listen`` is set (e.g. ``"127.0.0.1:415"``); a listen
address that is not loopback is allowed but logged as a warning, since a
trace shows task ids, parameters' names and file paths. ``dsagent run``
serves it in a thread; it only reads the log files, so it works whatever a
process is doing.

Protocol (one TCP connection per viewer)::

    server -> DSTRACE/1 <nonce>\\n                 32 hex digits, fresh per connection
    viewer -> AUTH <sig>[ <task-prefix>]\\n         sig = hex HMAC-SHA256(key, "DSTRACE/1 <nonce>")
    server -> OK\\n, then one JSON log record per line, until either side closes
           |  ERR bad-auth\\n | ERR bad-frame\\n, and closes

The key is ``<state_dir>/trace.key`` (64 hex digits, mode 0600, made at the
first start with the trace on): whoever can read it is as trusted as root on
that machine. A viewer that does not authenticate within 5 s is dropped; at
most MAX_VIEWERS watch at once; a viewer that cannot keep up is dropped
rather than slowing anything down.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import socket
import sys
import threading
from pathlib import Path

from agent.tools.logview import LogFollower, format_record, matches
from agent.common.serverapi import is_loopback_host
from agent.common.tickle import read_line, sign

log = logging.getLogger("dsagent.trace")

AUTH_TIMEOUT_S = 5.0
SEND_TIMEOUT_S = 10.0
MAX_VIEWERS = 8
MAX_LINE = 256


def load_trace_key(state_dir: str | os.PathLike, create: bool = False) -> bytes:
    """The trace key, made (0600) on first use when ``create``."""
    path = Path(state_dir) / "trace.key"
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        if not create:
            raise
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex() + "\n")
    return key


def _challenge(nonce: str) -> bytes:
    return f"DSTRACE/1 {nonce}".encode("ascii")


class TraceServer:
    """Accepts viewers and streams the log folder to each authenticated one."""

    def __init__(self, host: str, port: int, key: bytes, log_dir: Path):
        self.key = key
        self.log_dir = log_dir
        self.stop = threading.Event()
        self._viewers = threading.Semaphore(MAX_VIEWERS)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        if not is_loopback_host(host):
            log.warning("remote trace listening on %s:%d: reachable from other hosts "
                        "(authenticated with %s)", host, self.port, "trace.key")
        else:
            log.info("remote trace listening on %s:%d", host, self.port)
        self._thread = threading.Thread(target=self._accept_loop, name="trace", daemon=True)

    def start(self) -> "TraceServer":
        self._thread.start()
        return self

    def _accept_loop(self) -> None:
        while not self.stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return  # closed
            if not self._viewers.acquire(blocking=False):
                self._reply(conn, b"ERR busy\n")
                continue
            threading.Thread(target=self._serve, args=(conn, peer), name="trace-viewer",
                             daemon=True).start()

    @staticmethod
    def _reply(conn: socket.socket, answer: bytes) -> None:
        try:
            conn.sendall(answer)
        except OSError:
            pass
        conn.close()

    def _serve(self, conn: socket.socket, peer) -> None:
        follower = LogFollower(self.log_dir)  # before OK: the viewer sees every line after it
        try:
            task = self._authenticate(conn, peer)
            if task is None:
                return
            self._stream(conn, follower, task, peer)
        except OSError:
            pass
        finally:
            follower.close()
            conn.close()
            self._viewers.release()

    def _authenticate(self, conn: socket.socket, peer) -> str | None:
        """The viewer's task filter ("" for all) once it proved it has the key; else None."""
        conn.settimeout(AUTH_TIMEOUT_S)
        nonce = secrets.token_hex(16)
        conn.sendall(_challenge(nonce) + b"\n")
        try:
            line = read_line(conn, MAX_LINE)
        except socket.timeout:
            line = b""
        parts = line.decode("ascii", "replace").split()
        if not line.endswith(b"\n") or len(parts) not in (2, 3) or parts[0] != "AUTH":
            log.warning("remote trace: bad request from %s:%s", *peer[:2])
            conn.sendall(b"ERR bad-frame\n")
            return None
        if not hmac.compare_digest(parts[1], sign(self.key, _challenge(nonce))):
            log.warning("remote trace: refused %s:%s (bad key)", *peer[:2])
            conn.sendall(b"ERR bad-auth\n")
            return None
        conn.sendall(b"OK\n")
        log.info("remote trace: %s:%s watching%s", *peer[:2],
                 f" task {parts[2]}" if len(parts) == 3 else "")
        return parts[2] if len(parts) == 3 else ""

    def _stream(self, conn: socket.socket, follower: LogFollower, task: str, peer) -> None:
        conn.settimeout(SEND_TIMEOUT_S)  # a viewer that stops reading is dropped
        try:
            for record in follower.follow(self.stop):
                if record.get("logger") == log.name:
                    continue  # our own lines would echo for every viewer
                if matches(record, task or None):
                    conn.sendall(json.dumps(record, ensure_ascii=False).encode() + b"\n")
        except (socket.timeout, OSError):
            log.info("remote trace: %s:%s gone", *peer[:2])

    def close(self) -> None:
        self.stop.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def watch(host: str, port: int, key: bytes, task: str | None = None, as_json: bool = False,
          out=sys.stdout, timeout: float = 5.0) -> int:
    """``dsagent trace``: authenticate, then print the stream until it ends."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        print(f"dsagent trace: cannot reach {host}:{port}: {exc}", file=sys.stderr)
        return 1
    # one buffered reader for all of it: the records may follow "OK" in the same read
    with sock, sock.makefile("rb") as stream:
        first = stream.readline(MAX_LINE).decode("ascii", "replace").split()
        if len(first) != 2 or first[0] != "DSTRACE/1":
            print(f"dsagent trace: {host}:{port} is not a dsagent remote trace "
                  f"(it said {' '.join(first)[:60]!r})", file=sys.stderr)
            return 1
        sig = sign(key, _challenge(first[1]))
        sock.sendall(f"AUTH {sig}{' ' + task if task else ''}\n".encode("ascii"))
        answer = stream.readline(MAX_LINE).strip().decode("ascii", "replace")
        if answer != "OK":
            print(f"dsagent trace: refused: {answer}", file=sys.stderr)
            return 1
        sock.settimeout(None)
        try:
            for raw in stream:
                line = raw.decode("utf-8", "replace")
                if as_json:
                    out.write(line)
                else:
                    try:
                        out.write(format_record(json.loads(line)) + "\n")
                    except ValueError:
                        continue
                out.flush()
        except (KeyboardInterrupt, BrokenPipeError):
            pass
    return 0
