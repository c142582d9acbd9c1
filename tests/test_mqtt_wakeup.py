"""The optional MQTT wake-up, end to end through a real Mosquitto.

Each broker is our own ``mosquitto -c CONF`` on a free loopback port (never
the system's 1883). The chain is the real one (task server + ``dsagent
run``) with ``[wakeup] mqtt`` set, the client's tickle address pointing at a
closed port and a poll interval of an hour, so only a wake-up over MQTT can
explain a pull. Without mosquitto the tests fail, naming the package.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.common.config import check_config, load_config, render_config, write_private
from agent.common.errors import ConfigError, MqttError
from agent.common.mqtt import parse_mqtt_url, probe, wake_topic
from agent.common.tickle import exchange_line, make_tickle
from agent.tools.status import gather, render
from conftest import wait_until
from objecthost.frames import TickleGate
from objecthost.mqttwake import MqttWakeup
from taskserver import TickleFailed, wakeup
from taskserver.app import tickle_clients
from taskserver.loopback import LoopbackChain, free_port

MOSQUITTO = "/usr/sbin/mosquitto"
TERMINAL = {"succeeded", "failed", "cancelled"}


class Broker:
    """Our own mosquitto on 127.0.0.1:<free port>; ``extra`` lines go in its config."""

    def __init__(self, folder: Path, extra: str = "allow_anonymous true\n"):
        if not os.path.exists(MOSQUITTO):
            pytest.fail(f"{MOSQUITTO} is missing: apt-get install mosquitto "
                        "(packaging/ensure-system-tools.sh installs it)")
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\npersistence false\n"
                             f"user {getpass.getuser()}\n{extra}")
        self.log = folder / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    def url(self, scheme: str = "mqtt", userinfo: str = "", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{userinfo}{host}:{self.port}"

    def start(self) -> "Broker":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_until(lambda: self.proc.poll() is None and _connectable(self.port), 10,
                   f"mosquitto on port {self.port} (see {self.log})")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


def _connectable(port: int) -> bool:
    import socket
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    b = Broker(tmp_path_factory.mktemp("broker")).start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def chain(tmp_path_factory, broker):
    """An agent reachable only over MQTT (its tickle address is a closed port)."""
    folder = tmp_path_factory.mktemp("chain")
    previous = os.environ.get(wakeup.ENV)
    os.environ[wakeup.ENV] = broker.url()
    c = LoopbackChain(folder, client_id="nat-pc", poll_interval_s=3600,
                      extra_config=f'[wakeup]\nmqtt = "{broker.url()}"\n')
    c.start()
    try:
        c.wait_first_pull()
        wait_until(lambda: mqtt_state(c) == "connected", 15, "the objecthost's MQTT link")
        c.store.set_tickle_addr(c.client_id, f"127.0.0.1:{free_port()}")   # nothing listens
        yield c
    finally:
        c.stop()
        wakeup.close()
        os.environ.pop(wakeup.ENV, None)
        if previous is not None:
            os.environ[wakeup.ENV] = previous


def facts(chain) -> dict:
    path = chain.workdir / "state" / "status" / "objecthost.json"
    return json.loads(path.read_text())


def mqtt_state(chain) -> str | None:
    return (facts(chain).get("mqtt") or {}).get("state")


def key_of(chain) -> bytes:
    return bytes.fromhex(chain.creds["tickle_key"])


def publish(broker: Broker, client_id: str, line: bytes) -> None:
    """Publish a line of our own choosing (the server's publisher signs fresh ones)."""
    sender = wakeup.Publisher(parse_mqtt_url(broker.url(), "test"))
    try:
        sender.publish(client_id, line, 5.0)
    finally:
        sender.close()


def pulled_within(chain, task_id: str, timeout: float) -> float:
    """Seconds until the server saw the task's first status (``received``)."""
    start = time.monotonic()
    wait_until(lambda: chain.events(task_id), timeout, f"task {task_id} pulled")
    return time.monotonic() - start


def log_text(chain) -> str:
    return chain.log_path.read_text(errors="replace")


def seen(chain, broker: Broker, what: str) -> int:
    """How many wake-ups from the broker the objecthost logged as ``what``
    (its log is written at once; its status file at most once a second)."""
    return log_text(chain).count(f"tickle from {broker.url()} {what}")


# ---- the chain ---------------------------------------------------------------------

def test_a_task_is_pulled_within_two_seconds_of_the_publish(chain, broker):
    task = chain.queue("RunScript", {"script": "true"})
    started = time.monotonic()
    answer = chain.tickle()                 # TCP is refused: the server publishes instead
    assert answer == f"published to {broker.url()}"
    took = pulled_within(chain, task, 5) + (time.monotonic() - started)
    print(f"queued -> published -> pulled: {took * 1000:.0f} ms")
    assert took < 2.0            # ~0.3 s measured on an idle machine
    assert chain.wait([task], 30)
    assert [e["state"] for e in chain.events(task)][-1] == "succeeded"
    assert f"tickle from {broker.url()} accepted" in log_text(chain)


def test_a_replayed_wakeup_wakes_once_and_is_logged_as_replay(chain, broker):
    accepted, replays = seen(chain, broker, "accepted"), seen(chain, broker, "refused replay")
    line = make_tickle(chain.client_id, key_of(chain))
    publish(broker, chain.client_id, line)
    publish(broker, chain.client_id, line)
    wait_until(lambda: seen(chain, broker, "refused replay") == replays + 1, 5,
               "the second publish refused as replay")
    assert seen(chain, broker, "accepted") == accepted + 1
    wait_until(lambda: facts(chain)["last_refused"]["code"] == "replay", 3, "the status file")
    assert facts(chain)["last_refused"]["peer"] == broker.url()


def test_a_wakeup_with_a_bad_signature_is_refused(chain, broker):
    accepted = seen(chain, broker, "accepted")
    publish(broker, chain.client_id, make_tickle(chain.client_id, b"\x01" * 32))
    wait_until(lambda: seen(chain, broker, "refused bad-signature"), 5, "a forged wake-up refused")
    assert seen(chain, broker, "accepted") == accepted


def test_the_broker_never_delivers_a_big_payload(chain, broker):
    publish(broker, chain.client_id, b"X" * 65536)      # over the 2,048 bytes asked of it
    publish(broker, chain.client_id, b"junk\n")
    wait_until(lambda: "(starts b'junk\\n')" in log_text(chain), 5, "the small junk refused")
    assert "(starts b'XXX" not in log_text(chain)


def test_tcp_and_mqtt_share_one_replay_cache(chain, broker):
    replays = seen(chain, broker, "refused replay")
    tcp = make_tickle(chain.client_id, key_of(chain))
    assert exchange_line("127.0.0.1", chain.objecthost_port, tcp) == "OK"
    publish(broker, chain.client_id, tcp)   # the same line, now over MQTT
    wait_until(lambda: seen(chain, broker, "refused replay") == replays + 1, 5,
               "a TCP tickle's line refused over MQTT")
    over_mqtt = make_tickle(chain.client_id, key_of(chain))
    accepted = seen(chain, broker, "accepted")
    publish(broker, chain.client_id, over_mqtt)
    wait_until(lambda: seen(chain, broker, "accepted") == accepted + 1, 5, "the MQTT line accepted")
    assert exchange_line("127.0.0.1", chain.objecthost_port, over_mqtt) == "ERR replay"


def test_the_tcp_tickle_still_works_beside_mqtt(chain):
    chain.store.set_tickle_addr(chain.client_id, f"127.0.0.1:{chain.objecthost_port}")
    try:
        task = chain.queue("RunScript", {"script": "true"})
        assert chain.tickle() == "OK"
        pulled_within(chain, task, 3)
    finally:
        chain.store.set_tickle_addr(chain.client_id, f"127.0.0.1:{free_port()}")


def test_status_and_doctor_show_the_link(chain, broker):
    shown = render(gather(chain.workdir / "state"))
    assert f"mqtt wake-up: connected to {broker.url()} ({wake_topic(chain.client_id)})" in shown
    result = subprocess.run([sys.executable, "-m", "agent", "doctor", "--config",
                             str(chain.config_path), "--json"],
                            capture_output=True, text=True, timeout=120)
    row = {c["name"]: c for c in json.loads(result.stdout)["checks"]}["mqtt-wakeup"]
    assert row["status"] == "ok", row
    assert "the objecthost is subscribed" in row["finding"]


def test_after_a_broker_restart_the_agent_reconnects_and_is_woken(chain, broker):
    broker.stop()
    wait_until(lambda: mqtt_state(chain) == "reconnecting", 5, "the link seen down")
    assert "reason" in facts(chain)["mqtt"]
    assert "mqtt wake-up: reconnecting" in render(gather(chain.workdir / "state"))
    broker.start()                          # same port; persistence false: sessions are gone
    wait_until(lambda: mqtt_state(chain) == "connected", 15, "the agent reconnected")
    task = chain.queue("RunScript", {"script": "true"})
    assert chain.tickle().startswith("published to ")
    pulled_within(chain, task, 3)


# ---- the server side -----------------------------------------------------------------

def test_a_fan_out_publishes_through_one_connection(chain, broker):
    ids = [chain.store.enroll(f"away-{n}")["client_id"] for n in range(40)]   # no tickle address
    publisher = wakeup.publisher()
    logged = len(broker.log.read_text().splitlines())
    answers = tickle_clients(chain.store, ids)
    assert set(answers.values()) == {f"published to {broker.url()}"}
    assert wakeup.publisher() is publisher
    connects = [line for line in broker.log.read_text().splitlines()[logged:]
                if "New client connected" in line and " as dsagent-server-" in line]
    assert len(connects) <= 1, connects


def test_without_a_broker_the_tickle_fails_as_before(chain, monkeypatch):
    monkeypatch.delenv(wakeup.ENV)
    with pytest.raises(TickleFailed, match="cannot tickle 'nat-pc' at 127.0.0.1:[0-9]+: "):
        chain.tickle()


def test_an_unreachable_broker_names_both_failures(chain, monkeypatch):
    monkeypatch.setenv(wakeup.ENV, f"mqtt://127.0.0.1:{free_port()}")
    with pytest.raises(TickleFailed, match=r"Connection refused; and over MQTT: cannot "
                                           r"connect to mqtt://127.0.0.1:\d+"):
        chain.tickle()


def test_the_cli_tickle_takes_mqtt(chain, broker):
    result = subprocess.run([sys.executable, "-m", "taskserver", "tickle", "--db",
                             str(chain.workdir / "server.db"), "--client", chain.client_id,
                             "--mqtt", broker.url()], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout.strip()) == (0, f"published to {broker.url()}")


# ---- user:password, TLS ----------------------------------------------------------------

def test_user_and_password_in_the_url(tmp_path):
    folder = tmp_path / "auth"
    folder.mkdir()
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(folder / "passwd"), "pc-1", "s3cr:et"],
                   check=True, capture_output=True)
    b = Broker(folder, f"allow_anonymous false\npassword_file {folder / 'passwd'}\n").start()
    try:
        probe(parse_mqtt_url(b.url(userinfo="pc-1:s3cr%3Aet@"), "t"), wake_topic("pc-1"))
        with pytest.raises(MqttError, match="refused the connection") as refused:
            probe(parse_mqtt_url(b.url(userinfo="pc-1:wrong@"), "t"), wake_topic("pc-1"))
        assert refused.value.kind == "refused"
        with pytest.raises(MqttError, match="refused the connection"):
            probe(parse_mqtt_url(b.url(), "t"), wake_topic("pc-1"))
        row = doctor_row(tmp_path, b.url(userinfo="pc-1:wrong@"))
        assert row["status"] == "fail" and "refused the connection" in row["finding"], row
        assert "pc-1:wrong" not in row["finding"] and "password" in row["action"], row
    finally:
        b.stop()


def test_doctor_names_a_broker_that_is_down(tmp_path):
    row = doctor_row(tmp_path, f"mqtt://127.0.0.1:{free_port()}")
    assert row["status"] == "fail" and "cannot connect to mqtt://127.0.0.1:" in row["finding"]
    assert "start the broker" in row["action"]


def doctor_row(folder: Path, url: str) -> dict:
    """``dsagent doctor``'s mqtt-wakeup row for an enrolled config with ``[wakeup] mqtt = url``."""
    config = folder / "agent.toml"
    write_private(config, render_config({
        "agent": {"server_url": f"http://127.0.0.1:{free_port()}", "client_id": "pc-1",
                  "token": "t", "tickle_key": "00" * 32, "state_dir": str(folder / "state")},
        "wakeup": {"mqtt": url}}, []))
    result = subprocess.run([sys.executable, "-m", "agent", "doctor", "--config", str(config),
                             "--json"], capture_output=True, text=True, timeout=120)
    return {c["name"]: c for c in json.loads(result.stdout)["checks"]}["mqtt-wakeup"]


def test_mqtts_is_verified_against_the_ca(tmp_path):
    folder = tmp_path / "tls"
    folder.mkdir()
    ca, cert, key = _make_ca_and_cert(folder)
    b = Broker(folder, f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\nallow_anonymous true\n")
    b.start()
    try:
        url = parse_mqtt_url(b.url("mqtts", host="localhost"), "t")
        probe(url, wake_topic("pc-1"), ca_file=str(ca))
        with pytest.raises(MqttError) as untrusted:     # the system store does not know our CA
            probe(url, wake_topic("pc-1"))
        assert untrusted.value.kind == "tls"
    finally:
        b.stop()


def _make_ca_and_cert(folder: Path) -> tuple[Path, Path, Path]:
    ca, ca_key = folder / "ca.crt", folder / "ca.key"
    cert, key, csr = folder / "broker.crt", folder / "broker.key", folder / "broker.csr"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "1",
        "-subj", "/CN=dsagent test CA")
    run("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost")
    ext = folder / "ext.cnf"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(cert), "-days", "1", "-extfile", str(ext))
    return ca, cert, key


# ---- config ------------------------------------------------------------------------------

BASE = {"agent": {"server_url": "http://127.0.0.1:1", "state_dir": "/tmp/x"}}


@pytest.mark.parametrize("url, error", [
    ("http://broker", "starts with mqtt:// or mqtts://"),
    ("mqtt://", "names no host"),
    ("mqtt://broker:70000", "bad broker URL"),
    ("mqtt://broker:x", "bad broker URL"),
    ("mqtt://u:hunter2@broker/topic", r"got 'mqtt://u:\*\*\*@broker/topic'"),   # no password shown
])
def test_a_bad_broker_url_names_the_key_and_the_file(url, error):
    with pytest.raises(ConfigError, match=rf"^agent.toml: \[wakeup\] mqtt: .*{error}"):
        check_config({**BASE, "wakeup": {"mqtt": url}}, "agent.toml")


def test_broker_urls_and_the_ca_file():
    config = check_config({**BASE, "wakeup": {"mqtt": "mqtts://pc%2D1:p%40ss@mq.example",
                                               "mqtt_ca_file": "/etc/dsagent/mq-ca.pem"}}, "a")
    url = parse_mqtt_url(config.get("wakeup", "mqtt"), "k")
    assert (url.host, url.port, url.username, url.password, str(url)) == (
        "mq.example", 8883, "pc-1", "p@ss", "mqtts://mq.example:8883")
    assert str(parse_mqtt_url("mqtt://[::1]", "k")) == "mqtt://[::1]:1883"
    with pytest.raises(ConfigError, match=r"mqtt_ca_file is for an mqtts:// broker"):
        check_config({**BASE, "wakeup": {"mqtt": "mqtt://mq", "mqtt_ca_file": "/ca.pem"}}, "a")
    with pytest.raises(ConfigError, match=r"mqtt_ca_file must be an absolute path"):
        check_config({**BASE, "wakeup": {"mqtt": "mqtts://mq", "mqtt_ca_file": "ca.pem"}}, "a")


def test_a_password_in_the_url_makes_the_config_secret(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\nserver_url = "http://127.0.0.1:1"\nstate_dir = "/tmp/x"\n'
                    '[wakeup]\nmqtt = "mqtt://pc:pw@mq"\n')
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=r"\[wakeup\] mqtt's password.*chmod 600"):
        load_config(path)
    path.chmod(0o600)
    assert load_config(path).get("wakeup", "mqtt") == "mqtt://pc:pw@mq"


# ---- any payload, never a crash or a hang ---------------------------------------------------

class _Message:
    def __init__(self, payload: bytes):
        self.payload = payload


@pytest.fixture(scope="module")
def fed_gate():
    """An MqttWakeup (never connected) whose gate runs on an event loop thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    woken: list[str] = []
    stats: Counter[str] = Counter()
    gate = TickleGate("pc-1", b"k" * 32, 50.0, 50, stats, woken.append)
    link = MqttWakeup(parse_mqtt_url("mqtt://127.0.0.1:1", "t"), None, gate, lambda: "pc-1")
    link._loop = loop
    yield link, stats, woken
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def _lines():
    good = st.builds(lambda n: make_tickle("pc-1", b"k" * 32, nonce=f"{n:032x}"),
                     st.integers(0, 2**64))
    return st.one_of(st.binary(max_size=4096), good,
                     good.map(lambda line: line[:-2] + b"\r\n"),
                     good.map(lambda line: line + b"x" * 600),
                     st.builds(lambda a, b: a + b, good, st.binary(max_size=64)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=_lines())
def test_any_payload_is_answered_without_crash_or_hang(fed_gate, payload):
    link, stats, woken = fed_gate
    before = sum(stats.values())
    started = time.monotonic()
    link._on_message(None, None, _Message(payload))
    assert time.monotonic() - started < 1.0
    assert sum(stats.values()) == before + 1        # decided: accepted or refused, once


def test_the_objecthost_without_mqtt_loads_no_paho():
    code = "import sys, objecthost.server; print(any(m.startswith('paho') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent).stdout
    assert out.strip() == "False"


def test_mosquitto_is_installed_by_the_tools_script():
    script = (Path(__file__).resolve().parent.parent / "packaging" / "ensure-system-tools.sh")
    assert "[/usr/sbin/mosquitto]=mosquitto" in script.read_text()
    assert shutil.which("mosquitto_passwd"), "mosquitto_passwd (package mosquitto) is missing"
