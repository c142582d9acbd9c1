"""``dsagent-server deploy`` (taskserver/deploy.py) and queueing for many with
tokens: the console side of the initial deployment (PROTOCOL.md §8)."""

import io
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from taskserver.deploy import CAPTURE, follow, start
from taskserver.pxe import PXEStore
from taskserver.checks import InvalidRequest
from taskserver.store import TaskStore

REPO = Path(__file__).resolve().parent.parent
MAC = "52:54:00:12:34:56"


@pytest.fixture
def store(tmp_path):
    s = TaskStore(str(tmp_path / "ns.db"))
    yield s
    s.close()


def event(task_id, seq, state, message="", progress=None):
    return {"event_id": str(uuid.uuid4()), "task_id": task_id, "seq": seq, "state": state,
            "progress": progress, "message": message, "details": {},
            "at": "2026-12-07T10:00:00Z"}


def test_deploy_sets_automation_and_queues_deploy_then_reboot_for_the_listed_computer(store):
    store.enroll("site-1")
    pxe = PXEStore(store)
    pxe.startup("site-1")                               # a registered PXE server
    pxe.add_computer(MAC, "ignore", name="pc-0042", config="auto64")
    job = start(store, MAC, "gold-%COMPNAME%", "/dev/vda")
    assert job.client_id == "pc-0042" and job.pxe_servers == ["site-1"]
    assert pxe.computer(MAC).action == "automation"
    tasks = store.pending_tasks("pc-0042")              # queued before it ever registered
    assert [(t["type"], t["params"]) for t in tasks] == [
        ("DeployImage", {"image": "gold-pc-0042", "target": "/dev/vda"}),
        ("Reboot", {"to": "production"})]
    assert [t["type"] for t in store.pending_tasks("site-1")] == ["UpdateSBSInfo"] * 2


def test_capture_queues_create_image_of_the_source_then_reboot(tmp_path, store):
    pxe = PXEStore(store)
    pxe.add_computer(MAC, "ignore", name="pc-0042", config="auto64")
    store.close()
    done = subprocess.run([sys.executable, "-m", "taskserver", "capture", "--db",
                           str(tmp_path / "ns.db"), "--mac", MAC, "--image", "%COMPNAME%-golden",
                           "--source", "/dev/sda", "--no-wait"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "queued CreateImage" in done.stdout, done.stdout
    with TaskStore(str(tmp_path / "ns.db")) as s:
        assert [(t["type"], t["params"]) for t in s.pending_tasks("pc-0042")] == [
            ("CreateImage", {"image": "pc-0042-golden", "source": "/dev/sda"}),
            ("Reboot", {"to": "production"})]
        assert PXEStore(s).computer(MAC).action == "automation"
        job = start(s, MAC, "other", "/dev/vdb", kind=CAPTURE)
        out = io.StringIO()
        assert follow(s, job, timeout=0.1, out=out) == 1
        assert "capture not finished after 0.1 s: waiting for CreateImage, Reboot" \
            in out.getvalue()


def test_an_unlisted_computer_or_no_configuration_is_refused(store):
    with pytest.raises(InvalidRequest, match="no computer with MAC 52:54:00:12:34:56 is listed"):
        start(store, MAC, "gold")
    PXEStore(store).add_computer(MAC, "ignore", name="pc-1")
    with pytest.raises(InvalidRequest, match="which automation configuration"):
        start(store, MAC, "gold")


def test_follow_prints_each_status_and_ends_on_success_or_failure(store):
    PXEStore(store).add_computer(MAC, "ignore", name="pc-1", config="auto64")
    job = start(store, MAC, "gold")
    deploy, reboot = job.task_ids
    store.record_events("pc-1", [event(deploy, 1, "received"), event(deploy, 2, "running"),
                                 event(deploy, 3, "running", "wrote 50%", 50.0),
                                 event(deploy, 4, "succeeded", "deployed"),
                                 event(reboot, 1, "received"), event(reboot, 2, "succeeded")])
    out = io.StringIO()
    assert follow(store, job, timeout=5, out=out) == 0
    lines = out.getvalue().splitlines()
    assert "DeployImage running 50%  wrote 50%" in lines[2]
    assert lines[-1].startswith("deploy done: pc-1 (52:54:00:12:34:56)")

    job = start(store, MAC, "gold")
    store.record_events("pc-1", [event(job.task_ids[0], 1, "failed", "image gold: run 3 "
                                       "checksum mismatch")])
    out = io.StringIO()
    assert follow(store, job, timeout=5, out=out) == 1
    assert "deploy stopped: DeployImage failed: image gold: run 3 checksum mismatch" \
        in out.getvalue()


def test_follow_says_what_it_still_waits_for(store):
    PXEStore(store).add_computer(MAC, "ignore", name="pc-1", config="auto64")
    out = io.StringIO()
    assert follow(store, start(store, MAC, "gold"), timeout=0.1, out=out) == 1
    assert "waiting for DeployImage, Reboot" in out.getvalue()


def test_queue_for_many_replaces_tokens_per_computer_and_refuses_an_unknown_one(tmp_path):
    db = tmp_path / "ns.db"
    with TaskStore(str(db)) as s:
        s.enroll("pc-a", name="Alpha")
        s.enroll("pc-b")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "taskserver", "queue", "--db", str(db),
                               *args], capture_output=True, text=True, cwd=REPO, timeout=60)

    bad = cli("--client", "pc-a", "--client", "pc-b", "--type", "RunScript",
              "--param", "script=echo %COMPUTERNAME%")
    assert bad.returncode == 1 and "unknown token %COMPUTERNAME%" in bad.stderr
    good = cli("--client", "pc-a", "--client", "pc-b", "--type", "RunScript",
               "--param", "script=echo %COMPNAME% %ID%")
    assert good.returncode == 0, good.stderr
    with TaskStore(str(db)) as s:
        assert [t["params"]["script"] for t in s.pending_tasks("pc-a")] == ["echo Alpha pc-a"]
        assert [t["params"]["script"] for t in s.pending_tasks("pc-b")] == ["echo pc-b pc-b"]
