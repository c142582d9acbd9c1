"""End to end over real sockets and processes: reference task server +
`dsagent run` (objecthost, CTA, ctdataloader) on loopback ports."""

import re
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agent.common.events import TERMINAL
from conftest import listening, wait_until
from taskserver.loopback import LoopbackChain

BACKENDS = ("sqlite", "postgresql")   # conftest.py: each test on both databases


@pytest.fixture
def make_chain(tmp_path, store_target):
    chains = []

    def make(**kwargs):
        chain = LoopbackChain(tmp_path / f"chain{len(chains)}", db=store_target, **kwargs)
        chains.append(chain)
        return chain.start()

    yield make
    for chain in chains:
        chain.stop()


def assert_clean_history(chain, task_id):
    """Seqs 1..n without gaps or repeats, in order, exactly one terminal, last."""
    events = chain.events(task_id)
    states = [e["state"] for e in events]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), events
    assert states[0] == "received", states
    assert sum(s in TERMINAL for s in states) == 1 and states[-1] in TERMINAL, states
    if states[1:-1]:
        assert states[1] == "running" and set(states[2:-1]) <= {"progress"}, states
    return states


def script_ran(path, task_id):
    return path.read_text().split().count(task_id) if path.exists() else 0


def test_queue_tickle_statuses_in_order(make_chain):
    chain = make_chain()
    ok = chain.queue("RunScript", {"script": "echo hello"})
    third_party = chain.queue("Example.Echo", {"text": "dsagent"})
    unknown = chain.queue("NoSuchType", {"x": "1"})
    bad = chain.queue("RunScript", {"script": ""})
    assert chain.tickle() == "OK"
    assert chain.wait([ok, third_party, unknown, bad], 30)
    assert assert_clean_history(chain, ok) == ["received", "running", "succeeded"]
    assert chain.events(ok)[-1]["details"]["stdout_tail"] == "hello\n"
    assert assert_clean_history(chain, third_party) == ["received", "running", "progress", "succeeded"]
    assert chain.events(third_party)[-1]["details"] == {"reversed": "tnegasd"}
    assert assert_clean_history(chain, unknown) == ["received", "failed"]
    assert "unknown task type 'NoSuchType'" in chain.events(unknown)[-1]["message"]
    assert assert_clean_history(chain, bad) == ["received", "failed"]
    assert "parameter 'script' is empty" in chain.events(bad)[-1]["message"]
    log = chain.log_path.read_text()
    assert f"task={ok}" in log  # support staff can follow one task in the log


def test_lost_tickle_is_covered_by_the_poll(make_chain):
    chain = make_chain(poll_interval_s=1)
    chain.wait_first_pull()  # so the task comes with a poll, not the start-up pull
    task = chain.queue("RunScript", {"script": "true"})  # no tickle
    assert chain.wait([task], 15)
    assert assert_clean_history(chain, task)[-1] == "succeeded"


def test_redelivered_task_never_runs_twice(make_chain, tmp_path):
    chain = make_chain(max_concurrent_tasks=1)
    ran = tmp_path / "ran.txt"
    slow = chain.queue("RunScript", {"script": f"sleep 1; echo $DSAGENT_TASK_ID >> {ran}"})
    assert chain.tickle() == "OK"
    for _ in range(5):  # pulls while it runs (the reference server lists it once)
        time.sleep(0.2)  # a sleep, not a wait: pulls spread over the task's run
        assert chain.tickle() == "OK"
    assert chain.wait([slow], 20)
    first = chain.events(slow)
    # the server "loses" the task's statuses and lists the task again
    with chain.store._write() as db:
        db.execute("DELETE FROM events WHERE task_id=? AND state IN "
                   "('succeeded','failed','cancelled','timed_out')", (slow,))
        db.execute("UPDATE tasks SET terminal_state=NULL, delivered=0 WHERE task_id=?",
                   (slow,))
    assert not chain.store.is_terminal(slow)
    assert chain.tickle() == "OK"
    assert chain.wait([slow], 20)
    again = chain.events(slow)
    assert again[-1]["event_id"] == first[-1]["event_id"]  # the original terminal event
    assert script_ran(ran, slow) == 1
    assert_clean_history(chain, slow)


def _kill_mid_run(chain, tmp_path, victim):
    ran = tmp_path / "ran.txt"
    tasks = [chain.queue("RunScript", {"script": f"sleep 0.3; echo $DSAGENT_TASK_ID >> {ran}"})
             for _ in range(12)]
    assert chain.tickle() == "OK"
    wait_until(lambda: sum(chain.store.is_terminal(t) for t in tasks) >= 3, 20,
               "three tasks to end")
    proc = chain.child(victim)
    proc.send_signal(signal.SIGKILL)
    proc.wait(5)
    # the supervisor restarts it; a tickle (or the startup pull) resumes work
    def restarted():
        new = chain.child(victim)
        return new is not None and new.pid != proc.pid

    wait_until(restarted, 20, f"the supervisor to restart the {victim}")
    wait_until(lambda: listening(chain.cta_port), 20, "the CTA to listen (for the tickle)")
    chain.tickle()
    assert chain.wait(tasks, 60), [chain.events(t)[-1:] for t in tasks]
    finals = []
    for task in tasks:
        finals.append(assert_clean_history(chain, task)[-1])
        assert script_ran(ran, task) <= 1
    return tasks, finals, ran


def test_cta_sigkill_mid_run_loses_and_duplicates_nothing(make_chain, tmp_path):
    chain = make_chain(max_concurrent_tasks=2)
    tasks, finals, ran = _kill_mid_run(chain, tmp_path, "cta")
    # tasks interrupted while running are failed (never re-run); the rest succeed
    assert finals.count("failed") <= 2
    for task, final in zip(tasks, finals):
        if final == "failed":
            assert "interrupted" in chain.events(task)[-1]["message"]
        else:
            assert final == "succeeded" and script_ran(ran, task) == 1
    assert "cta killed by signal 9; restarting" in chain.log_path.read_text()


def test_ctdataloader_sigkill_loses_and_duplicates_nothing(make_chain, tmp_path):
    chain = make_chain(max_concurrent_tasks=2)
    tasks, finals, ran = _kill_mid_run(chain, tmp_path, "ctdataloader")
    assert finals == ["succeeded"] * len(tasks)
    assert all(script_ran(ran, t) == 1 for t in tasks)


def test_objecthost_restart_keeps_serving_tickles(make_chain):
    chain = make_chain()
    old = chain.child("objecthost")
    old.send_signal(signal.SIGKILL)
    old.wait(5)
    answer = wait_until(chain.tickle, 15, "the restarted objecthost to answer a tickle")
    assert answer == "OK"
    task = chain.queue("RunScript", {"script": "true"})
    chain.tickle()
    assert chain.wait([task], 15)


def test_server_outage_then_everything_arrives(make_chain):
    chain = make_chain()
    port = chain.server.port
    chain.stop_server()
    task = chain.store.queue_task(chain.client_id, "RunScript", {"script": "true"})
    time.sleep(2)  # a sleep, not a wait: an outage that lasts is the condition tested
    chain.start_server(port=port)
    chain.tickle()
    assert chain.wait([task], 60)
    assert assert_clean_history(chain, task)[-1] == "succeeded"


class _ScriptedServer(BaseHTTPRequestHandler):
    """A task server peer that first answers a malformed document."""

    protocol_version = "HTTP/1.1"
    answers: list = []
    posted: list = []
    gets = 0

    def do_GET(self):
        cls = type(self)
        cls.gets += 1
        body = cls.answers[min(cls.gets - 1, len(cls.answers) - 1)]
        self.send_response(200)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        import json
        data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).posted.extend(data["events"])
        body = json.dumps({"accepted": [e["event_id"] for e in data["events"]]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_oversize_and_malformed_documents_are_logged_and_pull_retried(tmp_path):
    good_id = "0b8e8c5e-3f7a-4f63-9d8f-2a61c1e0e4a1"
    _ScriptedServer.answers = [
        b"<ClientTasks>" + b" " * (17 * 1024 * 1024) + b"</ClientTasks>",  # over the limit
        b"<ClientTasks><Task id='x'",  # truncated: not well-formed
        f'<ClientTasks client="demo-pc"><Task id="{good_id}" type="RunScript"><Parameters>'
        '<Parameter name="script">true</Parameter></Parameters></Task></ClientTasks>'.encode()]
    _ScriptedServer.posted, _ScriptedServer.gets = [], 0
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _ScriptedServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    chain = LoopbackChain(tmp_path / "c")
    chain.start_server()
    chain.creds = chain.store.enroll(chain.client_id, tickle_addr=f"127.0.0.1:{chain.objecthost_port}")
    chain.server_url = f"http://127.0.0.1:{httpd.server_address[1]}"  # point the agent at the peer
    try:
        chain.start_agent()
        wait_until(lambda: any(e["state"] in TERMINAL for e in _ScriptedServer.posted), 20,
                   "a terminal status posted")
        states = [e["state"] for e in _ScriptedServer.posted if e["task_id"] == good_id]
        assert states == ["received", "running", "succeeded"]
        assert _ScriptedServer.gets >= 3
        log = chain.log_path.read_text()
        assert "pull failed: GET" in log and "larger than 16777216 bytes" in log
        assert "pull failed: not well-formed XML" in log
        assert chain.child("cta").is_running()
    finally:
        chain.stop_agent()
        chain.stop_server()
        httpd.shutdown()


def test_sigterm_drains_running_task_and_uploads_its_end(make_chain):
    chain = make_chain()
    task = chain.queue("RunScript", {"script": "sleep 1.5"})
    chain.tickle()
    wait_until(lambda: len(chain.events(task)) >= 2, 10, "the task's running status")
    assert [e["state"] for e in chain.events(task)] == ["received", "running"]
    assert chain.stop_agent() == 0
    assert assert_clean_history(chain, task)[-1] == "succeeded"


def test_agent_without_token_registers_then_runs_tasks(make_chain):
    chain = make_chain(enrollment_key="site-secret")
    state = chain.workdir / "state"
    assert (state / "credentials.json").stat().st_mode & 0o777 == 0o600
    assert chain.store.client(chain.client_id) is not None
    task = chain.queue("RunScript", {"script": "true"})
    assert chain.tickle() == "OK"
    assert chain.wait([task], 20)
    assert "registered as" in chain.log_path.read_text()


def test_bad_config_stops_the_start_naming_the_key(tmp_path):
    import subprocess
    import sys
    config = tmp_path / "agent.toml"
    config.write_text('[agent]\nserver_url = "http://127.0.0.1:1"\nstate_dir = "/tmp/x"\n'
                      "[cta]\npoll_interval = 5\n")
    result = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(config)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert f"{config}: unknown key 'poll_interval' in [cta]" in result.stderr


def test_cta_crash_leaves_no_handler_process_running(make_chain):
    import uuid

    import psutil
    chain = make_chain()
    marker = uuid.uuid4().hex
    task = chain.queue("RunScript", {"script": f"sh -c 'sleep 300; : {marker}'"})
    chain.tickle()
    wait_until(lambda: len(chain.events(task)) >= 2, 10, "the task's running status")

    def leftovers():
        return [p for p in psutil.process_iter(["cmdline"])
                if marker in " ".join(p.info["cmdline"] or [])]

    # `running` is recorded just before the script starts
    wait_until(leftovers, 10, "the script's process")
    cta = chain.child("cta")
    cta.send_signal(signal.SIGKILL)
    wait_until(lambda: leftovers() == [], 10, "no process of the script left")
    chain.tickle()
    assert chain.wait([task], 20)
    assert "interrupted" in chain.events(task)[-1]["message"]


def test_prestarted_workers_stay_alive(make_chain):
    """Workers die with the thread that started them (PR_SET_PDEATHSIG), so
    they must be started by a thread that lives as long as the CTA."""
    chain = make_chain(max_concurrent_tasks=2)

    def live_workers():
        workers = [p for p in chain.child("cta").children() if p.status() != "zombie"]
        assert len(workers) == 2, workers
        return workers

    pids = {p.pid for p in wait_until(live_workers, 15, "two prestarted workers")}
    # A sleep, not a wait: the failure is the workers dying a little later
    # (and being replaced when a task comes before they are ready).
    time.sleep(1.5)
    assert {p.pid for p in live_workers()} == pids
    task = chain.queue("RunScript", {"script": "true"})
    chain.tickle()
    assert chain.wait([task], 15)
    assert {p.pid for p in chain.child("cta").children()} == pids  # reused, not replaced


def test_uploads_resume_as_soon_as_the_cta_reaches_the_server_again(make_chain):
    chain = make_chain()
    port = chain.server.port
    task = chain.queue("RunScript", {"script": "sleep 1"})
    chain.tickle()
    wait_until(lambda: len(chain.events(task)) >= 2, 10, "the task's running status")
    chain.stop_server()
    # the task ends (its last event is the one that cannot be uploaded) and the
    # uploader's backoff grows until its next retry is well over 3 s away
    wait_until(lambda: any(float(s) >= 4 for s in re.findall(
        r"upload failed: .*; retry in ([\d.]+) s", chain.log_path.read_text())), 30,
        "an upload retry 4 s or more away")
    chain.start_server(port=port)
    started = time.monotonic()
    chain.tickle()  # the CTA's pull succeeds and tells the uploader
    assert chain.wait([task], 20)
    assert time.monotonic() - started < 3, "the uploader waited out its backoff"
    assert "the CTA reached the server again" in chain.log_path.read_text()
