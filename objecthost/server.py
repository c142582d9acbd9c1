"""The objecthost: checks tickles (PROTOCOL.md §2) and wakes the CTA.

Standard library only (plus ``agent.config``/``agent.tickle``/``agent.errors``,
which are too): this process listens on every interface, so it stays small.

One connection carries one tickle line and gets one answer line::

    client: DSTICKLE/1 <client_id> <unix_ts> <nonce> <sig>\\n
    server: OK\\n   or   ERR <code>\\n      (then the server closes)

Connections are handled on raw non-blocking sockets, not asyncio transports
(whose per-connection task, transport and callbacks cost more than the check
itself: with them a flood of 10,000 connections a second was not kept up
with). A connection whose line is already there when it is accepted is
answered and closed at once, without entering the event loop; only the others
are held, each with a fixed 512-byte buffer, in at most ``max_connections``
slots; when they are all taken the oldest held connection is reset, so slow
senders cannot lock out a tickle. There is no per-peer state anywhere (the
rate limit is one global token bucket and the replay cache holds accepted
nonces only, which the token bucket bounds). Nothing runs on a timer while
idle.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import signal
import socket
import struct
import threading
import time
from collections import Counter
from typing import Callable

from agent.common.config import load_config, parse_hostport
from agent.common.errors import ConfigError, TickleRefused
from agent.common.logsetup import setup_logging
from agent.common.statusfile import StatusFile
from agent.common.tickle import MAX_LINE, ReplayCache, check_tickle, load_hop_key, make_wake

log = logging.getLogger("objecthost")


DRAIN_BYTES = 64 * 1024      # after refusing a long line, read (and drop) at most this much
DRAIN_SECONDS = 0.5          # ... for at most this long, so the peer reads our answer, not a RST
CREDENTIALS_RELOAD_S = 1.0   # re-read the credentials at most this often
FORWARD_TIMEOUT_S = 5.0      # one objecthost -> CTA wake-up exchange
REFUSAL_LOG_LINES = 10       # refused tickles logged per second; the rest are counted
OVERLOAD_LOG_PERIOD_S = 5.0  # "over max_connections" logged at most this often
LISTEN_BACKLOG = 4096        # the kernel caps it at net.core.somaxconn; absorbs bursts while a batch runs
ACCEPT_BATCH = 256           # connections accepted (and most answered) per turn of the event loop
ACCEPT_PAUSE_S = 0.1         # out of file descriptors: stop accepting this long
SWEEP_SLACK_S = 0.05         # deadlines are checked in batches this far apart at most
_LINGER_ABORT = struct.pack("ii", 1, 0)   # SO_LINGER on, 0 s: close() sends RST

CredentialsLoader = Callable[[], "tuple[str, bytes] | None"]

_RELOAD_ON = ("unknown-client", "bad-signature")


class _LogBudget:
    """At most ``lines`` log lines per ``period`` seconds, then one summary line.

    The summary (``summary % suppressed_count``) is written when the period
    ends, by a one-shot timer that exists only while lines are being dropped.
    """

    def __init__(self, lines: int, period: float, summary: str):
        self.lines = lines
        self.period = period
        self.summary = summary
        self._window_start = -math.inf
        self._used = 0
        self._suppressed = 0
        self._timer: asyncio.TimerHandle | None = None

    def log(self, level: int, msg: str, *args) -> None:
        if self.allow():
            log.log(level, msg, *args)

    def allow(self) -> bool:
        """May one more line be written now? (If not, it is counted for the summary.)"""
        now = time.monotonic()
        if now - self._window_start >= self.period:
            self._flush()
            self._window_start = now
            self._used = 0
        if self._used < self.lines:
            self._used += 1
            return True
        self._suppressed += 1
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return False
            delay = max(0.0, self._window_start + self.period - now)
            self._timer = loop.call_later(delay, self._on_timer)
        return False

    def _on_timer(self) -> None:
        self._timer = None
        self._flush()

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._suppressed:
            log.warning(self.summary, self._suppressed)
            self._suppressed = 0

    def close(self) -> None:
        self._flush()


class _TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; one global bucket."""

    def __init__(self, rate: float, burst: int):
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


def _format_peer(peername) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peername) if peername else "unknown-peer"


class _Peer:
    """A peer address formatted only if a log line is actually written."""

    __slots__ = ("addr",)

    def __init__(self, addr):
        self.addr = addr

    def __str__(self) -> str:
        return _format_peer(self.addr)


class _Held:
    """A connection that holds a slot: its line is not complete yet, or it drains after the answer."""

    __slots__ = ("sock", "fd", "addr", "buf", "view", "n", "deadline", "draining", "drained")

    def __init__(self, sock: socket.socket, addr, data: bytes):
        self.sock = sock
        self.fd = sock.fileno()
        self.addr = addr
        self.buf = bytearray(MAX_LINE)
        self.view = memoryview(self.buf)
        self.n = len(data)
        self.buf[: self.n] = data
        self.deadline = 0.0
        self.draining = False
        self.drained = 0


def _listen(host: str | None, port: int, backlog: int) -> list[socket.socket]:
    """Non-blocking listening sockets for ``host`` (None: every interface), as asyncio binds them."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    seen = set()
    try:
        for family, type_, proto, _, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


class ObjectHost:
    """The tickle listener.

    ``client_id``/``tickle_key`` may be None (not registered yet): tickles are
    then answered ``ERR unknown-client``. With a ``credentials`` loader
    (returning ``(client_id, tickle_key)`` or None), the credentials are
    re-read, at most once a second and only when a tickle arrives, while they
    are missing or when a tickle fails as unknown-client/bad-signature, so a
    registration (or re-registration) is picked up without a restart.
    """

    def __init__(self, listen_host: str | None, listen_port: int,
                 client_id: str | None, tickle_key: bytes | None,
                 cta_host: str, cta_port: int, hop_key: bytes,
                 read_timeout: float = 5.0, rate: float = 50.0, burst: int = 50,
                 max_connections: int = 1024,
                 credentials: CredentialsLoader | None = None,
                 refusal_log_lines: int = REFUSAL_LOG_LINES,
                 status: StatusFile | None = None):
        if read_timeout <= 0 or rate <= 0 or burst < 1 or max_connections < 1:
            raise ValueError("read_timeout and rate must be > 0, burst and max_connections >= 1")
        self.listen_host = listen_host or None
        self.listen_port = listen_port
        self.cta_host = cta_host
        self.cta_port = cta_port
        self.hop_key = hop_key
        self.read_timeout = read_timeout
        self.rate = rate
        self.burst = burst
        self.max_connections = max_connections
        self.port: int | None = None
        self.stats: Counter[str] = Counter()   # keys: accepted, refused-<code>, evicted, forward-ok, forward-failed
        self.status = status                   # last tickle accepted / refused, for `dsagent status`
        self._latest_nonce: str | None = None  # the wake-up carries it: the CTA logs which tickle

        self._credentials = (client_id, tickle_key) if client_id and tickle_key else None
        self._loader = credentials
        self._last_reload = -math.inf
        self._replay = ReplayCache()
        self._bucket = _TokenBucket(rate, burst)
        self._refusal_log = _LogBudget(refusal_log_lines, 1.0,
                                       "%d more refused tickles not logged in the last second")
        self._overload_log = _LogBudget(1, OVERLOAD_LOG_PERIOD_S,
                                        f"%d more held connections reset to make room (max_connections="
                                        f"{max_connections}) in the last {OVERLOAD_LOG_PERIOD_S:g} s")
        self._forward_log = _LogBudget(3, 10.0, "%d more failed CTA wake-ups not logged in the last 10 s")
        self._scratch = memoryview(bytearray(DRAIN_BYTES))
        # Held connections in arrival order, so the first is the oldest and the next to expire.
        self._reading: dict[_Held, None] = {}
        self._draining: dict[_Held, None] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._listeners: list[socket.socket] = []
        self._idle: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._forward_task: asyncio.Task | None = None
        self._forward_pending = False
        self._closing = False
        self._closed: asyncio.Event | None = None

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> int:
        """Start listening; return the bound port (useful with port 0)."""
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = asyncio.Event()
        self._listeners = _listen(self.listen_host, self.listen_port, LISTEN_BACKLOG)
        for sock in self._listeners:
            self._loop.add_reader(sock.fileno(), self._on_accept, sock)
        self.port = self._listeners[0].getsockname()[1]
        addrs = ", ".join(_format_peer(s.getsockname()) for s in self._listeners)
        log.info("listening on %s; wake-ups go to %s", addrs, _format_peer((self.cta_host, self.cta_port)))
        if self._credentials is None:
            log.info("no credentials yet (not registered): tickles get ERR unknown-client until they appear")
        return self.port

    async def serve_forever(self) -> None:
        """Wait until :meth:`close` is called (the server runs from :meth:`start` on)."""
        if self._loop is None:
            await self.start()
        await self._closed.wait()

    async def close(self, timeout: float = 1.0) -> None:
        """Stop listening, give open connections and an in-flight wake-up up to
        ``timeout`` seconds, then abort what is left."""
        if self._loop is None:
            return
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        self._stop_listening()
        deadline = time.monotonic() + max(0.0, timeout)
        if self.active_connections:
            try:
                await asyncio.wait_for(self._idle.wait(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                pass
        self._drop_all()
        task = self._forward_task
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=max(0.0, deadline - time.monotonic()))
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
        for budget in (self._refusal_log, self._overload_log, self._forward_log):
            budget.close()
        self._closed.set()

    def abort(self) -> None:
        """Drop every open connection and the in-flight wake-up now (forced shutdown)."""
        self._drop_all()
        if self._forward_task is not None:
            self._forward_task.cancel()

    @property
    def active_connections(self) -> int:
        return len(self._reading) + len(self._draining)

    def _stop_listening(self) -> None:
        for sock in self._listeners:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
                sock.close()

    def _drop_all(self) -> None:
        for table in (self._reading, self._draining):
            for conn in list(table):
                self._drop(conn, abort=True)
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

    # -- connections -------------------------------------------------------
    #
    # The cheap path, taken by nearly every connection under a flood: accept,
    # one non-blocking recv, answer, close; the socket never enters the event
    # loop. Only a connection whose line has not fully arrived (or that must
    # drain after its answer) is "held": it takes one of max_connections
    # slots, a reader in the loop and a deadline. When every slot is taken the
    # oldest held connection is reset to make room: a slow sender loses its
    # slot, a sender that writes its line at once always gets through.

    def _on_accept(self, listener: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:             # EMFILE, ENFILE, ENOBUFS, ENOMEM
                self._overload_log.log(logging.WARNING, "cannot accept connections (%s): pausing %g s",
                                       exc.strerror or exc, ACCEPT_PAUSE_S)
                self._loop.remove_reader(listener.fileno())
                self._loop.call_later(ACCEPT_PAUSE_S, self._resume_accepting, listener)
                return
            try:
                self._serve(sock, addr)
            except Exception:  # never let one connection hurt the server
                log.exception("internal error on a connection from %s", _Peer(addr))
                sock.close()

    def _resume_accepting(self, listener: socket.socket) -> None:
        if not self._closing and listener.fileno() >= 0:
            self._loop.add_reader(listener.fileno(), self._on_accept, listener)

    def _serve(self, sock: socket.socket, addr) -> None:
        """A new connection: answer it now if its line is there, else hold it."""
        try:
            data = sock.recv(MAX_LINE, socket.MSG_DONTWAIT)
        except BlockingIOError:
            data = None
        except OSError:                        # reset before we read
            sock.close()
            return
        if data is None:
            self._hold(sock, addr, b"")
            return
        if not data:                           # a port probe (health check, scanner)
            self.stats["refused-bad-frame"] += 1
            log.debug("connection from %s closed without data", _Peer(addr))
            self._reply(sock, b"ERR bad-frame\n")
            return
        end = data.find(b"\n")
        if end >= 0:
            self._reply(sock, self._handle_line(data[: end + 1], addr), drain=len(data) > end + 1,
                        addr=addr)
        elif len(data) >= MAX_LINE:
            self._refuse_long(sock, addr, data)
        else:
            self._hold(sock, addr, data)

    def _refuse_long(self, sock: socket.socket, addr, data, held: _Held | None = None) -> None:
        self._log_refusal(addr, TickleRefused("bad-frame", f"line longer than {MAX_LINE} bytes"),
                          bytes(data[:40]))
        self._reply(sock, b"ERR bad-frame\n", drain=True, addr=addr, held=held)

    def _reply(self, sock: socket.socket, answer: bytes, drain: bool = False, addr=None,
               held: _Held | None = None) -> None:
        """Write the one answer line; then close, or half-close and drain first.

        Unread bytes make a close send a RST that can make the peer lose our
        answer: then send FIN after the answer, swallow what the peer still
        sends for a little while (DRAIN_BYTES, DRAIN_SECONDS), then close.
        """
        try:
            sock.send(answer, socket.MSG_DONTWAIT)
            if drain:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            drain = False
        if not drain:
            if held is not None:
                self._drop(held)
            else:
                sock.close()
            return
        if held is None:
            sock.setblocking(False)
            held = _Held(sock, addr, b"")
            self._admit(held)
            self._loop.add_reader(held.fd, self._on_readable, held)
        else:
            del self._reading[held]
        held.draining = True
        held.deadline = self._loop.time() + DRAIN_SECONDS
        self._draining[held] = None
        self._arm_sweep(held.deadline)

    def _hold(self, sock: socket.socket, addr, data: bytes) -> None:
        sock.setblocking(False)
        held = _Held(sock, addr, data)
        self._admit(held)
        held.deadline = self._loop.time() + self.read_timeout
        self._reading[held] = None
        self._loop.add_reader(held.fd, self._on_readable, held)
        self._arm_sweep(held.deadline)

    def _admit(self, held: _Held) -> None:
        """Make room for one more held connection: reset the oldest if all slots are taken."""
        if self.active_connections >= self.max_connections:
            victim = next(iter(self._draining or self._reading))
            self.stats["evicted"] += 1
            self._overload_log.log(logging.WARNING,
                                   "%d connections open (max_connections): resetting the oldest, "
                                   "from %s, to make room", self.active_connections, _Peer(victim.addr))
            self._drop(victim, abort=True)
        self._idle.clear()

    def _drop(self, held: _Held, abort: bool = False) -> None:
        (self._draining if held.draining else self._reading).pop(held, None)
        if held.sock.fileno() >= 0:
            self._loop.remove_reader(held.fd)
            if abort:   # RST now: no FIN handshake, no TIME_WAIT kept for it
                held.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
            held.sock.close()
        if not self._reading and not self._draining:
            self._idle.set()

    def _on_readable(self, held: _Held) -> None:
        try:
            self._read(held)
        except Exception:  # never let one connection hurt the server
            log.exception("internal error on a connection from %s", _Peer(held.addr))
            self._drop(held, abort=True)

    def _read(self, held: _Held) -> None:
        try:
            if held.draining:
                n = held.sock.recv_into(self._scratch)
            else:
                n = held.sock.recv_into(held.view[held.n:])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(held)
            return
        if held.draining:
            held.drained += n
            if n == 0 or held.drained >= DRAIN_BYTES:
                self._drop(held)
            return
        if n == 0:
            if held.n:
                self._log_refusal(held.addr, TickleRefused("bad-frame", "connection closed before a newline"),
                                  bytes(held.buf[: min(held.n, 40)]))
            else:  # a port probe (health check, scanner): not worth a log line
                self.stats["refused-bad-frame"] += 1
                log.debug("connection from %s closed without data", _Peer(held.addr))
            self._reply(held.sock, b"ERR bad-frame\n", held=held)
            return
        start = held.n
        held.n += n
        end = held.buf.find(b"\n", start, held.n)
        if end >= 0:
            answer = self._handle_line(bytes(held.buf[: end + 1]), held.addr)
            self._reply(held.sock, answer, drain=held.n > end + 1, held=held)
        elif held.n >= MAX_LINE:
            self._refuse_long(held.sock, held.addr, held.buf, held)

    def _arm_sweep(self, deadline: float) -> None:
        """One timer for all held connections, at the earliest deadline (plus a little, to batch)."""
        when = deadline + SWEEP_SLACK_S
        if self._sweep is not None:
            if self._sweep.when() <= when:
                return
            self._sweep.cancel()
        self._sweep = self._loop.call_at(when, self._on_sweep)

    def _on_sweep(self) -> None:
        self._sweep = None
        now = self._loop.time()
        while self._draining:
            held = next(iter(self._draining))
            if held.deadline > now:
                break
            self._drop(held)
        while self._reading:
            held = next(iter(self._reading))
            if held.deadline > now:
                break
            self._log_refusal(held.addr, TickleRefused(
                "bad-frame", f"no complete line within {self.read_timeout:g} s"),
                bytes(held.buf[: min(held.n, 40)]))
            self._reply(held.sock, b"ERR bad-frame\n", held=held)
        for table in (self._draining, self._reading):
            if table:
                self._arm_sweep(next(iter(table)).deadline)

    def _handle_line(self, line: bytes, addr) -> bytes:
        """Check one complete line (§2 order, then the rate limit); return the answer."""
        now = time.time()
        try:
            nonce = self._check(line, now)
            if not self._bucket.take():
                raise TickleRefused("busy", f"rate limit ({self.rate:g}/s, burst {self.burst})")
        except TickleRefused as exc:
            self._log_refusal(addr, exc, line[:40] if exc.code == "bad-frame" else None)
            return f"ERR {exc.code}\n".encode("ascii")
        self._replay.remember(nonce, now)
        self.stats["accepted"] += 1
        log.info("tickle from %s accepted", _Peer(addr), extra={"tickle": nonce.lower()})
        if self.status is not None:
            self.status.update(accepted=self.stats["accepted"],
                               last_accepted={"at": now, "peer": _format_peer(addr),
                                              "tickle": nonce.lower()})
        self._latest_nonce = nonce
        self._request_forward()
        return b"OK\n"

    def _check(self, line: bytes, now: float) -> str:
        creds = self._credentials
        reloaded = False
        if creds is None and self._loader is not None:
            creds = self._reload_credentials()
            reloaded = True
        try:
            return self._check_with(line, creds, now)
        except TickleRefused as exc:
            if reloaded or self._loader is None or exc.code not in _RELOAD_ON:
                raise
            fresh = self._reload_credentials()
            if fresh == creds:
                raise
            return self._check_with(line, fresh, now)

    def _check_with(self, line: bytes, creds, now: float) -> str:
        client_id, key = creds if creds else (None, None)
        return check_tickle(line, client_id, key, self._replay, now)

    def _reload_credentials(self):
        """Re-read the credentials (at most once per CREDENTIALS_RELOAD_S)."""
        mono = time.monotonic()
        if mono - self._last_reload < CREDENTIALS_RELOAD_S:
            return self._credentials
        self._last_reload = mono
        try:
            fresh = self._loader()
        except (ConfigError, OSError, ValueError) as exc:
            log.warning("cannot read the credentials: %s", exc)
            return self._credentials
        fresh = (fresh[0], fresh[1]) if fresh and fresh[0] and fresh[1] else None
        if fresh != self._credentials:
            if fresh is None:
                log.warning("credentials are gone: tickles get ERR unknown-client")
            else:
                log.info("credentials loaded for client %s", fresh[0])
            self._credentials = fresh
        return self._credentials

    def _log_refusal(self, addr, exc: TickleRefused, preview: bytes | None = None) -> None:
        self.stats[f"refused-{exc.code}"] += 1
        if self.status is not None:
            self.status.count("refused",
                              last_refused={"at": time.time(), "peer": addr, "code": exc.code})
        if not self._refusal_log.allow():
            return
        reason = exc.reason or exc.code
        if preview:
            reason = f"{reason} (starts {preview!r})"
        log.info("tickle from %s refused %s: %s", _Peer(addr), exc.code, reason)

    # -- wake-up hop -------------------------------------------------------

    def _request_forward(self) -> None:
        """Wake the CTA; while a wake-up is in flight, fold requests into one more."""
        if self._forward_task is not None and not self._forward_task.done():
            self._forward_pending = True
            return
        self._forward_pending = False
        self._forward_task = self._loop.create_task(self._forward_loop())

    async def _forward_loop(self) -> None:
        while True:
            self._forward_pending = False
            # the nonce is taken with the request it answers: a tickle accepted while
            # this wake-up connects asks for the next one, which carries its nonce
            await self._forward_once(self._latest_nonce)
            if not self._forward_pending or self._closing:
                return

    async def _forward_once(self, nonce: str | None) -> None:
        writer = None
        try:
            async with asyncio.timeout(FORWARD_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(
                    self.cta_host, self.cta_port, limit=MAX_LINE)
                writer.write(make_wake(self.hop_key, nonce=nonce))
                await writer.drain()
                answer = await reader.readline()
        except asyncio.CancelledError:
            raise
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError) as exc:
            self.stats["forward-failed"] += 1
            self._forward_log.log(logging.WARNING, "cannot wake the CTA at %s: %s (it will still poll)",
                                  _format_peer((self.cta_host, self.cta_port)),
                                  str(exc) or type(exc).__name__)
            return
        finally:
            if writer is not None:
                writer.close()
                try:
                    await writer.wait_closed()
                except OSError:
                    pass
        text = answer.decode("ascii", "replace").strip()
        if text == "OK":
            self.stats["forward-ok"] += 1
            log.debug("CTA woken")
        else:
            self.stats["forward-failed"] += 1
            self._forward_log.log(logging.WARNING, "CTA refused the wake-up: %r", text[:80])


# -- the process -------------------------------------------------------------

def _connectable(host: str) -> str:
    """The CTA's listen address as something to connect to."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _raise_fd_limit(connections: int) -> None:
    """Let max_connections sockets fit under RLIMIT_NOFILE (else accept() hits EMFILE first)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + 64
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError):
            pass


def main(argv: list[str] | None = None) -> int:
    """``python -m objecthost --config FILE``: 0 after a signal, 2 bad config, 1 cannot start."""
    parser = argparse.ArgumentParser(
        prog="python -m objecthost",
        description="Accept signed tickles (PROTOCOL.md §2) and wake the CTA.")
    parser.add_argument("--config", required=True, metavar="FILE", help="the agent's TOML config")
    args = parser.parse_args(argv)
    setup_logging("objecthost")

    try:
        config = load_config(args.config)
        setup_logging("objecthost", config=config)
        listen_host, listen_port = parse_hostport(
            config.get("objecthost", "listen"), f"{config.path}: [objecthost] listen")
        cta_host, cta_port = parse_hostport(config.get("cta", "listen"), f"{config.path}: [cta] listen")
        creds = config.credentials()
    except ConfigError as exc:
        log.error("%s", " ".join(str(exc).split()))
        return 2
    try:
        hop_key = load_hop_key(config.state_dir, create=True)
    except (OSError, ValueError) as exc:
        log.error("cannot read or create %s: %s", config.state_dir / "hop.key", exc)
        return 1

    def loader():
        fresh = config.credentials()
        return (fresh.client_id, fresh.tickle_key) if fresh else None

    host = ObjectHost(listen_host, listen_port,
                      creds.client_id if creds else None, creds.tickle_key if creds else None,
                      _connectable(cta_host), cta_port, hop_key, credentials=loader,
                      status=StatusFile(config.state_dir, "objecthost"))
    _raise_fd_limit(host.max_connections)
    try:
        return asyncio.run(_serve(host))
    finally:
        host.status.close()


async def _serve(host: ObjectHost) -> int:
    """Startup -> main loop (until SIGTERM/SIGINT) -> shutdown."""
    loop = asyncio.get_running_loop()
    should_exit = asyncio.Event()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        name = signal.Signals(signum).name
        if signals_seen == 1:
            log.info("%s received: shutting down", name)
            should_exit.set()
        else:
            log.warning("%s received during shutdown: dropping open connections", name)
            host.abort()

    installed: list[tuple[int, object]] = []
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(signum, on_signal, signum)
                installed.append((signum, None))
            except (NotImplementedError, RuntimeError):   # e.g. Windows
                previous = signal.signal(
                    signum, lambda s, _f: loop.call_soon_threadsafe(on_signal, s))
                installed.append((signum, previous))
    try:
        try:
            await host.start()
        except OSError as exc:
            log.error("cannot listen on %s: %s",
                      _format_peer((host.listen_host or "*", host.listen_port)), exc)
            return 1
        await should_exit.wait()
        await host.close(timeout=1.0)
        log.info("stopped")
        return 0
    finally:
        for signum, previous in installed:
            if previous is None:
                loop.remove_signal_handler(signum)
            else:
                signal.signal(signum, previous)
