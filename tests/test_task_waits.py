"""Tasks that wait for others (taskserver/chain.py) and the server's package
bookkeeping (taskserver/packages.py), on both database engines: a held task
is not listed until what it waits for succeeded; a failure cancels it and
what waits for it, naming why; a source's manifest change queues one
replication per holder; a BootWizRebuild or a DeployImage queued while its
package replicates waits for it. Sources are real HTTP on loopback; agents'
statuses are stored as the API stores them (the real agents run in
tests/test_package_sync.py)."""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from taskserver.checks import InvalidRequest
from taskserver.cli import format_history
from taskserver.packages import GONE, PackageStore

BACKENDS = ("sqlite", "postgresql")


def event(task_id, seq, state, **details):
    return {"event_id": str(uuid.uuid4()), "task_id": task_id, "seq": seq, "state": state,
            "progress": None, "message": f"{state} #{seq}", "details": details,
            "at": "2026-12-07T10:00:00Z"}


def listed(store, client_id):
    return [t["task_id"] for t in store.deliverable_tasks(client_id, 100)]


def finish(store, client_id, task_id, state="succeeded", **details):
    store.record_events(client_id, [event(task_id, 1, "received"),
                                    event(task_id, 2, state, **details)])


@pytest.fixture
def clients(store):
    for name in ("site-a", "site-b", "pc-1"):
        store.enroll(name)
    return store


class Source:
    """A package's source of truth: a folder served by the standard library."""

    def __init__(self, root: Path):
        self.root = root
        handler = partial(SimpleHTTPRequestHandler, directory=str(root))
        handler.log_message = lambda *a: None
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, package):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{package}/"

    def publish(self, package, files: dict[str, bytes]) -> str:
        folder = self.root / package
        folder.mkdir(parents=True, exist_ok=True)
        manifest = json.dumps({"id": package, "files": [
            {"path": p, "sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
            for p, d in files.items()]}).encode()
        (folder / "manifest.json").write_bytes(manifest)
        return hashlib.sha256(manifest).hexdigest()


@pytest.fixture
def source(tmp_path):
    s = Source(tmp_path)
    yield s
    s.httpd.shutdown()


def test_a_held_task_is_listed_once_what_it_waits_for_succeeded(clients):
    store = clients
    first = store.queue_task("site-a", "RunScript", {"script": "true"})
    second = store.queue_task("pc-1", "RunScript", {"script": "true"}, after=[first])
    assert listed(store, "pc-1") == []
    assert store.history(task_id=second)[0]["state"] == "waiting"
    shown = format_history(store.history(client_id="pc-1"), show_client=False)
    assert f"waiting for task {first} to succeed" in shown and "1 task: 1 waiting" in shown
    finish(store, "site-a", first)
    assert listed(store, "pc-1") == [second]
    assert store.history(task_id=second)[0]["state"] == "queued"


def test_a_failure_cancels_what_waits_for_it_in_turn(clients):
    store = clients
    first = store.queue_task("site-a", "RunScript", {"script": "false"})
    second = store.queue_task("site-a", "RunScript", {"script": "true"}, after=[first])
    third = store.queue_task("pc-1", "RunScript", {"script": "true"}, after=[second])
    finish(store, "site-a", first, "failed")
    for task_id, awaited, ended in ((second, first, "failed"), (third, second, "cancelled")):
        history = store.history(task_id=task_id)[0]
        assert history["state"] == "cancelled"
        assert f"task {awaited}, which it waited for, ended {ended}" in \
            history["events"][-1]["message"]
    assert listed(store, "site-a") == [] and listed(store, "pc-1") == []


def test_cancelling_what_is_awaited_cancels_the_waiter(clients):
    store = clients
    first = store.queue_task("site-a", "RunScript", {"script": "true"})
    second = store.queue_task("pc-1", "RunScript", {"script": "true"}, after=[first])
    assert store.cancel_tasks([first]) == {first: None}
    assert store.history(task_id=second)[0]["state"] == "cancelled"


def test_waiting_for_a_task_that_cannot_succeed_is_refused(clients):
    store = clients
    failed = store.queue_task("site-a", "RunScript", {"script": "false"})
    finish(store, "site-a", failed, "failed")
    with pytest.raises(InvalidRequest, match="already ended failed"):
        store.queue_task("pc-1", "RunScript", {"script": "true"}, after=[failed])
    with pytest.raises(InvalidRequest, match="is not queued here"):
        store.queue_task("pc-1", "RunScript", {"script": "true"}, after=["no-such-task"])
    done = store.queue_task("site-a", "RunScript", {"script": "true"})
    finish(store, "site-a", done)
    free = store.queue_task("pc-1", "RunScript", {"script": "true"}, after=[done])
    assert listed(store, "pc-1") == [free]


def test_a_changed_source_queues_one_replication_per_holder(clients, source):
    store, packages = clients, PackageStore(clients)
    digest = source.publish("nic", {"a.ko": b"one"})
    packages.add("nic", "driver", source.url("nic"), ["site-a", "site-b"])
    queued, errors = packages.check()
    assert errors == {} and sorted(q.client_id for q in queued) == ["site-a", "site-b"]
    assert packages.check()[0] == []            # pending: not queued twice
    assert {h["state"] for h in packages.packages()[0]["holders"]} == {"queued"}
    first, second = queued                      # site-a, site-b
    store.record_events("site-a", [event(first.task_id, 1, "received"),
                                   {**event(first.task_id, 2, "progress"), "progress": 40.0}])
    states = {h["client_id"]: (h["state"], h["detail"]) for h in packages.packages()[0]["holders"]}
    assert states["site-a"] == ("replicating", "40%")
    store.record_events("site-a", [event(first.task_id, 3, "succeeded", manifest_sha256=digest)])
    finish(store, second.client_id, second.task_id, manifest_sha256=digest)
    states = {h["client_id"]: h["state"] for h in packages.packages()[0]["holders"]}
    assert states == {"site-a": "replicated", "site-b": "replicated"}
    assert packages.check()[0] == []            # up to date
    source.publish("nic", {"a.ko": b"two"})
    changed = packages.check()[0]
    assert sorted(q.client_id for q in changed) == ["site-a", "site-b"]
    assert store.task(changed[0].task_id)["params"] == {
        "package": "nic", "kind": "driver", "source": source.url("nic")}
    for q in changed:
        finish(store, q.client_id, q.task_id, manifest_sha256=digest)   # an old copy
    assert {h["state"] for h in packages.packages()[0]["holders"]} == {"outdated"}
    assert len(packages.check(resync=True)[0]) == 2


def test_a_deletion_at_the_source_reaches_every_holder(clients, source):
    store, packages = clients, PackageStore(clients)
    source.publish("nic", {"a.ko": b"one"})
    packages.add("nic", "driver", source.url("nic"), ["site-a"])
    for q in packages.check()[0]:
        finish(store, q.client_id, q.task_id, manifest_sha256="x")
    (source.root / "nic" / "manifest.json").unlink()
    queued = packages.check()[0]
    assert [q.client_id for q in queued] == ["site-a"]
    assert packages.packages()[0]["manifest_sha256"] == GONE
    finish(store, "site-a", queued[0].task_id, deleted=True)
    assert packages.packages()[0]["holders"][0]["state"] == "deleted"


def test_an_unreadable_source_is_reported_and_queues_nothing(clients, source):
    packages = PackageStore(clients)
    packages.add("nic", "driver", "http://127.0.0.1:9/nic/", ["site-a"])
    queued, errors = packages.check()
    assert queued == [] and "nic" in errors
    assert packages.packages()[0]["check_error"] == errors["nic"]
    source.publish("other", {"a": b"1"})
    packages.add("wrong", "driver", source.url("other"), ["site-a"])
    assert "the manifest of 'other', not of 'wrong'" in packages.check(["wrong"])[1]["wrong"]


def test_a_rebuild_queued_with_its_drivers_waits_for_their_replication(clients, source):
    """The seed's failure made impossible: "add drivers, then rebuild" at once."""
    store, packages = clients, PackageStore(clients)
    digest = source.publish("nic", {"a.ko": b"one"})
    packages.add("nic", "driver", source.url("nic"), ["site-a"])
    replicate = packages.check()[0][0].task_id
    rebuild = store.queue_task("site-a", "BootWizRebuild",
                               {"config": "linux", "base": "base", "drivers": "nic"})
    assert listed(store, "site-a") == [replicate]
    finish(store, "site-a", replicate, manifest_sha256=digest)
    assert listed(store, "site-a") == [rebuild]
    # site-b does not hold it yet: queueing its rebuild queues the replication first
    rebuild_b = store.queue_task("site-b", "BootWizRebuild",
                                 {"config": "linux", "base": "base", "drivers": "nic"})
    (replicate_b,) = listed(store, "site-b")
    assert store.task(replicate_b)["type"] == "ReplicatePackage"
    finish(store, "site-b", replicate_b, "failed")
    holders = {h["client_id"]: h for h in packages.packages()[0]["holders"]}
    assert (holders["site-b"]["state"], holders["site-b"]["detail"]) == ("failed", "failed #2")
    history = store.history(task_id=rebuild_b)[0]
    assert history["state"] == "cancelled"
    assert f"task {replicate_b}, which it waited for, ended failed" in \
        history["events"][-1]["message"]
    # up to date: nothing to wait for
    finish(store, "site-a", rebuild)
    again = store.queue_task("site-a", "BootWizRebuild",
                             {"config": "linux", "base": "base", "drivers": "nic,other"})
    assert listed(store, "site-a") == [again]


def test_a_deploy_waits_for_its_image_on_every_holder(clients, source):
    store, packages = clients, PackageStore(clients)
    digest = source.publish("golden", {"current": b"v1\n"})
    packages.add("golden", "image", source.url("golden"), ["site-a", "site-b"])
    queued = {q.client_id: q.task_id for q in packages.check()[0]}
    deploy = store.queue_task("pc-1", "DeployImage", {"image": "golden", "target": "/dev/vda"})
    assert listed(store, "pc-1") == []
    finish(store, "site-a", queued["site-a"], manifest_sha256=digest)
    assert listed(store, "pc-1") == []
    finish(store, "site-b", queued["site-b"], manifest_sha256=digest)
    assert listed(store, "pc-1") == [deploy]


def test_serve_checks_the_sources_on_its_schedule(clients, store_target, source):
    """``dsagent-server serve --package-check-s``: a source's change is noticed
    and queued without anyone asking."""
    import signal
    import subprocess
    import sys

    from conftest import wait_until

    store, packages = clients, PackageStore(clients)
    source.publish("nic", {"a.ko": b"one"})
    packages.add("nic", "driver", source.url("nic"), ["site-a"])
    server = subprocess.Popen([sys.executable, "-m", "taskserver", "serve", "--db", store_target,
                               "--listen", "127.0.0.1:0", "--package-check-s", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def replications():
            return [t for t in store.history(client_id="site-a")
                    if t["type"] == "ReplicatePackage"]

        wait_until(lambda: len(replications()) == 1, 20, "the first check")
        digest = source.publish("nic", {"a.ko": b"two"})
        finish(store, "site-a", replications()[0]["task_id"], manifest_sha256="old")
        wait_until(lambda: len(replications()) == 2, 20, "the check after the change")
        finish(store, "site-a", replications()[1]["task_id"], manifest_sha256=digest)
        assert packages.packages()[0]["holders"][0]["state"] == "replicated"
    finally:
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=20)
    assert server.returncode == 0, err
