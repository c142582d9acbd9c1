"""The reference task server (taskserver/), over real HTTP on loopback: no mocks."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest
import xmltodict

from agent.common.config import load_config
from conftest import TickleListener
from taskserver import TaskStore, TickleFailed
from taskserver.checks import InvalidRequest, RegistrationRefused, UnknownClient

BACKENDS = ("sqlite", "postgresql")   # conftest.py: each test on both databases

ROOT = Path(__file__).resolve().parents[1]
ENROLL_KEY = "let-me-in"

TRICKY = {
    "crlf": "line one\r\nline two\r\n",
    "lone_cr": "a\rb\r",
    "lf": "\nfirst\n\nlast\n",
    "markup": 'a < b && c > d; <Computer mac="00:11:22:33:44:55" action="boot-automation"/>',
    "cdata_end": "x]]>y <![CDATA[z]]> ]]>",
    "quotes": "\"double\" and 'single'",
    "unicode": "ünïcødé – 日本語 🚀 \u00a0nbsp",
    "spaces": "  leading and trailing  ",
    "tabs": "\tcol1\tcol2\t",
    "entities": "&amp; &lt; &#13; &#x41;",
    "whitespace_only": " \r\n\t ",
    "we\"ird <name> & more": "value",
}


# -- fixtures -----------------------------------------------------------------

# store and server: tests/conftest.py

@pytest.fixture
def creds(store):
    return store.enroll("pc-0042")


@pytest.fixture
def http(server, creds):
    with httpx.Client(base_url=server.url, timeout=5,
                      headers={"Authorization": f"Bearer {creds['token']}"}) as client:
        yield client


def event(task_id, seq, state, **extra):
    data = {"event_id": str(uuid.uuid4()), "task_id": task_id, "seq": seq, "state": state,
            "progress": None, "message": f"{state} #{seq}", "details": {},
            "at": "2024-05-01T12:00:00Z"}
    data.update(extra)
    return data


def run_cli(*args, check=True, timeout=20):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "taskserver", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}: {proc.stderr}")
    return proc


# -- register and auth --------------------------------------------------------

def test_register_returns_credentials_and_sanitised_unique_id(server, store):
    request = {"name": "PC 0042/lab", "uuid": str(uuid.uuid4()), "macs": ["00:11:22:33:44:55"],
               "ips": ["10.0.0.5"], "os": "Linux 6.1", "agent_version": "0.1.0",
               "enrollment_key": ENROLL_KEY}
    first = httpx.post(f"{server.url}/api/v1/register", json=request)
    assert first.status_code == 201
    assert first.headers["content-type"] == "application/json"
    data = first.json()
    assert set(data) == {"client_id", "token", "tickle_key", "poll_interval_s"}
    assert data["client_id"] == "PC-0042-lab"
    assert data["poll_interval_s"] == 17
    assert len(bytes.fromhex(data["tickle_key"])) == 32
    second = httpx.post(f"{server.url}/api/v1/register", json=request).json()
    assert second["client_id"] == "PC-0042-lab-2"
    assert second["token"] != data["token"]

    row = store.client("PC-0042-lab")
    assert row["macs"] == ["00:11:22:33:44:55"] and row["os"] == "Linux 6.1"
    tasks = httpx.get(f"{server.url}/api/v1/clients/PC-0042-lab/tasks",
                      headers={"Authorization": f"Bearer {data['token']}"})
    assert tasks.status_code == 200
    assert store.request_counts("PC-0042-lab") == {"register": 1, "tasks": 1, "status": 0}


def test_register_refuses_bad_enrollment_key(server, store):
    for key in ("wrong", None):
        resp = httpx.post(f"{server.url}/api/v1/register",
                          json={"name": "intruder", "enrollment_key": key})
        assert resp.status_code == 403
        assert "enrollment key" in resp.json()["error"]
    assert store.clients() == []
    with pytest.raises(RegistrationRefused, match="disabled"):
        store.register({"name": "x", "enrollment_key": "x"}, None)
    resp = httpx.post(f"{server.url}/api/v1/register", content=b"{not json",
                      headers={"Content-Type": "application/json"})
    assert resp.status_code == 400 and "JSON" in resp.json()["error"]


def test_auth_required(server, creds, store):
    other = store.enroll("pc-other")
    base = f"{server.url}/api/v1/clients/pc-0042"
    for headers in ({}, {"Authorization": "Bearer nope"},
                    {"Authorization": f"Bearer {other['token']}"},
                    {"Authorization": f"Basic {creds['token']}"}):
        resp = httpx.get(f"{base}/tasks", headers=headers)
        assert resp.status_code == 401, headers
        assert resp.json()["error"]
        assert resp.headers["www-authenticate"].startswith("Bearer")
        resp = httpx.post(f"{base}/status", json={"events": []}, headers=headers)
        assert resp.status_code == 401
    unknown = httpx.get(f"{server.url}/api/v1/clients/nobody/tasks",
                        headers={"Authorization": f"Bearer {creds['token']}"})
    assert unknown.status_code == 401
    auth = {"Authorization": f"Bearer {creds['token']}"}
    assert httpx.get(f"{server.url}/api/v1/nothing", headers=auth).status_code == 404
    assert httpx.get(f"{server.url}/", headers=auth).json()["error"]
    wrong_method = httpx.post(f"{base}/tasks", headers=auth, content=b"")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "GET"


# -- tasks ----------------------------------------------------------------------

def test_tasks_xml_oldest_first_and_params_round_trip(http, store, creds):
    first = store.queue_task("pc-0042", "RunScript", {"script": "echo hi"}, timeout=30)
    second = store.queue_task("pc-0042", "Odd<Type>&\"", TRICKY)
    given = "0b8e8c5e-3f7a-4f63-9d8f-2a61c1e0e4a1"
    cdata = '<Computer mac="00:11:22:33:44:55" action="boot-automation"/>'
    ids = store.queue_xml("pc-0042", f"""<?xml version="1.0" encoding="UTF-8"?>
<ClientTasks client="pc-0042">
  <Task id="{given}" type="UpdateSBSInfo" timeout="300">
    <Parameters>
      <Parameter name="kind">update</Parameter>
      <Parameter name="payload"><![CDATA[{cdata}]]></Parameter>
    </Parameters>
  </Task>
  <Task type="RunScript"><Parameters><Parameter name="script">true</Parameter></Parameters></Task>
</ClientTasks>""")
    assert ids[0] == given and uuid.UUID(ids[1])

    resp = http.get("/api/v1/clients/pc-0042/tasks")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/xml"
    root = ET.fromstring(resp.content)                     # well-formed
    assert root.tag == "ClientTasks" and root.get("client") == "pc-0042"

    doc = xmltodict.parse(resp.content, strip_whitespace=False,
                          force_list=("Task", "Parameter"))["ClientTasks"]
    tasks = doc["Task"]
    assert [t["@id"] for t in tasks] == [first, second, given, ids[1]]
    assert tasks[0]["@type"] == "RunScript" and tasks[0]["@timeout"] == "30"
    assert "@timeout" not in tasks[1]
    assert tasks[1]["@type"] == "Odd<Type>&\""

    def params(task):
        return {p["@name"]: p.get("#text", "") for p in task["Parameters"]["Parameter"]}

    got = params(tasks[1])
    assert list(got) == list(TRICKY)
    for name, value in TRICKY.items():
        assert got[name].encode("utf-8") == value.encode("utf-8"), name
    assert params(tasks[2]) == {"kind": "update", "payload": cdata}
    assert params(tasks[0]) == {"script": "echo hi"}


def test_queue_validation(store, creds):
    with pytest.raises(InvalidRequest, match="U\\+0000"):
        store.queue_task("pc-0042", "RunScript", {"script": "a\x00b"})
    with pytest.raises(InvalidRequest, match="UUID"):
        store.queue_task("pc-0042", "RunScript", {}, task_id="not-a-uuid")
    with pytest.raises(InvalidRequest, match="CDATA"):
        store.queue_xml("pc-0042", '<Task type="T"><Parameters><Parameter name="p">'
                                   "<Computer/></Parameter></Parameters></Task>")
    with pytest.raises(InvalidRequest, match="not well-formed"):
        store.queue_xml("pc-0042", "<ClientTasks><Task></ClientTasks>")
    with pytest.raises(Exception, match="unknown client"):
        store.queue_task("nobody", "RunScript", {})
    # bare <Task> elements (more than one, no root) are accepted; all or nothing
    ids = store.queue_xml("pc-0042", '<?xml version="1.0"?>\n<Task type="A"/>\n<Task type="B"/>')
    assert [t["type"] for t in store.pending_tasks("pc-0042")] == ["A", "B"]
    with pytest.raises(InvalidRequest, match="already queued"):
        store.queue_xml("pc-0042", f'<Task type="C"/><Task id="{ids[0]}" type="D"/>')
    assert len(store.pending_tasks("pc-0042")) == 2


# -- status -----------------------------------------------------------------------

def test_status_dedup_on_event_id(http, store):
    task = store.queue_task("pc-0042", "RunScript", {"script": "true"})
    ev = event(task, 1, "received")
    for _ in range(2):
        resp = http.post("/api/v1/clients/pc-0042/status", json={"events": [ev]})
        assert resp.status_code == 200
        assert resp.json() == {"accepted": [ev["event_id"]]}
    assert len(store.events(task)) == 1
    two = [event(task, 2, "running"), event(task, 3, "progress", progress=42.5)]
    resp = http.post("/api/v1/clients/pc-0042/status", json={"events": [ev] + two})
    assert resp.json()["accepted"] == [ev["event_id"]] + [e["event_id"] for e in two]
    stored = store.events(task)
    assert [(e["seq"], e["state"], e["progress"]) for e in stored] == [
        (1, "received", None), (2, "running", None), (3, "progress", 42.5)]
    assert store.request_counts("pc-0042")["status"] == 3


def test_malformed_events_not_accepted(http, store, caplog):
    mine = store.queue_task("pc-0042", "RunScript", {"script": "true"})
    store.enroll("pc-other")
    theirs = store.queue_task("pc-other", "RunScript", {"script": "true"})
    good = event(mine, 1, "received")
    missing = event(mine, 2, "running")
    del missing["at"]
    bad = [
        missing,
        event(mine, 2, "exploded"),                 # bad state name
        event(theirs, 1, "received"),               # another client's task
        event(str(uuid.uuid4()), 1, "received"),    # unknown task
        event(mine, "2", "running"),                # bad types...
        event(mine, 2, "progress", progress=101),
        event(mine, 2, "progress", progress=True),
        event(mine, 2, "running", details=[1]),
        event(mine, 2, "running", event_id="not-a-uuid"),
        event(mine, 2, "running", at="yesterday"),
        "not an object",
    ]
    with caplog.at_level(logging.WARNING, logger="taskserver"):
        resp = http.post("/api/v1/clients/pc-0042/status", json={"events": [good] + bad})
    assert resp.status_code == 200
    assert resp.json() == {"accepted": [good["event_id"]]}
    assert [e["event_id"] for e in store.events(mine)] == [good["event_id"]]
    assert store.events(theirs) == []
    reasons = [r.getMessage() for r in caplog.records if "not accepted" in r.getMessage()]
    assert len(reasons) == len(bad)
    assert any("missing field(s) at" in r for r in reasons)
    assert any("does not belong" in r for r in reasons)
    for body in (b"{", b'{"events": 3}', b"[]", b'{"events": [NaN]}'):
        resp = http.post("/api/v1/clients/pc-0042/status", content=body)
        assert resp.status_code == 400 and resp.json()["error"]


def test_a_task_is_listed_until_the_agent_has_taken_it(http, store):
    """Listed on every pull until a status of it is stored (the agent's outbox
    had it), then no more, so the next page goes on after it; pending until
    its terminal status."""
    done = store.queue_task("pc-0042", "RunScript", {"script": "true"})
    waiting = store.queue_task("pc-0042", "RunScript", {"script": "sleep 1"})

    def listed():
        doc = xmltodict.parse(http.get("/api/v1/clients/pc-0042/tasks").content,
                              force_list=("Task",))["ClientTasks"]
        return [t["@id"] for t in (doc or {}).get("Task", [])]

    assert listed() == [done, waiting]
    assert listed() == [done, waiting]                 # no status yet: listed again
    events = [event(done, 1, "received"), event(done, 2, "running")]
    http.post("/api/v1/clients/pc-0042/status", json={"events": events})
    assert listed() == [waiting]                       # taken: the agent holds it
    assert store.wait_terminal([done], 0.05) is False
    assert [t["task_id"] for t in store.pending_tasks("pc-0042")] == [done, waiting]

    waiter = {}
    thread = threading.Thread(target=lambda: waiter.setdefault(
        "ok", store.wait_terminal([done], 5)))
    thread.start()
    final = event(done, 3, "succeeded", progress=100, details={"exit_code": 0})
    assert http.post("/api/v1/clients/pc-0042/status",
                     json={"events": [final]}).json()["accepted"] == [final["event_id"]]
    thread.join(5)
    assert waiter == {"ok": True}
    assert [t["task_id"] for t in store.pending_tasks("pc-0042")] == [waiting]
    history = store.history(client_id="pc-0042")
    assert [(h["task_id"], h["state"]) for h in history] == [(done, "succeeded"),
                                                             (waiting, "queued")]
    assert history[0]["events"][-1]["details"] == {"exit_code": 0}
    # the agent resending the terminal event (same event_id) is still accepted
    assert http.post("/api/v1/clients/pc-0042/status",
                     json={"events": [final]}).json()["accepted"] == [final["event_id"]]


# -- HTTP behaviour -----------------------------------------------------------------

def test_keep_alive_50_gets_on_one_connection(http, store, server):
    store.queue_task("pc-0042", "RunScript", {"script": "echo hi"})
    http.get("/api/v1/clients/pc-0042/tasks")          # connect
    times = []
    for _ in range(50):
        start = time.perf_counter()
        resp = http.get("/api/v1/clients/pc-0042/tasks")
        times.append(time.perf_counter() - start)
        assert resp.status_code == 200
        assert resp.headers.get("connection", "").lower() != "close"
    assert len(server._httpd._open) == 1               # one kept-alive connection served all
    print(f"\nkeep-alive GET /tasks: mean {sum(times) / len(times) * 1000:.2f} ms, "
          f"max {max(times) * 1000:.2f} ms over {len(times)} requests")


def test_oversized_body_and_fault_and_restart(server, creds, store):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"POST /api/v1/clients/pc-0042/status HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + creds["token"].encode() +
                     b"\r\nContent-Length: 17000000\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"Connection: close" in answer

    auth = {"Authorization": f"Bearer {creds['token']}"}
    with httpx.Client(base_url=server.url, headers=auth, timeout=5) as client:
        assert client.get("/api/v1/clients/pc-0042/tasks").status_code == 200
        before = store.request_counts("pc-0042")["tasks"]
        server.set_fault(503)
        assert client.get("/api/v1/clients/pc-0042/tasks").status_code == 503
        assert client.get("/api/v1/clients/pc-0042/tasks").status_code == 503
        server.set_fault(None)
        assert store.request_counts("pc-0042")["tasks"] == before + 2
        port = server.port
        server.stop()
        with pytest.raises(httpx.TransportError):
            client.get("/api/v1/clients/pc-0042/tasks")
        server.start()
        assert server.port == port
        assert client.get("/api/v1/clients/pc-0042/tasks").status_code == 200


# -- tickle ---------------------------------------------------------------------------

def test_tickle_reaches_a_real_listener(server, store, tmp_path):
    creds = store.enroll("pc-tick")
    listener = TickleListener("pc-tick", bytes.fromhex(creds["tickle_key"]))
    try:
        with pytest.raises(TickleFailed, match="no tickle address .* dsagent-server set-tickle "
                                               "--client pc-tick --addr HOST:PORT"):
            server.tickle("pc-tick")
        run_cli("set-tickle", "--db", store.db_path, "--client", "pc-tick",
                "--addr", f"127.0.0.1:{listener.port}")
        assert store.client("pc-tick")["tickle_addr"] == f"127.0.0.1:{listener.port}"
        assert server.tickle("pc-tick") == "OK"
        assert server.tickle("pc-tick") == "OK"         # a fresh nonce every time
        assert len(listener.lines) == 2
        assert listener.lines[0].startswith(b"DSTICKLE/1 pc-tick ")
        proc = run_cli("tickle", "--db", store.db_path, "--client", "pc-tick")
        assert proc.stdout.strip() == "OK"
    finally:
        listener.close()
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    store.set_tickle_addr("pc-tick", f"127.0.0.1:{port}")
    with pytest.raises(TickleFailed, match=f"127.0.0.1:{port}"):
        server.tickle("pc-tick")
    proc = run_cli("tickle", "--db", store.db_path, "--client", "pc-tick", check=False)
    assert proc.returncode == 1 and "cannot tickle" in proc.stderr
    for client, addr, error in (("nobody", "127.0.0.1:50199", "unknown client 'nobody'"),
                                ("pc-tick", "127.0.0.1", "--addr: ")):
        proc = run_cli("set-tickle", "--db", store.db_path, "--client", client, "--addr", addr,
                       check=False)
        assert proc.returncode == 1 and error in proc.stderr, proc.stderr
    assert store.client("pc-tick")["tickle_addr"] == f"127.0.0.1:{port}"


# -- command line ---------------------------------------------------------------------

def test_cli_enroll_queue_status(tmp_path):
    db = tmp_path / "cli.db"
    config = tmp_path / "etc" / "agent.toml"
    proc = run_cli("enroll", "--db", db, "--client-id", "pc-cli", "--tickle", "127.0.0.1:50199",
                   "--agent-config", config, "--server-url", "http://127.0.0.1:8080",
                   "--state-dir", tmp_path / "state", "--set", "cta.poll_interval_s=5")
    lines = dict(line.split(" = ", 1) for line in proc.stdout.splitlines())
    assert set(lines) == {"client_id", "token", "tickle_key"}
    assert lines["client_id"] == "pc-cli"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    cfg = load_config(config)
    creds = cfg.credentials()
    assert (creds.client_id, creds.token, creds.tickle_key.hex()) == (
        "pc-cli", lines["token"], lines["tickle_key"])
    assert cfg.get("cta", "poll_interval_s") == 5
    assert run_cli("enroll", "--db", db, "--client-id", "pc-cli", check=False).returncode == 1

    payload = tmp_path / "payload.txt"
    payload.write_bytes("a\r\nb <&> ü\n".encode())
    one = run_cli("queue", "--db", db, "--client", "pc-cli", "--type", "RunScript",
                  "--param", "script=echo a=b", "--param-file", f"payload={payload}",
                  "--timeout", "60").stdout.split()
    doc = tmp_path / "tasks.xml"
    doc.write_text('<ClientTasks><Task type="UpdateSBSInfo"><Parameters>'
                   '<Parameter name="kind">update</Parameter></Parameters></Task>'
                   '<Task type="RunScript"/></ClientTasks>')
    two = run_cli("queue", "--db", db, "--client", "pc-cli", doc).stdout.split()
    assert len(one) == 1 and len(two) == 2
    bad = run_cli("queue", "--db", db, "--client", "nobody", "--type", "X", check=False)
    assert bad.returncode == 1 and "unknown client" in bad.stderr

    with TaskStore(str(db)) as store:
        task = store.pending_tasks("pc-cli")[0]
        assert task["params"] == {"script": "echo a=b", "payload": "a\r\nb <&> ü\n"}
        assert task["timeout"] == 60
        store.record_events("pc-cli", [
            event(one[0], 1, "received"), event(one[0], 2, "running"),
            event(one[0], 3, "succeeded", progress=100, message="exit code 0")])

    table = run_cli("status", "--db", db).stdout
    print("\n" + table)
    for header in ("TASK ID", "TYPE", "SEQ", "STATE", "PROGRESS", "AT", "MESSAGE"):
        assert header in table
    assert one[0] in table and all(t in table for t in two)
    assert "succeeded" in table and "exit code 0" in table and "100%" in table
    assert "3 tasks: 2 queued, 1 succeeded" in table
    history = json.loads(run_cli("status", "--db", db, "--task", one[0], "--json").stdout)
    assert [e["state"] for e in history[0]["events"]] == ["received", "running", "succeeded"]
    missing = run_cli("status", "--db", db, "--task", str(uuid.uuid4()), check=False)
    assert missing.returncode == 1 and "no such task" in missing.stderr


def test_cli_serve_until_sigterm(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskserver", "serve", "--db", str(tmp_path / "s.db"),
         "--listen", "127.0.0.1:0", "--enrollment-key", "k", "--poll-interval", "9"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        resp = httpx.post(f"{url}/api/v1/register", json={"name": "box", "enrollment_key": "k"})
        assert resp.status_code == 201 and resp.json()["poll_interval_s"] == 9
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_queue_for_many_clients_is_one_transaction_all_or_none(store):
    for cid in ("pc-a", "pc-b"):
        store.enroll(cid)
    with pytest.raises(UnknownClient):
        store.queue_for_clients({"pc-a": ("RunScript", {"script": "true"}, None),
                                 "nobody": ("RunScript", {"script": "true"}, None)})
    assert store.pending_tasks("pc-a") == []               # none queued: all or none
    ids = store.queue_for_clients({c: ("RunScript", {"script": f"echo {c}"}, 60)
                                   for c in ("pc-a", "pc-b")})
    assert list(ids) == ["pc-a", "pc-b"]
    for cid, task_id in ids.items():
        [task] = store.pending_tasks(cid)
        assert (task["task_id"], task["params"], task["timeout"]) == (
            task_id, {"script": f"echo {cid}"}, 60)
