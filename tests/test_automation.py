"""Automation mode (issue #13, PROTOCOL.md §8; docs/automation.md), without the agent's
processes: the reference server's automation registration (match by MAC and by uuid,
predefined -> managed, unknown computers, fresh credentials, tasks queued before the
registration), the Reboot status -> PXE change, and the agent's pieces (config keys,
MACs and uuid, registering in automation mode with its console messages, the reboot
request). The whole chain with `dsagent run` is tests/test_reboot.py."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid

import httpx
import pytest

from agent.common.config import check_config, reboot_command
from agent.common.errors import ConfigError
from agent.common.serverapi import machine_macs, machine_uuid
from agent.cta import reboot as cta_reboot
from agent import supervisor
from conftest import TickleListener, wait_until
from taskserver import TaskServer, TaskStore
from taskserver import automation
from taskserver.cli import build_parser
from taskserver.pxe import PXEStore
from taskserver.checks import InvalidRequest, UnknownClient

BACKENDS = ("sqlite", "postgresql")   # conftest.py: each test on both databases

MAC_A, MAC_B, MAC_C = "52:54:00:aa:00:01", "52:54:00:aa:00:02", "52:54:00:aa:00:03"
SMBIOS = "4c4c4544-0042-3510-8052-b4c04f4b4c31"


def automation_request(macs, uuid_=None, **extra):
    return {"mode": "automation", "name": "localhost", "uuid": uuid_, "macs": macs,
            "ips": ["192.0.2.7"], "os": "Linux 6.1", "agent_version": "0.1.0", **extra}


@pytest.fixture
def env(store_target):
    """A server on loopback, its PXEStore, and one PXE server ``site-1`` (tickled at a
    fake objecthost) that asked for its startup information."""
    store = TaskStore(store_target)
    server = TaskServer(store, enrollment_key="k").start()
    pxe = PXEStore(store)
    site = TickleListener()
    store.enroll("site-1", tickle_addr=site.addr)
    pxe.startup("site-1")
    http = httpx.Client(base_url=server.url, timeout=10)

    class Env:
        pass

    e = Env()
    e.store, e.server, e.pxe, e.site, e.http = store, server, pxe, site, http

    def register(request):
        return http.post("/api/v1/register", json=request)
    e.register = register
    yield e
    http.close()
    server.stop()
    site.close()
    store.close()


def site_tasks(store):
    return [(t["type"], t["params"]["kind"], t["params"]["payload"])
            for t in store.pending_tasks("site-1")]


def pull(env, creds):
    return env.http.get(f"/api/v1/clients/{creds['client_id']}/tasks",
                        headers={"Authorization": f"Bearer {creds['token']}"})


# ---- the server: matching, identity, lists --------------------------------------------

def test_a_managed_computer_is_matched_by_any_of_its_macs(env):
    env.pxe.add_computer(MAC_B, "automation", name="lab-7", config="auto64", managed=True)
    before = site_tasks(env.store)
    resp = env.register(automation_request(["02:00:00:00:00:09", MAC_B.upper().replace(":", "-")]))
    assert resp.status_code == 201, resp.text
    creds = resp.json()
    assert creds["client_id"] == "lab-7" and creds["poll_interval_s"] == 300
    assert pull(env, creds).status_code == 200
    row = env.store.client("lab-7")
    assert row["macs"] == ["02:00:00:00:00:09", MAC_B] and row["name"] == "lab-7"
    # the machine's other MAC joins the managed list as the same computer, so that a
    # Reboot later changes the answer whichever NIC it boots from
    other = env.pxe.computer("02:00:00:00:00:09")
    assert (other.list, other.name, other.action, other.config) == (
        "managed", "lab-7", "automation", "auto64")
    assert [kind for _, kind, _ in site_tasks(env.store)[len(before):]] == ["update"]
    [log] = automation.attempts(env.store)
    assert (log["outcome"], log["client_id"], log["matched"]) == (
        "registered", "lab-7", f"MAC {MAC_B} (managed)")


def test_a_predefined_computer_becomes_managed_right_there(env):
    env.pxe.add_computer(MAC_A, "automation", name="Lab PC 9", config="auto64")
    assert env.pxe.computer(MAC_A).list == "predefined"
    before = len(site_tasks(env.store))
    resp = env.register(automation_request([MAC_A]))
    assert resp.status_code == 201, resp.text
    assert resp.json()["client_id"] == "Lab-PC-9"              # sanitised as registration does
    c = env.pxe.computer(MAC_A)
    assert (c.list, c.name, c.action) == ("managed", "Lab PC 9", "automation")
    new = site_tasks(env.store)[before:]
    assert [kind for _, kind, _ in new] == ["predefined", "update"]
    assert MAC_A not in new[0][2] and f'mac="{MAC_A}"' in new[1][2]
    wait_until(lambda: env.site.times, 5, "the PXE server tickled")


def test_an_unnamed_computer_is_named_by_its_mac(env):
    env.pxe.add_computer(MAC_C, "automation")
    resp = env.register(automation_request([MAC_C]))
    assert resp.json()["client_id"] == "52-54-00-aa-00-03"
    assert env.pxe.computer(MAC_C).name == "52-54-00-aa-00-03"


def test_matched_by_smbios_uuid_when_no_mac_is_listed(env):
    env.pxe.add_computer(MAC_A, "automation", name="pc-0042", config="auto64", managed=True)
    first = env.register(automation_request([MAC_A], SMBIOS.upper()))
    assert first.json()["client_id"] == "pc-0042"
    # the NIC was replaced: only the uuid says who it is
    resp = env.register(automation_request([MAC_B], SMBIOS))
    assert resp.status_code == 201, resp.text
    assert resp.json()["client_id"] == "pc-0042"
    assert env.pxe.computer(MAC_B).name == "pc-0042"         # the new NIC joins it
    assert automation.attempts(env.store)[0]["matched"] == f"uuid {SMBIOS} (client pc-0042)"
    # a firmware placeholder uuid is never used to match
    with env.store._write() as conn:
        conn.execute("UPDATE clients SET uuid = ? WHERE client_id = 'pc-0042'",
                            ("03000200-0400-0500-0006-000700080009",))
    resp = env.register(automation_request([MAC_C], "03000200-0400-0500-0006-000700080009"))
    assert resp.status_code == 403


def test_an_unknown_computer_is_refused_and_the_attempt_recorded(env, capsys):
    resp = env.register(automation_request([MAC_C], SMBIOS))
    assert resp.status_code == 403
    error = resp.json()["error"]
    assert error.startswith("unknown computer") and MAC_C in error and SMBIOS in error
    assert "--allow-unknown-computers" in error
    [log] = automation.attempts(env.store)
    assert (log["outcome"], log["client_id"], log["macs"]) == ("refused", None, [MAC_C])
    assert env.store.clients() == [env.store.client("site-1")]
    assert automation.main(["log", "--db", env.store.db_path]) == 0
    out = capsys.readouterr().out
    assert "refused" in out and MAC_C in out and "unknown computer" in out


def test_unknown_computers_may_be_allowed(env):
    env.store.allow_unknown_computers = True
    resp = env.register(automation_request([MAC_C, MAC_A]))
    assert resp.status_code == 201, resp.text
    assert resp.json()["client_id"] == "52-54-00-aa-00-03"
    assert {(c.mac, c.list, c.name, c.action) for c in env.pxe.computers()} == {
        (MAC_C, "managed", "52-54-00-aa-00-03", "automation"),
        (MAC_A, "managed", "52-54-00-aa-00-03", "automation")}
    # next boot: now it is a listed computer, and keeps its id
    assert env.register(automation_request([MAC_A, MAC_C])).json()["client_id"] == \
        "52-54-00-aa-00-03"
    args = build_parser().parse_args(["serve", "--db", "x.db", "--allow-unknown-computers"])
    assert args.allow_unknown_computers
    assert not build_parser().parse_args(["serve", "--db", "x.db"]).allow_unknown_computers


def test_each_automation_registration_issues_new_credentials_for_the_same_id(env):
    env.pxe.add_computer(MAC_A, "automation", name="lab-7", managed=True)
    one = env.register(automation_request([MAC_A])).json()
    two = env.register(automation_request([MAC_A])).json()
    assert one["client_id"] == two["client_id"] == "lab-7"
    assert one["token"] != two["token"] and one["tickle_key"] != two["tickle_key"]
    assert pull(env, one).status_code == 401                 # the old boot's token is gone
    assert pull(env, two).status_code == 200
    assert [c["client_id"] for c in env.store.clients()] == ["site-1", "lab-7"]


def test_a_power_cut_in_automation_ends_the_running_task_never_runs_it_again(env):
    """The automation environment's state is in RAM: after a power cut the server still
    shows the task running; the next registration of that computer closes it."""
    env.pxe.add_computer(MAC_A, "automation", name="lab-7", managed=True)
    env.register(automation_request([MAC_A]))
    started = env.store.queue_task("lab-7", "RunScript", {"script": "deploy"})
    waiting = env.store.queue_task("lab-7", "RunScript", {"script": "later"})
    env.store.record_events("lab-7", reboot_events(started, "received", "running")
                            + reboot_events(waiting, "received"))
    creds = env.register(automation_request([MAC_A])).json()      # the power came back
    [history] = env.store.history(task_id=started)
    assert history["state"] == "failed"
    assert [e["state"] for e in history["events"]] == ["received", "running", "failed"]
    assert history["events"][-1]["message"].startswith(
        "interrupted: the computer registered again in automation")
    xml = pull(env, creds).text
    assert waiting in xml and started not in xml               # only received: run it


def test_another_machines_client_id_is_never_taken_over(env):
    other = env.register({"name": "lab-7", "macs": [MAC_C], "enrollment_key": "k"}).json()
    assert other["client_id"] == "lab-7"
    env.pxe.add_computer(MAC_A, "automation", name="lab-7")
    mine = env.register(automation_request([MAC_A])).json()
    assert mine["client_id"] == "lab-7-2"
    assert pull(env, other).status_code == 200               # untouched
    # a production agent of the same machine (its MAC) is adopted, not duplicated
    env.pxe.add_computer(MAC_C, "automation", name="lab-7")
    again = env.register(automation_request([MAC_C])).json()
    assert again["client_id"] == "lab-7" and pull(env, other).status_code == 401


def test_tasks_queued_before_the_registration_are_delivered_after(env):
    env.pxe.add_computer(MAC_A, "automation", name="lab-9", config="auto64")
    with pytest.raises(UnknownClient):
        env.store.queue_task("nobody-listed", "RunScript", {"script": "true"})
    first = env.store.queue_task("lab-9", "RunScript", {"script": "echo one"})
    second = env.store.queue_task("lab-9", "Reboot", {"to": "production"})
    placeholder = env.store.client("lab-9")
    assert placeholder["macs"] == [MAC_A] and placeholder["agent_version"] is None
    creds = env.register(automation_request([MAC_A])).json()
    assert creds["client_id"] == "lab-9"
    xml = pull(env, creds).text
    assert xml.index(first) < xml.index(second)
    assert env.store.client("lab-9")["agent_version"] == "0.1.0"


def test_bad_automation_requests_are_400(env):
    assert env.register(automation_request([])).status_code == 400
    assert "MACs" in env.register(automation_request(["not-a-mac"])).json()["error"]
    resp = env.register({**automation_request([MAC_A]), "mode": "kiosk"})
    assert resp.status_code == 400 and "mode must be one of" in resp.json()["error"]
    resp = env.register(automation_request([MAC_A], tickle_addr="nowhere"))
    assert resp.status_code == 400
    with pytest.raises(InvalidRequest):
        env.store.register({"mode": "automation", "macs": "x"}, None)
    # managed registration is as before, "mode": "managed" included
    assert env.register({"name": "pc", "mode": "managed", "enrollment_key": "k"}).status_code \
        == 201
    assert env.register({"name": "pc", "mode": "managed"}).status_code == 403


def test_tickle_address_sent_by_the_agent_is_kept(env):
    env.pxe.add_computer(MAC_A, "automation", name="lab-7")
    env.register(automation_request([MAC_A], tickle_addr="192.0.2.7:50122"))
    assert env.store.client("lab-7")["tickle_addr"] == "192.0.2.7:50122"


# ---- the server: Reboot -> PXE --------------------------------------------------------

def reboot_events(task_id, *states):
    return [{"event_id": str(uuid.uuid4()), "task_id": task_id, "seq": n, "state": state,
             "progress": None, "message": "", "details": None, "at": "2026-01-02T03:04:05Z"}
            for n, state in enumerate(states, 1)]


def test_reboot_running_switches_the_pxe_answer_before_the_status_is_answered(env):
    env.pxe.add_computer(MAC_A, "automation", name="lab-7", config="auto64")
    creds = env.register(automation_request([MAC_A, MAC_B])).json()
    wait_until(lambda: env.site.times, 5, "the registration's tickle")
    before, tickles = len(site_tasks(env.store)), len(env.site.times)
    task = env.store.queue_task("lab-7", "Reboot", {"to": "production"})
    events = reboot_events(task, "received", "running", "succeeded")
    auth = {"Authorization": f"Bearer {creds['token']}"}
    resp = env.http.post("/api/v1/clients/lab-7/status", headers=auth,
                         json={"events": events[:2]})
    answered = time.monotonic()
    assert resp.json()["accepted"] == [e["event_id"] for e in events[:2]]
    assert {c.mac: c.action for c in env.pxe.computers()} == {MAC_A: "production",
                                                               MAC_B: "production"}
    new = site_tasks(env.store)[before:]
    assert [kind for _, kind, _ in new] == ["clients"]       # two managed MACs: the list
    assert new[0][2].count('action="production"') == 2
    assert len(env.site.times) == tickles + 1 and env.site.times[-1] < answered
    # succeeded: already production, nothing more to tell
    env.http.post("/api/v1/clients/lab-7/status", headers=auth, json={"events": events[2:]})
    assert len(site_tasks(env.store)) == before + 1 and env.store.is_terminal(task)


def test_reboot_to_automation_and_reboots_without_a_listed_computer(env, caplog):
    env.pxe.add_computer(MAC_A, "production", name="lab-7", managed=True)
    creds = env.store.enroll("lab-7")
    task = env.store.queue_task("lab-7", "Reboot", {"to": "automation"})
    env.store.record_events("lab-7", reboot_events(task, "received", "running"))
    assert env.pxe.computer(MAC_A).action == "automation"
    env.store.enroll("lone")
    lone = env.store.queue_task("lone", "Reboot", {"to": "production"})
    bad = env.store.queue_task("lone", "Reboot", {"to": "sideways"})
    with caplog.at_level(logging.WARNING, "taskserver.automation"):
        assert len(env.store.record_events("lone", reboot_events(lone, "received", "running")
                                           + reboot_events(bad, "received", "running"))) == 4
    assert "no listed computer has its MACs or its id" in caplog.text
    assert "to='sideways' is not one of" in caplog.text
    assert creds


# ---- the agent's pieces ---------------------------------------------------------------

def fake_net(root, name, mac, flags="0x1003", device=True):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "address").write_text(mac + "\n")
    (folder / "flags").write_text(flags + "\n")
    if device:
        (folder / "device").mkdir()


def test_every_mac_of_the_machine_is_sent(tmp_path):
    fake_net(tmp_path, "lo", "00:00:00:00:00:00", "0x9", device=False)
    fake_net(tmp_path, "br0", "02:42:AC:11:00:01", device=False)
    fake_net(tmp_path, "eth1", "52:54:00:AA:00:02")
    fake_net(tmp_path, "eth0", "52:54:00:aa:00:01")
    fake_net(tmp_path, "bond0", "52:54:00:aa:00:01", device=False)
    fake_net(tmp_path, "ib0", "80:00:00:48:fe:80:00:00:00:00:00:00:00:00:00:00:00:00:00:01")
    fake_net(tmp_path, "tun0", "00:00:00:00:00:00", "0x10d1", device=False)
    assert machine_macs(str(tmp_path)) == [MAC_A, MAC_B, "02:42:ac:11:00:01"]
    assert machine_macs()                 # this machine has at least one, whatever it is


def test_the_smbios_uuid_and_its_fallback(tmp_path):
    path = tmp_path / "product_uuid"
    path.write_text(SMBIOS.upper() + "\n")
    assert machine_uuid(str(path)) == SMBIOS
    fallback = str(uuid.UUID(int=uuid.getnode()))
    path.write_text("03000200-0400-0500-0006-000700080009\n")
    assert machine_uuid(str(path)) == fallback
    assert machine_uuid(str(tmp_path / "missing")) == fallback
    path.write_text("not a uuid")
    assert machine_uuid(str(path)) == fallback


BASE = {"server_url": "http://127.0.0.1:1", "state_dir": "/tmp/x"}


def test_mode_and_reboot_command_config_keys():
    managed = check_config({"agent": BASE}, "a.toml")
    assert managed.get("agent", "mode") == "managed"
    assert reboot_command(managed) == ["systemctl", "reboot"]
    auto = check_config({"agent": {**BASE, "mode": "automation"}}, "a.toml")
    assert reboot_command(auto) == ["reboot", "-f"]
    mine = check_config({"agent": {**BASE, "reboot_command": ["/bin/sh", "-c", "x"]}}, "a.toml")
    assert reboot_command(mine) == ["/bin/sh", "-c", "x"]
    for bad, message in [
            ({"mode": "kiosk"}, r"\[agent\] mode must be"),
            ({"mode": "automation", "client_id": "pc", "token": "t"},
             r"registers at every start .* remove client_id, token"),
            ({"reboot_command": []}, "reboot_command must be a list of strings"),
            ({"reboot_command": ["reboot", 1]}, "reboot_command must be a list of strings"),
            ({"reboot_command": "reboot"}, r"\[agent\] reboot_command must be a list")]:
        with pytest.raises(ConfigError, match=message):
            check_config({"agent": {**BASE, **bad}}, "a.toml")


def automation_config(tmp_path, url):
    return check_config({"agent": {"server_url": url, "state_dir": str(tmp_path / "state"),
                                   "mode": "automation"},
                         "objecthost": {"listen": "0.0.0.0:50999"}}, "agent.toml")


def test_automation_registration_says_why_it_waits_and_goes_on(env, tmp_path, caplog,
                                                                monkeypatch):
    monkeypatch.setattr(supervisor, "UNKNOWN_RETRY_S", 0.3)
    config = automation_config(tmp_path, env.server.url)
    stop = threading.Event()
    mac = machine_macs()[0]
    result = []
    with caplog.at_level(logging.INFO, "dsagent.supervisor"):
        thread = threading.Thread(target=lambda: result.append(
            supervisor.ensure_registered(config, stop)))
        thread.start()
        wait_until(lambda: caplog.text.count("is not known to the task server") >= 2, 10,
                   "two refused attempts said plainly")
        env.pxe.add_computer(mac, "automation", name="bare-metal-1")
        thread.join(10)
    assert result == [True]
    assert config.credentials().client_id == "bare-metal-1"
    line = next(r.getMessage() for r in caplog.records if "not known" in r.getMessage())
    assert f"this computer (MACs {', '.join(machine_macs())}, uuid {machine_uuid()})" in line
    assert "unknown computer: no managed or predefined computer has MAC" in line
    # the objecthost's wildcard became the address this machine reaches the server from
    assert env.store.client("bare-metal-1")["tickle_addr"] == "127.0.0.1:50999"
    # every start registers again (the state dir of an automation environment is new)
    assert supervisor.ensure_registered(config, stop)
    assert config.credentials().client_id == "bare-metal-1"


def test_automation_registration_retries_while_the_server_is_down(tmp_path, caplog):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = automation_config(tmp_path, f"http://127.0.0.1:{port}")
    stop = threading.Event()
    with caplog.at_level(logging.INFO, "dsagent.supervisor"):
        timer = threading.Timer(1.6, stop.set)
        timer.start()
        assert supervisor.ensure_registered(config, stop) is False
    lines = [r.getMessage() for r in caplog.records if "registration attempt" in r.getMessage()]
    assert len(lines) >= 2, caplog.text
    assert all("cannot reach the task server" in line and "retrying in" in line
               for line in lines)


def test_the_reboot_request_belongs_to_this_boot(tmp_path, caplog):
    path = cta_reboot.write_request(tmp_path, "t-1", "production")
    assert path.name == supervisor.REBOOT_REQUEST == cta_reboot.REQUEST_FILE
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    request = supervisor.read_reboot_request(tmp_path)
    assert (request["task_id"], request["to"]) == ("t-1", "production")
    assert request["boot_id"] == supervisor.boot_id() != ""
    path.write_text(json.dumps({**request, "boot_id": "an-earlier-boot"}))
    assert supervisor.read_reboot_request(tmp_path) is None and not path.exists()
    path.write_text("{torn")
    assert supervisor.read_reboot_request(tmp_path) is None and not path.exists()
    with pytest.raises(ValueError):
        cta_reboot.write_request(tmp_path, "t-2", "sideways")


def test_the_reboot_handler_checks_to_and_succeeds(dsagent_run):
    ok = dsagent_run("Reboot", {"to": "automation"})
    assert ok.state == "succeeded" and ok.details["to"] == "automation"
    bad = dsagent_run("Reboot", {"to": "sideways"})
    assert bad.state == "failed" and "parameter 'to' must match" in bad.message
    assert dsagent_run("Reboot", {}).state == "failed"
