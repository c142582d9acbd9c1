"""`dsagent enroll` against the reference task server on loopback."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import tomllib

import psutil
import pytest

from agent.common.config import load_config
from agent.common.serverapi import ServerAPI
from agent.common.taskxml import parse_client_tasks

DSAGENT = [sys.executable, "-m", "agent"]
KEY = "let-me-in"  # the enrollment key of the conftest server


# store and server: tests/conftest.py


def enroll(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(DSAGENT + ["enroll", *args], capture_output=True, text=True,
                          timeout=120)


def test_enroll_writes_a_private_config_the_agent_and_server_accept(tmp_path, server, store):
    path = tmp_path / "etc" / "dsagent" / "agent.toml"
    result = enroll("--server", server.url, "--key", KEY, "--config", str(path),
                    "--state-dir", str(tmp_path / "state"), "--name", "lab-pc-7")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"enrolled as lab-pc-7 with {server.url}; wrote {path}")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700  # created by enroll
    config = load_config(path)                                # what `dsagent run` does
    assert config.get("cta", "poll_interval_s") == 17         # the server's answer
    assert config.get("objecthost", "listen") == "0.0.0.0:50122"
    creds = config.credentials()
    assert creds.client_id == "lab-pc-7"
    # the server knows these credentials: a task queued for the client is listed to them
    task_id = store.queue_task(creds.client_id, "RunScript", {"script": "true"})
    api = ServerAPI(config.get("agent", "server_url"), creds.client_id, creds.token)
    try:
        listed = parse_client_tasks(api.get_tasks(1 << 20)).tasks
    finally:
        api.close()
    assert [t.id for t in listed] == [task_id]
    assert store.client("lab-pc-7")["tickle_key"] == creds.tickle_key.hex()


def test_existing_config_is_kept_without_force(tmp_path, server, store):
    path = tmp_path / "agent.toml"
    path.write_text("# the admin's\n")
    result = enroll("--server", server.url, "--key", KEY, "--config", str(path))
    assert result.returncode == 2
    assert f"{path} already exists; refusing to overwrite it" in result.stderr
    assert path.read_text() == "# the admin's\n"
    assert store.clients() == []  # refused before registering


def test_force_replaces_identity_and_keeps_other_settings(tmp_path, server, store):
    path = tmp_path / "agent.toml"
    path.write_text(f'[agent]\nserver_url = "http://127.0.0.1:1"\nenrollment_key = "{KEY}"\n'
                    f'state_dir = "{tmp_path / "kept-state"}"\n\n'
                    '[cta]\npoll_interval_s = 77\n\n[handlers]\nsbs_dir = "/srv/sbs/SBS"\n')
    os.chmod(path, 0o644)  # a secret readable by others: the new file is 0600
    result = enroll("--server", server.url, "--key", KEY, "--config", str(path), "--force")
    assert result.returncode == 0, result.stderr
    written = tomllib.loads(path.read_text())
    assert written["agent"]["server_url"] == server.url
    assert "enrollment_key" not in written["agent"]
    assert written["agent"]["state_dir"] == str(tmp_path / "kept-state")
    assert written["cta"]["poll_interval_s"] == 77     # the admin's value wins
    assert written["cta"]["listen"] == "127.0.0.1:50124"
    assert written["handlers"] == {"sbs_dir": "/srv/sbs/SBS"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert store.client(written["agent"]["client_id"]) is not None


def test_force_refuses_an_invalid_existing_config(tmp_path, server):
    path = tmp_path / "agent.toml"
    path.write_text("[agent]\ntypo = 1\n")
    result = enroll("--server", server.url, "--key", KEY, "--config", str(path), "--force")
    assert result.returncode == 2
    assert "unknown key 'typo' in [agent]" in result.stderr and "fix it or remove it" in result.stderr


def test_refused_key(tmp_path, server, store):
    path = tmp_path / "agent.toml"
    result = enroll("--server", server.url, "--key", "wrong", "--config", str(path))
    assert result.returncode == 1
    assert "the server refused the enrollment key" in result.stderr
    assert "HTTP 403" in result.stderr
    assert not path.exists() and store.clients() == []


def test_unreachable_server_and_bad_url(tmp_path, server):
    url = server.url
    server.stop()
    path = tmp_path / "agent.toml"
    result = enroll("--server", url, "--key", KEY, "--config", str(path))
    assert result.returncode == 1
    assert "the server is unreachable" in result.stderr and url in result.stderr
    for bad in ("ftp://host", "https://", "http://host:99999", "http://h/?x=1"):
        result = enroll("--server", bad, "--key", KEY, "--config", str(path))
        assert result.returncode == 2, bad
        assert f"--server {bad!r}" in result.stderr
    assert not path.exists()


def test_plain_http_to_a_non_loopback_host_warns(tmp_path):
    """This machine's own address: not loopback to the agent, yet nothing leaves the host."""
    own = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
           if a.family == socket.AF_INET and not a.address.startswith("127.")]
    if not own:
        pytest.skip("no non-loopback IPv4 address on this machine")
    with socket.socket() as sock:  # a closed port of that address
        sock.bind((own[0], 0))
        port = sock.getsockname()[1]
    result = enroll("--server", f"http://{own[0]}:{port}", "--key", KEY,
                    "--config", str(tmp_path / "agent.toml"))
    assert "warning: " in result.stderr and "plain http" in result.stderr
    assert "unencrypted" in result.stderr
    assert result.returncode == 1  # and then unreachable
