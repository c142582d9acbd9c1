"""The PXE process's Interface (agent/pxe/, PROTOCOL.md §7): SBS files parsed,
applied to the durable state and moved to SBSStore -- real files, real
processes, the real UpdateSBSInfo through ``dsagent run-task``."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from agent.common.statusfile import read_all
from agent.pxe.interface import InterfaceError, prune, scan, store_dir
from agent.pxe.sbsdoc import (Computer, Computers, Image, Images, RemoveComputer, RemoveImage,
                              Setting, SBSParseError, Settings, Update, parse_sbs)
from agent.pxe.state import Decision, PXEState
from conftest import wait_until
from taskserver.loopback import LoopbackChain

REPO = Path(__file__).resolve().parent.parent
MAC1, MAC2, MAC3 = "00:11:22:33:44:55", "00:11:22:33:44:66", "aa:bb:cc:dd:ee:ff"
INITIAL = ('<PXEConfig><Setting name="unknown_computers">automation</Setting>'
           '<Setting name="automation_config">auto64</Setting></PXEConfig>')
CLIENTS = (f'<Computers><Computer mac="{MAC1.upper()}" id="pc-1" action="automation" '
           f'config="linux-auto" extra="ignored"/>'
           f'<Computer mac="{MAC2.replace(":", "-")}" id="pc-2" action="production"/></Computers>')
PREDEFINED = f'<Computers><Computer mac="{MAC3}" action="ignore"/></Computers>'
IMAGES = '<Images><Image config="auto64" version="20261201-1"/><Image config="old"/></Images>'


def uid():
    return f"{uuid.uuid4()}.sbs"


@pytest.fixture
def env(tmp_path):
    sbs = tmp_path / "sbs" / "SBS"
    sbs.mkdir(parents=True)
    state = PXEState(tmp_path / "state")
    yield sbs, state
    state.close()


def drop(folder, name, text, mtime=None):
    """A file as UpdateSBSInfo makes it: hidden temporary name, then a link."""
    tmp = folder / f".dsagent.1.{uuid.uuid4().hex[:16]}.tmp"
    tmp.write_text(text, encoding="utf-8")
    if mtime is not None:
        os.utime(tmp, (mtime, mtime))
    os.link(tmp, folder / name)
    tmp.unlink()
    return name


# ---- the parser ----------------------------------------------------------------

def test_every_document_kind_parses():
    assert parse_sbs("initialPXEConfigPath.sbs", INITIAL.encode()) == Settings(
        {"unknown_computers": "automation", "automation_config": "auto64"})
    clients = parse_sbs("4829301756-client.sbs", CLIENTS.encode())
    assert clients == Computers(False, (Computer(MAC1, "automation", "linux-auto", "pc-1"),
                                        Computer(MAC2, "production", None, "pc-2")))
    assert parse_sbs("PredefinedComputers.sbs", PREDEFINED.encode()) == Computers(
        True, (Computer(MAC3, "ignore"),))
    assert parse_sbs("1234567890-image.sbs", IMAGES.encode()) == Images(
        (Image("auto64", "20261201-1"), Image("old")))
    assert parse_sbs("PredefinedComputers.sbs", b"<Computers/>") == Computers(True, ())
    for xml, change in [
            (f'<Computer mac="{MAC1}" action="ignore"/>', Computer(MAC1, "ignore")),
            ('<RemoveComputer mac="AA-BB-CC-DD-EE-FF"/>', RemoveComputer(MAC3)),
            # BootWizRebuild's update file: extra attributes are ignored
            ('<Image config="auto64" version="v2" path="/srv/preboot/x"/>', Image("auto64", "v2")),
            ('<RemoveImage config="old"/>', RemoveImage("old")),
            ('<Setting name="unknown_computers">ignore</Setting>',
             Setting("unknown_computers", "ignore"))]:
        assert parse_sbs(uid(), f"<Update>{xml}</Update>".encode()) == Update(change)


@pytest.mark.parametrize("name, xml, message", [
    ("notes.sbs", "<Computers/>", "not an SBS file name"),
    ("1234567890-client.sbs", "<Images/>", "root element is <Images>, expected <Computers>"),
    ("1234567890-client.sbs", "<Computers><Computer mac='zz' action='ignore'/></Computers>",
     "MAC 'zz' is not six hex pairs"),
    ("1234567890-client.sbs", f"<Computers><Computer mac='{MAC1}' action='boot'/></Computers>",
     "action 'boot' is not one of automation, production, ignore"),
    ("1234567890-client.sbs", f"<Computers><Computer mac='{MAC1}'/></Computers>",
     "<Computer> has no action attribute"),
    ("1234567890-client.sbs", f"<Computers><Computer mac='{MAC1}' action='ignore'/>"
     f"<Computer mac='{MAC1.upper()}' action='ignore'/></Computers>", "listed twice"),
    ("1234567890-client.sbs", "<Computers><Printer/></Computers>", "unexpected element <Printer>"),
    ("1234567890-image.sbs", "<Images><Image version='1'/></Images>", "no config attribute"),
    ("initialPXEConfigPath.sbs", "<PXEConfig><Setting name='unknown_computers'>maybe</Setting>"
     "</PXEConfig>", "unknown_computers is 'maybe'"),
    (None, "<Update/>", "<Update> holds 0 changes"),
    (None, "<Update><RemoveImage config='a'/><RemoveImage config='b'/></Update>", "holds 2"),
    (None, "<Update>hello</Update>", "holds text 'hello'"),
    (None, "<!DOCTYPE x [<!ENTITY a 'b'>]><Update/>", "DTD"),
    (None, "<Update><Computer", "not well-formed XML"),
])
def test_bad_documents_name_the_file_and_the_problem(name, xml, message):
    name = name or uid()
    with pytest.raises(SBSParseError) as err:
        parse_sbs(name, xml.encode())
    assert str(err.value).startswith(f"{name}: ") and message in str(err.value)


NAMES = st.sampled_from(["initialPXEConfigPath.sbs", "1234567890-client.sbs",
                         "PredefinedComputers.sbs", "1234567890-image.sbs",
                         "77aa417a-c9d7-4154-8f79-97ef95ead2bc.sbs", "x.sbs"])
FRAGMENTS = st.sampled_from(["<Computers>", "</Computers>", "<Update>", "</Update>", "<Images>",
                             "</Images>", "<PXEConfig>", "</PXEConfig>", f'<Computer mac="{MAC1}"',
                             ' action="automation"', ' config="a b"', "/>", ">", "<Image",
                             '<Setting name="unknown_computers">', "</Setting>", "<RemoveImage",
                             "&amp;", "&x;", "<!DOCTYPE a>", "<?xml version='1.0'?>", "\x00",
                             "é", "<a>", "</a>", " ", "text"])


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(NAMES, st.one_of(st.binary(max_size=300),
                        st.lists(FRAGMENTS, max_size=12).map(lambda p: "".join(p).encode())))
def test_fuzzed_input_only_ever_raises_the_parsers_error(name, data):
    try:
        doc = parse_sbs(name, data)
    except SBSParseError as exc:
        assert str(exc).startswith(name)
        return
    assert isinstance(doc, (Settings, Computers, Images, Update))


# ---- applying ------------------------------------------------------------------

def test_every_kind_is_applied_then_moved_to_sbsstore(env):
    sbs, state = env
    now = time.time()
    files = [drop(sbs, uid(), f'<Update><Computer mac="{MAC2}" action="automation"/></Update>',
                  now - 50),  # the oldest file, but an update: applied after the lists
             drop(sbs, "4829301756-client.sbs", CLIENTS, now - 40),
             drop(sbs, "PredefinedComputers.sbs", PREDEFINED, now - 30),
             drop(sbs, "1234567890-image.sbs", IMAGES, now - 20),
             drop(sbs, "initialPXEConfigPath.sbs", INITIAL, now - 10),
             drop(sbs, uid(), '<Update><RemoveImage config="old"/></Update>', now - 5),
             drop(sbs, uid(), '<Update><Image config="auto64" version="v3"/></Update>', now - 4),
             drop(sbs, uid(), '<Update><Setting name="automation_config">auto65</Setting>'
                              '</Update>', now - 3),
             drop(sbs, uid(), f'<Update><RemoveComputer mac="{MAC3}"/></Update>', now - 2)]
    (sbs / ".dsagent.9.0123456789abcdef.tmp").write_text("half a file")  # never read
    result = scan(sbs, state)
    assert [name for name, _ in result.applied] == files[1:5] + [files[0]] + files[5:]
    assert result.rejected == [] and result.waiting == []
    assert sorted(os.listdir(sbs)) == [".dsagent.9.0123456789abcdef.tmp"]
    assert sorted(os.listdir(store_dir(sbs))) == sorted(files)
    assert dict(result.applied)[files[1]] == "managed computers replaced: 2 computer(s)"
    assert state.settings() == {"unknown_computers": "automation", "automation_config": "auto65"}
    assert state.images() == {"auto64": "v3"}
    assert state.computers() == {MAC1: Computer(MAC1, "automation", "linux-auto", "pc-1"),
                                 MAC2: Computer(MAC2, "automation", None, None)}
    assert state.computers(predefined=True) == {}
    assert state.decision(MAC1) == Decision("automation", "linux-auto")
    assert state.decision(MAC2.upper()) == ("automation", "auto65")   # the setting's config
    assert state.decision(MAC3) == ("automation", "auto65")           # unknown: the setting
    assert state.counts() == {"computers": 2, "predefined": 0, "images": 1}
    assert state.last_applied()["file"] == files[-1]


def test_decisions_follow_the_lists_and_unknown_computers(env):
    sbs, state = env
    drop(sbs, "4829301756-client.sbs", CLIENTS)
    drop(sbs, "PredefinedComputers.sbs", f'<Computers><Computer mac="{MAC3}" action="production"/>'
                                         f'<Computer mac="{MAC2}" action="ignore"/></Computers>')
    scan(sbs, state)
    assert state.decision(MAC2) == ("production", None)        # managed wins over predefined
    assert state.decision(MAC3) == ("production", None)
    assert state.decision("02:00:00:00:00:01") == ("ignore", None)   # default: ignore
    drop(sbs, uid(), '<Update><Setting name="unknown_computers">automation</Setting></Update>')
    scan(sbs, state)
    assert state.decision("02:00:00:00:00:01") == ("automation", None)  # no automation_config
    with pytest.raises(ValueError):
        state.decision("nonsense")


def test_a_rejected_file_is_set_aside_with_its_reason_and_the_others_apply(env):
    sbs, state = env
    good = drop(sbs, "4829301756-client.sbs", CLIENTS)
    bad = drop(sbs, uid(), "<Update><Computer mac='00:11' action='ignore'/></Update>")
    junk = drop(sbs, "readme.sbs", "hello")
    (store_dir(sbs) / "rejected").mkdir(parents=True)
    (store_dir(sbs) / "rejected" / junk).write_text("an older file of that name")
    result = scan(sbs, state)
    assert [n for n, _ in result.applied] == [good] and len(state.computers()) == 2
    assert sorted(n for n, _ in result.rejected) == sorted([bad, junk])
    rejected = store_dir(sbs) / "rejected"
    assert (rejected / junk).read_text() == "an older file of that name"   # never overwritten
    assert (rejected / "readme-1.sbs").read_text() == "hello"
    assert "not an SBS file name" in (rejected / "readme-1.sbs.reason").read_text()
    assert "MAC '00:11' is not six hex pairs" in (rejected / f"{bad}.reason").read_text()
    assert os.listdir(sbs) == []


def test_a_restart_keeps_the_state(env, tmp_path):
    sbs, state = env
    drop(sbs, "4829301756-client.sbs", CLIENTS)
    drop(sbs, "initialPXEConfigPath.sbs", INITIAL)
    drop(sbs, "1234567890-image.sbs", IMAGES)
    result = scan(sbs, state)
    state.close()
    again = PXEState(tmp_path / "state")   # no old file is needed: SBS is empty now
    try:
        assert os.listdir(sbs) == []
        assert again.decision(MAC1) == ("automation", "linux-auto")
        assert again.settings()["automation_config"] == "auto64"
        assert set(again.images()) == {"auto64", "old"}
        assert again.last_applied()["file"] == result.applied[-1][0]
    finally:
        again.close()


def test_ten_thousand_files_in_one_scan(env):
    """A mass roll-out's files all apply in one scan (one transaction); its
    speed is bench/pxe.py's."""
    sbs, state = env
    macs = [f"02:00:00:00:{i // 256:02x}:{i % 256:02x}" for i in range(10_000)]
    for mac in macs:
        drop(sbs, uid(), f'<Update><Computer mac="{mac}" action="automation" config="c"/></Update>')
    result = scan(sbs, state)
    assert len(result.applied) == 10_000 and os.listdir(sbs) == []
    assert len(os.listdir(store_dir(sbs))) == 10_000
    assert state.counts()["computers"] == 10_000
    assert state.decision(macs[-1]) == ("automation", "c")


def test_store_not_writable_is_a_clear_error_and_nothing_is_lost(env):
    sbs, state = env
    store_dir(sbs).write_text("a file where the SBSStore folder belongs")
    name = drop(sbs, "4829301756-client.sbs", CLIENTS)
    with pytest.raises(InterfaceError, match=r"SBSStore: it exists and is not a folder.*stay"):
        scan(sbs, state)
    assert os.listdir(sbs) == [name] and state.counts()["computers"] == 0
    store_dir(sbs).unlink()
    assert [n for n, _ in scan(sbs, state).applied] == [name]   # the next scan takes it


def test_sbsstore_is_pruned_by_age_and_size(tmp_path):
    store = tmp_path / "SBSStore"
    (store / "rejected").mkdir(parents=True)
    now = time.time()
    for i in range(10):
        path = store / f"{i}.sbs"
        path.write_bytes(b"x" * 100)
        os.utime(path, (now - 1000 + i, now - 1000 + i))
    old = store / "rejected" / "old.sbs"
    old.write_text("x")
    os.utime(old, (now - 5000, now - 5000))
    assert prune(store, max_age_s=3000, max_bytes=10**9) == 1 and not old.exists()
    assert prune(store, max_age_s=3000, max_bytes=450) == 6
    assert sorted(os.listdir(store)) == ["6.sbs", "7.sbs", "8.sbs", "9.sbs", "rejected"]


# ---- the process -----------------------------------------------------------------

def write_config(tmp_path, sbs, extra=""):
    config = tmp_path / "agent.toml"
    # a task server that never answers: the Interface works without one (no
    # startup answer ever applied, so no dnsmasq either)
    config.write_text(f'[agent]\nserver_url = "http://127.0.0.1:9"\nclient_id = "site-1"\n'
                      f'token = "t"\ntickle_key = "{"00" * 32}"\n'
                      f'state_dir = "{tmp_path / "state"}"\n'
                      f'[handlers]\nsbs_dir = "{sbs}"\npreboot_store = "{tmp_path / "preboot"}"\n'
                      f'[pxe]\ninterface = "lo"\n{extra}')
    config.chmod(0o600)
    return config


@pytest.fixture
def pxe_process(tmp_path):
    procs = []

    def start(config):
        log = open(tmp_path / "pxe.out", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "agent.pxe", "--config", str(config)],
                                cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_update_sbs_info_through_run_task_is_consumed_by_the_pxe_process(tmp_path, pxe_process):
    sbs = tmp_path / "sbs" / "SBS"
    sbs.mkdir(parents=True)
    config = write_config(tmp_path, sbs)
    proc = pxe_process(config)
    wait_until(lambda: read_all(tmp_path / "state").get("pxe"), 20, "the PXE process's status")
    doc = tmp_path / "tasks.xml"
    payload = f'<Update><Computer mac="{MAC1}" action="automation" config="auto64"/></Update>'
    doc.write_text(f'<ClientTasks><Task id="{uuid.uuid4()}" type="UpdateSBSInfo"><Parameters>'
                   f'<Parameter name="kind">update</Parameter>'
                   f'<Parameter name="payload"><![CDATA[{payload}]]></Parameter>'
                   f'<Parameter name="confirm_s">20</Parameter></Parameters></Task></ClientTasks>')
    result = subprocess.run([sys.executable, "-m", "agent", "run-task", str(doc), "--config",
                             str(config), "--json"], capture_output=True, text=True, cwd=REPO,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    final = json.loads(result.stdout.splitlines()[-1])
    assert final["state"] == "succeeded" and final["details"]["consumed"] is True, final
    assert "warning" not in final["details"]
    name = final["details"]["file"]
    assert (store_dir(sbs) / name).read_text() == payload
    facts = wait_until(lambda: (f := read_all(tmp_path / "state")["pxe"])["applied"] == 1 and f,
                       5, "the status file to count the file")
    assert facts["computers"] == 1 and facts["last_applied"]["file"] == name
    log = (tmp_path / "pxe.out").read_text()
    assert f"applied {name}: computer {MAC1} set: automation auto64" in log
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    state = PXEState(tmp_path / "state")
    try:
        assert state.decision(MAC1) == ("automation", "auto64")
    finally:
        state.close()


def test_the_process_sets_a_bad_file_aside_and_logs_it(tmp_path, pxe_process):
    sbs = tmp_path / "sbs" / "SBS"
    sbs.mkdir(parents=True)
    drop(sbs, "PredefinedComputers.sbs", "<Computers><Computer/></Computers>")
    proc = pxe_process(write_config(tmp_path, sbs))
    reason = store_dir(sbs) / "rejected" / "PredefinedComputers.sbs.reason"
    wait_until(reason.exists, 20, "the rejected file's reason")
    assert "<Computer> has no mac attribute" in reason.read_text()
    facts = wait_until(lambda: read_all(tmp_path / "state")["pxe"].get("rejected") == 1
                       and read_all(tmp_path / "state")["pxe"], 5, "the status to count it")
    assert facts["last_rejected"]["file"] == "PredefinedComputers.sbs"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 0
    assert "rejected PredefinedComputers.sbs" in (tmp_path / "pxe.out").read_text()


@pytest.mark.parametrize("with_pxe", [True, False], ids=["with-pxe", "without-pxe"])
def test_the_supervisor_starts_the_pxe_child_only_with_pxe(tmp_path, with_pxe):
    sbs = tmp_path / "SBS"
    sbs.mkdir()
    chain = LoopbackChain(tmp_path / "chain", handlers={
        "sbs_dir": str(sbs), "preboot_store": str(tmp_path / "preboot")},
        extra_config='[pxe]\ninterface = "lo"\n' if with_pxe else "")
    with chain:
        chain.wait_first_pull()
        wait_until(lambda: all(chain.child(n) for n in ("objecthost", "cta", "ctdataloader")),
                   20, "the three children")
        status = subprocess.run([sys.executable, "-m", "agent", "status", "--config",
                                 str(chain.config_path)], capture_output=True, text=True,
                                cwd=REPO, timeout=60)
        if with_pxe:
            pxe = wait_until(lambda: chain.child("pxe"), 20, "the pxe child")
            drop(sbs, "1234567890-image.sbs", IMAGES)
            wait_until(lambda: not os.listdir(sbs), 10, "the PXE child to take the file")
            pxe.kill()   # restarted like the others
            wait_until(lambda: (c := chain.child("pxe")) and c.pid != pxe.pid, 20,
                       "the supervisor to restart the pxe child")
        else:
            time.sleep(1)
            assert chain.child("pxe") is None
    assert (" pxe " in status.stdout) is with_pxe, status.stdout


def test_a_missing_sbs_folder_is_said_once_and_taken_when_it_appears(tmp_path, pxe_process):
    sbs = tmp_path / "sbs" / "SBS"
    proc = pxe_process(write_config(tmp_path, sbs))
    facts = wait_until(lambda: (read_all(tmp_path / "state").get("pxe") or {}).get("last_error"),
                       20, "the PXE process to report the missing folder")
    assert f"cannot list the SBS folder {sbs}: does not exist" in facts["message"]
    assert proc.poll() is None
    sbs.mkdir(parents=True)
    drop(sbs, "1234567890-image.sbs", IMAGES)
    wait_until(lambda: (store_dir(sbs) / "1234567890-image.sbs").exists(), 20,
               "the file to be taken once the folder exists")
    proc.terminate()
    assert proc.wait(timeout=20) == 0
    log = (tmp_path / "pxe.out").read_text()
    assert log.count("cannot list the SBS folder") == 1 and "usable again" in log


def test_the_folder_watch_wakes_at_once_on_a_new_sbs_file(tmp_path):
    from agent.pxe.wake import FolderWatch

    sbs = tmp_path / "SBS"
    watch = FolderWatch(sbs)              # the folder does not exist yet: polled
    try:
        assert watch.wait(0.05) is False and not watch.using_inotify
        sbs.mkdir()
        assert watch.wait(0.05) is True   # it appeared (its mtime), and is watched from now
        watch._next_try = 0.0
        assert watch.wait(0.05) is False and watch.using_inotify
        woke = []
        timer = threading.Timer(0.3, lambda: drop(sbs, uid(), IMAGES))
        timer.start()
        started = time.monotonic()
        woke.append(watch.wait(30))
        timer.join()
        assert woke == [True] and time.monotonic() - started < 10   # not the 30 s timeout
    finally:
        watch.close()


CHILD = r"""
import os, subprocess, sys
from pathlib import Path
from agent.pxe.interface import InterfaceError, scan, store_dir
from agent.pxe.state import PXEState

top, how, doc = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
sbs = top / "sbs" / "SBS"
sbs.mkdir(parents=True)
(sbs / "4829301756-client.sbs").write_text(doc)
# full: the state is on the full disk too (the moves alone need no space)
state = PXEState(top / "state" if how == "full" else top.parent / "state")
if how == "full":
    with open(top / "filler", "wb", buffering=0) as fh:   # fill it to the last block
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass
else:
    subprocess.run(["mount", "-o", "remount,ro,bind", str(top)], check=True)
try:
    scan(sbs, state)
    print("no error")
except InterfaceError as exc:
    print("ERROR", exc)
print("LEFT", sorted(os.listdir(sbs)), state.counts()["computers"])
if how == "full":
    os.unlink(top / "filler")
else:
    subprocess.run(["mount", "-o", "remount,rw,bind", str(top)], check=True)
print("THEN", [n for n, _ in scan(sbs, state).applied], sorted(os.listdir(sbs)))
"""


@pytest.mark.parametrize("how", ["full", "read-only"])
def test_a_full_or_read_only_sbs_disk_is_a_clear_error_and_nothing_is_lost(tmp_path, how):
    """A real full file system (a 256 KiB tmpfs holding the state as well:
    moving files needs no space, committing does) and a real read-only one (a
    read-only bind mount, which stops root too), in a mount namespace of
    their own: the scan says why, the file stays, the next scan takes it."""
    top = tmp_path / "disk"
    top.mkdir()
    mount = (f"mount -t tmpfs -o size=256k tmpfs {top}" if how == "full"
             else f"mount --bind {top} {top}")
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f'{mount} && exec "$0" -c "$1" "$2" "$3" "$4"', sys.executable, CHILD, str(top), how,
         CLIENTS], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    cause = "full" if how == "full" else "read-only file system"
    print(lines[0])
    assert lines[0].startswith("ERROR") and cause in lines[0], lines
    assert "stay" in lines[0]                                   # and it says so
    assert lines[1] == "LEFT ['4829301756-client.sbs'] 0"      # nothing lost, nothing applied
    assert lines[2] == "THEN ['4829301756-client.sbs'] []"     # taken once the disk is usable
