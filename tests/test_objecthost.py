"""The objecthost over real loopback sockets (PROTOCOL.md §2).

The ObjectHost runs in a background thread's event loop (or as the real
``python -m objecthost`` process); a fake CTA is a real socket that checks
every wake-up line with ``agent.common.tickle.check_wake``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.common.errors import TickleRefused
from agent.common.tickle import ReplayCache, check_wake, load_hop_key, make_tickle
from conftest import listening, wait_until
from objecthost.server import ObjectHost

KEY = bytes.fromhex("00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff")
HOP_KEY = bytes.fromhex("ff" * 32)
CID = "pc-0042"
REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the agent targets POSIX")


# -- helpers ---------------------------------------------------------------------

class FakeCTA:
    """A real listener that validates wake-up lines like the CTA does."""

    def __init__(self, hop_key: bytes = HOP_KEY, delay: float = 0.0):
        self.hop_key = hop_key
        self.delay = delay
        self.cache = ReplayCache()
        self.wakes = 0
        self.refused: list[str] = []
        self.cond = threading.Condition()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                data = b""
                try:
                    while not data.endswith(b"\n") and len(data) < 512:
                        chunk = conn.recv(512)
                        if not chunk:
                            break
                        data += chunk
                    time.sleep(self.delay)
                    check_wake(data, self.hop_key, self.cache)
                    conn.sendall(b"OK\n")
                    with self.cond:
                        self.wakes += 1
                        self.cond.notify_all()
                except TickleRefused as exc:
                    self.refused.append(exc.code)
                    conn.sendall(f"ERR {exc.code}\n".encode())
                except OSError:
                    pass

    def wait_for(self, count: int, timeout: float = 3.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.wakes >= count, timeout)

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


class HostThread:
    """An ObjectHost on 127.0.0.1:0 in its own thread's event loop."""

    def __init__(self, cta_port: int, *, client_id=CID, key=KEY, **kwargs):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.host = ObjectHost("127.0.0.1", 0, client_id, key, "127.0.0.1", cta_port,
                               HOP_KEY, **kwargs)
        self.port = self.call(self.host.start())

    def call(self, coro, timeout: float = 5.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def settle(self, timeout: float = 3.0) -> None:
        """Wait until no wake-up is in flight."""
        def idle():
            task = self.host._forward_task
            return task is None or task.done()

        wait_until(idle, timeout, "no wake-up in flight")

    def close(self) -> None:
        self.call(self.host.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def exchange(port: int, data: bytes, *, half_close: bool = False, timeout: float = 3.0) -> bytes:
    """Send ``data``, read everything until the server closes; return it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return answer
            answer += chunk


def tickle(**kwargs) -> bytes:
    kwargs.setdefault("now", int(time.time()))
    return make_tickle(kwargs.pop("client_id", CID), kwargs.pop("key", KEY), **kwargs)


@pytest.fixture
def cta():
    fake = FakeCTA()
    yield fake
    fake.close()


@pytest.fixture
def make_host(cta):
    hosts = []

    def make(**kwargs):
        hosts.append(HostThread(kwargs.pop("cta_port", cta.port), **kwargs))
        return hosts[-1]

    yield make
    for runner in hosts:
        runner.close()


@pytest.fixture
def oh(make_host):
    return make_host()


def assert_still_works(runner: HostThread, cta: FakeCTA) -> None:
    """A valid tickle gets OK and the CTA receives a wake-up."""
    runner.settle()
    before = cta.wakes
    assert exchange(runner.port, tickle()) == b"OK\n"
    assert cta.wait_for(before + 1), "the CTA got no wake-up"
    assert not cta.refused


# -- accepted ---------------------------------------------------------------------

def test_valid_tickle_gets_ok_and_wakes_the_cta(oh, cta):
    assert exchange(oh.port, tickle()) == b"OK\n"
    assert cta.wait_for(1)
    assert oh.host.stats["accepted"] == 1
    assert_still_works(oh, cta)


def test_bytes_after_the_line_are_ignored(oh, cta):
    assert exchange(oh.port, tickle() + b"trailing junk") == b"OK\n"
    assert cta.wait_for(1)


# -- every ERR code over TCP, each followed by a working tickle ----------------------

GARBAGE = [
    pytest.param(b"hello world\n", id="garbage"),
    pytest.param(b"\x00\xff\xfe binary \x80\n", id="binary"),
    pytest.param(b"\n", id="empty-line"),
    pytest.param(b"A" * 511 + b"\n", id="512-byte-garbage-line"),
    pytest.param(b"A" * 512 + b"\n", id="513-byte-line"),
]


@pytest.mark.parametrize("data", GARBAGE)
def test_bad_frame_garbage(oh, cta, data):
    started = time.monotonic()
    assert exchange(oh.port, data) == b"ERR bad-frame\n"
    assert time.monotonic() - started < 1.0          # answered at once, no timeout wait
    assert_still_works(oh, cta)


def test_bad_frame_crlf(oh, cta):
    assert exchange(oh.port, tickle()[:-1] + b"\r\n") == b"ERR bad-frame\n"
    assert_still_works(oh, cta)


def test_bad_frame_missing_newline_at_eof(oh, cta):
    assert exchange(oh.port, tickle()[:-1], half_close=True) == b"ERR bad-frame\n"
    assert exchange(oh.port, b"", half_close=True) == b"ERR bad-frame\n"
    assert_still_works(oh, cta)


def test_bad_frame_long_line_answered_without_reading_on(oh, cta):
    # 513 bytes already refused (above); a 20 KiB line is refused after its
    # first 512 bytes and the peer still reads the answer (no RST).
    started = time.monotonic()
    assert exchange(oh.port, b"x" * 20_000) == b"ERR bad-frame\n"
    assert time.monotonic() - started < 1.5
    assert oh.host.stats["refused-bad-frame"] == 1
    assert_still_works(oh, cta)


def test_unknown_client(oh, cta):
    assert exchange(oh.port, tickle(client_id="pc-other")) == b"ERR unknown-client\n"
    assert_still_works(oh, cta)


def test_unknown_client_when_not_registered(make_host, cta):
    runner = make_host(client_id=None, key=None)
    assert exchange(runner.port, tickle()) == b"ERR unknown-client\n"
    assert cta.wakes == 0


def test_bad_signature(oh, cta):
    assert exchange(oh.port, tickle(key=bytes(32))) == b"ERR bad-signature\n"
    assert_still_works(oh, cta)


@pytest.mark.parametrize("offset", [-301, 301, -86400 * 365], ids=["past", "future", "a-year-ago"])
def test_stale(oh, cta, offset):
    assert exchange(oh.port, tickle(now=int(time.time()) + offset)) == b"ERR stale\n"
    assert_still_works(oh, cta)


def test_replay(oh, cta):
    line = tickle()
    assert exchange(oh.port, line) == b"OK\n"
    assert exchange(oh.port, line) == b"ERR replay\n"
    nonce = line.split()[3].decode()
    assert exchange(oh.port, tickle(nonce=nonce.upper())) == b"ERR replay\n"   # hex: any case
    assert_still_works(oh, cta)


def test_refused_nonces_are_not_remembered(oh, cta):
    line = tickle(now=int(time.time()) - 1000)
    assert exchange(oh.port, line) == b"ERR stale\n"
    assert len(oh.host.gate.replay) == 0
    assert_still_works(oh, cta)
    assert len(oh.host.gate.replay) == 1


def test_busy_then_recovers(make_host, cta):
    runner = make_host(rate=5.0, burst=2)
    lines = [tickle() for _ in range(3)]
    answers = [exchange(runner.port, line) for line in lines]
    assert answers == [b"OK\n", b"OK\n", b"ERR busy\n"]
    time.sleep(0.3)                                  # a sleep by design: the bucket refills at 5/s
    # a busy tickle's nonce was not remembered: the very same line is accepted now
    assert exchange(runner.port, lines[2]) == b"OK\n"
    time.sleep(0.25)                                 # by design too: a refill for the tickle below
    assert_still_works(runner, cta)


def test_twenty_a_second_are_never_refused_with_defaults(oh, cta):
    answers = [exchange(oh.port, tickle()) for _ in range(20)]          # 20 back to back
    start = time.monotonic()
    for i in range(40):                                                  # then 20/s for 2 s
        delay = start + i / 20 - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # pacing: the rate is what is tested
        answers.append(exchange(oh.port, tickle()))
    assert answers == [b"OK\n"] * 60
    oh.settle()
    assert cta.wakes >= 2 and not cta.refused


def test_invalid_tickles_do_not_use_up_the_rate_limit(make_host, cta):
    runner = make_host(rate=1.0, burst=1)
    for _ in range(20):
        assert exchange(runner.port, tickle(key=bytes(32))) == b"ERR bad-signature\n"
    assert exchange(runner.port, tickle()) == b"OK\n"


# -- slow and hostile peers -------------------------------------------------------

def test_slow_sender_is_cut_off_at_read_timeout(make_host, cta):
    runner = make_host(read_timeout=0.5)
    line = tickle()
    with socket.create_connection(("127.0.0.1", runner.port), timeout=3) as sock:
        started = time.monotonic()
        answer = b""
        for byte in line:                             # 1 byte every 0.1 s: needs ~9 s
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            ready = sock.recv(64) if _readable(sock, 0.1) else b""
            if ready or time.monotonic() - started > 2:
                answer = ready
                break
        answer += _read_to_eof(sock)
        elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 1.2, elapsed
    assert answer in (b"ERR bad-frame\n", b"")        # best effort
    assert runner.host.stats["refused-bad-frame"] == 1
    assert_still_works(runner, cta)


def test_idle_connection_is_closed_at_read_timeout(make_host, cta):
    runner = make_host(read_timeout=0.5)
    with socket.create_connection(("127.0.0.1", runner.port), timeout=3) as sock:
        started = time.monotonic()
        answer = _read_to_eof(sock)
        elapsed = time.monotonic() - started
    assert answer == b"ERR bad-frame\n"
    assert 0.4 <= elapsed < 1.2, elapsed
    assert runner.host.active_connections == 0


def test_when_full_the_oldest_slow_sender_makes_room(make_host, cta):
    runner = make_host(max_connections=2)
    held = [socket.create_connection(("127.0.0.1", runner.port), timeout=2) for _ in range(2)]
    try:
        wait_until(lambda: runner.host.active_connections == 2, 3, "two connections held")
        held.append(socket.create_connection(("127.0.0.1", runner.port), timeout=2))
        assert _read_to_eof(held[0]) == b""              # the oldest is reset, long before 5 s
        assert runner.host.stats["evicted"] == 1
        assert exchange(runner.port, tickle()) == b"OK\n"   # while two slow senders hold the slots
        late = socket.create_connection(("127.0.0.1", runner.port), timeout=2)
        held.append(late)
        # held, it took the next oldest's slot
        wait_until(lambda: runner.host.stats["evicted"] == 2, 3, "a second eviction")
        late.sendall(tickle())
        assert _read_to_eof(late) == b"OK\n"
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: runner.host.active_connections == 0, 3, "no connection left")
    assert_still_works(runner, cta)


def test_flood_keeps_state_flat_and_logging_bounded(make_host, cta, caplog):
    caplog.set_level(logging.INFO, logger="objecthost")
    runner = make_host(refusal_log_lines=5)
    started = time.monotonic()
    for i in range(300):
        data = [b"junk\n", tickle(key=bytes(32)), tickle(client_id=f"x{i}")][i % 3]
        assert exchange(runner.port, data).startswith(b"ERR ")
    windows = int(time.monotonic() - started) + 1
    wait_until(lambda: any("not logged" in r.getMessage() for r in caplog.records), 2.5,
               "the 'not logged' summary line")
    refused = [r for r in caplog.records if r.getMessage().startswith("tickle from")]
    assert 5 <= len(refused) <= 5 * windows
    assert runner.host.active_connections == 0
    assert len(runner.host.gate.replay) == 0
    assert_still_works(runner, cta)


# -- the wake-up hop --------------------------------------------------------------

def test_wake_ups_coalesce_while_one_is_in_flight(make_host):
    slow = FakeCTA(delay=0.6)
    try:
        runner = make_host(cta_port=slow.port)
        started = time.monotonic()
        for _ in range(10):
            assert exchange(runner.port, tickle()) == b"OK\n"
        sent_in = time.monotonic() - started
        runner.settle(timeout=5)
        if sent_in < 0.5:
            assert slow.wakes == 2          # the first one, plus exactly one folded
        assert 2 <= slow.wakes <= 3 and not slow.refused
    finally:
        slow.close()


def test_cta_down_is_logged_not_fatal(make_host, caplog):
    caplog.set_level(logging.INFO, logger="objecthost")
    with socket.socket() as placeholder:             # a port with nobody listening
        placeholder.bind(("127.0.0.1", 0))
        dead_port = placeholder.getsockname()[1]
    runner = make_host(cta_port=dead_port)
    assert exchange(runner.port, tickle()) == b"OK\n"
    runner.settle()
    assert runner.host.stats["forward-failed"] == 1
    assert any("cannot wake the CTA" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    assert exchange(runner.port, tickle()) == b"OK\n"


def test_close_is_prompt_with_connections_open(cta):
    runner = HostThread(cta.port)
    sock = socket.create_connection(("127.0.0.1", runner.port))
    try:
        wait_until(lambda: runner.host.active_connections == 1, 3, "the connection held")
        started = time.monotonic()
        runner.close()
        assert time.monotonic() - started < 2.0
        assert _read_to_eof(sock) in (b"", b"ERR bad-frame\n")
    finally:
        sock.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", runner.port), timeout=1).close()


# -- the real process -------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_config(tmp_path: Path, port: int, cta_port: int, *, registered=True, extra="") -> Path:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    creds = (f'client_id = "{CID}"\ntoken = "tok"\ntickle_key = "{KEY.hex()}"\n'
             if registered else "")
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[agent]\nserver_url = "http://127.0.0.1:9"\nstate_dir = "{state}"\n{creds}\n'
        f'[objecthost]\nlisten = "127.0.0.1:{port}"\n{extra}\n'
        f'[cta]\nlisten = "127.0.0.1:{cta_port}"\n')
    path.chmod(0o600)  # it holds secrets: the agent refuses it readable by others
    return path


def _start(config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "objecthost", "--config", str(config)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_listening(proc: subprocess.Popen, port: int) -> None:
    def up():
        if proc.poll() is not None:
            pytest.fail(proc.communicate()[1].decode())
        return listening(port)

    wait_until(up, 10, "the objecthost to listen")


def _stop(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=5)
    return proc.returncode, err.decode()


def _cpu_ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])        # utime + stime


def test_process_tickled_end_to_end(tmp_path):
    state = tmp_path / "state"
    hop_key = load_hop_key(state, create=True)      # the CTA's and the objecthost's shared key
    fake = FakeCTA(hop_key=hop_key)
    port = _free_port()
    proc = _start(_write_config(tmp_path, port, fake.port))
    try:
        _wait_listening(proc, port)
        assert exchange(port, tickle()) == b"OK\n"
        assert fake.wait_for(1)
        assert exchange(port, tickle(key=bytes(32))) == b"ERR bad-signature\n"
        # idle: (next to) no CPU
        before = _cpu_ticks(proc.pid)
        time.sleep(1.0)                             # a sleep, not a wait: idle time is measured
        after = _cpu_ticks(proc.pid)
        if before is not None and after is not None:
            assert after - before <= 5, "objecthost uses CPU while idle"
        assert exchange(port, tickle()) == b"OK\n"
        assert fake.wait_for(2)
        assert not fake.refused
    finally:
        code, err = _stop(proc)
        fake.close()
    assert code == 0, err
    assert re.search(r" INFO objecthost\[\d+\] tickle=[0-9a-f]{32}: tickle from 127.0.0.1:\d+ accepted", err), err
    assert "refused bad-signature" in err
    assert "stopped" in err


def test_process_picks_up_registration_without_restart(tmp_path):
    from agent.common.config import load_config

    fake = FakeCTA(hop_key=b"")                     # key read below, once the process made it
    port = _free_port()
    config = _write_config(tmp_path, port, fake.port, registered=False)
    proc = _start(config)
    try:
        _wait_listening(proc, port)
        fake.hop_key = load_hop_key(tmp_path / "state")   # created by the objecthost
        assert exchange(port, tickle()) == b"ERR unknown-client\n"
        load_config(config).save_credentials(CID, "tok", KEY.hex())
        time.sleep(1.05)  # a sleep by design: credentials are re-read at most once a second
        assert exchange(port, tickle()) == b"OK\n"
        assert fake.wait_for(1)
    finally:
        code, err = _stop(proc)
        fake.close()
    assert code == 0, err
    assert "credentials loaded for client pc-0042" in err


def test_process_unknown_config_key_exits_2(tmp_path):
    config = _write_config(tmp_path, _free_port(), 1, extra='listen_backlog = 5')
    proc = _start(config)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 2
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "listen_backlog" in lines[0] and str(config) in lines[0]


def test_process_port_in_use_exits_1(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        config = _write_config(tmp_path, busy.getsockname()[1], 1)
        proc = _start(config)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 1
    assert "cannot listen" in err.decode()


def test_objecthost_imports_only_the_standard_library():
    code = (
        "import sys, json; base = set(sys.modules);"
        "import objecthost, objecthost.server;"
        "print(json.dumps(sorted(set(sys.modules) - base)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    loaded = {name.split(".")[0] for name in json.loads(out)}
    for forbidden in ("httpx", "pluggy", "apscheduler", "xmltodict", "psutil"):
        assert forbidden not in loaded
    ours = {"agent", "objecthost"}
    foreign = {name for name in loaded
               if name not in ours and name not in sys.stdlib_module_names}
    assert not foreign, f"non-stdlib modules imported: {sorted(foreign)}"


# -- small helpers ----------------------------------------------------------------

def _readable(sock: socket.socket, timeout: float) -> bool:
    import select

    return bool(select.select([sock], [], [], timeout)[0])


def _read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except (ConnectionResetError, TimeoutError, socket.timeout):
            return data
        if not chunk:
            return data
        data += chunk
