"""`dsagent doctor`: each check failing for its real cause, and a healthy setup.

Real reference server on loopback, real ports taken by real processes, real
files (a stale .sbs file, a half-replicated driver package, a read-only
file system); doctor runs as the CLI does, in its own process.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.server
import json
import os
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
from pathlib import Path

import pytest

from agent.common.config import render_config, write_private
from agent.common.tickle import exchange_line, make_tickle
from agent.plugin.testing import write_distribution
from conftest import wait_until
from taskserver.loopback import LoopbackChain, free_port

DSAGENT = [sys.executable, "-m", "agent"]
HOUR = 3600


def doctor(config: Path, *extra: str, plugins: Path | None = None) -> tuple[int, dict]:
    """Run ``dsagent doctor --json``; (exit status, {check name: result}, in
    the doctor's order). ``plugins``: a folder of handler distributions to add."""
    env = dict(os.environ, PYTHONPATH=str(plugins)) if plugins else None
    result = subprocess.run(DSAGENT + ["doctor", "--config", str(config), "--json", *extra],
                            capture_output=True, text=True, timeout=120, env=env)
    report = json.loads(result.stdout)
    assert report["ok"] == (result.returncode == 0)
    return result.returncode, {c["name"]: c for c in report["checks"]}


# store and server: tests/conftest.py


def write_config(path: Path, server_url: str, creds: dict, handlers: dict | None = None,
                 mode: int = 0o600) -> Path:
    sections = {
        "agent": {"server_url": server_url, "client_id": creds["client_id"],
                  "token": creds["token"], "tickle_key": creds["tickle_key"],
                  "state_dir": str(path.parent / "state")},
        "objecthost": {"listen": f"127.0.0.1:{free_port()}"},
        "cta": {"listen": f"127.0.0.1:{free_port()}"},
        "handlers": handlers or {},
    }
    write_private(path, render_config(sections, []))
    os.chmod(path, mode)
    return path


@pytest.fixture
def config(tmp_path, server, store):
    """A config enrolled with the running server; no agent runs."""
    return write_config(tmp_path / "agent.toml", server.url, store.enroll("pc-1"))


def make_package(store: Path, pid: str, files: dict[str, bytes]) -> Path:
    folder = store / pid
    entries = []
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
        entries.append({"path": rel, "sha256": hashlib.sha256(data).hexdigest()})
    (folder / "manifest.json").write_text(json.dumps({"id": pid, "files": entries}))
    return folder


# ---- healthy ------------------------------------------------------------------

def test_healthy_agent_passes_every_check(tmp_path):
    (tmp_path / "sbs").mkdir()
    (tmp_path / "images").mkdir()
    make_package(tmp_path / "packages", "e1000e",
                 {"lib/modules/6.1.0/extra/e1000e.ko": b"\x7fELF driver"})
    handlers = {"sbs_dir": str(tmp_path / "sbs"), "image_store": str(tmp_path / "images"),
                "package_store": str(tmp_path / "packages")}
    with LoopbackChain(tmp_path / "chain", handlers=handlers) as chain:
        code, checks = doctor(chain.config_path)
        objecthost = chain.child("objecthost").pid
        cta = chain.child("cta").pid
    assert code == 0, checks
    assert {c["status"] for c in checks.values()} == {"ok"}, checks
    assert f"our objecthost (pid {objecthost})" in checks["objecthost-port"]["finding"]
    assert f"our cta (pid {cta})" in checks["cta-port"]["finding"]
    assert "1 driver package(s)" in checks["drivers"]["finding"]
    assert "writable" in checks["image-store"]["finding"]
    assert not list((tmp_path / "images").iterdir())  # the probe file is gone


def test_human_table_names_each_check_and_what_to_do(config):
    os.chmod(config, 0o644)
    result = subprocess.run(DSAGENT + ["doctor", "--config", str(config)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("FAIL  config")
    assert lines[1].strip() == f"what to do: chmod 600 {config}"
    # the wrong mode does not stop the other checks: the server answers, no agent runs
    assert lines[-1] == "12 checks: 4 ok, 2 warn, 1 fail, 5 skip"
    assert "\r" not in result.stderr and "\x1b" not in result.stderr


# ---- ports --------------------------------------------------------------------

def test_port_taken_by_another_program_is_named_with_its_pid(config):
    port = int(tomllib.loads(config.read_text())["objecthost"]["listen"].rsplit(":", 1)[1])
    squatter = subprocess.Popen(
        [sys.executable, "-c", "import socket, sys, time\n"
         f"s = socket.create_server(('127.0.0.1', {port}))\n"
         "print('up', flush=True)\ntime.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert squatter.stdout.readline() == "up\n"
        code, checks = doctor(config)
    finally:
        squatter.kill()
        squatter.wait()
    assert code == 1
    port_check = checks["objecthost-port"]
    assert port_check["status"] == "fail"
    assert f"127.0.0.1:{port} is taken by another program" in port_check["finding"]
    assert f"(pid {squatter.pid})" in port_check["finding"]
    assert "stop python" in port_check["action"]
    # the CTA's port is free and no agent runs: a warning, not a failure
    assert checks["cta-port"]["status"] == "warn"
    assert "dsagent run is not running" in checks["cta-port"]["finding"]


# ---- server and clock -----------------------------------------------------------

def test_stopped_server_is_unreachable(config, server):
    server.stop()
    code, checks = doctor(config)
    assert code == 1
    assert checks["server"]["status"] == "fail"
    assert checks["server"]["finding"].startswith("the server is unreachable")
    assert checks["clock"]["status"] == "skip"


def test_refused_token(tmp_path, server, store):
    creds = dict(store.enroll("pc-1"), token="not-the-token")
    config = write_config(tmp_path / "agent.toml", server.url, creds)
    code, checks = doctor(config)
    assert code == 1
    assert checks["server"]["status"] == "fail"
    assert "refused the token of client pc-1" in checks["server"]["finding"]
    assert "HTTP 401" in checks["server"]["finding"]
    assert "--force" in checks["server"]["action"]
    assert checks["clock"]["status"] == "ok"  # the refusal still carried a Date


class SkewedServer(http.server.ThreadingHTTPServer):
    """A task server whose clock is an hour fast: its Date header says so."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b'<ClientTasks client="pc-1"></ClientTasks>'
            self.send_response_only(200)
            self.send_header("Date", email.utils.formatdate(time.time() + HOUR, usegmt=True))
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    def __init__(self):
        super().__init__(("127.0.0.1", 0), self.Handler)

    def __enter__(self):
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


def test_clock_skew_beyond_300_s_fails(tmp_path, store):
    with SkewedServer() as peer:
        config = write_config(tmp_path / "agent.toml", peer.url, store.enroll("pc-1"))
        code, checks = doctor(config)
    assert code == 1
    assert checks["server"]["status"] == "ok"
    clock = checks["clock"]
    assert clock["status"] == "fail"
    assert "behind the task server's" in clock["finding"]
    assert "stale" in clock["finding"] and "NTP" in clock["action"]


def test_tls_failure_is_told_apart(tmp_path, store):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    peer = SkewedServer()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    peer.socket = context.wrap_socket(peer.socket, server_side=True)
    with peer:
        url = f"https://127.0.0.1:{peer.server_address[1]}"
        config = write_config(tmp_path / "agent.toml", url, store.enroll("pc-1"))
        code, checks = doctor(config)
    assert code == 1
    assert checks["server"]["finding"].startswith("TLS with the server failed")
    assert "CERTIFICATE_VERIFY_FAILED" in checks["server"]["finding"]


# ---- handlers' folders ------------------------------------------------------------

def test_sbs_file_piling_up_means_pxe_services_stopped(tmp_path, server, store):
    sbs = tmp_path / "SBS"
    sbs.mkdir()
    fresh = sbs / "0b8e8c5e-3f7a-4f63-9d8f-2a61c1e0e4a1.sbs"
    fresh.write_text("<Computer/>")
    config = write_config(tmp_path / "agent.toml", server.url, store.enroll("pc-1"),
                          {"sbs_dir": str(sbs)})
    assert doctor(config)[1]["sbs"]["status"] == "ok"
    stale = sbs / "1234567890-client.sbs"
    stale.write_text("<Clients/>")
    ten_minutes_ago = time.time() - 600
    os.utime(stale, (ten_minutes_ago, ten_minutes_ago))  # written 10 min ago, never taken
    code, checks = doctor(config)
    assert code == 1
    assert checks["sbs"]["status"] == "fail"
    assert "1 .sbs file(s) waited over 60 s" in checks["sbs"]["finding"]
    assert "oldest 1234567890-client.sbs" in checks["sbs"]["finding"]
    assert "PXE services look stopped" in checks["sbs"]["finding"]
    assert "[pxe] section" in checks["sbs"]["action"]


def test_driver_packages_not_replicated(tmp_path, server, store):
    packages = tmp_path / "packages"
    make_package(packages, "good", {"a.ko": b"a"})
    missing = make_package(packages, "igb", {"lib/igb.ko": b"igb", "lib/igb.fw": b"fw"})
    (missing / "lib/igb.fw").unlink()
    config = write_config(tmp_path / "agent.toml", server.url, store.enroll("pc-1"),
                          {"package_store": str(packages)})
    code, checks = doctor(config)
    assert code == 1
    assert checks["drivers"]["finding"] == ("driver package 'igb' has not replicated yet: "
                                            "lib/igb.fw is missing")
    assert "igb" in checks["drivers"]["action"] and "BootWizRebuild" in checks["drivers"]["action"]

    (missing / "lib/igb.fw").write_bytes(b"fw")
    assert doctor(config)[1]["drivers"]["status"] == "ok"
    (missing / "lib/igb.ko").write_bytes(b"half")
    finding = doctor(config)[1]["drivers"]["finding"]
    assert finding == "driver package 'igb' has not replicated yet: lib/igb.ko sha256 mismatch " \
                      "(half-replicated?)"


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs at a fresh folder (root only); yields a mount function."""
    mounted = []

    def mount(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                                capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)


def test_unwritable_and_nearly_full_image_store(tmp_path, server, store, tmpfs):
    read_only = tmpfs("ro", "ro,size=8m")
    config = write_config(tmp_path / "agent.toml", server.url, store.enroll("pc-1"),
                          {"image_store": str(read_only)})
    code, checks = doctor(config)
    assert code == 1
    assert checks["image-store"]["status"] == "fail"
    assert checks["image-store"]["finding"] == (f"cannot write in the image store {read_only}: "
                                                "Read-only file system (EROFS)")

    small = tmpfs("small", "size=8m")
    config = write_config(tmp_path / "agent.toml", server.url, store.enroll("pc-2"),
                          {"image_store": str(small)})
    code, checks = doctor(config)
    assert checks["image-store"]["status"] == "warn"
    assert f"image store {small} is nearly full: 8.0 MiB free" in checks["image-store"]["finding"]
    # warnings do not fail (seen once failing in a full run: say which check did)
    assert code == 0, {name: c for name, c in checks.items() if c["status"] == "fail"}


# ---- modes --------------------------------------------------------------------------

def test_config_with_secret_readable_by_others(config):
    os.chmod(config, 0o644)
    code, checks = doctor(config)
    assert code == 1
    assert checks["config"]["status"] == "fail"
    assert "holds secrets ([agent] token, [agent] tickle_key)" in checks["config"]["finding"]
    assert "mode is 0644" in checks["config"]["finding"]
    assert checks["config"]["action"] == f"chmod 600 {config}"
    assert checks["server"]["status"] == "ok"  # the other checks still run


def test_unusable_config_skips_the_rest(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text('[agent]\nserver_url = "http://127.0.0.1:1"\nstate_dir = "/x"\ntypo = 1\n')
    code, checks = doctor(config)
    assert code == 1
    assert checks["config"]["finding"] == f"{config}: unknown key 'typo' in [agent]"
    assert {c["status"] for n, c in checks.items() if n != "config"} == {"skip"}


def test_credentials_file_readable_by_others(tmp_path, server, store):
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\nserver_url = "{server.url}"\nenrollment_key = "K"\n'
                      f'state_dir = "{tmp_path / "state"}"\n')
    os.chmod(config, 0o600)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    creds = store.enroll("pc-1")
    (state / "credentials.json").write_text(json.dumps(creds))
    os.chmod(state / "credentials.json", 0o644)
    code, checks = doctor(config)
    assert code == 1
    assert checks["state-dir"]["finding"] == (f"{state}/credentials.json holds secrets but its "
                                              "mode is 0644, readable by other users")
    assert checks["server"]["status"] == "ok"   # the stored credentials are used
    os.chmod(state / "credentials.json", 0o600)
    os.chmod(state, 0o755)
    checks = doctor(config)[1]
    assert checks["state-dir"]["status"] == "warn" and "chmod 700" in checks["state-dir"]["action"]


# ---- what the processes reported ---------------------------------------------------

def test_tickles_refused_since_the_last_accepted_one(tmp_path):
    with LoopbackChain(tmp_path / "chain") as chain:
        assert chain.tickle() == "OK"

        def tickle_check(holds):
            code, checks = doctor(chain.config_path)
            assert holds(checks["tickles"]), checks["tickles"]
            return code, checks

        # the objecthost publishes within a second
        code, checks = wait_until(lambda: tickle_check(lambda t: "1 accepted" in t["finding"]),
                                  10, "the accepted tickle in the doctor's report", interval=0.3)
        assert checks["tickles"]["status"] == "ok", checks["tickles"]
        assert "1 accepted, 0 refused" in checks["tickles"]["finding"]
        # the task server now signs with another key (its record was re-enrolled)
        forged = make_tickle(chain.client_id, bytes(32))
        assert exchange_line("127.0.0.1", chain.objecthost_port, forged) == "ERR bad-signature"
        code, checks = wait_until(lambda: tickle_check(lambda t: t["status"] != "ok"), 10,
                                  "the refused tickle in the doctor's report", interval=0.3)
    tickles = checks["tickles"]
    assert tickles["status"] == "warn" and code == 0, tickles    # tasks still come by polling
    assert "was refused bad-signature" in tickles["finding"] and "127.0.0.1:" in tickles["finding"]
    assert "dsagent enroll --force" in tickles["action"]


def test_outbox_events_the_server_has_not_taken_for_long(config, server):
    from agent.common.statedb import db_path
    from agent.cta.taskdb import AgentDB
    from agent.common.task import Task

    state = config.parent / "state"
    db = AgentDB(db_path(state))
    task = Task(id="6d0c3a9e-3c1e-4f55-9a59-0c1b9c1c2e01", type="RunScript")
    db.record(task.id, "received", task=task, type_name=task.type)
    db.close()
    code, checks = doctor(config)
    assert checks["outbox"]["status"] == "ok" and "1 status event(s) waiting" in \
        checks["outbox"]["finding"]
    # an hour passes without the server accepting it (the test ages the row
    # itself: the outbox's API has no reason to rewrite history)
    import sqlite3
    with sqlite3.connect(db_path(state)) as conn:
        conn.execute("UPDATE outbox SET created_at = created_at - 3600")
    code, checks = doctor(config)
    assert checks["outbox"]["status"] == "warn", checks["outbox"]
    assert "the oldest for 1 h 0 min: the server has not accepted them" in checks["outbox"]["finding"]


# ---- handler plugins -----------------------------------------------------------------

def test_settings_for_a_plugin_that_is_not_installed(tmp_path, server, store):
    """A typo in a [handlers.<plugin>] table: the plugin would run without its settings."""
    config = write_config(tmp_path / "agent.toml", server.url, store.enroll("pc-1"),
                          {"exampel": {"greeting": "hi"}})
    code, checks = doctor(config)
    handlers = checks["handlers"]
    assert handlers["status"] == "fail" and code == 1, handlers
    assert handlers["finding"].startswith(f"[handlers.exampel] in {config} names no installed "
                                          "handler plugin (installed: bootwiz, example, imaging")

    config = write_config(tmp_path / "agent.toml", server.url, store.enroll("pc-2"),
                          {"example": {"greeting": "hi"}})
    code, checks = doctor(config)
    assert checks["handlers"]["status"] == "ok", checks["handlers"]
    assert ("from 7 plugin(s): bootwiz, example, imaging, reboot, replication, runscript, sbs"
            in checks["handlers"]["finding"])


def install_plugin(root: Path, module: str, entry_name: str, source: str) -> Path:
    """A third-party handler distribution under ``root`` (put on PYTHONPATH)."""
    return write_distribution(root, module, textwrap.dedent(source), entry_name, "0.9")


def test_a_third_party_plugin_adds_its_own_check(tmp_path, server, store):
    """dsagent_doctor_checks: the check runs with the [handlers] section (its
    own settings table included) and is printed like the doctor's own."""
    plugins = install_plugin(tmp_path / "plugins", "acme_inventory", "acme", """
        from agent.plugin import CheckResult, DoctorCheck, hookimpl

        def check_licence(config):
            seats = config["acme"]["seats"]
            return CheckResult("warn", f"acme licence: {seats} seat(s) left",
                               "buy seats before they run out")

        @hookimpl
        def dsagent_doctor_checks(register):
            register(DoctorCheck("acme-licence", check_licence))
    """)
    config = write_config(tmp_path / "agent.toml", server.url, store.enroll("pc-1"),
                          {"acme": {"seats": 2}})
    code, checks = doctor(config, plugins=plugins)
    licence = checks["acme-licence"]
    assert licence == {"name": "acme-licence", "status": "warn",
                       "finding": "acme licence: 2 seat(s) left",
                       "action": "buy seats before they run out"}
    assert code == 0, [c for c in checks.values() if c["status"] == "fail"]  # warnings do not fail
    assert checks["handlers"]["status"] == "ok", checks["handlers"]
    # the plugins' checks (by plugin: acme, bootwiz, imaging, sbs) come after the
    # clock; the handlers check stays last
    names = list(checks)
    assert names[names.index("clock") + 1:names.index("tickles")] == [
        "acme-licence", "drivers", "image-store", "sbs"]
    assert names[-1] == "handlers"


def test_a_plugin_check_that_raises_or_answers_nonsense_fails_naming_the_plugin(
        tmp_path, server, store):
    plugins = tmp_path / "plugins"
    install_plugin(plugins, "raiser", "raiser", """
        from agent.plugin import DoctorCheck, hookimpl

        def check(config):
            raise OSError("licence server down")

        @hookimpl
        def dsagent_doctor_checks(register):
            register(DoctorCheck("raiser-check", check))
    """)
    install_plugin(plugins, "sloppy", "sloppy", """
        from agent.plugin import DoctorCheck, hookimpl

        @hookimpl
        def dsagent_doctor_checks(register):
            register(DoctorCheck("sloppy-check", lambda config: "all fine"))
    """)
    install_plugin(plugins, "unregisterable", "unregisterable", """
        from agent.plugin import hookimpl

        @hookimpl
        def dsagent_doctor_checks(register):
            register("not a check")
    """)
    config = write_config(tmp_path / "agent.toml", server.url, store.enroll("pc-1"))
    code, checks = doctor(config, plugins=plugins)
    assert code == 1
    raised = checks["raiser-check"]
    assert raised["status"] == "fail"
    assert raised["finding"] == ("handler plugin 'raiser' failed its doctor check: "
                                 "OSError: licence server down")
    assert "'raiser'" in raised["action"]
    sloppy = checks["sloppy-check"]
    assert sloppy["status"] == "fail"
    assert sloppy["finding"] == ("handler plugin 'sloppy': its doctor check returned str, "
                                 "not a CheckResult")
    unregisterable = checks["unregisterable"]
    assert unregisterable["status"] == "fail"
    assert unregisterable["finding"].startswith(
        "handler plugin 'unregisterable' could not register its doctor checks: TypeError: "
        "register() expects a DoctorCheck")
    # the other plugins' checks still run
    assert checks["sbs"]["status"] == "skip" and checks["server"]["status"] == "ok"


def test_a_check_name_registered_twice_fails_naming_both_plugins(tmp_path, server, store):
    sbs = tmp_path / "SBS"
    sbs.mkdir()
    plugins = install_plugin(tmp_path / "plugins", "pxeplus", "pxeplus", """
        from agent.plugin import CheckResult, DoctorCheck, hookimpl

        @hookimpl
        def dsagent_doctor_checks(register):
            register(DoctorCheck("sbs", lambda config: CheckResult("ok", "mine")))
            register(DoctorCheck("clock", lambda config: CheckResult("ok", "mine too")))
    """)
    config = write_config(tmp_path / "agent.toml", server.url, store.enroll("pc-1"),
                          {"sbs_dir": str(sbs)})
    code, checks = doctor(config, plugins=plugins)
    assert code == 1
    assert checks["sbs"] == {
        "name": "sbs", "status": "fail",
        "finding": "doctor check 'sbs' is registered by both pxeplus and sbs: it does not run",
        "action": "uninstall one of the packages, or rename the check in one of them"}
    # a name of the doctor's own checks: the doctor's runs, the plugin's does not
    assert checks["clock"]["status"] == "ok" and "task server's" in checks["clock"]["finding"]
    assert checks["pxeplus"]["status"] == "fail"
    assert checks["pxeplus"]["finding"] == ("handler plugin 'pxeplus' registers a doctor check "
                                            "named 'clock', like one of the doctor's own: it "
                                            "does not run")


def test_a_handler_check_names_the_config_file(tmp_path, server, store):
    """A plugin's check says "the agent's config"; the doctor names the file."""
    config = write_config(tmp_path / "agent.toml", server.url, store.enroll("pc-9"))
    code, checks = doctor(config)
    assert checks["sbs"]["status"] == "skip"
    assert str(config) in checks["sbs"]["action"], checks["sbs"]
