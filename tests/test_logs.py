"""Logs a support engineer can follow: per-process JSON files with task and
event ids, rotation shared by several writers, journald prefixes, `dsagent
logs` (merge, --task, --since, --follow, --json) and the remote trace."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from agent.tools import trace as trace_mod
from agent.common.config import check_config
from agent.common.errors import ConfigError
from agent.tools.logview import LogFollower, log_files, parse_since, read_records
from agent.common.tickle import sign
from agent.tools.trace import TraceServer, _challenge, load_trace_key
from conftest import wait_until
from taskserver.loopback import LoopbackChain, free_port

PY = sys.executable


def _writer(log_dir: Path, process: str, lines: int, *, max_bytes=0, backups=5,
            fmt="text", env_extra=None, stderr=subprocess.DEVNULL, task="t-1"):
    """A separate process logging ``lines`` records through agent.common.logsetup."""
    code = textwrap.dedent(f"""
        import logging
        from agent.common.logsetup import LogSettings, setup_logging, task_context
        setup_logging({process!r}, settings=LogSettings(dir={str(log_dir)!r}, format={fmt!r},
                      max_bytes={max_bytes}, backups={backups}))
        log = logging.getLogger("probe")
        with task_context({task!r}):
            for i in range({lines}):
                log.info("line %d of {process} " + "x" * 60, i, extra={{"event_id": f"e-{{i}}"}})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("with a traceback")
    """)
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.Popen([PY, "-c", code], stderr=stderr, env=env)


def test_file_records_carry_process_task_and_event(tmp_path):
    assert _writer(tmp_path, "cta", 3).wait(30) == 0
    records = [json.loads(line) for line in (tmp_path / "cta.log").read_text().splitlines()]
    assert [r["msg"].split(" of ")[0] for r in records[:3]] == ["line 0", "line 1", "line 2"]
    first = records[0]
    assert first["process"] == "cta" and first["task_id"] == "t-1" and first["event_id"] == "e-0"
    assert first["ts"].endswith("Z") and first["level"] == "INFO" and first["pid"] > 0
    assert "ValueError: boom" in records[-1]["exc"]
    assert oct((tmp_path / "cta.log").stat().st_mode & 0o777) == "0o640"


def test_stderr_is_text_json_on_request_and_journald_prefixed(tmp_path):
    out = tmp_path / "stderr.txt"
    with open(out, "wb") as fh:
        assert _writer(tmp_path / "a", "cta", 1, stderr=fh).wait(30) == 0
    text = out.read_text().splitlines()[0]
    assert " INFO cta[" in text and " task=t-1 event=e-0: line 0" in text and text[:4] == "20" + text[2:4]

    with open(out, "wb") as fh:
        assert _writer(tmp_path / "b", "cta", 1, fmt="json", stderr=fh).wait(30) == 0
    assert json.loads(out.read_text().splitlines()[0])["event_id"] == "e-0"

    with open(out, "wb") as fh:
        st = os.fstat(fh.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert _writer(tmp_path / "c", "cta", 1, stderr=fh, env_extra=env).wait(30) == 0
    lines = out.read_text().splitlines()
    assert lines[0].startswith("<6>INFO cta[")          # priority, no timestamp: journald adds it
    assert any(line.startswith("<3>") and "ValueError" in line for line in lines)  # every line


def test_rotation_shared_by_several_processes_loses_no_line(tmp_path):
    writers = [_writer(tmp_path, "worker", 1500, max_bytes=16_000, backups=100) for _ in range(3)]
    assert [w.wait(120) for w in writers] == [0, 0, 0]
    files = log_files(tmp_path)
    assert len(files) > 5, files                       # it did rotate, many times
    lines = [line for path in files for line in path.read_text().splitlines()]
    records = [json.loads(line) for line in lines]     # no torn line anywhere
    assert sum(r["msg"].startswith("line ") for r in records) == 4500
    assert len({(r["pid"], r["msg"]) for r in records}) == len(records)
    for path in files:
        assert path.stat().st_size < 16_000 + 4096, path   # at most one record past the limit


def test_rotation_keeps_only_the_configured_backups(tmp_path):
    assert _writer(tmp_path, "cta", 800, max_bytes=8_000, backups=2).wait(60) == 0
    assert sorted(p.name for p in log_files(tmp_path)) == ["cta.log", "cta.log.1", "cta.log.2"]


def test_read_records_merges_files_in_time_order_and_filters(tmp_path):
    for name in ("objecthost", "cta", "ctdataloader"):
        assert _writer(tmp_path, name, 20, task=f"task-{name}").wait(30) == 0
    records = read_records(tmp_path)
    assert [r["ts"] for r in records] == sorted(r["ts"] for r in records)
    assert {r["process"] for r in records} == {"objecthost", "cta", "ctdataloader"}
    only = read_records(tmp_path, task="task-ct")       # a prefix
    assert {r["task_id"] for r in only} == {"task-cta", "task-ctdataloader"}
    assert read_records(tmp_path, since=parse_since("1h")) == records
    assert read_records(tmp_path, since=parse_since("2999-01-01T00:00")) == []


def test_parse_since_refuses_nonsense():
    with pytest.raises(ConfigError, match="--since"):
        parse_since("yesterday-ish")
    assert parse_since("90s", now=1_000_000.0) == "1970-01-12T13:45:10.000Z"


def test_follower_sees_new_lines_new_files_and_rotations(tmp_path):
    follower = LogFollower(tmp_path, poll_s=0.05)
    assert follower.poll() == []
    assert _writer(tmp_path, "cta", 300, max_bytes=6_000, backups=50).wait(60) == 0
    seen = [r for r in follower.poll() if r["msg"].startswith("line ")]
    # the first file appeared after the follower started; older generations it
    # never had open are not replayed, but nothing it saw is torn or repeated
    assert seen and len({r["msg"] for r in seen}) == len(seen)
    assert _writer(tmp_path, "cta", 5, task="later").wait(30) == 0
    later = [r for r in follower.poll() if r.get("task_id") == "later"]
    assert len([r for r in later if r["msg"].startswith("line ")]) == 5
    follower.close()


def test_logs_command_follow_prints_new_lines(tmp_path):
    (tmp_path / "cta.log").write_text("")
    viewer = subprocess.Popen([PY, "-m", "agent", "logs", "--log-dir", str(tmp_path), "--follow",
                               "--task", "follow-me"], stdout=subprocess.PIPE, text=True)
    try:
        # once it holds cta.log open, it shows every line written after
        wait_until(lambda: any(f.path.endswith("/cta.log")
                               for f in psutil.Process(viewer.pid).open_files()), 10,
                   "the viewer to open cta.log")
        assert _writer(tmp_path, "worker", 3, task="follow-me").wait(30) == 0
        assert _writer(tmp_path, "worker", 3, task="someone-else").wait(30) == 0
        got = [viewer.stdout.readline() for _ in range(3)]
    finally:
        viewer.kill()
        viewer.wait()
    assert all("task=follow-me" in line and "worker[" in line for line in got), got


def test_logs_command_without_a_log_folder_says_so(tmp_path):
    result = subprocess.run([PY, "-m", "agent", "logs", "--log-dir", str(tmp_path / "none")],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "no log folder" in result.stderr


def test_logging_config_is_checked():
    base = {"agent": {"server_url": "http://127.0.0.1:1", "state_dir": "/tmp/x"}}
    with pytest.raises(ConfigError, match=r"\[logging\] format"):
        check_config({**base, "logging": {"format": "xml"}}, "a.toml")
    with pytest.raises(ConfigError, match=r"\[logging\] level"):
        check_config({**base, "logging": {"level": "LOUD"}}, "a.toml")
    with pytest.raises(ConfigError, match=r"\[trace\] listen"):
        check_config({**base, "trace": {"listen": "nowhere"}}, "a.toml")


# ---- one task followed across the whole chain --------------------------------

def test_one_task_can_be_followed_across_every_process(tmp_path):
    with LoopbackChain(tmp_path / "chain") as chain:
        chain.wait_first_pull()  # so the task comes with the tickle's pull, not the start's
        task_id = chain.queue("RunScript", {"script": "echo hi; exit 3"})
        assert chain.tickle() == "OK"
        assert chain.wait([task_id], 60)
        server_events = {e["event_id"]: e["state"] for e in chain.events(task_id)}

        def logged():
            result = subprocess.run(
                [PY, "-m", "agent", "logs", "--config", str(chain.config_path),
                 "--task", task_id[:8], "--json"], capture_output=True, text=True)
            records = [json.loads(line) for line in result.stdout.splitlines()]
            accepted = {r["event_id"] for r in records if r["process"] == "ctdataloader"}
            assert accepted >= set(server_events), (result.stderr, accepted)
            return result, records, accepted

        # the uploader logs right after the server's answer
        result, records, accepted = wait_until(logged, 10, "the uploader's line for each event",
                                               interval=0.2)
    assert result.returncode == 0, result.stderr
    assert {r["task_id"] for r in records if r["process"] != "objecthost"} == {task_id}
    assert {"objecthost", "cta", "worker", "ctdataloader"} <= {r["process"] for r in records}
    # the objecthost's line has no task (a tickle carries none): the tickle's
    # nonce links it to the CTA's `received` line of the pull it caused
    [tickled] = [r for r in records if r["process"] == "objecthost"]
    [received] = [r for r in records if r["process"] == "cta" and r["msg"].endswith(
        f"received (pulled after tickle {tickled['tickle']})")]
    assert "accepted" in tickled["msg"] and received["tickle"] == tickled["tickle"]
    # each event the server holds was recorded by the CTA and accepted by the
    # uploader, and both lines name it
    recorded = {r["event_id"] for r in records if r["process"] == "cta" and r["event_id"]}
    assert set(server_events) == recorded == accepted
    assert any("failed" in r["msg"] for r in records if r["process"] == "cta")
    text = subprocess.run([PY, "-m", "agent", "logs", "--config", str(chain.config_path),
                           "--task", task_id], capture_output=True, text=True).stdout
    first, second = text.splitlines()[:2]
    assert " objecthost[" in first and " tickle=" in first
    assert f"task={task_id}" in second and " event=" in second and " tickle=" in second


# ---- remote trace -------------------------------------------------------------

def _connect(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    greeting = sock.makefile("rb").readline()
    assert greeting.startswith(b"DSTRACE/1 ")
    return sock, greeting.split()[1].decode()


def _lines(sock):
    return sock.makefile("rb")


def test_trace_streams_live_lines_to_an_authenticated_viewer(tmp_path):
    key = load_trace_key(tmp_path, create=True)
    assert oct((tmp_path / "trace.key").stat().st_mode & 0o777) == "0o600"
    server = TraceServer("127.0.0.1", 0, key, tmp_path / "logs").start()
    try:
        sock, nonce = _connect(server.port)
        sock.sendall(f"AUTH {sign(key, _challenge(nonce))} t-9\n".encode())
        stream = _lines(sock)
        assert stream.readline() == b"OK\n"
        assert _writer(tmp_path / "logs", "cta", 3, task="t-9").wait(30) == 0
        assert _writer(tmp_path / "logs", "cta", 3, task="other").wait(30) == 0
        got = [json.loads(stream.readline()) for _ in range(3)]
        assert all(r["task_id"] == "t-9" for r in got), got
        sock.close()
    finally:
        server.close()


def test_trace_refuses_a_wrong_key_a_bad_frame_and_a_silent_viewer(tmp_path, monkeypatch):
    key = load_trace_key(tmp_path, create=True)
    monkeypatch.setattr(trace_mod, "AUTH_TIMEOUT_S", 0.5)
    server = TraceServer("127.0.0.1", 0, key, tmp_path / "logs").start()
    try:
        sock, nonce = _connect(server.port)
        sock.sendall(f"AUTH {sign(b'wrong key', _challenge(nonce))}\n".encode())
        assert _lines(sock).readline() == b"ERR bad-auth\n"
        sock, nonce = _connect(server.port)
        sock.sendall(b"HELLO\n")
        assert _lines(sock).readline() == b"ERR bad-frame\n"
        sock, nonce = _connect(server.port)               # says nothing: dropped
        assert _lines(sock).readline() == b"ERR bad-frame\n"
        sock, nonce = _connect(server.port)               # a replayed answer fails: fresh nonce
        old = sign(key, _challenge("0" * 32))
        sock.sendall(f"AUTH {old}\n".encode())
        assert _lines(sock).readline() == b"ERR bad-auth\n"
    finally:
        server.close()


def test_dsagent_run_serves_the_trace_and_dsagent_trace_shows_it(tmp_path):
    port = free_port()
    chain = LoopbackChain(tmp_path / "chain", extra_config=f'[trace]\nlisten = "127.0.0.1:{port}"\n')
    with chain:
        viewer = subprocess.Popen([PY, "-m", "agent", "trace", "--config", str(chain.config_path)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: any("watching" in r["msg"] for r in read_records(
                chain.workdir / "state" / "logs") if r["logger"] == "dsagent.trace"), 30,
                "the viewer to connect")
            task_id = chain.queue("RunScript", {"script": "true"})
            assert chain.tickle() == "OK"
            assert chain.wait([task_id], 60)
            lines = []
            deadline = time.monotonic() + 20
            while not any("succeeded" in line and task_id in line for line in lines):
                assert time.monotonic() < deadline and viewer.poll() is None, \
                    (lines, viewer.stderr.read() if viewer.poll() is not None else "")
                lines.append(viewer.stdout.readline())
        finally:
            viewer.kill()
            viewer.wait()
    assert any(f"task={task_id}" in line and "cta[" in line for line in lines)


# ---- bad input ---------------------------------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402


@given(st.text(max_size=300))
@settings(max_examples=300, deadline=None)
def test_parse_line_never_raises(line):
    from agent.tools.logview import parse_line
    record = parse_line(line)
    assert record is None or (isinstance(record, dict) and isinstance(record["ts"], str))


@given(st.text(max_size=60))
@settings(max_examples=300, deadline=None)
def test_parse_since_refuses_with_a_clear_error_only(text):
    try:
        assert parse_since(text).endswith("Z")
    except ConfigError as exc:
        assert "--since" in str(exc)


def test_garbage_in_a_log_file_is_skipped_not_fatal(tmp_path):
    assert _writer(tmp_path, "cta", 2).wait(30) == 0
    with open(tmp_path / "cta.log", "ab") as fh:
        fh.write(b"\xff\xfe not json\n{\"ts\": 5}\n[1, 2]\n{\"no\": \"ts\"}\n" + os.urandom(512) + b"\n")
    assert _writer(tmp_path, "cta", 1, task="after").wait(30) == 0
    records = read_records(tmp_path)
    assert [r["task_id"] for r in records if r["msg"].startswith("line ")] == ["t-1", "t-1", "after"]
    result = subprocess.run([PY, "-m", "agent", "logs", "--log-dir", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.count(": line ") == 3


@given(st.binary(max_size=300))
@settings(max_examples=60, deadline=None)
def test_trace_answers_any_request_with_a_refusal(tmp_path_factory, request_line):
    tmp = tmp_path_factory.mktemp("trace")
    key = load_trace_key(tmp, create=True)
    server = TraceServer("127.0.0.1", 0, key, tmp / "logs").start()
    try:
        sock, _ = _connect(server.port)
        sock.sendall(request_line + b"\n")
        answer = _lines(sock).readline()
        assert answer in (b"ERR bad-auth\n", b"ERR bad-frame\n"), answer
        sock.close()
        sock, nonce = _connect(server.port)       # and it still serves
        sock.sendall(f"AUTH {sign(key, _challenge(nonce))}\n".encode())
        assert _lines(sock).readline() == b"OK\n"
        sock.close()
    finally:
        server.close()
