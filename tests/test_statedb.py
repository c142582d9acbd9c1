"""The state DB + outbox: state machine, group commit, resend, recovery,
prune, the read-only summary, and the outbox's SQL in one place."""

import json
import re
import sqlite3
import threading
from pathlib import Path

import pytest

from agent.common.errors import DsagentError
from agent.common.events import TransitionError
from agent.common.task import Task
from agent.cta.taskdb import AgentDB, Change
from conftest import wait_until
from ctdataloader.outbox import Outbox, Summary, summary


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
    assert outbox.depth().waiting == 0
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


def test_prune_forgets_old_finished_tasks_none_of_whose_events_wait(db):
    for tid in ("sent", "waiting", "open"):
        db.record(tid, "received", type_name="X")
    db.record("sent", "running")
    db.record("sent", "succeeded")
    db.record("waiting", "failed")
    outbox = Outbox(db.path)
    outbox.delete([e["event_id"] for e in outbox.batch() if e["task_id"] != "waiting"])
    outbox.close()
    assert db.prune(older_than_s=3600) == 0          # finished, but not long ago
    assert db.prune(older_than_s=-1) == 1
    assert db.state_of("sent") is None
    assert db.state_of("waiting") == "failed" and db.state_of("open") == "received"
    assert db.resend_terminal("waiting") is False     # its terminal event still waits


def test_summary_reads_the_outbox_while_the_agent_holds_it(db, tmp_path):
    with pytest.raises(DsagentError, match="no state DB at"):
        summary(tmp_path / "elsewhere")
    assert summary(tmp_path) == Summary(0, None, 0)
    event = db.record("t1", "received", type_name="X")
    db.record("t1", "running")
    box = summary(tmp_path, sizes=True)
    assert box.waiting == 2 and 0 <= box.oldest_s < 60
    assert box.body_bytes > len(json.dumps(event)) > 0
    assert summary(tmp_path).body_bytes == 0    # status and doctor do not read every body
    outbox = Outbox(db.path)
    assert (outbox.depth().waiting, outbox.depth().body_bytes) == (2, 0)  # no sizes: cheap
    outbox.close()


def test_the_state_db_file_keeps_its_tables_and_columns(db):
    """An existing dsagent.db must keep working: same tables, same columns."""
    conn = sqlite3.connect(db.path)
    try:
        columns = {table: [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]
                   for (table,) in conn.execute(
                       "SELECT name FROM sqlite_master WHERE type='table' "
                       "AND name NOT LIKE 'sqlite_%'")}
    finally:
        conn.close()
    assert columns == {
        "tasks": ["task_id", "type", "task_json", "state", "next_seq", "terminal_event",
                  "updated_at"],
        "outbox": ["id", "event_id", "task_id", "body", "created_at"]}


OUTBOX_SQL = re.compile(r"\b(FROM|INTO|UPDATE|TABLE[^,]*?)\s+outbox\b", re.IGNORECASE)


def test_no_sql_on_the_outbox_outside_ctdataloader():
    """ctdataloader/outbox.py owns the outbox table: every statement on it is
    there (the shipped code and the benches; tests may poke at the file)."""
    root = Path(__file__).resolve().parent.parent
    found = [f"{path.relative_to(root)}:{n}: {line.strip()}"
             for top in ("agent", "handlers", "objecthost", "taskserver", "ctdataloader", "bench")
             for path in sorted((root / top).rglob("*.py"))
             if path.relative_to(root) != Path("ctdataloader/outbox.py")
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if OUTBOX_SQL.search(line)]
    assert found == []
    assert OUTBOX_SQL.search((root / "ctdataloader" / "outbox.py").read_text())  # sees SQL


def test_recorder_waits_out_a_full_disk(db, tmp_path, caplog):
    """docs/reliability.md "Disk full": a running or terminal event is retried
    until it is on disk (the outcome waits in memory), a progress event is
    dropped with a warning, and nothing recorded before is damaged. SQLite's
    max_page_count makes the file full exactly as a full disk does
    (SQLITE_FULL, "database or disk is full")."""
    from agent.common.notify import Notifier, NotifyListener
    from ctdataloader.recorder import OutboxRecorder

    listener = NotifyListener(tmp_path)
    recorder = OutboxRecorder(db, Notifier(tmp_path))
    task = Task("t-full", "RunScript", {"script": "true"})
    recorder.record(task, "received")
    recorder.record(task, "running")
    big = {"stdout_tail": "x" * 200_000}   # needs pages the file may not grow to

    def set_limit(pages: int) -> None:
        with db._lock:
            db._conn.execute(f"PRAGMA max_page_count={pages}")

    set_limit(db._conn.execute("PRAGMA page_count").fetchone()[0])
    assert recorder.record(task, "progress", progress=50, details=big) is None
    assert "progress of task t-full not recorded" in caplog.text

    done: dict = {}
    thread = threading.Thread(target=lambda: done.update(
        event=recorder.record(task, "succeeded", details=big)))
    thread.start()
    wait_until(lambda: "cannot record succeeded of task t-full" in caplog.text, 10,
               "the recorder's first failed try")
    assert thread.is_alive() and db.state_of("t-full") == "running"
    set_limit(1_000_000)                      # space is back
    thread.join(10)
    assert not thread.is_alive()
    assert done["event"]["state"] == "succeeded" and done["event"]["seq"] == 3
    assert db.state_of("t-full") == "succeeded"
    events = Outbox(db.path).batch()
    assert [e["state"] for e in events] == ["received", "running", "succeeded"]
    assert listener.wait(1)   # the uploader was told
    listener.close()
