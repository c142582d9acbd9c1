"""The state DB + outbox: state machine, group commit, resend, recovery."""

import threading

import pytest

from agent.common.events import TransitionError
from agent.cta.statedb import AgentDB, Change
from agent.common.task import Task
from ctdataloader.outbox import Outbox


@pytest.fixture
def db(tmp_path):
    database = AgentDB(tmp_path / "dsagent.db")
    yield database
    database.close()


def test_events_follow_the_state_machine_with_seq(db):
    task = Task("t1", "RunScript", {"script": "true"})
    states = ["received", "running", "progress", "progress", "succeeded"]
    events = [db.record("t1", s, task=task) for s in states]
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
    assert [e["state"] for e in events] == states
    with pytest.raises(TransitionError):
        db.record("t1", "running")  # nothing follows a terminal state
    with pytest.raises(TransitionError):
        db.record("t2", "running")  # a task starts with received
    assert db.state_of("t1") == "succeeded"


def test_outbox_order_delete_and_terminal_resend(db, tmp_path):
    db.record("t1", "received", type_name="X")
    final = db.record("t1", "failed", message="bad")
    outbox = Outbox(db.path)
    batch = outbox.batch()
    assert [e["state"] for e in batch] == ["received", "failed"]
    assert outbox.delete([e["event_id"] for e in batch]) == 2
    assert outbox.depth()[0] == 0
    assert db.resend_terminal("t1") is True
    assert db.resend_terminal("t1") is False  # already waiting
    [again] = outbox.batch()
    assert again == final  # the same event, same event_id
    outbox.close()


def test_many_threads_group_commit_without_losing_or_reordering(db):
    n_threads, per_thread = 8, 25

    def worker(k):
        for i in range(per_thread):
            tid = f"t{k}-{i}"
            db.record(tid, "received", type_name="X")
            db.record(tid, "running")
            db.record(tid, "succeeded")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outbox = Outbox(db.path)
    events = outbox.batch(10_000)
    assert len(events) == n_threads * per_thread * 3
    per_task = {}
    for e in events:
        per_task.setdefault(e["task_id"], []).append(e["seq"])
    assert all(seqs == [1, 2, 3] for seqs in per_task.values())
    outbox.close()


def test_record_many_one_bad_change_does_not_sink_the_others(db):
    changes = [Change("a", "received", "X"), Change("b", "running"), Change("c", "received", "X")]
    with pytest.raises(TransitionError):
        db.record_many(changes)
    assert db.state_of("a") == "received" and db.state_of("c") == "received"
    assert db.state_of("b") is None


def test_unfinished_survives_reopen(tmp_path):
    path = tmp_path / "dsagent.db"
    first = AgentDB(path)
    first.record("queued", "received", task=Task("queued", "RunScript", {"script": "true"}))
    first.record("started", "received", task=Task("started", "RunScript", {}))
    first.record("started", "running")
    first.record("done", "received", type_name="X")
    first.record("done", "failed")
    first.close()
    second = AgentDB(path)
    unfinished = {tid: (state, task) for tid, state, task in second.unfinished()}
    assert set(unfinished) == {"queued", "started"}
    assert unfinished["queued"][1].parameters == {"script": "true"}
    assert unfinished["started"][0] == "running"
    second.close()
