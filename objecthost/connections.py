"""The objecthost's sockets: listen, accept, read one line, answer, close.

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
senders cannot lock out a tickle. Nothing runs on a timer while idle. What
the answer is, is :class:`objecthost.frames.TickleGate`'s decision.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections import Counter

from agent.common.errors import TickleRefused
from agent.common.tickle import MAX_LINE
from objecthost.frames import TickleGate
from objecthost.logbudget import LogBudget, Peer

log = logging.getLogger("objecthost")

DRAIN_BYTES = 64 * 1024      # after refusing a long line, read (and drop) at most this much
DRAIN_SECONDS = 0.5          # ... for at most this long, so the peer reads our answer, not a RST
OVERLOAD_LOG_PERIOD_S = 5.0  # "over max_connections" logged at most this often
LISTEN_BACKLOG = 4096        # the kernel caps it at net.core.somaxconn; absorbs bursts while a batch runs
ACCEPT_BATCH = 256           # connections accepted (and most answered) per turn of the event loop
ACCEPT_PAUSE_S = 0.1         # out of file descriptors: stop accepting this long
SWEEP_SLACK_S = 0.05         # deadlines are checked in batches this far apart at most
_LINGER_ABORT = struct.pack("ii", 1, 0)   # SO_LINGER on, 0 s: close() sends RST


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


def listen(host: str | None, port: int, backlog: int = LISTEN_BACKLOG) -> list[socket.socket]:
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


class Connections:
    """Every open connection of the listening sockets, in the event loop's readers.

    The cheap path, taken by nearly every connection under a flood: accept,
    one non-blocking recv, answer, close; the socket never enters the event
    loop. Only a connection whose line has not fully arrived (or that must
    drain after its answer) is "held": it takes one of max_connections
    slots, a reader in the loop and a deadline. When every slot is taken the
    oldest held connection is reset to make room: a slow sender loses its
    slot, a sender that writes its line at once always gets through.
    """

    def __init__(self, gate: TickleGate, stats: Counter[str],
                 read_timeout: float, max_connections: int):
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self.stats = stats
        self.listeners: list[socket.socket] = []
        self.idle: asyncio.Event | None = None
        self._answer = gate.answer     # bound once: called for every connection
        self._refuse = gate.refuse
        self._overload_log = LogBudget(1, OVERLOAD_LOG_PERIOD_S,
                                       f"%d more held connections reset to make room (max_connections="
                                       f"{max_connections}) in the last {OVERLOAD_LOG_PERIOD_S:g} s")
        self._scratch = memoryview(bytearray(DRAIN_BYTES))
        # Held connections in arrival order, so the first is the oldest and the next to expire.
        self._reading: dict[_Held, None] = {}
        self._draining: dict[_Held, None] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False

    def start(self, loop: asyncio.AbstractEventLoop, host: str | None, port: int) -> None:
        """Listen on ``host``:``port`` (None: every interface) and accept in ``loop``."""
        self._loop = loop
        self.idle = asyncio.Event()
        self.idle.set()
        self.listeners = listen(host, port)
        for sock in self.listeners:
            loop.add_reader(sock.fileno(), self._on_accept, sock)

    @property
    def active(self) -> int:
        return len(self._reading) + len(self._draining)

    def stop_listening(self) -> None:
        self._closing = True
        for sock in self.listeners:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
                sock.close()

    def drop_all(self) -> None:
        for table in (self._reading, self._draining):
            for held in list(table):
                self._drop(held, abort=True)
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

    def close(self) -> None:
        """Drop what is left and write the overload summary still owed."""
        self.drop_all()
        self._overload_log.close()

    # -- accept and the cheap path -----------------------------------------

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
                log.exception("internal error on a connection from %s", Peer(addr))
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
            log.debug("connection from %s closed without data", Peer(addr))
            self._reply(sock, b"ERR bad-frame\n")
            return
        end = data.find(b"\n")
        if end >= 0:
            self._reply(sock, self._answer(data[: end + 1], addr), drain=len(data) > end + 1,
                        addr=addr)
        elif len(data) >= MAX_LINE:
            self._refuse_long(sock, addr, data)
        else:
            self._hold(sock, addr, data)

    def _refuse_long(self, sock: socket.socket, addr, data, held: _Held | None = None) -> None:
        self._refuse(addr, TickleRefused("bad-frame", f"line longer than {MAX_LINE} bytes"),
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

    # -- held connections: slots, reads, deadlines -------------------------

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
        if self.active >= self.max_connections:
            victim = next(iter(self._draining or self._reading))
            self.stats["evicted"] += 1
            self._overload_log.log(logging.WARNING,
                                   "%d connections open (max_connections): resetting the oldest, "
                                   "from %s, to make room", self.active, Peer(victim.addr))
            self._drop(victim, abort=True)
        self.idle.clear()

    def _drop(self, held: _Held, abort: bool = False) -> None:
        (self._draining if held.draining else self._reading).pop(held, None)
        if held.sock.fileno() >= 0:
            self._loop.remove_reader(held.fd)
            if abort:   # RST now: no FIN handshake, no TIME_WAIT kept for it
                held.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
            held.sock.close()
        if not self._reading and not self._draining:
            self.idle.set()

    def _on_readable(self, held: _Held) -> None:
        try:
            self._read(held)
        except Exception:  # never let one connection hurt the server
            log.exception("internal error on a connection from %s", Peer(held.addr))
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
                self._refuse(held.addr, TickleRefused("bad-frame", "connection closed before a newline"),
                             bytes(held.buf[: min(held.n, 40)]))
            else:  # a port probe (health check, scanner): not worth a log line
                self.stats["refused-bad-frame"] += 1
                log.debug("connection from %s closed without data", Peer(held.addr))
            self._reply(held.sock, b"ERR bad-frame\n", held=held)
            return
        start = held.n
        held.n += n
        end = held.buf.find(b"\n", start, held.n)
        if end >= 0:
            answer = self._answer(bytes(held.buf[: end + 1]), held.addr)
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
            self._refuse(held.addr, TickleRefused(
                "bad-frame", f"no complete line within {self.read_timeout:g} s"),
                bytes(held.buf[: min(held.n, 40)]))
            self._reply(held.sock, b"ERR bad-frame\n", held=held)
        for table in (self._draining, self._reading):
            if table:
                self._arm_sweep(next(iter(table)).deadline)
