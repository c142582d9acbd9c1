"""Simulated agents for the fleet bench (bench/fleet.py), thousands per event loop.

Each agent speaks the real wire contract (PROTOCOL.md §2, §3 v1.1) to a real
task server, as the three agent processes would, without their processes:

- a tickle listener on its own loopback address (127.x.y.z, one fixed port),
  checking each line with ``agent.common.tickle.check_tickle`` and its own
  replay cache, answering ``OK`` or ``ERR code`` as the objecthost does;
- a puller: at start, on a tickle and on a poll timer jittered ±10 % (the
  first one at a random point of the interval, so the fleet's polls are
  spread as in one that has run for a while, not bunched by the ramp), it
  GETs ``tasks?limit=100&max_bytes=16777216``, parses the document with
  ``parse_client_tasks`` and pulls again at once on ``more="true"``;
- a no-op "handler" per new task: ``received``, ``running``, then after a
  short random run (longer by the task's ``run_s`` parameter) ``succeeded``
  (``failed`` for a task the parser rejected, an ``oversize`` one included),
  each event written to an in-memory outbox;
- an uploader posting the outbox in batches of up to 500.

Back-off follows the outbox's v1.1 rules, per endpoint: ``Retry-After`` on
503/429 is honoured (plus up to 10 % jitter); otherwise exponential with full
jitter, uniform in [0, b] (uploads 0.5 s doubling to 60 s, pulls 2 s doubling
to the poll interval). A pull that succeeds does not cut an upload back-off
short: each endpoint keeps its own.

HTTP is a minimal HTTP/1.1 client on asyncio streams, not httpx: two
connections per agent (the puller's and the uploader's, as the CTA and the
ctdataloader each have their own), made from the agent's own address, kept
alive while in use and closed after 5 s idle (httpx's default keep-alive
expiry), so the server sees the connections a real fleet opens. httpx costs several times the
CPU per request (bench/fleet.py's notes give the measurement), and the
simulator must stay cheaper than the server it loads.
"""

from __future__ import annotations

import asyncio
import json
import random
import resource
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

from agent.common.errors import TaskDocumentError, TickleRefused
from agent.common.taskxml import MAX_DOCUMENT_BYTES, parse_client_tasks
from agent.common.tickle import MAX_LINE, ReplayCache, check_tickle

PULL_BATCH = 100
UPLOAD_BATCH = 500
UPLOAD_BACKOFF_S = (0.5, 60.0)
PULL_BACKOFF_MIN_S = 2.0
KEEPALIVE_S = 5.0
REQUEST_TIMEOUT_S = 30.0
TICKLE_READ_TIMEOUT_S = 5.0
RUN_S = (0.05, 0.5)          # how long a no-op task "runs"
RUN_PARAM = "run_s"          # a task parameter: run that much longer (bench/fleet.py's outage)
TASKS, STATUS = "tasks", "status"
TERMINAL = ("succeeded", "failed")
NO_ANSWER, TIMED_OUT = 0, -1       # a request's "status" when no HTTP answer came


def loopback_address(index: int, base: int = 10) -> str:
    """Agent ``index``'s own address: 127.<base + i/62500>.<…>.<1..250>, never .0 or .255."""
    block, host = divmod(index, 250)
    return f"127.{base + block // 256}.{block % 256}.{host + 1}"


def rfc3339_now() -> str:
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


@dataclass
class AgentSpec:
    client_id: str
    ip: str
    token: str = ""
    key: bytes = b""


@dataclass
class Records:
    """What one shard saw, in wall-clock ``time.time()`` (comparable across processes)."""
    requests: list[tuple[float, str, float, int]] = field(default_factory=list)
    # (sent at, endpoint, seconds to the whole answer, HTTP status, or NO_ANSWER / TIMED_OUT)
    tickles: list[tuple[float, str]] = field(default_factory=list)   # (arrived, answer)
    tasks: dict[str, list[float]] = field(default_factory=dict)
    # task id -> [tickle at (or 0), pulled at, `received` accepted at, terminal accepted at]
    loop_lag: list[float] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)   # an agent coroutine that died
    connects: list[tuple[float, float]] = field(default_factory=list)   # (began, seconds)
    cpu_s: float = 0.0


class HTTPConnection:
    """One agent's keep-alive connection to the server, from the agent's own address."""

    def __init__(self, host: str, port: int, local_ip: str, records: Records):
        self.host, self.port, self.local_ip, self.records = host, port, local_ip, records
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.idle_since = 0.0
        self.busy = False

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    def close_if_idle(self, now: float) -> None:
        if self.writer is not None and not self.busy and now - self.idle_since > KEEPALIVE_S:
            self.close()

    async def request(self, method: str, path: str, token: str,
                      body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        """Send one request; a kept-alive connection the server had closed is redone
        once on a new one (a status post may repeat: the server dedups on event_id)."""
        self.busy = True
        try:
            if self.writer is not None:
                try:
                    return await self._exchange(method, path, token, body)
                except (ConnectionError, asyncio.IncompleteReadError):
                    self.close()
            began, started = time.time(), time.perf_counter()
            self.reader, self.writer = await asyncio.open_connection(
                self.host, self.port, local_addr=(self.local_ip, 0))
            self.records.connects.append((began, time.perf_counter() - started))
            return await self._exchange(method, path, token, body)
        except BaseException:
            self.close()
            raise
        finally:
            self.busy = False
            self.idle_since = time.monotonic()

    async def _exchange(self, method: str, path: str, token: str,
                        body: bytes) -> tuple[int, dict[str, str], bytes]:
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Authorization: Bearer {token}\r\nAccept: */*\r\n")
        if method == "POST":
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode("latin-1") + b"\r\n" + body)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionResetError("the server closed the connection")
        status = int(status_line.split(None, 2)[1])
        headers: dict[str, str] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        payload = await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, payload


class SimAgent:
    """One simulated agent: tickle listener, puller, handler and uploader."""

    def __init__(self, spec: AgentSpec, shard: "Shard"):
        self.spec, self.shard, self.rng, self.records = spec, shard, shard.rng, shard.records
        self.cache = ReplayCache()
        self.http: dict[str, HTTPConnection] = {}      # endpoint -> its own connection
        self.wake = asyncio.Event()
        self.outbox: list[dict] = []
        self.outbox_ready = asyncio.Event()
        self.not_before = {TASKS: 0.0, STATUS: 0.0}      # time.monotonic()
        self.backoff = {TASKS: 0.0, STATUS: 0.0}
        self.tasks_seen: set[str] = set()
        self.seq: dict[str, int] = {}
        self.tickled_at = 0.0

    # -- §2: the tickle listener --------------------------------------------
    async def on_tickle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(TICKLE_READ_TIMEOUT_S):
                line = await reader.readline()
            nonce = check_tickle(line, self.spec.client_id, self.spec.key or None, self.cache)
            self.cache.remember(nonce, time.time())
            answer = "OK"
        except TickleRefused as exc:
            answer = f"ERR {exc.code}"
        except ValueError:                      # over the reader's limit: a long line
            answer = "ERR bad-frame"
        except (TimeoutError, OSError):
            writer.close()
            return
        now = time.time()
        self.records.tickles.append((now, answer))
        if answer == "OK":
            self.tickled_at = now
            self.wake.set()
        writer.write(answer.encode("ascii") + b"\n")
        try:
            await writer.drain()
        except OSError:
            pass
        writer.close()

    # -- HTTP with per-endpoint back-off -------------------------------------
    async def call(self, endpoint: str, method: str, body: bytes = b"") -> tuple[int, bytes]:
        path = f"/api/v1/clients/{self.spec.client_id}/{endpoint}"
        if endpoint == TASKS:
            path += f"?limit={PULL_BATCH}&max_bytes={MAX_DOCUMENT_BYTES}"
        sent, started = time.time(), time.perf_counter()
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                status, headers, payload = await self.http[endpoint].request(
                    method, path, self.spec.token, body)
        except TimeoutError:
            status, headers, payload = TIMED_OUT, {}, b""
        except (OSError, asyncio.IncompleteReadError, ValueError):
            status, headers, payload = NO_ANSWER, {}, b""
        self.records.requests.append((sent, endpoint, time.perf_counter() - started, status))
        if status == 200:
            self.backoff[endpoint] = 0.0
        else:
            self._back_off(endpoint, status, headers.get("retry-after"))
        return status, payload

    def _back_off(self, endpoint: str, status: int, retry_after: str | None) -> None:
        if status in (429, 503) and retry_after and retry_after.strip().isdigit():
            wait = int(retry_after) * self.rng.uniform(1.0, 1.1)
        else:
            low, high = UPLOAD_BACKOFF_S if endpoint == STATUS else (
                PULL_BACKOFF_MIN_S, self.shard.poll_s)
            self.backoff[endpoint] = min(max(2 * self.backoff[endpoint], low), high)
            wait = self.rng.uniform(0.0, self.backoff[endpoint])
        self.not_before[endpoint] = time.monotonic() + wait

    async def _wait_for(self, endpoint: str) -> None:
        if (wait := self.not_before[endpoint] - time.monotonic()) > 0:
            await asyncio.sleep(wait)

    # -- pulling ----------------------------------------------------------------
    async def run_puller(self, start_at: float) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, start_at - time.time()))
        phase = self.rng.random()
        while True:
            await self._wait_for(TASKS)
            self.wake.clear()
            while await self.pull_once():
                pass                            # more="true": at once
            retry = self.not_before[TASKS] - time.monotonic()
            interval = retry if retry > 0 else self.shard.poll_s * (
                phase if phase is not None else self.rng.uniform(0.9, 1.1))
            phase = None
            timer = loop.call_later(interval, self.wake.set)
            await self.wake.wait()
            timer.cancel()

    async def pull_once(self) -> bool:
        """One GET; True if the server said more tasks are waiting."""
        status, payload = await self.call(TASKS, "GET")
        if status != 200:
            return False
        try:
            doc = parse_client_tasks(payload, self.spec.client_id, MAX_DOCUMENT_BYTES)
        except TaskDocumentError:
            self._back_off(TASKS, 0, None)
            return False
        now = time.time()
        for task in doc.tasks:
            if task.id not in self.tasks_seen:
                self._start(task.id, now, None, float(task.parameters.get(RUN_PARAM, 0)))
        for rejected in doc.rejected:
            if rejected.task_id not in self.tasks_seen:
                self._start(rejected.task_id, now, rejected.message)
        return doc.more

    # -- the no-op handler --------------------------------------------------------
    def _start(self, task_id: str, now: float, refusal: str | None, hold_s: float = 0.0) -> None:
        self.tasks_seen.add(task_id)
        tickled = self.tickled_at if now - self.tickled_at < REQUEST_TIMEOUT_S else 0.0
        self.records.tasks[task_id] = [tickled, now, 0.0, 0.0]
        self._record(task_id, "received")
        if refusal is not None:
            self._record(task_id, "failed", refusal)
        else:
            asyncio.get_running_loop().create_task(self._run(task_id, hold_s))

    async def _run(self, task_id: str, hold_s: float) -> None:
        self._record(task_id, "running")
        await asyncio.sleep(hold_s + self.rng.uniform(*RUN_S))
        self._record(task_id, "succeeded")

    def _record(self, task_id: str, state: str, message: str = "") -> None:
        seq = self.seq.pop(task_id, 0) + 1
        if state not in TERMINAL:
            self.seq[task_id] = seq
        event_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        self.outbox.append({"event_id": event_id, "task_id": task_id, "seq": seq,
                            "state": state, "progress": None, "message": message,
                            "details": {}, "at": rfc3339_now()})
        self.outbox_ready.set()

    # -- uploading -----------------------------------------------------------
    async def run_uploader(self) -> None:
        while True:
            await self.outbox_ready.wait()
            await self._wait_for(STATUS)
            batch = self.outbox[:UPLOAD_BATCH]
            status, payload = await self.call(STATUS, "POST", json.dumps({"events": batch}).encode())
            if status != 200:
                continue
            try:
                accepted = set(json.loads(payload)["accepted"])
            except (ValueError, KeyError, TypeError):
                accepted = set()
            if not accepted:
                self._back_off(STATUS, 0, None)
                continue
            now = time.time()
            for event in batch:
                if event["event_id"] in accepted:
                    slot = 2 if event["state"] == "received" else 3 if event["state"] in (
                        TERMINAL) else None
                    if slot is not None and event["task_id"] in self.records.tasks:
                        self.records.tasks[event["task_id"]][slot] = now
            self.outbox = [e for e in self.outbox if e["event_id"] not in accepted]
            if not self.outbox:
                self.outbox_ready.clear()


class Shard:
    """The agents of one process, on one event loop."""

    def __init__(self, specs: list[AgentSpec], tickle_port: int, seed: str,
                 poll_s: float):
        self.rng = random.Random(seed)
        self.records = Records()
        self.poll_s = poll_s
        self.tickle_port = tickle_port
        self.agents = [SimAgent(spec, self) for spec in specs]
        self.servers: list[asyncio.Server] = []
        self.background: list[asyncio.Task] = []
        self._cpu_at_start = time.process_time()

    async def listen(self) -> list[str]:
        """Bind every agent's tickle listener; return their ``host:port`` addresses."""
        addrs = []
        for agent in self.agents:
            server = await asyncio.start_server(agent.on_tickle, agent.spec.ip, self.tickle_port,
                                                limit=MAX_LINE, backlog=64, reuse_address=True)
            self.servers.append(server)
            addrs.append(f"{agent.spec.ip}:{server.sockets[0].getsockname()[1]}")
        return addrs

    def start(self, creds: dict[str, tuple[str, str]], server_host: str, server_port: int,
              t0: float, ramp_s: float) -> None:
        """Give each agent its token and key and start it at t0 + U(0, ramp_s)."""
        loop = asyncio.get_running_loop()
        for agent in self.agents:
            token, key_hex = creds[agent.spec.client_id]
            agent.spec.token, agent.spec.key = token, bytes.fromhex(key_hex)
            agent.http = {endpoint: HTTPConnection(server_host, server_port, agent.spec.ip,
                                                   self.records) for endpoint in (TASKS, STATUS)}
            start_at = t0 + self.rng.uniform(0.0, ramp_s)
            self.background += [loop.create_task(agent.run_puller(start_at)),
                                loop.create_task(agent.run_uploader())]
        self.background += [loop.create_task(self._reap_idle()),
                            loop.create_task(self._watch_loop_lag())]

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for agent in self.agents:
                for connection in agent.http.values():
                    connection.close_if_idle(now)

    async def _watch_loop_lag(self, every_s: float = 0.1) -> None:
        """How late the loop wakes a timer: > a few ms means the simulator is saturated."""
        while True:
            before = time.perf_counter()
            await asyncio.sleep(every_s)
            self.records.loop_lag.append(time.perf_counter() - before - every_s)

    async def stop(self) -> Records:
        for task in self.background:
            task.cancel()
        for outcome in await asyncio.gather(*self.background, return_exceptions=True):
            if isinstance(outcome, Exception):
                self.records.crashes.append(repr(outcome))
        for server in self.servers:
            server.close()
        for agent in self.agents:
            for connection in agent.http.values():
                connection.close()
        self.records.cpu_s = time.process_time() - self._cpu_at_start
        return self.records


def raise_open_files_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (a listener and a connection per agent)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def shard_process(conn, specs: list[AgentSpec], tickle_port: int, seed: str,
                  poll_s: float) -> None:
    """A shard's process: bind the listeners and send ("ready", addresses) (or
    ("error", why)); take (creds, host, port, t0, ramp_s) and run the agents;
    on the next message stop and send back the Records."""
    raise_open_files_limit()
    asyncio.run(_shard_main(conn, specs, tickle_port, seed, poll_s))


async def _shard_main(conn, specs, tickle_port, seed, poll_s) -> None:
    shard = Shard(specs, tickle_port, seed, poll_s)
    try:
        conn.send(("ready", await shard.listen()))
    except OSError as exc:
        conn.send(("error", f"cannot bind a tickle listener: {exc}"))
        return
    shard.start(*await _receive(conn))
    await _receive(conn)
    conn.send(await shard.stop())


async def _receive(conn):
    """The next message on a multiprocessing pipe, without blocking the loop."""
    loop = asyncio.get_running_loop()
    readable = loop.create_future()
    loop.add_reader(conn.fileno(), lambda: readable.done() or readable.set_result(None))
    try:
        await readable
    finally:
        loop.remove_reader(conn.fileno())
    return conn.recv()
