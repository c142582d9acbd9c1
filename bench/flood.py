"""``python -m bench.flood [--quick]``: the objecthost under attack, measured.

Starts the real ``python -m objecthost --config FILE`` on a loopback port
with a fake CTA (a real socket that checks every wake-up with
``check_wake``), then runs, one after the other:

- connection floods: N connections a second for S seconds (default 10,000/s
  for 5 s), from source addresses 127.0.0.2-127.0.0.40 so no ephemeral port
  range runs dry. With a C compiler (``cc``) they come from ``floodgen``
  (bench/floodgen.c, compiled into the work folder: epoll, non-blocking
  connects), in four modes: forged signatures, garbage lines, replays of one
  accepted tickle, and connect-and-hold (one byte a second, so every
  connection wants a slot); without one (or with ``--generator python``),
  forged signatures only, from asyncio client processes, which reach only
  ~3,000-4,400/s on two shared cores. Meanwhile the reference task server's
  ``tickle_client`` (which retries a reset or busy tickle once) sends a
  legitimate tickle every 200 ms, which must get ``OK``;
- saturation: 1,024 connections (``max_connections``) held open by slow
  senders while legitimate tickles are sent (C generator only);
- slowloris: 200 connections sending one byte a second (must be cut at 5 s),
  again with legitimate tickles at 5/s;
- 100 lines of 1 MB; 1,000 connections of random garbage; 1,000 forged
  signatures; 1,000 replays of one accepted tickle; 500 stale and 500
  future timestamps; 500 tickles for another client.

For each: the answers the clients got, the objecthost's RSS before and after
(and its peak), the log lines it wrote, and whether a legitimate tickle still
gets ``OK`` right after. Everything is loopback only, bounded in count and
time, and stops by itself. Prints a Markdown table (machine and date first);
``--out FILE`` also writes it there. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import random
import resource
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from agent.common.errors import TickleRefused
from agent.common.tickle import ReplayCache, check_wake, load_hop_key, make_tickle
from taskserver import TaskStore, TickleFailed
from taskserver.app import tickle_client

from bench.report import Conditions, Row, machine_lines, mb, ms, percentile, table

REPO = Path(__file__).resolve().parent.parent
FLOODGEN_SRC = Path(__file__).with_name("floodgen.c")
CID = "pc-0042"
SOURCES = [f"127.0.0.{i}" for i in range(2, 41)]   # client source addresses
ANSWER_TIMEOUT_S = 8.0                            # a client waits this long for an answer
LEGIT_EVERY_S = 0.2                               # legitimate tickles at 5/s
MAX_CONNECTIONS = 1024                            # the objecthost's default max_connections


def say(message: str) -> None:
    print(f"[flood {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def raise_fd_limit(wanted: int = 65536) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


# ---------------------------------------------------------------------------
# the process under test
# ---------------------------------------------------------------------------

class FakeCTA:
    """A real listener that checks wake-ups like the CTA and answers OK."""

    def __init__(self, hop_key: bytes):
        self.hop_key = hop_key
        self.cache = ReplayCache()
        self.wakes = 0
        self.refused = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    data = b""
                    while not data.endswith(b"\n") and len(data) < 512:
                        chunk = conn.recv(512)
                        if not chunk:
                            break
                        data += chunk
                    check_wake(data, self.hop_key, self.cache)
                    self.wakes += 1
                    conn.sendall(b"OK\n")
                except TickleRefused as exc:
                    self.refused += 1
                    conn.sendall(f"ERR {exc.code}\n".encode())
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.sock.close()


class ObjectHostProcess:
    """The real objecthost, enrolled as CID in a reference task server store (``self.store``)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        state = workdir / "state"
        state.mkdir(parents=True)
        self.cta = FakeCTA(load_hop_key(state, create=True))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.store = TaskStore(str(workdir / "server.db"))
        self.key = bytes.fromhex(self.store.enroll(CID, tickle_addr=f"127.0.0.1:{self.port}")["tickle_key"])
        self.config = workdir / "agent.toml"
        fd = os.open(self.config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f'[agent]\nserver_url = "http://127.0.0.1:9"\nstate_dir = "{state}"\n'
                     f'client_id = "{CID}"\ntoken = "tok"\ntickle_key = "{self.key.hex()}"\n\n'
                     f'[objecthost]\nlisten = "127.0.0.1:{self.port}"\n\n'
                     f'[cta]\nlisten = "127.0.0.1:{self.cta.port}"\n')
        self.log_path = workdir / "objecthost.log"
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "objecthost", "--config", str(self.config)],
                                     cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"objecthost exited: {self.log_path.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("objecthost did not start listening") from None
                time.sleep(0.05)
        self.ps = psutil.Process(self.proc.pid)
        time.sleep(0.3)

    def memory(self) -> tuple[int, int]:
        """(RSS, peak RSS) in bytes."""
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
        return fields["VmRSS"], fields["VmHWM"]

    def log_lines(self) -> int:
        with open(self.log_path, "rb") as fh:
            return sum(1 for _ in fh)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self.cta.close()
            self.store.close()


# ---------------------------------------------------------------------------
# clients
# ---------------------------------------------------------------------------

def exchange(port: int, line: bytes, timeout: float = 5.0) -> tuple[str, float]:
    """Send one line from a fresh connection; (answer or error name, seconds)."""
    started = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(line)
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = sock.recv(512)
                if not chunk:
                    break
                answer += chunk
        text = answer.decode("ascii", "replace").strip() or "closed"
    except OSError as exc:
        text = type(exc).__name__
    return text, time.perf_counter() - started


class _RetryCounter(logging.Handler):
    """Counts the task server's "retrying once" warnings (one per retried tickle)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying once" in record.getMessage():
            self.count += 1


class LegitTickler:
    """A tickle every LEGIT_EVERY_S in a thread, while an attack runs, sent as the
    reference task server sends it (``tickle_client``: one retry if reset or busy)."""

    def __init__(self, store: TaskStore):
        self.store = store
        self.answers: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.retries = _RetryCounter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "LegitTickler":
        logging.getLogger("taskserver").addHandler(self.retries)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(15)
        logging.getLogger("taskserver").removeHandler(self.retries)

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                answer = tickle_client(self.store, CID, timeout=ANSWER_TIMEOUT_S)
            except TickleFailed as exc:
                answer = f"failed ({str(exc).rpartition(': ')[2]})"
            self.answers[answer] += 1
            if answer == "OK":
                self.latencies.append(time.perf_counter() - started)
            next_at += LEGIT_EVERY_S
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def summary(self) -> str:
        total = sum(self.answers.values())
        ok = self.answers.get("OK", 0)
        text = f"{ok}/{total} OK ({self.retries.count} retried once)"
        if self.latencies:
            text += (f", p50 {ms(percentile(self.latencies, 50))}, "
                     f"p99 {ms(percentile(self.latencies, 99))}")
        others = Counter({k: v for k, v in self.answers.items() if k != "OK"})
        if others:
            text += " (" + ", ".join(f"{k}: {v}" for k, v in others.most_common()) + ")"
        return text

    @property
    def all_ok(self) -> bool:
        return bool(self.answers) and set(self.answers) == {"OK"}


def _classify(exc: BaseException) -> str:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "no answer (timeout)"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{type(exc).__name__} errno {exc.errno}"
    return type(exc).__name__


async def _one(port: int, payload: bytes, source: str | None, counts: Counter,
               timeout: float = ANSWER_TIMEOUT_S) -> None:
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(source, 0) if source else None, limit=1024)
            writer.write(payload)
            answer = await reader.readline()
        counts[answer.decode("ascii", "replace").strip() or "closed without an answer"] += 1
    except BaseException as exc:  # noqa: BLE001 - every outcome is counted
        if isinstance(exc, asyncio.CancelledError):
            counts["cancelled (bench deadline)"] += 1
            raise
        counts[_classify(exc)] += 1
    finally:
        if writer is not None:
            writer.transport.abort()


def _flood_worker(port: int, rate: float, seconds: float, sources: list[str],
                  max_in_flight: int, queue) -> None:
    """One client process: ``rate`` connections a second for ``seconds``."""
    raise_fd_limit()

    async def main() -> tuple[Counter, int, float]:
        counts: Counter[str] = Counter()
        in_flight = asyncio.Semaphore(max_in_flight)
        tasks: set[asyncio.Task] = set()
        started = time.monotonic()
        launched = skipped = 0
        tick = 0.005
        per_tick = rate * tick
        due = 0.0
        next_at = started
        key = secrets.token_bytes(32)
        while time.monotonic() - started < seconds:
            due += per_tick
            while due >= 1:
                due -= 1
                if in_flight.locked():
                    skipped += 1           # the client side is saturated: not offered
                    continue
                await in_flight.acquire()
                line = make_tickle(CID, key)  # well-formed, forged signature
                task = asyncio.create_task(_one(port, line, sources[launched % len(sources)], counts))
                task.add_done_callback(lambda t: (in_flight.release(), tasks.discard(t)))
                tasks.add(task)
                launched += 1
            next_at += tick
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        launch_time = time.monotonic() - started
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=ANSWER_TIMEOUT_S + 2)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        counts["_skipped"] = skipped
        return counts, launched, launch_time

    counts, launched, launch_time = asyncio.run(main())
    queue.put((dict(counts), launched, launch_time))


@dataclass
class Outcome:
    name: str
    sent: int
    answers: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    rss_before: int = 0
    rss_after: int = 0
    peak: int = 0
    log_lines: int = 0
    legit: LegitTickler | None = None
    after_ok: bool = False
    alive: bool = True
    extra: str = ""
    cpu: float = 0.0          # objecthost CPU seconds (user + system) during the attack

    def answers_text(self) -> str:
        total = sum(self.answers.values()) or 1
        parts = [f"{k} {100 * v / total:.1f} %" if len(self.answers) > 1 else f"{k} (all)"
                 for k, v in self.answers.most_common()]
        return "; ".join(parts)


def run_attack(host: ObjectHostProcess, name: str, body, *, legit: bool = False) -> Outcome:
    say(name)
    rss_before, _ = host.memory()
    cpu_before = sum(host.ps.cpu_times()[:2])
    lines_before = host.log_lines()
    tickler = LegitTickler(host.store) if legit else None
    started = time.monotonic()
    if tickler:
        with tickler:
            sent, answers, extra = body()
    else:
        sent, answers, extra = body()
    seconds = time.monotonic() - started
    cpu = sum(host.ps.cpu_times()[:2]) - cpu_before
    time.sleep(0.5)  # let the objecthost release what it held
    rss_after, peak = host.memory()
    after, _ = exchange(host.port, make_tickle(CID, host.key))
    time.sleep(0.05)
    return Outcome(name, sent, Counter(answers), seconds, rss_before, rss_after, peak,
                   host.log_lines() - lines_before, tickler, after == "OK", host.alive(), extra, cpu)


def attack_flood(port: int, rate: float, seconds: float, workers: int):
    def body():
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        share = [SOURCES[i::workers] for i in range(workers)]
        procs = [ctx.Process(target=_flood_worker,
                             args=(port, rate / workers, seconds, share[i], 4000, queue))
                 for i in range(workers)]
        for proc in procs:
            proc.start()
        results = [queue.get(timeout=seconds + ANSWER_TIMEOUT_S + 60) for _ in procs]
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        counts: Counter[str] = Counter()
        launched, launch_time, skipped = 0, 0.0, 0
        for part, n, t in results:
            skipped += part.pop("_skipped", 0)
            counts.update(part)
            launched += n
            launch_time = max(launch_time, t)
        extra = (f"offered {rate:,.0f}/s for {seconds:g} s from {workers} client processes; "
                 f"launched {launched:,} ({launched / max(launch_time, 1e-9):,.0f}/s)"
                 + (f", {skipped:,} not launched (client side saturated)" if skipped else ""))
        return launched, counts, extra
    return body


# -- the C load generator ------------------------------------------------------

def build_floodgen(outdir: Path) -> Path | None:
    """Compile bench/floodgen.c into ``outdir`` with ``cc``; None if there is no C compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    binary = outdir / "floodgen"
    subprocess.run([compiler, "-O2", "-o", str(binary), str(FLOODGEN_SRC)],
                   check=True, capture_output=True, timeout=120)
    return binary


def floodgen(binary: Path, port: int, payloads: list[bytes], rate: float, seconds: float, *,
             mode: str = "line", timeout: float = ANSWER_TIMEOUT_S) -> dict:
    """Run floodgen against 127.0.0.1:``port``; its JSON report (``outcomes``: answer -> count)."""
    path = binary.parent / f"payloads-{secrets.token_hex(4)}.bin"
    path.write_bytes(b"".join(struct.pack("<I", len(p)) + p for p in payloads))
    try:
        proc = subprocess.run(
            [str(binary), "--port", str(port), "--rate", str(rate), "--seconds", str(seconds),
             "--payloads", str(path), "--mode", mode, "--timeout", str(timeout),
             "--sources", str(len(SOURCES))],
            check=True, capture_output=True, text=True, timeout=seconds + timeout + 30)
    finally:
        path.unlink(missing_ok=True)
    return json.loads(proc.stdout)


def forged_lines(n: int = 1000) -> list[bytes]:
    """Well-formed tickles for CID with random keys: each gets ``ERR bad-signature``."""
    return [make_tickle(CID, secrets.token_bytes(32)) for _ in range(n)]


def garbage_lines(n: int = 1000) -> list[bytes]:
    """Random bytes, 1-700 long (some over the 512-byte limit), each ended by a newline."""
    rnd = random.Random(n)
    return [bytes(rnd.choice(range(256)) for _ in range(rnd.randrange(1, 700))).replace(b"\n", b"") + b"\n"
            for _ in range(n)]


def attack_floodgen(binary: Path, port: int, payloads: list[bytes], rate: float, seconds: float,
                    mode: str = "line", what: str = ""):
    def body():
        report = floodgen(binary, port, payloads, rate, seconds, mode=mode)
        extra = (f"offered {rate:,.0f}/s for {seconds:g} s by floodgen; launched "
                 f"{report['launched']:,} at {report['rate']:,.0f}/s"
                 + (f", {report['not_launched']:,} not launched (in-flight cap)" if report["not_launched"] else "")
                 + f"; connection lifetime p50 {ms(report['lifetime_p50'])}, p99 {ms(report['lifetime_p99'])}"
                 + f", max {report['lifetime_max']:.2f} s" + (f"; {what}" if what else ""))
        return report["launched"], report["outcomes"], extra
    return body


def attack_slowloris(port: int, key: bytes, n: int = 200, cap: float = 12.0):
    def body():
        async def one(source: str, counts: Counter, cut: list[float]) -> None:
            started = time.monotonic()
            writer = None
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                               local_addr=(source, 0))
                line = make_tickle(CID, key)[:-1]   # never the newline
                answer = b""
                for i in range(len(line)):
                    writer.write(line[i:i + 1])
                    try:
                        answer = await asyncio.wait_for(reader.readline(), 1.0)
                        break                        # the server answered (and closes)
                    except asyncio.TimeoutError:
                        if time.monotonic() - started > cap:
                            break
                counts[answer.decode().strip() or "closed without an answer"] += 1
            except OSError as exc:
                counts[_classify(exc)] += 1
            finally:
                cut.append(time.monotonic() - started)
                if writer is not None:
                    writer.transport.abort()

        async def main():
            counts: Counter[str] = Counter()
            cut: list[float] = []
            await asyncio.gather(*(one(SOURCES[i % len(SOURCES)], counts, cut) for i in range(n)))
            return counts, cut

        counts, cut = asyncio.run(main())
        extra = (f"{n} connections, 1 byte/s; cut after p50 {percentile(cut, 50):.2f} s, "
                 f"max {max(cut):.2f} s")
        return n, counts, extra
    return body


def attack_lines(port: int, make, n: int, concurrency: int = 50, what: str = ""):
    """``n`` connections each sending ``make(i)``, ``concurrency`` at a time."""
    def body():
        async def main():
            counts: Counter[str] = Counter()
            gate = asyncio.Semaphore(concurrency)

            async def guarded(i: int):
                async with gate:
                    await _one(port, make(i), SOURCES[i % len(SOURCES)], counts)

            await asyncio.gather(*(guarded(i) for i in range(n)))
            return counts

        return n, asyncio.run(main()), what
    return body


def attack_big_lines(port: int, n: int = 100, size: int = 1 << 20):
    def body():
        async def one(i: int, counts: Counter, times: list[float]):
            started = time.monotonic()
            writer = None
            try:
                async with asyncio.timeout(ANSWER_TIMEOUT_S):
                    reader, writer = await asyncio.open_connection(
                        "127.0.0.1", port, local_addr=(SOURCES[i % len(SOURCES)], 0))
                    writer.write(b"A" * size)
                    answer = await reader.readline()
                counts[answer.decode().strip() or "closed without an answer"] += 1
            except BaseException as exc:  # noqa: BLE001
                counts[_classify(exc)] += 1
            finally:
                times.append(time.monotonic() - started)
                if writer is not None:
                    writer.transport.abort()

        async def main():
            counts: Counter[str] = Counter()
            times: list[float] = []
            gate = asyncio.Semaphore(10)

            async def guarded(i):
                async with gate:
                    await one(i, counts, times)

            await asyncio.gather(*(guarded(i) for i in range(n)))
            return counts, times

        counts, times = asyncio.run(main())
        return n, counts, f"{size >> 20} MB each, 10 at a time; answered in p50 " \
                          f"{ms(percentile(times, 50))}, max {ms(max(times))}"
    return body


def garbage(i: int) -> bytes:
    rnd = random.Random(i)
    data = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 700)))
    return data + (b"\n" if i % 2 else b"")


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------

def rows_of(results: list[Outcome]) -> list[Row]:
    rows = []
    for r in results:
        growth = r.rss_after - r.rss_before
        memory = (f"RSS {mb(r.rss_before)} → {mb(r.rss_after)} (peak so far {mb(r.peak)}); "
                  f"objecthost CPU {r.cpu:.2f} s ({r.cpu / max(r.sent, 1) * 1e6:.0f} µs a connection); "
                  f"{r.log_lines} log lines")
        legit = f"; legit tickles during it: {r.legit.summary()}" if r.legit else ""
        after = "a signed tickle right after: " + ("OK" if r.after_ok else "**not OK**")
        alive = "" if r.alive else "; **objecthost died**"
        result = (f"{r.sent:,} sent in {r.seconds:.1f} s → {r.answers_text()}"
                  + (f" ({r.extra})" if r.extra else "") + f"{legit}; {memory}; {after}{alive}")
        met = r.alive and r.after_ok and growth < 16 << 20 and (r.legit is None or r.legit.all_ok)
        rows.append(Row(r.name, result, "alive, RSS +<16 MB, every legit tickle OK", met))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flood", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller counts (about 30 s)")
    parser.add_argument("--rate", type=float, default=None, help="flood connections per second")
    parser.add_argument("--seconds", type=float, default=5.0, help="flood duration")
    parser.add_argument("--workers", type=int, default=max(2, min(8, os.cpu_count() or 2)),
                        help="flood client processes (--generator python)")
    parser.add_argument("--generator", choices=("c", "python"), default="c",
                        help="who floods: floodgen (bench/floodgen.c, needs cc) or asyncio processes")
    parser.add_argument("--out", type=Path, help="also write the Markdown here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    parser.add_argument("--only", metavar="WORD", help="run only the attacks whose name contains WORD")
    args = parser.parse_args(argv)
    rate = args.rate or (2000.0 if args.quick else 10000.0)
    seconds = min(args.seconds, 2.0) if args.quick else args.seconds
    n = 200 if args.quick else 1000
    raise_fd_limit()
    conditions = Conditions()
    workdir = Path(tempfile.mkdtemp(prefix="dsagent-flood-"))
    host = ObjectHostProcess(workdir)
    results: list[Outcome] = []
    began = time.monotonic()
    try:
        idle_rss, _ = host.memory()
        port = host.port
        now = int(time.time())
        key = host.key
        replayed = make_tickle(CID, key)
        first, _ = exchange(port, replayed)
        binary = build_floodgen(workdir) if args.generator == "c" else None
        if binary is None:
            if args.generator == "c":
                say("no C compiler (cc): the flood comes from Python clients, ~3,000-4,400/s at most")
            attacks = [(f"Connection flood ({rate:,.0f}/s × {seconds:g} s, forged signatures, Python clients)",
                        attack_flood(port, rate, seconds, args.workers), True)]
        else:
            flood = f"{rate:,.0f}/s × {seconds:g} s"
            attacks = [
                (f"Connection flood ({flood}, forged signatures)",
                 attack_floodgen(binary, port, forged_lines(), rate, seconds), True),
                (f"Connection flood ({flood}, garbage lines)",
                 attack_floodgen(binary, port, garbage_lines(), rate, seconds,
                                 what="random bytes, 1-700 long, ended by a newline"), True),
                (f"Connection flood ({flood}, replays of one accepted tickle: {first})",
                 attack_floodgen(binary, port, [replayed], rate, seconds), True),
                (f"Connection flood ({flood}, connect and hold: 1 byte/s each)",
                 attack_floodgen(binary, port, [make_tickle(CID, key)[:-1]], rate, seconds, mode="hold",
                                 what="every connection wants a slot; the oldest held one is reset"), True),
                (f"Saturation ({MAX_CONNECTIONS:,} slow senders held, 1 byte/s, until cut at 5 s)",
                 attack_floodgen(binary, port, [make_tickle(CID, key)[:-1]], 2 * MAX_CONNECTIONS, 0.5,
                                 mode="hold"), True),
            ]
        attacks += [
            ("Slowloris (200 connections, 1 byte/s)", attack_slowloris(port, key), True),
            ("1 MB lines × 100", attack_big_lines(port, 100 if not args.quick else 20), False),
            (f"Garbage × {n:,}", attack_lines(port, garbage, n,
                                              what="random bytes, 1-700 long, half with a newline"), False),
            (f"Forged signatures × {n:,}", attack_lines(
                port, lambda i: make_tickle(CID, secrets.token_bytes(32)), n), False),
            (f"Replays × {n:,} (of one accepted tickle: {first})",
             attack_lines(port, lambda i: replayed, n), False),
            (f"Stale timestamps × {n // 2:,} (now − 400 s)", attack_lines(
                port, lambda i: make_tickle(CID, key, now=now - 400), n // 2), False),
            (f"Future timestamps × {n // 2:,} (now + 400 s)", attack_lines(
                port, lambda i: make_tickle(CID, key, now=now + 400), n // 2), False),
            (f"Unknown client × {n // 2:,}", attack_lines(
                port, lambda i: make_tickle("intruder", key), n // 2), False),
        ]
        for name, body, legit in attacks:
            if args.only and args.only.lower() not in name.lower():
                continue
            results.append(run_attack(host, name, body, legit=legit))
            if not host.alive():
                say("the objecthost died; stopping")
                break
        final_rss, peak = host.memory()
        wakes = host.cta.wakes
    finally:
        code = host.stop()
        if args.keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    mode = "quick" if args.quick else "full"
    rows = rows_of(results)
    rows.append(Row("objecthost memory over the whole run",
                    f"idle {mb(idle_rss)} → {mb(final_rss)} at the end, peak {mb(peak)}; "
                    f"{wakes} CTA wake-ups; exit code {code} after SIGTERM",
                    "no growth without bound", final_rss - idle_rss < 16 << 20))
    text = "\n".join(["## Objecthost under attack (`python -m bench.flood`)", "",
                      *machine_lines(workdir.parent, mode), conditions.line(),
                      f"- Duration: {time.monotonic() - began:.0f} s; everything on loopback", "",
                      table(rows), ""])
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
