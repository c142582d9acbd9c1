"""Hostile conditions: hostile or broken servers, hostile local processes,
malicious task XML and parameters -- nothing lost, nobody let in.

Everything runs for real on loopback: scripted HTTP(S) peers written here
(like ``_ScriptedServer`` in test_chain.py) stand in for a broken or hostile
task server, the agent is the real ``dsagent run`` (LoopbackChain pointed at
the peer), handler parameters go through the real ``dsagent run-task``.

Each test asserts the right behaviour; the bugs this campaign found (a
compression bomb past the size cap, no overall deadline, encodings and
non-ASCII digits escaping the parsers, a log line per skipped task, symlinked
image and preboot folders followed) are fixed, and these tests keep them so.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest

from agent.common.errors import ServerError
from agent.common.events import TERMINAL
from agent.common.serverapi import ServerAPI
from agent.common.statedb import db_path
from agent.common.tickle import exchange_line, make_tickle, make_wake, send_tickle
from conftest import wait_until
from ctdataloader.outbox import Outbox
from taskserver.loopback import LoopbackChain

REPO = Path(__file__).resolve().parent.parent
DSAGENT = [sys.executable, "-m", "agent"]
CID = "demo-pc"

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the agent targets POSIX")


# ---------------------------------------------------------------------------
# a scripted task-server peer
# ---------------------------------------------------------------------------

def task_xml(task_id: str, type_: str = "RunScript", params: dict | None = None,
             attrs: str = "") -> str:
    params = {"script": "true"} if params is None else params
    ps = "".join(f'<Parameter name="{k}">{v}</Parameter>' for k, v in params.items())
    return f'<Task id="{task_id}" type="{type_}"{attrs}><Parameters>{ps}</Parameters></Task>'


def client_tasks(*tasks: str) -> bytes:
    return f'<ClientTasks client="{CID}">{"".join(tasks)}</ClientTasks>'.encode()


class Peer:
    """A task-server peer whose answers are scripted per request.

    ``on_get``/``on_post`` take answers (functions of the request handler,
    and for POST of the events posted); each request uses the next one and
    the last one repeats. Events are recorded in ``posted`` (every upload)
    and ``accepted`` (event_id -> event, those the answer accepted).
    """

    def __init__(self, tls: ssl.SSLContext | None = None):
        self.lock = threading.Lock()
        self.get_plan: list = [answer_xml(client_tasks())]
        self.post_plan: list = [accept_all]
        self.gets = self.posts = 0
        self.paths: list[str] = []
        self.auth: set[str] = set()
        self.posted: list[dict] = []
        self.accepted: dict[str, dict] = {}
        self.handshakes = self.tls_failures = 0
        self.stream_sent = 0          # bytes of a streamed answer actually sent
        self.stream_seconds = 0.0     # how long the peer streamed before the agent hung up
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                with peer.lock:
                    peer.gets += 1
                    peer.paths.append(self.path)
                    peer.auth.add(self.headers.get("Authorization", ""))
                    answer = peer.get_plan[0] if len(peer.get_plan) == 1 else peer.get_plan.pop(0)
                answer(self)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                events = json.loads(body)["events"]
                with peer.lock:
                    peer.posts += 1
                    peer.paths.append(self.path)
                    peer.auth.add(self.headers.get("Authorization", ""))
                    peer.posted.extend(events)
                    answer = peer.post_plan[0] if len(peer.post_plan) == 1 else peer.post_plan.pop(0)
                answer(self, events, peer)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

            def get_request(self):
                sock, addr = super().get_request()
                if tls is None:
                    return sock, addr
                peer.handshakes += 1
                sock.settimeout(5)
                try:
                    wrapped = tls.wrap_socket(sock, server_side=True)
                except (ssl.SSLError, OSError):
                    peer.tls_failures += 1
                    sock.close()
                    raise
                wrapped.settimeout(None)
                return wrapped, addr

            def handle_error(self, request, client_address):
                pass  # a client hanging up mid-answer is part of these tests

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def on_get(self, *answers) -> None:
        with self.lock:
            self.get_plan = list(answers)

    def on_post(self, *answers) -> None:
        with self.lock:
            self.post_plan = list(answers)

    def states(self, task_id: str) -> list[str]:
        """The accepted events of ``task_id``, in seq order."""
        events = sorted((e for e in self.accepted.values() if e["task_id"] == task_id),
                        key=lambda e: e["seq"])
        return [e["state"] for e in events]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _send(h, status: int, body: bytes, ctype: str = "application/xml", headers=()) -> None:
    h.send_response(status)
    h.send_header("Content-Type", ctype)
    h.send_header("Content-Length", str(len(body)))
    for key, value in headers:
        h.send_header(key, value)
    h.end_headers()
    h.wfile.write(body)


# -- GET answers ------------------------------------------------------------------

def answer_xml(body: bytes):
    return lambda h: _send(h, 200, body)


def answer_pending(peer: Peer, *tasks: tuple[str, str]):
    """Like a real server: list each (task_id, xml) until its terminal event was accepted."""
    def answer(h):
        with peer.lock:
            done = {e["task_id"] for e in peer.accepted.values() if e["state"] in TERMINAL}
        _send(h, 200, client_tasks(*(xml for tid, xml in tasks if tid not in done)))
    return answer


def answer_html(h, *_):
    _send(h, 200, b"<html><body>Down for maintenance. <ClientTasks/></body></html>",
          "text/html; charset=utf-8")


def answer_status(code: int):
    return lambda h, *_: _send(h, code, b'{"error": "internal"}', "application/json")


def answer_truncated(h, *_):
    """Promise 4096 bytes, send 100, close."""
    h.send_response(200)
    h.send_header("Content-Type", "application/xml" if h.command == "GET" else "application/json")
    h.send_header("Content-Length", "4096")
    h.end_headers()
    h.wfile.write(b"<ClientTasks>" + b" " * 87)
    h.wfile.flush()
    h.close_connection = True


def answer_redirect(location: str):
    return lambda h, *_: _send(h, 302, b"", "text/plain", [("Location", location)])


def answer_hang(seconds: float):
    """Accept the request, say nothing for ``seconds``, hang up without an answer."""
    def answer(h, *_):
        time.sleep(seconds)
        h.close_connection = True
    return answer


def answer_stream(peer: Peer, total: int, chunk: int = 1 << 20):
    """A ``total``-byte XML document streamed from a generator (never in memory whole)."""
    def pieces():
        yield b"<ClientTasks>"
        left = total - len(b"<ClientTasks></ClientTasks>")
        block = b"<!-- padding -->" * (chunk // 16)
        while left > 0:
            piece = block[:min(left, len(block))]
            left -= len(piece)
            yield piece
        yield b"</ClientTasks>"

    def answer(h):
        h.send_response(200)
        h.send_header("Content-Type", "application/xml")
        h.send_header("Content-Length", str(total))
        h.end_headers()
        started = time.monotonic()
        try:
            for piece in pieces():
                h.wfile.write(piece)
                peer.stream_sent += len(piece)
        except OSError:
            pass
        peer.stream_seconds = time.monotonic() - started
        h.close_connection = True
    return answer


def answer_dribble(seconds: float, every: float):
    """Headers at once, then one body byte every ``every`` s for ``seconds``."""
    def answer(h, *_):
        n = int(seconds / every)
        h.send_response(200)
        h.send_header("Content-Type", "application/xml")
        h.send_header("Content-Length", str(n))
        h.end_headers()
        try:
            for _ in range(n):
                h.wfile.write(b" ")
                h.wfile.flush()
                time.sleep(every)
        except OSError:
            pass
        h.close_connection = True
    return answer


# -- POST answers ------------------------------------------------------------------

def accept_all(h, events, peer):
    with peer.lock:
        for event in events:
            peer.accepted[event["event_id"]] = event
    _send(h, 200, json.dumps({"accepted": [e["event_id"] for e in events]}).encode(),
          "application/json")


def accept_with_extra_ids(h, events, peer):
    """Accept what was sent, plus ids that were never sent."""
    with peer.lock:
        for event in events:
            peer.accepted[event["event_id"]] = event
    ids = [e["event_id"] for e in events] + [str(uuid.uuid4()) for _ in range(3)] + ["", "x" * 300]
    _send(h, 200, json.dumps({"accepted": ids}).encode(), "application/json")


def answer_not_json(h, *_):
    _send(h, 200, b"<html>OK</html>", "text/html")


def answer_no_accepted(h, *_):
    _send(h, 200, b'{"ok": true}', "application/json")


def answer_accepted_not_a_list(h, *_):
    _send(h, 200, b'{"accepted": "everything"}', "application/json")


def answer_only_unknown_ids(h, *_):
    ids = [str(uuid.uuid4()) for _ in range(5)]
    _send(h, 200, json.dumps({"accepted": ids}).encode(), "application/json")


# ---------------------------------------------------------------------------
# the real agent, pointed at a peer
# ---------------------------------------------------------------------------

class Agent:
    """``dsagent run`` (LoopbackChain) enrolled in the reference store, talking to ``url``."""

    def __init__(self, workdir: Path, url: str, **kwargs):
        self.chain = LoopbackChain(workdir, client_id=CID, **kwargs)
        self.chain.creds = self.chain.store.enroll(
            CID, tickle_addr=f"127.0.0.1:{self.chain.objecthost_port}")
        self.chain.server_url = url
        self.key = bytes.fromhex(self.chain.creds["tickle_key"])
        self.pids: dict[str, int] = {}

    def start(self) -> "Agent":
        self.chain.start_agent()
        self.pids = self.current_pids()
        return self

    def restart(self, url: str) -> None:
        self.chain.stop_agent()
        self.chain.server_url = url
        self.start()

    def current_pids(self) -> dict[str, int]:
        procs = {name: self.chain.child(name) for name in ("objecthost", "cta", "ctdataloader")}
        return {name: proc.pid for name, proc in procs.items() if proc is not None}

    def assert_alive_same_pids(self) -> None:
        assert len(self.pids) == 3, self.pids
        assert self.current_pids() == self.pids, "an agent process died and was restarted"
        for pid in self.pids.values():
            assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        assert "unexpected error" not in self.log(), self.log()[-3000:]
        assert "Traceback" not in self.log(), self.log()[-3000:]

    def tickle(self) -> str:
        return send_tickle("127.0.0.1", self.chain.objecthost_port, CID, self.key)

    def log(self) -> str:
        return self.chain.log_path.read_text(errors="replace")

    def wait_log(self, *fragments: str, timeout: float = 15.0) -> str:
        wait_until(lambda: all(f in self.log() for f in fragments), timeout,
                   f"log lines {fragments!r}")
        return self.log()

    def outbox(self, task_id: str | None = None) -> list[str]:
        """The states waiting in the durable outbox (of ``task_id``)."""
        box = Outbox(db_path(self.chain.workdir / "state"))
        try:
            events = box.batch(limit=1_000_000)
        finally:
            box.close()
        return [e["state"] for e in events if task_id in (None, e["task_id"])]

    def rss(self, which: str = "cta") -> tuple[int, int]:
        """(VmRSS, VmHWM = peak RSS) of a child, in bytes."""
        fields = {}
        for line in Path(f"/proc/{self.pids[which]}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
        return fields["VmRSS"], fields["VmHWM"]

    def stop(self) -> None:
        self.chain.stop()


@pytest.fixture
def peers():
    made: list[Peer] = []

    def make(**kwargs) -> Peer:
        made.append(Peer(**kwargs))
        return made[-1]

    yield make
    for peer in made:
        peer.close()


@pytest.fixture
def agents(tmp_path):
    made: list[Agent] = []

    def make(url: str, **kwargs) -> Agent:
        made.append(Agent(tmp_path / f"agent{len(made)}", url, **kwargs))
        return made[-1]

    yield make
    for agent in made:
        agent.stop()


# ---------------------------------------------------------------------------
# 1. broken or hostile server answers, through the whole agent
# ---------------------------------------------------------------------------

EVIL = "http://127.0.0.1:{port}/api/v1/clients/demo-pc/tasks"

# GET fault, POST fault (each made from the `evil` peer), what the CTA logs, what the
# ctdataloader logs
FAULTS = [
    pytest.param(lambda p: answer_html, lambda p: answer_not_json,
                 "content type 'text/html', expected application/xml",
                 "POST status: unusable answer", id="html-not-json"),
    pytest.param(lambda p: answer_status(500), lambda p: answer_status(500),
                 "HTTP 500", "HTTP 500", id="http-500"),
    pytest.param(lambda p: answer_truncated, lambda p: answer_truncated,
                 "RemoteProtocolError", "RemoteProtocolError", id="truncated-body"),
    pytest.param(lambda p: answer_redirect(EVIL.format(port=p.port)),
                 lambda p: answer_redirect(EVIL.format(port=p.port)),
                 "; not followed", "; not followed", id="redirect-elsewhere"),
    pytest.param(lambda p: answer_hang(2.0), lambda p: answer_no_accepted,
                 "Server disconnected without sending a response",
                 "unusable answer ('accepted')", id="hang-then-close/no-accepted"),
    pytest.param(lambda p: answer_status(503), lambda p: answer_accepted_not_a_list,
                 "HTTP 503", "accepted is not a list", id="503/accepted-not-a-list"),
    pytest.param(lambda p: answer_status(404), lambda p: answer_only_unknown_ids,
                 "HTTP 404", "server accepted none", id="404/unknown-ids-only"),
]


@pytest.mark.parametrize("get_fault, post_fault, cta_says, loader_says", FAULTS)
def test_bad_server_answers_are_logged_nothing_lost_agent_recovers(
        peers, agents, get_fault, post_fault, cta_says, loader_says):
    peer, evil = peers(), peers()
    task_id = str(uuid.uuid4())
    peer.on_get(get_fault(evil))
    agent = agents(peer.url).start()
    # the startup pull meets the fault: logged by the CTA, nothing run
    log = agent.wait_log("pull failed: GET ", cta_says)
    line = [line for line in log.splitlines() if cta_says in line][0]
    assert " ERROR cta[" in line and "pull failed: GET " in line, line
    # the server now lists a task but its status answers are faulty
    peer.on_get(answer_pending(peer, (task_id, task_xml(task_id))))
    peer.on_post(post_fault(evil))
    assert agent.tickle() == "OK"
    wait_until(lambda: agent.outbox(task_id) == ["received", "running", "succeeded"], 15,
               "the task's three events in the outbox")
    log = agent.wait_log("upload failed: ", loader_says)
    assert any(loader_says in line and " ctdataloader[" in line for line in log.splitlines())
    wait_until(lambda: peer.posts >= 2, 10, "a retried upload")
    assert agent.outbox(task_id) == ["received", "running", "succeeded"]  # kept, nothing lost
    assert peer.states(task_id) == []  # nothing was accepted by a faulty answer
    # the server recovers: everything arrives, in order, and the outbox empties
    peer.on_post(accept_with_extra_ids)
    wait_until(lambda: peer.states(task_id) == ["received", "running", "succeeded"], 40,
               "the events at the recovered server")
    wait_until(lambda: agent.outbox() == [], 10, "an empty outbox")
    assert evil.gets == evil.posts == 0, "a redirect was followed"
    assert peer.auth == {f"Bearer {agent.chain.creds['token']}"}
    agent.assert_alive_same_pids()


def test_server_that_never_answers_times_out_then_the_same_client_recovers(peers):
    """The narrow case (ServerAPI timeout 1 s; the agent's is 30 s): a listener
    that accepts TCP but never reads, and a peer that reads but never answers."""
    silent = socket.create_server(("127.0.0.1", 0), backlog=8)  # never accept()ed
    try:
        api = ServerAPI(f"http://127.0.0.1:{silent.getsockname()[1]}", CID, "tok", timeout=1)
        started = time.monotonic()
        with pytest.raises(ServerError, match=r"timed out \(ReadTimeout\)"):
            api.get_tasks(1 << 20)
        assert time.monotonic() - started < 3
        api.close()
    finally:
        silent.close()
    peer = peers()
    api = ServerAPI(peer.url, CID, "tok", timeout=1)
    peer.on_get(answer_hang(3))
    peer.on_post(answer_hang(3))
    for call in (lambda: api.get_tasks(1 << 20),
                 lambda: api.post_status([{"event_id": "e1", "task_id": "t", "seq": 1}])):
        started = time.monotonic()
        with pytest.raises(ServerError, match="timed out"):
            call()
        assert time.monotonic() - started < 3
    doc = client_tasks(task_xml(str(uuid.uuid4())))
    peer.on_get(answer_xml(doc))
    peer.on_post(accept_all)
    assert api.get_tasks(1 << 20) == doc
    assert api.post_status([{"event_id": "e2", "task_id": "t", "seq": 1}]) == ["e2"]
    api.close()


def test_dribbling_server_cannot_hold_a_call_past_its_timeout(peers):
    peer = peers()
    peer.on_get(answer_dribble(seconds=5, every=0.4))
    api = ServerAPI(peer.url, CID, "tok", timeout=1)
    started = time.monotonic()
    try:
        with pytest.raises(ServerError):
            api.get_tasks(1 << 20)
    finally:
        elapsed = time.monotonic() - started
        api.close()
    assert elapsed < 3, f"a 1 s timeout held the call for {elapsed:.1f} s"


BOMB_CHILD = r"""
import json, resource, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from agent.common.serverapi import ServerAPI
from agent.common.statedb import db_path
from agent.common.errors import ServerError
body = open(sys.argv[1], "rb").read()
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Encoding", sys.argv[2])
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass
    def log_message(self, *a):
        pass
srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
threading.Thread(target=srv.serve_forever, daemon=True).start()
api = ServerAPI(f"http://127.0.0.1:{srv.server_address[1]}", "c", "t")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    api.get_tasks(16 * 1024 * 1024)
    outcome = "accepted"
except ServerError as exc:
    outcome = str(exc)
grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(json.dumps({"outcome": outcome, "grew": grew}))
"""


def _bomb(path: Path, encoding: str, size: int) -> None:
    block = b"\0" * (1 << 20)
    if encoding == "zstd":
        import zstandard
        comp = zstandard.ZstdCompressor(level=19).compressobj(size=size)
        with open(path, "wb") as fh:
            for _ in range(size >> 20):
                fh.write(comp.compress(block))
            fh.write(comp.flush())
    else:
        with gzip.open(path, "wb", compresslevel=9) as fh:
            for _ in range(size >> 20):
                fh.write(block)


@pytest.mark.parametrize("encoding", ["zstd", "gzip"])
def test_compressed_answer_cannot_inflate_past_the_cap(tmp_path, encoding):
    bomb = tmp_path / "bomb"
    _bomb(bomb, encoding, 256 << 20)
    assert bomb.stat().st_size < 512 << 10
    out = subprocess.run([sys.executable, "-c", BOMB_CHILD, str(bomb), encoding], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    result = json.loads(out.stdout)
    assert result["outcome"] != "accepted"
    assert result["grew"] < 50 << 20, f"peak RSS grew {result['grew'] >> 20} MB on " \
        f"{bomb.stat().st_size} bytes of {encoding}"


def _openssl_cert(folder: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the openssl command line tool is not installed (needed to make a test "
                    "cert; make test installs it)")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                    "-days", "1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_bad_tls_certificate_is_refused_and_logged_nothing_lost(tmp_path, peers, agents):
    cert, key = _openssl_cert(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    tls_peer = peers(tls=context)
    plain = peers()
    task_id = str(uuid.uuid4())
    # 1. a task runs; its status cannot be uploaded yet (500): 3 events wait in the outbox
    plain.on_get(answer_pending(plain, (task_id, task_xml(task_id))))
    plain.on_post(answer_status(500))
    agent = agents(plain.url).start()
    wait_until(lambda: agent.outbox(task_id) == ["received", "running", "succeeded"], 15,
               "three events in the outbox")
    # 2. the agent now talks to a server whose certificate does not verify
    agent.restart(tls_peer.url)
    tls_peer.on_get(answer_pending(tls_peer, (task_id, task_xml(task_id))))
    log = agent.wait_log(f"pull failed: GET {tls_peer.url}", f"upload failed: POST {tls_peer.url}",
                         "CERTIFICATE_VERIFY_FAILED")
    lines = [line for line in log.splitlines() if "CERTIFICATE_VERIFY_FAILED" in line]
    assert any(" cta[" in line for line in lines) and any(" ctdataloader[" in line for line in lines)
    refused = tls_peer.tls_failures
    assert agent.tickle() == "OK"      # another pull, refused the same way
    wait_until(lambda: tls_peer.tls_failures > refused
               and tls_peer.tls_failures == tls_peer.handshakes, 10, "another refused handshake")
    assert tls_peer.handshakes >= 2 and tls_peer.tls_failures == tls_peer.handshakes
    assert tls_peer.gets == tls_peer.posts == 0, "a request went through an unverified connection"
    assert agent.outbox(task_id) == ["received", "running", "succeeded"]
    agent.assert_alive_same_pids()
    # 3. back to a good server: every event arrives
    plain.on_post(accept_all)
    agent.restart(plain.url)
    wait_until(lambda: plain.states(task_id) == ["received", "running", "succeeded"], 20,
               "the events at the good server")
    wait_until(lambda: agent.outbox() == [], 10, "an empty outbox")
    agent.assert_alive_same_pids()


# ---------------------------------------------------------------------------
# 2. the CTA port: loopback only, signed, no replays
# ---------------------------------------------------------------------------

def _listeners(port: int) -> list[tuple[str, int]]:
    return [(c.laddr.ip, c.pid or 0) for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port]


def _tampered(line: bytes) -> bytes:
    """The line with the last digit of its signature changed (always changed)."""
    last = line[-2:-1]
    return line[:-2] + (b"1" if last == b"0" else b"0") + b"\n"


def test_cta_port_is_loopback_only_and_refuses_forged_garbage_and_replayed_wakes(tmp_path):
    chain = LoopbackChain(tmp_path / "c", client_id=CID)
    chain.start()
    try:
        cta = chain.child("cta")
        listeners = _listeners(chain.cta_port)
        assert listeners and all(ip == "127.0.0.1" for ip, _ in listeners), listeners
        # the CTA's socket; a worker it is starting holds it too for a moment (between
        # fork and exec, before close_fds), and psutil may name that pid instead
        family = {cta.pid, 0} | {p.pid for p in cta.children(recursive=True)}
        assert {pid for _, pid in listeners} <= family, (listeners, family)
        for addrs in psutil.net_if_addrs().values():  # not reachable on another address
            for addr in addrs:
                if addr.family == socket.AF_INET and not addr.address.startswith("127."):
                    with pytest.raises(OSError):
                        socket.create_connection((addr.address, chain.cta_port), timeout=1).close()
        wait_until(lambda: chain.store.request_counts(CID)["tasks"] >= 1, 10, "the startup pull")
        chain.wait_first_pull(10)
        pulls = chain.store.request_counts(CID)["tasks"]
        hop_key = bytes.fromhex((chain.workdir / "state" / "hop.key").read_text().strip())
        now = int(time.time())
        tickle_key = bytes.fromhex(chain.creds["tickle_key"])
        refused = {
            b"hello world\n": "ERR bad-frame",
            b"\x00\xff\xfe\x80 binary\n": "ERR bad-frame",
            b"A" * 4096: "ERR bad-frame",
            make_tickle(CID, tickle_key): "ERR bad-frame",          # a tickle is not a wake-up
            make_wake(os.urandom(32)): "ERR bad-signature",        # forged
            _tampered(make_wake(hop_key)): "ERR bad-signature",    # tampered
            make_wake(hop_key, now=now - 3600): "ERR stale",
            make_wake(hop_key, now=now + 3600): "ERR stale",
        }
        for line, answer in refused.items():
            assert exchange_line("127.0.0.1", chain.cta_port, line) == answer, line
        valid = make_wake(hop_key)
        assert exchange_line("127.0.0.1", chain.cta_port, valid) == "OK"
        for _ in range(3):
            assert exchange_line("127.0.0.1", chain.cta_port, valid) == "ERR replay"
        # forged tickles at the objecthost cause no pull either
        for forged in (make_tickle(CID, os.urandom(32)), make_tickle("someone-else", tickle_key),
                       make_tickle(CID, tickle_key, now=now - 3600)):
            assert exchange_line("127.0.0.1", chain.objecthost_port, forged).startswith("ERR ")
        time.sleep(1.5)  # a sleep, not a wait: that no other pull comes is what is tested
        assert chain.store.request_counts(CID)["tasks"] == pulls + 1  # the one valid wake-up only
        log = chain.log_path.read_text()
        for code in ("bad-frame", "bad-signature", "stale", "replay"):
            assert f"refused a wake-up on the CTA port: {code}" in log
        assert log.count("refused a wake-up on the CTA port") == len(refused) + 3
        assert chain.child("cta").pid == cta.pid
    finally:
        chain.stop()


# ---------------------------------------------------------------------------
# 3. malicious task XML, from a scripted server, through the whole chain
# ---------------------------------------------------------------------------

LAUGHS = (b'<?xml version="1.0"?><!DOCTYPE ClientTasks [<!ENTITY l0 "lol">'
          + b"".join(b'<!ENTITY l%d "%s">' % (i, b"&l%d;" % (i - 1) * 10) for i in range(1, 10))
          + b']><ClientTasks client="demo-pc">&l9;</ClientTasks>')
XXE = (b'<?xml version="1.0"?><!DOCTYPE ClientTasks [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
       b'<ClientTasks client="demo-pc"><Task id="0b8e8c5e-3f7a-4f63-9d8f-2a61c1e0e4a1" '
       b'type="RunScript"><Parameters><Parameter name="script">&x;</Parameter></Parameters>'
       b'</Task></ClientTasks>')
DEEP = b"<ClientTasks>" + b"<a>" * 10_000 + b"</a>" * 10_000 + b"</ClientTasks>"
BAD_UTF8 = b'<ClientTasks client="demo-pc"><Task id="\xff\xfe\xc3(" type="RunScript"/></ClientTasks>'


def test_malicious_task_documents_are_refused_quickly_memory_bounded(peers, agents):
    peer = peers()
    dtd_url = f"http://127.0.0.1:{peer.port}/evil.dtd"
    dup, odd, good = (str(uuid.uuid4()) for _ in range(3))
    per_task = client_tasks(
        task_xml(dup, params={"script": "echo first"}),
        task_xml(dup, params={"script": "echo second"}),
        task_xml(odd, attrs=' colour="red" onload="rm -rf /"'),
        task_xml(good, params={"script": "echo good"}))
    big = 100 * 1024 * 1024
    documents = [
        (answer_xml(LAUGHS), "a DTD (<!DOCTYPE>) is not allowed"),
        (answer_xml(XXE), "a DTD (<!DOCTYPE>) is not allowed"),
        (answer_xml(f'<!DOCTYPE ClientTasks SYSTEM "{dtd_url}"><ClientTasks/>'.encode()),
         "a DTD (<!DOCTYPE>) is not allowed"),
        (answer_xml(DEEP), "elements nested deeper than 6"),
        (answer_stream(peer, big), "response larger than 16777216 bytes; refused"),
        (answer_xml(BAD_UTF8), "not well-formed XML: not well-formed (invalid token)"),
    ]
    peer.on_get(answer_xml(client_tasks()))
    agent = agents(peer.url).start()
    agent.chain.wait_first_pull(10)
    rss_before, _ = agent.rss("cta")
    peer.on_get(*[answer for answer, _ in documents], answer_xml(per_task))

    def pulled_all():
        agent.tickle()  # each tickle is one more pull (retries pull too)
        return peer.gets >= len(documents) + 2

    started = time.monotonic()
    wait_until(pulled_all, 30, "a pull of every document", interval=0.25)
    elapsed = time.monotonic() - started
    log = agent.wait_log(*(f"pull failed: {reason}" if "larger" not in reason else reason
                           for _, reason in documents))
    assert elapsed < 20, f"{len(documents)} hostile documents took {elapsed:.1f} s"
    # the 100 MB document: refused at the cap, without reading it all, memory bounded
    assert 16 << 20 < peer.stream_sent < 64 << 20, peer.stream_sent
    assert peer.stream_seconds < 5
    _, peak = agent.rss("cta")
    assert peak - rss_before < 50 << 20, f"CTA peak RSS grew {(peak - rss_before) >> 20} MB"
    assert "/evil.dtd" not in peer.paths and "root:" not in log
    # per-task problems: the repeat skipped, the odd task received -> failed, the rest run
    wait_until(lambda: all(peer.states(t)[-1:] in (["succeeded"], ["failed"])
                           for t in (dup, odd, good)), 20, "the three tasks' ends")
    assert peer.states(good) == ["received", "running", "succeeded"]
    assert peer.states(dup) == ["received", "running", "succeeded"]
    ends = {e["task_id"]: e for e in peer.accepted.values() if e["state"] in TERMINAL}
    assert ends[dup]["details"]["stdout_tail"] == "first\n"
    assert peer.states(odd) == ["received", "failed"]
    assert "unknown attribute" in ends[odd]["message"]
    assert f"Task {dup} appears twice in the document; the repeat is skipped" in agent.log()
    agent.assert_alive_same_pids()


def test_parser_crashes_are_refusals_and_one_bad_timeout_fails_alone(peers, agents):
    peer = peers()
    good, bad = str(uuid.uuid4()), str(uuid.uuid4())
    peer.on_get(answer_xml(b'<?xml version="1.0" encoding="x-evil"?><ClientTasks/>'),
                answer_pending(peer, (good, task_xml(good)),
                               (bad, task_xml(bad, attrs=' timeout="\u00b2"'))))
    agent = agents(peer.url).start()
    agent.wait_log("unknown encoding")
    assert "pull failed: " in [line for line in agent.log().splitlines()
                               if "unknown encoding" in line][0]
    assert agent.tickle() == "OK"
    wait_until(lambda: peer.states(good)[-1:] == ["succeeded"], 10, "the good task to run")
    wait_until(lambda: peer.states(bad) == ["received", "failed"], 10, "the bad task to fail")
    agent.assert_alive_same_pids()


def test_document_of_many_unreadable_tasks_costs_bounded_log_lines(peers, agents):
    """Each <Task> with no readable id is "logged and skipped" (§3), but a
    document of 37,000 of them (256 KiB, well under the cap) must not cost
    37,000 log lines."""
    peer = peers()
    unit = b"<Task/>"
    doc = b"<ClientTasks>" + unit * ((256 << 10) // len(unit)) + b"</ClientTasks>"
    peer.on_get(answer_xml(doc), answer_xml(client_tasks()))
    agent = agents(peer.url).start()
    agent.wait_log("no readable id", timeout=30)
    wait_until(lambda: agent.tickle() == "OK" and peer.gets >= 2, 30, "the pull after")
    lines = agent.log().count("has no readable id")
    agent.assert_alive_same_pids()
    assert lines <= 100, f"{lines} log lines for one 256 KiB document"


# ---------------------------------------------------------------------------
# 4. hostile handler parameters, through `dsagent run-task`
# ---------------------------------------------------------------------------

def _tree(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its type and (for files) content digest."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            found[rel] = ("dir",)
        else:
            found[rel] = ("file", path.stat().st_size, path.read_bytes()[:64])
    return found


@pytest.fixture
def site(tmp_path):
    """Configured folders deep inside tmp_path (so any ``..`` escape lands in tmp_path)."""
    base = tmp_path / "srv" / "a" / "b"
    folders = {key: base / key for key in ("sbs", "images", "packages", "preboot")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    config = tmp_path / "agent.toml"
    config.write_text("[handlers]\n"
                      f'sbs_dir = "{folders["sbs"]}"\n'
                      f'image_store = "{folders["images"]}"\n'
                      f'package_store = "{folders["packages"]}"\n'
                      f'preboot_store = "{folders["preboot"]}"\n')
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(1 << 20))
    outside = tmp_path / "elsewhere"
    (outside / "precious").mkdir(parents=True)
    (outside / "precious" / "keep.txt").write_text("do not touch\n")
    return {"tmp": tmp_path, "config": config, "disk": disk, "outside": outside, **folders}


def _run_task_start(site, name: str, document: str | bytes) -> tuple[subprocess.Popen, Path]:
    path = site["tmp"] / name
    path.write_bytes(document.encode() if isinstance(document, str) else document)
    proc = subprocess.Popen(DSAGENT + ["run-task", str(path), "--json", "--config", str(site["config"])],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, path


def _run_task_finish(proc: subprocess.Popen) -> tuple[int, dict[str, list[dict]], str]:
    out, err = proc.communicate(timeout=90)
    by_task: dict[str, list[dict]] = {}
    for line in out.splitlines():
        event = json.loads(line)
        by_task.setdefault(event["task_id"], []).append(event)
    return proc.returncode, by_task, err


def _make_base(preboot: Path, name: str = "base1") -> None:
    from handlers.bootwiz.cpio import NewcWriter, Output

    folder = preboot / name
    folder.mkdir()
    (folder / "vmlinuz").write_bytes(b"MZ" + os.urandom(200))
    fd = os.open(folder / "initrd.img", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        out = Output(fd)
        writer = NewcWriter(out)
        writer.add_file("init", 10, 0, 0o755, [b"#!/bin/sh\n"])
        writer.close()
        out.flush()
    finally:
        os.close(fd)


NL = "&#10;"
BAD_PARAMETERS = [
    # (type, parameters, the parameter the message must name)
    ("RunScript", {"script": "true", "interpreter": "../../../../bin/sh"}, "'interpreter'"),
    ("RunScript", {"script": "true", "interpreter": "bin/sh"}, "'interpreter'"),
    ("RunScript", {"script": "true", "interpreter": f"/bin/sh{NL}/tmp/evil"}, "interpreter"),
    ("RunScript", {"script": "true", "interpreter": "/nonexistent/../bin/sh"}, "interpreter"),
    ("UpdateSBSInfo", {"kind": "../../../../etc/cron.d/evil", "payload": "x"}, "'kind'"),
    ("UpdateSBSInfo", {"kind": f"update{NL}", "payload": "x"}, "'kind'"),
    ("UpdateSBSInfo", {"kind": "update", "payload": "x", "file": "../../escaped.sbs"}, "'file'"),
    ("UpdateSBSInfo", {"kind": "update", "payload": "x", "confirm_s": "../1"}, "'confirm_s'"),
    ("BootWizRebuild", {"config": "../../../escaped", "base": "base1"}, "'config'"),
    ("BootWizRebuild", {"config": "..", "base": "base1"}, "'config'"),
    ("BootWizRebuild", {"config": f"cfg{NL}x", "base": "base1"}, "'config'"),
    ("BootWizRebuild", {"config": "cfg", "base": "../../../../etc"}, "'base'"),
    ("BootWizRebuild", {"config": "cfg", "base": "/etc"}, "'base'"),
    ("BootWizRebuild", {"config": "cfg", "base": "base1", "drivers": "ok,../../../escaped"},
     "'drivers'"),
    ("BootWizRebuild", {"config": "cfg", "base": "base1", "drivers": "/etc"}, "'drivers'"),
    ("CreateImage", {"source": "DISK", "image": "../../../escaped"}, "image"),
    ("CreateImage", {"source": "DISK", "image": ".."}, "image"),
    ("CreateImage", {"source": "DISK", "image": "a/b"}, "image"),
    ("CreateImage", {"source": "DISK", "image": f"img{NL}x"}, "image"),
    ("CreateImage", {"source": "relative/disk.img", "image": "img"}, "'source'"),
    ("CreateImage", {"source": f"DISK{NL}", "image": "img"}, "'source'"),
    ("DeployImage", {"image": "../../../../etc", "target": "DISK"}, "image"),
    ("DeployImage", {"image": "img", "target": "../disk.img"}, "'target'"),
    ("DeployImage", {"image": "img", "target": f"DISK{NL}"}, "'target'"),
]


def test_hostile_parameters_fail_naming_the_parameter_and_nothing_escapes(site):
    _make_base(site["preboot"])
    # a symlink planted in the SBS folder under a fixed name, pointing outside:
    # the handler must wait for it (never write through it) and then fail
    victim = site["outside"] / "victim.txt"
    victim.write_text("original\n")
    (site["sbs"] / "initialPXEConfigPath.sbs").symlink_to(victim)
    sbs_task = str(uuid.uuid4())
    sbs_proc, _ = _run_task_start(site, "sbs.xml", "<ClientTasks>" + task_xml(
        sbs_task, "UpdateSBSInfo", {"kind": "initial-config", "payload": "evil"}) + "</ClientTasks>")
    ids = [str(uuid.uuid4()) for _ in BAD_PARAMETERS]
    tasks = "".join(task_xml(tid, type_, {k: v.replace("DISK", str(site["disk"]))
                                          for k, v in params.items()})
                    for tid, (type_, params, _) in zip(ids, BAD_PARAMETERS))
    before = _tree(site["tmp"])
    proc, _ = _run_task_start(site, "bad.xml", f"<ClientTasks>{tasks}</ClientTasks>")
    # NUL cannot travel in XML 1.0 at all: the whole document is refused (exit 2)
    nul_ref, _ = _run_task_start(site, "nul-ref.xml", "<ClientTasks>" + task_xml(
        str(uuid.uuid4()), params={"script": "true", "interpreter": "/bin/sh&#0;/tmp/x"})
        + "</ClientTasks>")
    nul_raw, _ = _run_task_start(site, "nul-raw.xml", ("<ClientTasks>" + task_xml(
        str(uuid.uuid4()), "CreateImage", {"source": "/dev/null\0", "image": "x"})
        + "</ClientTasks>").encode())
    code, by_task, err = _run_task_finish(proc)
    assert code == 1, err
    for tid, (type_, params, names) in zip(ids, BAD_PARAMETERS):
        events = by_task[tid]
        assert [e["state"] for e in events] == ["received", "failed"], (type_, params, events)
        assert names in events[-1]["message"], (type_, params, events[-1]["message"])
    for proc_ in (nul_ref, nul_raw):
        code, by_task, err = _run_task_finish(proc_)
        assert code == 2 and by_task == {}, err
        assert "cannot read the task document: not well-formed XML" in err
    code, by_task, err = _run_task_finish(sbs_proc)  # waited FIXED_NAME_WAIT_S (10 s) meanwhile
    assert code == 1, err
    [final] = [e for e in by_task[sbs_task] if e["state"] in TERMINAL]
    assert final["state"] == "failed" and "already waiting" in final["message"]
    assert victim.read_text() == "original\n"
    assert os.readlink(site["sbs"] / "initialPXEConfigPath.sbs") == str(victim)
    after = _tree(site["tmp"])  # (the SBS task's temporary file is gone too)
    changed = sorted(p for p in set(after) ^ set(before) if not p.endswith(".xml"))
    changed += sorted(p for p in set(after) & set(before) if after[p] != before[p])
    assert changed == [], f"hostile parameters changed files: {changed}"
    assert not [p for p in after if "escaped" in p]


def test_symlinked_image_folder_is_not_written_through(site):
    (site["images"] / "evil").symlink_to(site["outside"], target_is_directory=True)
    before = _tree(site["outside"])
    tid = str(uuid.uuid4())
    proc, _ = _run_task_start(site, "t.xml", "<ClientTasks>" + task_xml(
        tid, "CreateImage", {"source": str(site["disk"]), "image": "evil"}) + "</ClientTasks>")
    code, by_task, err = _run_task_finish(proc)
    after = _tree(site["outside"])
    assert (site["outside"] / "precious" / "keep.txt").exists(), "a folder outside the store was deleted"
    assert after == before, f"written outside the image store: {sorted(set(after) ^ set(before))}"
    assert by_task[tid][-1]["state"] == "failed" and "symlink" in by_task[tid][-1]["message"]


def test_symlinked_preboot_config_is_not_written_through(site):
    _make_base(site["preboot"])
    (site["preboot"] / "evilcfg").symlink_to(site["outside"], target_is_directory=True)
    before = _tree(site["outside"])
    tid = str(uuid.uuid4())
    proc, _ = _run_task_start(site, "t.xml", "<ClientTasks>" + task_xml(
        tid, "BootWizRebuild", {"config": "evilcfg", "base": "base1"}) + "</ClientTasks>")
    code, by_task, err = _run_task_finish(proc)
    after = _tree(site["outside"])
    assert after == before, f"written outside the preboot store: {sorted(set(after) ^ set(before))}"
    assert by_task[tid][-1]["state"] == "failed" and "symlink" in by_task[tid][-1]["message"]


# ---------------------------------------------------------------------------
# 5. the fuzz corpus, replayed without atheris
# ---------------------------------------------------------------------------

FUZZ = REPO / "fuzz"
TARGETS = {"tickle": "fuzz_tickle.py", "taskxml": "fuzz_taskxml.py", "config": "fuzz_config.py"}


def _harness(name: str):
    if str(FUZZ) not in sys.path:
        sys.path.insert(0, str(FUZZ))
    spec = importlib.util.spec_from_file_location(f"_fuzz_{name}", FUZZ / TARGETS[name])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_corpus_replays_without_crash(target):
    harness = _harness(target)
    files = sorted((FUZZ / "corpus" / target).iterdir())
    assert len(files) >= 20, f"the {target} seed corpus is thin"
    for path in files:
        try:
            harness.TestOneInput(path.read_bytes())
        except Exception as exc:
            raise AssertionError(f"{path.relative_to(REPO)}: {type(exc).__name__}: {exc}") from exc


def _known_crashes():
    for target in sorted(TARGETS):
        folder = FUZZ / "known-crashes" / target
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            yield pytest.param(target, path, id=f"{target}/{path.name}")


@pytest.mark.parametrize("target, path", list(_known_crashes()))
def test_known_fuzz_crashes_are_fixed(target, path):
    _harness(target).TestOneInput(path.read_bytes())
