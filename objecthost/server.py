"""The objecthost process: startup -> main loop -> shutdown, and the wake-up hop to the CTA.

Standard library only (plus the shared plumbing in ``agent.common``, which is
too): this process listens on every interface, so it stays small. Its parts:
:mod:`objecthost.connections` (the sockets), :mod:`objecthost.frames` (what
a tickle line is answered) and this module, which ties them together, wakes
the CTA for each accepted tickle and runs as ``python -m objecthost``. With
``[wakeup] mqtt`` set, :mod:`objecthost.mqttwake` also takes tickle lines
from a broker (and only then is paho-mqtt loaded).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections import Counter

from agent.common.config import parse_hostport
from agent.common.mqtt import parse_mqtt_url, require_paho
from agent.common.errors import ConfigError, MqttError
from agent.common import process
from agent.common.statusfile import StatusFile
from agent.common.tickle import MAX_LINE, load_hop_key, make_wake
from objecthost.connections import Connections
from objecthost.frames import REFUSAL_LOG_LINES, CredentialsLoader, TickleGate
from objecthost.logbudget import LogBudget, format_peer

log = logging.getLogger("objecthost")

FORWARD_TIMEOUT_S = 5.0      # one objecthost -> CTA wake-up exchange


class ObjectHost:
    """The tickle listener: connections in, answers from the gate, wake-ups out.

    ``client_id``/``tickle_key`` may be None (not registered yet); see
    :class:`objecthost.frames.TickleGate` for them and ``credentials``.
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
        self.max_connections = max_connections
        self.port: int | None = None
        self.stats: Counter[str] = Counter()   # keys: accepted, refused-<code>, evicted, forward-ok, forward-failed
        self.status = status                   # last tickle accepted / refused, for `dsagent status`
        self.gate = TickleGate(client_id, tickle_key, rate, burst, self.stats, self._wake_cta,
                               credentials=credentials, refusal_log_lines=refusal_log_lines,
                               status=status)
        self.connections = Connections(self.gate, self.stats, read_timeout, max_connections)
        self._latest_nonce: str | None = None  # the wake-up carries it: the CTA logs which tickle
        self._forward_log = LogBudget(3, 10.0, "%d more failed CTA wake-ups not logged in the last 10 s")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._forward_task: asyncio.Task | None = None
        self._forward_pending = False
        self._closing = False
        self._closed: asyncio.Event | None = None
        self.mqtt = None                       # an objecthost.mqttwake.MqttWakeup, if configured

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> int:
        """Start listening; return the bound port (useful with port 0)."""
        self._loop = asyncio.get_running_loop()
        self._closed = asyncio.Event()
        self.connections.start(self._loop, self.listen_host, self.listen_port)
        listeners = self.connections.listeners
        self.port = listeners[0].getsockname()[1]
        addrs = ", ".join(format_peer(s.getsockname()) for s in listeners)
        log.info("listening on %s; wake-ups go to %s", addrs, format_peer((self.cta_host, self.cta_port)))
        if self.gate.credentials is None:
            log.info("no credentials yet (not registered): tickles get ERR unknown-client until they appear")
        if self.mqtt is not None:
            self.mqtt.start(self._loop)
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
        self.connections.stop_listening()
        if self.mqtt is not None:
            await asyncio.to_thread(self.mqtt.stop)   # joins paho's thread, which may wait on us
        deadline = time.monotonic() + max(0.0, timeout)
        if self.connections.active:
            try:
                await asyncio.wait_for(self.connections.idle.wait(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                pass
        self.connections.close()
        task = self._forward_task
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=max(0.0, deadline - time.monotonic()))
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
        self.gate.close()
        self._forward_log.close()
        self._closed.set()

    def abort(self) -> None:
        """Drop every open connection and the in-flight wake-up now (forced shutdown)."""
        self.connections.drop_all()
        if self._forward_task is not None:
            self._forward_task.cancel()

    @property
    def active_connections(self) -> int:
        return self.connections.active

    # -- wake-up hop -------------------------------------------------------

    def _wake_cta(self, nonce: str) -> None:
        """Wake the CTA for an accepted tickle; while a wake-up is in flight, fold requests into one more."""
        self._latest_nonce = nonce
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
                                  format_peer((self.cta_host, self.cta_port)),
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
    try:
        config = process.start("objecthost", argv, "python -m objecthost",
                       "Accept signed tickles (PROTOCOL.md §2) and wake the CTA.")
        listen_host, listen_port = parse_hostport(
            config.get("objecthost", "listen"), f"{config.path}: [objecthost] listen")
        cta_host, cta_port = parse_hostport(config.get("cta", "listen"), f"{config.path}: [cta] listen")
        broker = config.get("wakeup", "mqtt")
        broker = broker and parse_mqtt_url(broker, f"{config.path}: [wakeup] mqtt")
        creds = config.credentials()
    except ConfigError as exc:
        log.error("%s", " ".join(str(exc).split()))
        return 2
    try:
        hop_key = load_hop_key(config.state_dir, create=True)
    except (OSError, ValueError) as exc:
        log.error("cannot read or create %s: %s", config.state_dir / "hop.key", exc)
        return 1
    try:
        if broker:
            require_paho()
    except MqttError as exc:
        log.error("%s: [wakeup] mqtt is set, but %s", config.path, exc)
        return 1

    def loader():
        fresh = config.credentials()
        return (fresh.client_id, fresh.tickle_key) if fresh else None

    host = ObjectHost(listen_host, listen_port,
                      creds.client_id if creds else None, creds.tickle_key if creds else None,
                      _connectable(cta_host), cta_port, hop_key, credentials=loader,
                      status=StatusFile(config.state_dir, "objecthost"))
    if broker:
        from objecthost.mqttwake import MqttWakeup

        def client_id() -> str | None:
            try:
                known = host.gate.credentials or loader()
            except (ConfigError, OSError, ValueError):
                return None
            return known[0] if known else None

        host.mqtt = MqttWakeup(broker, config.get("wakeup", "mqtt_ca_file"), host.gate,
                               client_id, host.status)
    else:
        host.status.update(mqtt={"state": "off"})
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
                      format_peer((host.listen_host or "*", host.listen_port)), exc)
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
