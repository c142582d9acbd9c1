"""The reference task server as the NS side of the PXE site servers (issue #12,
PROTOCOL.md §7; taskserver/pxe.py, taskserver/pxecli.py, docs/taskserver-pxe.md).

Real HTTP on loopback: the startup answer and the state a site server posts;
console changes (the CLI, as an operator runs it) fanned out to every PXE
server as UpdateSBSInfo tasks, pulled over HTTP and parsed the way the agent
parses them (agent.common.taskxml, then agent.pxe.sbsdoc), and applied to the
agent's own PXE state to check that the site server ends up where the console is.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from agent.common.taskxml import parse_client_tasks
from agent.pxe.sbsdoc import (Computer, Computers, Image, Images, RemoveComputer, RemoveImage,
                              Setting, Settings, Update, parse_sbs)
from agent.pxe.state import PXEState
from conftest import ENROLL_KEY, TickleListener, wait_until
from taskserver.pxe import PXEStore

BACKENDS = ("sqlite", "postgresql")   # conftest.py: each test on both databases

ROOT = Path(__file__).resolve().parents[1]
NOW = "2026-01-02T03:04:05Z"
SBS_NAMES = {"initial-config": "initialPXEConfigPath.sbs", "clients": "0123456789-client.sbs",
             "images": "0123456789-image.sbs", "predefined": "PredefinedComputers.sbs"}


def sbs_name(kind: str) -> str:
    return SBS_NAMES.get(kind) or f"{uuid.uuid4()}.sbs"


def run_cli(*args, check=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "taskserver", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=30)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}: {proc.stderr}")
    return proc


def pxe(db, *args, check=True):
    """``dsagent-server pxe COMMAND --db DB ARGS...``"""
    return run_cli("pxe", args[0], "--db", db, *args[1:], check=check)


class Site:
    """A site server as the agent's PXE process sees the task server: startup, state,
    and pulling its UpdateSBSInfo tasks into a real agent PXE state."""

    def __init__(self, server, store, client_id: str, tmp_path: Path, tickle: str | None = None):
        self.client_id = client_id
        self.creds = store.enroll(client_id, tickle_addr=tickle)
        self.http = httpx.Client(base_url=f"{server.url}/api/v1/clients/{client_id}", timeout=5,
                                 headers={"Authorization": f"Bearer {self.creds['token']}"})
        self.state = PXEState(tmp_path / client_id)
        self.seen: set[str] = set()

    def close(self):
        self.http.close()
        self.state.close()

    def startup(self, apply: bool = True) -> dict:
        resp = self.http.get("/pxe/startup")
        assert resp.status_code == 200, resp.text
        answer = resp.json()
        if apply:
            docs = [(SBS_NAMES[kind], parse_sbs(SBS_NAMES[kind], answer[kind].encode()))
                    for kind in ("initial-config", "clients", "images", "predefined")]
            self.state.apply_all(docs)
        return answer

    def post_state(self, body) -> httpx.Response:
        return self.http.post("/pxe/state", content=body if isinstance(body, bytes)
                              else json.dumps(body).encode(),
                              headers={"Content-Type": "application/json"})

    def pull(self) -> list[tuple[str, object]]:
        """The new UpdateSBSInfo tasks, pulled and parsed as the agent does: (kind, doc)."""
        resp = self.http.get("/tasks")
        assert resp.status_code == 200
        parsed = parse_client_tasks(resp.content, self.client_id)
        assert not parsed.rejected and not parsed.skipped
        new = []
        for task in parsed.tasks:
            if task.id in self.seen:
                continue
            self.seen.add(task.id)
            assert task.type == "UpdateSBSInfo" and set(task.parameters) == {"kind", "payload"}
            kind = task.parameters["kind"]
            new.append((kind, parse_sbs(sbs_name(kind), task.parameters["payload"].encode())))
        return new

    def apply(self, pulled) -> None:
        self.state.apply_all([(sbs_name("update"), doc) for _, doc in pulled])


@pytest.fixture
def sites(server, store, tmp_path):
    made: list[Site] = []

    def make(client_id: str, **kw) -> Site:
        made.append(Site(server, store, client_id, tmp_path, **kw))
        return made[-1]
    yield make
    for site in made:
        site.close()


def good_state(**changes) -> dict:
    state = {"serving": True, "reason": "dnsmasq running", "computers": 2, "images": 1,
             "last_applied": {"file": "0123456789-client.sbs", "at": NOW}, "at": NOW}
    state.update(changes)
    return state


def agent_view(state: PXEState) -> dict:
    return {"managed": {m: (c.action, c.config, c.id) for m, c in state.computers().items()},
            "predefined": {m: (c.action, c.config, c.id)
                           for m, c in state.computers(predefined=True).items()},
            "images": state.images(), "settings": state.settings()}


def console_view(store) -> dict:
    pxe = PXEStore(store)
    lists = {"managed": {}, "predefined": {}}
    for c in pxe.computers():
        lists[c.list][c.mac] = (c.action, c.config, c.name)
    return {**lists, "images": pxe.images(), "settings": pxe.settings()}


# -- startup ------------------------------------------------------------------------

def test_startup_answers_the_section_7_documents_and_registers(server, store, sites):
    site = sites("site-1")
    pxe = PXEStore(store)
    assert pxe.servers() == []
    # changes before any PXE server registered: stored, nothing queued
    assert pxe.add_computer("00-11-22-AA-BB-CC", "automation", "pc-0042", "auto64",
                            managed=True).tasks == {}
    pxe.add_computer("00:11:22:33:44:01", "production", "lab 1")
    pxe.set_image("auto64", "20260101T000000.000000Z-0a1b2c3d")
    pxe.set_settings({"automation_config": "auto64"})

    answer = site.startup()
    assert set(answer) == {"initial-config", "clients", "images", "predefined"}
    docs = {kind: parse_sbs(SBS_NAMES[kind], answer[kind].encode()) for kind in SBS_NAMES}
    assert docs["initial-config"] == Settings({"unknown_computers": "ignore",
                                               "automation_config": "auto64"})
    assert docs["clients"] == Computers(False, (Computer("00:11:22:aa:bb:cc", "automation",
                                                         "auto64", "pc-0042"),))
    assert docs["predefined"] == Computers(True, (Computer("00:11:22:33:44:01", "production",
                                                           None, "lab 1"),))
    assert docs["images"] == Images((Image("auto64", "20260101T000000.000000Z-0a1b2c3d"),))
    assert agent_view(site.state) == console_view(store)
    assert site.state.decision("00:11:22:aa:bb:cc") == ("automation", "auto64")

    (registered,) = server.pxe_servers()
    assert registered["client_id"] == "site-1" and registered["status"] == "no state yet"
    assert registered["startup_at"] == registered["registered_at"]
    first = registered["registered_at"]
    time.sleep(0.01)
    site.startup(apply=False)                    # seen again: registered_at is kept
    (again,) = server.pxe_servers()
    assert again["registered_at"] == first and again["startup_at"] > first
    assert server.request_counts("site-1")["pxe/startup"] == 2


def test_startup_with_empty_lists_is_still_xml_and_needs_the_token(server, store, sites):
    site = sites("site-empty")
    answer = site.startup()
    assert answer["predefined"] is not None      # always the XML: a stale list is replaced
    assert parse_sbs("PredefinedComputers.sbs", answer["predefined"].encode()) == Computers(
        True, ())
    assert parse_sbs("0123456789-image.sbs", answer["images"].encode()) == Images(())
    base = f"{server.url}/api/v1/clients/site-empty/pxe"
    assert httpx.get(f"{base}/startup").status_code == 401
    assert httpx.get(f"{base}/startup", headers={"Authorization": "Bearer nope"}).status_code == 401
    wrong = site.http.post("/pxe/startup", content=b"")
    assert wrong.status_code == 405 and wrong.headers["Allow"] == "GET"
    assert site.http.get("/pxe/state").status_code == 405
    assert site.http.get("/pxe/other").status_code == 404


# -- state --------------------------------------------------------------------------

def test_state_is_recorded_and_registers_a_server_that_never_called_startup(server, sites):
    site = sites("site-state")
    resp = site.post_state(good_state())
    assert resp.status_code == 204 and resp.content == b""
    assert "content-length" not in resp.headers
    (entry,) = server.pxe_servers()
    assert entry["client_id"] == "site-state" and entry["startup_at"] is None
    assert entry["state"] == good_state() and entry["status"] == "serving"
    assert entry["age_s"] < 30 and not entry["silent"] and entry["poll_interval_s"] == 17
    assert site.post_state(good_state(serving=False, reason="dnsmasq exited 2",
                                      last_applied=None)).status_code == 204
    (entry,) = server.pxe_servers()
    assert entry["status"] == "not serving" and entry["state"]["reason"] == "dnsmasq exited 2"


@pytest.mark.parametrize("body, field", [
    (b"{not json", "JSON"),
    (b"[]", "JSON object"),
    (good_state(serving="yes"), "serving"),
    ({k: v for k, v in good_state().items() if k != "serving"}, "serving"),
    (good_state(reason=None), "reason"),
    (good_state(computers=-1), "computers"),
    (good_state(computers=True), "computers"),
    (good_state(images=1.5), "images"),
    ({k: v for k, v in good_state().items() if k != "last_applied"}, "last_applied"),
    (good_state(last_applied="0123456789-client.sbs"), "last_applied"),
    (good_state(last_applied={"file": 7, "at": NOW}), "last_applied.file"),
    (good_state(last_applied={"file": "x.sbs", "at": "yesterday"}), "last_applied.at"),
    (good_state(at="2026-13-01T00:00:00Z"), "at"),
    ({k: v for k, v in good_state().items() if k != "at"}, "at"),
])
def test_bad_state_bodies_are_refused_naming_the_field(server, sites, body, field):
    site = sites("site-bad")
    assert site.post_state(good_state()).status_code == 204
    resp = site.post_state(body)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert field in error, error
    if field != "JSON" and field != "JSON object":
        assert error.startswith(f"pxe/state: {field} must be ")
    assert server.pxe_servers()[0]["state"] == good_state()      # the last good one stays


# -- console changes fanned out -----------------------------------------------------

def test_console_changes_fan_out_to_every_pxe_server(server, store, sites, tmp_path):
    one, two = sites("site-1"), sites("site-2")
    bystander = store.enroll("pc-not-pxe")
    one.startup()
    two.startup()
    db = store.db_path
    expected = [
        (("add-computer", "--mac", "00-11-22-33-44-01", "--name", 'lab "1" \'x\' <&> é',
          "--action", "automation", "--config", "auto64", "--no-tickle"),
         "predefined", Computers(True, (Computer("00:11:22:33:44:01", "automation", "auto64",
                                                 'lab "1" \'x\' <&> é'),))),
        (("add-computer", "--mac", "00:11:22:33:44:AA", "--action", "automation", "--managed",
          "--no-tickle"),
         "update", Update(Computer("00:11:22:33:44:aa", "automation"))),
        (("set-action", "--mac", "00:11:22:33:44:aa", "--action", "production", "--config",
          "auto64", "--no-tickle"),
         "update", Update(Computer("00:11:22:33:44:aa", "production", "auto64"))),
        (("set-action", "--mac", "00:11:22:33:44:01", "--action", "ignore", "--no-tickle"),
         "predefined", Computers(True, (Computer("00:11:22:33:44:01", "ignore", "auto64",
                                                 'lab "1" \'x\' <&> é'),))),
        (("set-image", "--config", "auto64", "--version", "v1", "--no-tickle"),
         "update", Update(Image("auto64", "v1"))),
        (("set-image", "--config", "winpe", "--version", "v7", "--no-tickle"),
         "update", Update(Image("winpe", "v7"))),
        (("remove-image", "--config", "winpe", "--no-tickle"),
         "update", Update(RemoveImage("winpe"))),
        (("set", "unknown_computers=automation", "--no-tickle"),
         "update", Update(Setting("unknown_computers", "automation"))),
        (("set", "unknown_computers=ignore", "automation_config=auto64", "--no-tickle"),
         "initial-config", Settings({"unknown_computers": "ignore",
                                     "automation_config": "auto64"})),
        (("remove-computer", "--mac", "00:11:22:33:44:AA", "--no-tickle"),
         "update", Update(RemoveComputer("00:11:22:33:44:aa"))),
    ]
    for args, kind, doc in expected:
        proc = pxe(db, *args)
        lines = proc.stdout.splitlines()
        assert [line.split()[:3] for line in lines[1:]] == [
            ["site-1", "UpdateSBSInfo", kind], ["site-2", "UpdateSBSInfo", kind]], proc.stdout
        for site in (one, two):
            assert site.pull() == [(kind, doc)], args
            site.apply([(kind, doc)])
            assert agent_view(site.state) == console_view(store), args
    assert store.pending_tasks(bystander["client_id"]) == []
    # a site server that starts again gets the same state from its startup answer
    fresh = sites("site-3")
    fresh.startup()
    assert agent_view(fresh.state) == agent_view(one.state) == console_view(store)


def test_a_mac_is_on_one_list_and_a_registered_clients_mac_is_managed(server, store, sites):
    site = sites("site-1")
    site.startup()
    resp = httpx.post(f"{server.url}/api/v1/register", json={
        "name": "pc-0099", "macs": ["AA-BB-CC-00-00-99"], "enrollment_key": ENROLL_KEY})
    assert resp.status_code == 201
    pxe = PXEStore(store)
    sent = pxe.add_computer("aa:bb:cc:00:00:99", "automation", config="auto64")
    assert [kind for kind, _ in sent.files] == ["update"]          # managed: its client's id
    assert pxe.computer("aa:bb:cc:00:00:99").list == "managed"
    assert pxe.computer("aa:bb:cc:00:00:99").name == "pc-0099"
    sent = pxe.add_computers([{"mac": "aa:bb:cc:00:00:01", "action": "automation", "name": "p1"},
                              {"mac": "AA-BB-CC-00-00-02", "action": "ignore"}])
    assert [kind for kind, _ in sent.files] == ["predefined"] and list(sent.tasks) == ["site-1"]
    assert pxe.computer("aa:bb:cc:00:00:01").list == "predefined"
    pxe.remove_computer("aa-bb-cc-00-00-02")
    # a predefined computer given --managed moves: the predefined list loses it
    sent = pxe.add_computer("aa:bb:cc:00:00:01", "production", "p1", managed=True)
    assert [kind for kind, _ in sent.files] == ["predefined", "update"]
    assert [c.list for c in pxe.computers()] == ["managed", "managed"]
    # a managed computer stays managed when changed without --managed
    pxe.add_computer("aa:bb:cc:00:00:01", "automation", "p1")
    assert pxe.computer("aa:bb:cc:00:00:01").list == "managed"
    site.apply(site.pull())
    assert agent_view(site.state) == console_view(store)
    assert site.state.computers(predefined=True) == {}


def test_set_action_on_predefined_and_managed(server, store, sites, tmp_path):
    site = sites("site-1")
    site.startup()
    db = store.db_path
    pxe(db, "add-computer", "--mac", "00:00:00:00:00:01", "--action", "automation",
        "--config", "auto64", "--no-tickle")
    pxe(db, "add-computer", "--mac", "00:00:00:00:00:02", "--action", "automation",
        "--managed", "--no-tickle")
    site.apply(site.pull())
    proc = pxe(db, "set-action", "--mac", "00-00-00-00-00-01", "--action", "production",
               "--no-tickle")
    assert proc.stdout.splitlines()[0] == "predefined computer 00:00:00:00:00:01 set: " \
                                          "production auto64"
    assert site.pull() == [("predefined", Computers(True, (
        Computer("00:00:00:00:00:01", "production", "auto64"),)))]
    pxe(db, "set-action", "--mac", "00:00:00:00:00:02", "--action", "production", "--no-tickle")
    pulled = site.pull()
    assert pulled == [("update", Update(Computer("00:00:00:00:00:02", "production")))]
    site.apply(pulled)
    assert site.state.decision("00:00:00:00:00:02") == ("production", None)
    # failures (exit 1) and usage errors (exit 2) change nothing
    before = console_view(store)
    proc = pxe(db, "set-action", "--mac", "00:00:00:00:00:03", "--action", "ignore", check=False)
    assert proc.returncode == 1 and "no computer with MAC 00:00:00:00:00:03" in proc.stderr
    for args, message in (
            (("--mac", "00:00:00:00:00", "--action", "ignore"), "--mac: MAC '00:00:00:00:00'"),
            (("--mac", "00:00:00:00:00:01", "--action", "boot"), "--action: invalid choice"),
            (("--mac", "00:00:00:00:00:01", "--action", "automation", "--config", "a/b"),
             "--config: config 'a/b' is not a configuration name")):
        proc = pxe(db, "set-action", *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    proc = pxe(db, "remove-computer", "--mac", "00:00:00:00:00:03", check=False)
    assert proc.returncode == 1 and "no computer" in proc.stderr
    assert pxe(db, "set", "colour=blue", check=False).returncode == 2
    assert pxe(db, "add-computer", "--mac", "00:00:00:00:00:04", check=False).returncode == 2
    assert console_view(store) == before and site.pull() == []


def test_csv_is_all_or_nothing_and_one_task_per_server(server, store, sites, tmp_path):
    one, two = sites("site-1"), sites("site-2")
    one.startup()
    two.startup()
    db = store.db_path
    bad = tmp_path / "bad.csv"
    bad.write_text("mac,name,action,config\n"
                   "00:00:00:00:01:01,a,automation,auto64\n"
                   "00:00:00:00:01,b,automation,auto64\n"
                   "\n"
                   "00:00:00:00:01:03,c,reboot,\n"
                   "00:00:00:00:01:01,d,production,\n"
                   "00:00:00:00:01:05,e,ignore,bad/config\n")
    proc = pxe(db, "add-computer", "--csv", bad, check=False)
    assert proc.returncode == 1
    for line, what in ((3, "MAC '00:00:00:00:01'"), (5, "action 'reboot'"),
                       (6, "MAC 00:00:00:00:01:01 is already on line 2"),
                       (7, "config 'bad/config'")):
        assert f"bad.csv line {line}: {what}" in proc.stderr, proc.stderr
    assert "nothing applied" in proc.stderr and "line 2:" not in proc.stderr
    assert PXEStore(store).computers() == [] and one.pull() == [] and two.pull() == []
    header = tmp_path / "header.csv"
    header.write_text("mac,hostname,action\n00:00:00:00:01:01,a,automation\n")
    proc = pxe(db, "add-computer", "--csv", header, check=False)
    assert proc.returncode == 1 and "header.csv line 1: the header" in proc.stderr
    assert pxe(db, "add-computer", "--csv", header, "--mac", "00:00:00:00:00:01",
               check=False).returncode == 2

    good = tmp_path / "good.csv"
    rows = [f"00:00:00:00:{n // 256:02x}:{n % 256:02X},pc-{n},automation,auto64"
            for n in range(200)]
    good.write_text("MAC,Name,Action,Config\r\n" + "\r\n".join(rows) + "\r\n")
    proc = pxe(db, "add-computer", "--csv", good, "--no-tickle")
    assert proc.stdout.splitlines()[0] == "computers set: 200 predefined"
    for site in (one, two):
        ((kind, doc),) = site.pull()                       # ONE task for the whole CSV
        assert kind == "predefined" and len(doc.computers) == 200
        site.apply([(kind, doc)])
        assert agent_view(site.state) == console_view(store)
    managed = tmp_path / "managed.csv"
    managed.write_text("mac,action\n00:00:00:00:09:01,production\n00:00:00:00:09:02,ignore\n")
    pxe(db, "add-computer", "--csv", managed, "--managed", "--no-tickle")
    for site in (one, two):
        ((kind, doc),) = site.pull()
        assert kind == "clients" and [c.mac for c in doc.computers] == [
            "00:00:00:00:09:01", "00:00:00:00:09:02"]
        site.apply([(kind, doc)])
        assert agent_view(site.state) == console_view(store)
    listed = json.loads(pxe(db, "computers", "--json").stdout)
    assert len(listed["predefined"]) == 200 and len(listed["managed"]) == 2
    assert listed["managed"][0] == {"mac": "00:00:00:00:09:01", "action": "production",
                                    "name": None, "config": None}


# -- the servers listing --------------------------------------------------------------

def test_servers_listing_shows_state_and_silent_servers(server, store, sites):
    quiet, busy, new = sites("site-quiet"), sites("site-busy"), sites("site-new")
    quiet.startup(apply=False)
    assert quiet.post_state(good_state(reason="old news")).status_code == 204
    assert busy.post_state(good_state(computers=120)).status_code == 204
    new.startup(apply=False)
    with store._write() as conn:                 # site-quiet last spoke 10 minutes ago
        ten_minutes_ago = (datetime.now(timezone.utc) - timedelta(seconds=600)).strftime(
            "%Y-%m-%dT%H:%M:%S.%fZ")
        conn.execute("UPDATE pxe_servers SET state_at = ? WHERE client_id = 'site-quiet'",
                     (ten_minutes_ago,))
    listed = {s["client_id"]: s for s in json.loads(
        pxe(store.db_path, "servers", "--json").stdout)}
    assert {k: (v["status"], v["silent"]) for k, v in listed.items()} == {
        "site-quiet": ("silent", True), "site-busy": ("serving", False),
        "site-new": ("no state yet", False)}
    assert 590 < listed["site-quiet"]["age_s"] < 700
    assert listed["site-busy"]["state"]["computers"] == 120
    text = pxe(store.db_path, "servers").stdout
    row = {line.split()[0]: line for line in text.splitlines()[2:] if line.strip()}
    assert "10 min ago" in row["site-quiet"] and "silent" in row["site-quiet"]
    assert "nothing heard for 10 min, expected every 17 s; last said: old news" in text
    assert "serving" in row["site-busy"] and "120" in row["site-busy"]
    assert "0123456789-client.sbs at " + NOW in row["site-busy"]
    assert "3 PXE server(s), 1 silent" in text
    patient = json.loads(pxe(store.db_path, "servers", "--json", "--poll-interval",
                             "3600").stdout)
    assert not any(s["silent"] for s in patient)


# -- tickles ----------------------------------------------------------------------------

def test_a_change_tickles_each_pxe_server_and_a_failed_tickle_loses_nothing(server, store,
                                                                            sites):
    free = socket.create_server(("127.0.0.1", 0))
    refused = f"127.0.0.1:{free.getsockname()[1]}"
    free.close()
    awake = sites("site-awake")
    asleep = sites("site-asleep", tickle=refused)
    listener = TickleListener("site-awake", bytes.fromhex(awake.creds["tickle_key"]))
    try:
        store.set_tickle_addr("site-awake", listener.addr)
        awake.startup()
        asleep.startup()
        proc = pxe(store.db_path, "set", "unknown_computers=automation")
        assert proc.returncode == 0
        assert "tickled site-awake: OK" in proc.stderr
        assert ("warning: tickle of site-asleep failed: cannot tickle 'site-asleep' at "
                f"{refused}") in proc.stderr and "pulled at its next poll" in proc.stderr
        assert len(listener.lines) == 1
        assert listener.lines[0].startswith(b"DSTICKLE/1 site-awake ")
    finally:
        listener.sock.close()
    for site in (awake, asleep):                 # queued for both, tickled or not
        assert site.pull() == [("update", Update(Setting("unknown_computers", "automation")))]
    pxe(store.db_path, "set", "automation_config=auto64", "--confirm-s", "5")
    (task,) = [t for t in store.pending_tasks("site-asleep") if t["params"].get("confirm_s")]
    assert task["params"]["confirm_s"] == "5"


# -- BootWizRebuild's version lands in the image list -------------------------------------

def test_a_bootwiz_rebuild_success_records_its_image(server, store, sites):
    site = sites("site-1")
    site.startup()
    other = sites("site-2")
    other.startup()
    good = store.queue_task("site-1", "BootWizRebuild", {"config": "auto64", "base": "b"})
    bad = store.queue_task("site-1", "BootWizRebuild", {"config": "auto64", "base": "b"})

    def event(task_id, seq, state, details):
        return {"event_id": str(uuid.uuid4()), "task_id": task_id, "seq": seq, "state": state,
                "progress": None, "message": None, "details": details, "at": NOW}

    version = "20260102T030405.000000Z-0a1b2c3d"
    events = [event(good, 1, "received", {}), event(good, 2, "running", {}),
              event(good, 3, "succeeded", {"version": version, "initrd_sha256": "00"}),
              event(bad, 1, "succeeded", {"version": "not a <version>"})]
    resp = site.http.post("/status", json={"events": events})
    assert resp.status_code == 200 and len(resp.json()["accepted"]) == 4
    assert PXEStore(store).images() == {"auto64": version}
    assert other.pull() == []                    # the rebuilding site wrote its own update file
    answer = sites("site-3").startup()
    assert parse_sbs("0123456789-image.sbs", answer["images"].encode()) == Images(
        (Image("auto64", version),))
    wait_until(lambda: store.is_terminal(good) and store.is_terminal(bad), 5, "terminal")
