"""The objecthost: checks tickles (PROTOCOL.md §2) and wakes the CTA.

Standard library only (plus ``agent.config``/``agent.tickle``/``agent.errors``,
which are too): this process listens on every interface, so it stays small.

One connection carries one tickle line and gets one answer line::

    client: DSTICKLE/1 <client_id> <unix_ts> <nonce> <sig>\\n
    server: OK\\n   or   ERR <code>\\n      (then the server closes)

Connections are handled by a :class:`asyncio.BufferedProtocol` that reads into
a fixed 512-byte buffer, so no input can make one connection hold more than
that; there is no per-peer state anywhere (the rate limit is one global token
bucket and the replay cache holds accepted nonces only, which the token bucket
bounds). Nothing runs on a timer while idle.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import signal
import threading
import time
from collections import Counter
from typing import Callable

from agent.config import load_config, parse_hostport
from agent.errors import ConfigError, TickleRefused
from agent.logsetup import setup_logging
from agent.tickle import MAX_LINE, ReplayCache, check_tickle, load_hop_key, make_wake

log = logging.getLogger("objecthost")


DRAIN_BYTES = 64 * 1024      # after refusing a long line, read (and drop) at most this much
DRAIN_SECONDS = 0.5          # ... for at most this long, so the peer reads our answer, not a RST
CREDENTIALS_RELOAD_S = 1.0   # re-read the credentials at most this often
FORWARD_TIMEOUT_S = 5.0      # one objecthost -> CTA wake-up exchange
REFUSAL_LOG_LINES = 10       # refused tickles logged per second; the rest are counted
OVERLOAD_LOG_PERIOD_S = 5.0  # "over max_connections" logged at most this often

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
        now = time.monotonic()
        if now - self._window_start >= self.period:
            self._flush()
            self._window_start = now
            self._used = 0
        if self._used < self.lines:
            self._used += 1
            log.log(level, msg, *args)
            return
        self._suppressed += 1
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            delay = max(0.0, self._window_start + self.period - now)
            self._timer = loop.call_later(delay, self._on_timer)

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


_READING, _DRAINING, _DONE = "reading", "draining", "done"


class _TickleConnection(asyncio.BufferedProtocol):
    """One tickle connection: read one line (<= 512 bytes, <= read_timeout), answer, close."""

    def __init__(self, host: "ObjectHost"):
        self.host = host
        self.transport: asyncio.Transport | None = None
        self.peer = "unknown-peer"
        self._buf = bytearray(MAX_LINE)
        self._view = memoryview(self._buf)
        self._n = 0
        self._state = _READING
        self._timer: asyncio.TimerHandle | None = None
        self._drained = 0
        self._admitted = False

    # -- asyncio callbacks -------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        if not self.host._admit(self):
            self._state = _DONE
            transport.abort()
            return
        self._admitted = True
        self.peer = _format_peer(transport.get_extra_info("peername"))
        self._timer = self.host._loop.call_later(self.host.read_timeout, self._on_read_timeout)

    def get_buffer(self, sizehint: int):
        if self._state == _READING:
            return self._view[self._n:]
        return self.host._scratch          # drained bytes are dropped

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self._state == _READING:
                start = self._n
                self._n += nbytes
                end = self._buf.find(b"\n", start, self._n)
                if end >= 0:
                    line = bytes(self._buf[: end + 1])
                    answer = self.host._handle_line(line, self.peer)
                    self._answer(answer, drain=self._n > end + 1)
                elif self._n >= MAX_LINE:
                    self.host._log_refusal(self.peer, TickleRefused(
                        "bad-frame", f"line longer than {MAX_LINE} bytes"), bytes(self._buf[:40]))
                    self._answer(b"ERR bad-frame\n", drain=True)
            elif self._state == _DRAINING:
                self._drained += nbytes
                if self._drained >= DRAIN_BYTES:
                    self._finish()
        except Exception:  # never let one connection hurt the server
            log.exception("internal error on a connection from %s", self.peer)
            self._state = _DONE
            self._cancel_timer()
            self.transport.abort()

    def eof_received(self) -> bool:
        if self._state == _READING:
            if self._n:
                self.host._log_refusal(self.peer, TickleRefused(
                    "bad-frame", "connection closed before a newline"), bytes(self._buf[: self._n][:40]))
            else:  # a port probe (health check, scanner): not worth a log line
                self.host.stats["refused-bad-frame"] += 1
                log.debug("connection from %s closed without data", self.peer)
            self._answer(b"ERR bad-frame\n", drain=False)
        return False                       # asyncio closes once the answer is flushed

    def connection_lost(self, exc) -> None:
        self._state = _DONE
        self._cancel_timer()
        if self._admitted:
            self._admitted = False
            self.host._release(self)

    # -- internals ---------------------------------------------------------

    def _on_read_timeout(self) -> None:
        self._timer = None
        if self._state != _READING:
            return
        self.host._log_refusal(self.peer, TickleRefused(
            "bad-frame", f"no complete line within {self.host.read_timeout:g} s"),
            bytes(self._buf[: min(self._n, 40)]))
        self._answer(b"ERR bad-frame\n", drain=False)

    def _answer(self, data: bytes, drain: bool) -> None:
        """Write the one answer line; then close, or half-close and drain first."""
        self._cancel_timer()
        transport = self.transport
        if transport is None or transport.is_closing():
            self._state = _DONE
            return
        transport.write(data)
        if not drain:
            self._state = _DONE
            transport.close()
            return
        # Unread bytes are waiting: closing now would send a RST that can make
        # the peer lose our answer. Send FIN after the answer, swallow what the
        # peer still sends for a little while, then close.
        self._state = _DRAINING
        try:
            transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            self._finish()
            return
        self._timer = self.host._loop.call_later(DRAIN_SECONDS, self._finish)

    def _finish(self) -> None:
        self._cancel_timer()
        self._state = _DONE
        if self.transport is not None:
            self.transport.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def abort(self) -> None:
        self._cancel_timer()
        self._state = _DONE
        if self.transport is not None:
            self.transport.abort()


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
                 refusal_log_lines: int = REFUSAL_LOG_LINES):
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
        self.stats: Counter[str] = Counter()   # keys: accepted, refused-<code>, dropped, forward-ok, forward-failed

        self._credentials = (client_id, tickle_key) if client_id and tickle_key else None
        self._loader = credentials
        self._last_reload = -math.inf
        self._replay = ReplayCache()
        self._bucket = _TokenBucket(rate, burst)
        self._refusal_log = _LogBudget(refusal_log_lines, 1.0,
                                       "%d more refused tickles not logged in the last second")
        self._overload_log = _LogBudget(1, OVERLOAD_LOG_PERIOD_S,
                                        f"%d more connections closed at once (over max_connections="
                                        f"{max_connections}) in the last {OVERLOAD_LOG_PERIOD_S:g} s")
        self._forward_log = _LogBudget(3, 10.0, "%d more failed CTA wake-ups not logged in the last 10 s")
        self._scratch = memoryview(bytearray(DRAIN_BYTES))
        self._conns: set[_TickleConnection] = set()
        self._idle: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
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
        self._server = await self._loop.create_server(
            lambda: _TickleConnection(self), self.listen_host, self.listen_port,
            backlog=min(1024, max(128, self.max_connections)), reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        addrs = ", ".join(_format_peer(s.getsockname()) for s in self._server.sockets)
        log.info("listening on %s; wake-ups go to %s", addrs, _format_peer((self.cta_host, self.cta_port)))
        if self._credentials is None:
            log.info("no credentials yet (not registered): tickles get ERR unknown-client until they appear")
        return self.port

    async def serve_forever(self) -> None:
        """Wait until :meth:`close` is called (the server runs from :meth:`start` on)."""
        if self._server is None:
            await self.start()
        await self._closed.wait()

    async def close(self, timeout: float = 1.0) -> None:
        """Stop listening, give open connections and an in-flight wake-up up to
        ``timeout`` seconds, then abort what is left."""
        if self._server is None:
            return
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        self._server.close()
        deadline = time.monotonic() + max(0.0, timeout)
        if self._conns:
            try:
                await asyncio.wait_for(self._idle.wait(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                pass
        for conn in list(self._conns):
            conn.abort()
        task = self._forward_task
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=max(0.0, deadline - time.monotonic()))
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
        await self._server.wait_closed()
        await asyncio.sleep(0)  # let aborted transports call connection_lost
        for budget in (self._refusal_log, self._overload_log, self._forward_log):
            budget.close()
        self._closed.set()

    def abort(self) -> None:
        """Drop every open connection and the in-flight wake-up now (forced shutdown)."""
        for conn in list(self._conns):
            conn.abort()
        if self._forward_task is not None:
            self._forward_task.cancel()

    @property
    def active_connections(self) -> int:
        return len(self._conns)

    # -- connections -------------------------------------------------------

    def _admit(self, conn: _TickleConnection) -> bool:
        if self._closing or len(self._conns) >= self.max_connections:
            self.stats["dropped"] += 1
            self._overload_log.log(logging.WARNING,
                                   "%d connections open (max_connections): closing new ones at once",
                                   len(self._conns))
            return False
        self._conns.add(conn)
        self._idle.clear()
        return True

    def _release(self, conn: _TickleConnection) -> None:
        self._conns.discard(conn)
        if not self._conns:
            self._idle.set()

    def _handle_line(self, line: bytes, peer: str) -> bytes:
        """Check one complete line (§2 order, then the rate limit); return the answer."""
        now = time.time()
        try:
            nonce = self._check(line, now)
            if not self._bucket.take():
                raise TickleRefused("busy", f"rate limit ({self.rate:g}/s, burst {self.burst})")
        except TickleRefused as exc:
            self._log_refusal(peer, exc, line[:40] if exc.code == "bad-frame" else None)
            return f"ERR {exc.code}\n".encode("ascii")
        self._replay.remember(nonce, now)
        self.stats["accepted"] += 1
        log.info("tickle from %s accepted", peer)
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

    def _log_refusal(self, peer: str, exc: TickleRefused, preview: bytes | None = None) -> None:
        self.stats[f"refused-{exc.code}"] += 1
        reason = exc.reason or exc.code
        if preview:
            reason = f"{reason} (starts {preview!r})"
        self._refusal_log.log(logging.INFO, "tickle from %s refused %s: %s", peer, exc.code, reason)

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
            await self._forward_once()
            if not self._forward_pending or self._closing:
                return

    async def _forward_once(self) -> None:
        writer = None
        try:
            async with asyncio.timeout(FORWARD_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(
                    self.cta_host, self.cta_port, limit=MAX_LINE)
                writer.write(make_wake(self.hop_key))
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
                      _connectable(cta_host), cta_port, hop_key, credentials=loader)
    _raise_fd_limit(host.max_connections)
    return asyncio.run(_serve(host))


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
