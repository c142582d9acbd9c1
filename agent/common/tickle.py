"""Signed one-line frames: the tickle (PROTOCOL.md §2) and the CTA wake-up hop.

Standard library only: the objecthost imports this and must stay small.

Tickle (task server -> objecthost, TCP 50122)::

    DSTICKLE/1 <client_id> <unix_ts> <nonce> <sig>\\n

Wake-up (objecthost -> CTA, loopback only; our own internal hop, same shape)::

    DSWAKE/1 <unix_ts> <nonce> <sig>\\n

``sig`` is lowercase hex HMAC-SHA256 over the line up to the space before it.
The wake-up is keyed with a per-agent hop key (``<state_dir>/hop.key``), so a
local process that cannot read the state dir cannot make the CTA pull.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import socket
import time
from collections import OrderedDict
from pathlib import Path

from agent.common.errors import TickleRefused

MAX_LINE = 512          # bytes, including the trailing \n
MAX_SKEW_S = 300        # a tickle older/newer than this is `stale`
REPLAY_WINDOW_S = 600   # an accepted nonce is remembered this long

TICKLE_RE = re.compile(
    rb"DSTICKLE/1 ([A-Za-z0-9._-]{1,64}) (-?[0-9]{1,19}) ([0-9A-Fa-f]{16,64}) ([0-9a-f]{64})\n"
)
WAKE_RE = re.compile(rb"DSWAKE/1 (-?[0-9]{1,19}) ([0-9a-f]{16,64}) ([0-9a-f]{64})\n")


def sign(key: bytes, body: bytes) -> str:
    """Lowercase hex HMAC-SHA256 of ``body``."""
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def make_tickle(client_id: str, key: bytes, *, now: int | None = None,
                nonce: str | None = None) -> bytes:
    """A signed tickle line for ``client_id`` (with its trailing newline)."""
    ts = int(time.time()) if now is None else now
    nonce = nonce or secrets.token_hex(16)
    body = f"DSTICKLE/1 {client_id} {ts} {nonce}".encode("ascii")
    return body + b" " + sign(key, body).encode("ascii") + b"\n"


class ReplayCache:
    """Nonces accepted in the last ``window`` seconds, oldest first.

    Only accepted frames are remembered, and acceptance is rate limited, so
    the cache is bounded by rate x window; ``max_entries`` is a hard cap on top.
    """

    def __init__(self, window: float = REPLAY_WINDOW_S, max_entries: int = 100_000):
        self.window = window
        self.max_entries = max_entries
        self._seen: OrderedDict[str, float] = OrderedDict()

    def _prune(self, now: float) -> None:
        while self._seen:
            nonce, at = next(iter(self._seen.items()))
            if at > now - self.window and len(self._seen) <= self.max_entries:
                break
            self._seen.popitem(last=False)

    def seen(self, nonce: str, now: float) -> bool:
        self._prune(now)
        return nonce.lower() in self._seen

    def remember(self, nonce: str, now: float) -> None:
        self._seen[nonce.lower()] = now
        self._prune(now)

    def __len__(self) -> int:
        return len(self._seen)


def check_tickle(line: bytes, client_id: str | None, key: bytes | None,
                 cache: ReplayCache, now: float | None = None) -> str:
    """Check one tickle line in §2's order; return its nonce or raise TickleRefused.

    The rate limit (`busy`) is the caller's last check; the caller remembers
    the nonce only once the tickle is accepted.
    """
    now = time.time() if now is None else now
    if len(line) > MAX_LINE:
        raise TickleRefused("bad-frame", f"line longer than {MAX_LINE} bytes")
    match = TICKLE_RE.fullmatch(line)
    if not match:
        raise TickleRefused("bad-frame", "not a DSTICKLE/1 line")
    cid, ts, nonce, sig = (part.decode("ascii") for part in match.groups())
    if client_id is None or key is None or cid != client_id:
        raise TickleRefused("unknown-client", f"client id {cid!r} is not ours")
    body = line[: line.rindex(b" ")]
    if not hmac.compare_digest(sign(key, body), sig):
        raise TickleRefused("bad-signature", "HMAC does not match")
    if abs(now - int(ts)) > MAX_SKEW_S:
        raise TickleRefused("stale", f"timestamp {ts} is {int(now) - int(ts)} s off")
    if cache.seen(nonce, now):
        raise TickleRefused("replay", "nonce already used")
    return nonce


def make_wake(hop_key: bytes, *, now: int | None = None, nonce: str | None = None) -> bytes:
    """A signed wake-up. The objecthost passes the accepted tickle's nonce
    (unique: a nonce is accepted once), so the CTA's log names the tickle that
    woke it and one grep follows objecthost -> CTA."""
    ts = int(time.time()) if now is None else now
    body = f"DSWAKE/1 {ts} {(nonce or secrets.token_hex(16)).lower()}".encode("ascii")
    return body + b" " + sign(hop_key, body).encode("ascii") + b"\n"


def check_wake(line: bytes, hop_key: bytes, cache: ReplayCache,
               now: float | None = None) -> str:
    """Check a wake-up line; return its nonce or raise TickleRefused (codes as for tickles)."""
    now = time.time() if now is None else now
    match = WAKE_RE.fullmatch(line)
    if not match:
        raise TickleRefused("bad-frame", "not a DSWAKE/1 line")
    ts, nonce, sig = (part.decode("ascii") for part in match.groups())
    if not hmac.compare_digest(sign(hop_key, line[: line.rindex(b" ")]), sig):
        raise TickleRefused("bad-signature", "wake-up HMAC does not match")
    if abs(now - int(ts)) > MAX_SKEW_S:
        raise TickleRefused("stale", "wake-up timestamp out of range")
    if cache.seen(nonce, now):
        raise TickleRefused("replay", "wake-up nonce already used")
    cache.remember(nonce, now)
    return nonce


def read_line(sock: socket.socket, limit: int = MAX_LINE) -> bytes:
    """Read until a newline, EOF, or more than ``limit`` bytes (the caller
    refuses a longer line). For a peer that sends one line and waits: bytes
    after the newline are read too, so never use it on a stream."""
    data = b""
    while not data.endswith(b"\n") and len(data) <= limit:
        chunk = sock.recv(limit + 1 - len(data))
        if not chunk:
            break
        data += chunk
    return data


def exchange_line(host: str, port: int, line: bytes, timeout: float = 5.0) -> str:
    """Send one line, return the one-line answer without its newline."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(line)
        answer = read_line(sock, MAX_LINE - 1)
    return answer.decode("ascii", "replace").strip()


def send_tickle(host: str, port: int, client_id: str, key: bytes,
                timeout: float = 5.0) -> str:
    """Send a signed tickle; return the objecthost's answer (``OK`` or ``ERR code``)."""
    return exchange_line(host, port, make_tickle(client_id, key), timeout)


def load_hop_key(state_dir: str | os.PathLike, create: bool = False) -> bytes:
    """The per-agent key of the objecthost -> CTA hop (created 0600 if asked)."""
    path = Path(state_dir) / "hop.key"
    if create and not path.exists():
        # The objecthost and the CTA may both get here at once: each writes its
        # own temp file and hard-links it into place, which fails if the other
        # won, so both end up reading the one key (os.replace would let the
        # second overwrite the key the first already loaded).
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"hop.key.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            except OSError:  # a file system without hard links
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return bytes.fromhex(path.read_text().strip())
