"""Paging and back-off (PROTOCOL.md §3 v1.1, issue #14): the reference server's
pages (taskserver/paging.py), the agent pulling page after page, an oversize
task failed by name, and ``Retry-After`` obeyed per endpoint. Real HTTP on
loopback, the real agent."""

from __future__ import annotations

import time
from urllib.parse import parse_qs

import httpx
import pytest
import xmltodict

from agent.common.taskxml import MAX_DOCUMENT_BYTES, parse_client_tasks
from conftest import wait_until
from taskserver.checks import InvalidRequest
from taskserver.loopback import LoopbackChain
from taskserver.paging import DEFAULT_LIMIT, MAX_LIMIT, page_parameters, render_page

BACKENDS = ("sqlite", "postgresql")   # conftest.py: each test on both databases

MB = 1_000_000


@pytest.fixture
def chain(tmp_path, store_target):
    c = LoopbackChain(tmp_path / "chain", db=store_target).start()
    c.wait_first_pull()
    yield c
    c.stop()


def page(store, client_id, limit=DEFAULT_LIMIT, max_bytes=MAX_DOCUMENT_BYTES):
    body, info = render_page(client_id, lambda n: store.deliverable_tasks(client_id, n),
                             limit, max_bytes)
    assert len(body) <= max_bytes
    return parse_client_tasks(body, client_id, max_bytes), info


def script(size: int) -> dict[str, str]:
    """A RunScript of about ``size`` bytes that does nothing (a long comment)."""
    return {"script": "true\n#" + "x" * size + "\n"}


# ---- the server's pages ----------------------------------------------------------

def test_a_page_holds_at_most_limit_tasks_and_says_more(store):
    store.enroll("pc-1")
    ids = [store.queue_task("pc-1", "RunScript", {"script": f"echo {i}"}) for i in range(5)]
    doc, info = page(store, "pc-1", limit=2)
    assert [t.id for t in doc.tasks] == ids[:2] and doc.more and info["more"]
    doc, info = page(store, "pc-1", limit=5)
    assert [t.id for t in doc.tasks] == ids and not doc.more


def test_a_page_fits_in_max_bytes_and_a_task_too_big_alone_is_a_stand_in(store):
    store.enroll("pc-1")
    small = store.queue_task("pc-1", "RunScript", {"script": "echo small"})
    big = store.queue_task("pc-1", "RunScript", script(40_000))
    fits = store.queue_task("pc-1", "RunScript", script(20_000))
    after = store.queue_task("pc-1", "RunScript", script(20_000))
    doc, info = page(store, "pc-1", max_bytes=32_768)
    assert [t.id for t in doc.tasks] == [small, fits]
    [rejected] = doc.rejected
    assert rejected.task_id == big and rejected.type == "RunScript"
    assert "over the 32,768 bytes this agent takes in one pull" in rejected.message
    size = int(rejected.message.split("the task is ", 1)[1].split(" bytes")[0].replace(",", ""))
    assert 40_000 < size < 41_000
    assert doc.more and info["oversize"] == 1        # `after` fits alone, not with the others
    assert info["task_ids"] == [small, big, fits]
    store.record_events("pc-1", [_event(t, 1, "received") for t in (small, big, fits)])
    doc, _ = page(store, "pc-1", max_bytes=32_768)
    assert [t.id for t in doc.tasks] == [after] and not doc.more


def test_page_parameters_are_checked_and_capped():
    assert page_parameters({}) == (DEFAULT_LIMIT, MAX_DOCUMENT_BYTES)
    assert page_parameters({"limit": ["5000"], "max_bytes": ["4096"]}) == (MAX_LIMIT, 4096)
    for query, name in (({"limit": ["0"]}, "limit"), ({"limit": ["-1"]}, "limit"),
                        ({"limit": ["ten"]}, "limit"), ({"max_bytes": ["100"]}, "max_bytes"),
                        ({"max_bytes": ["1e9"]}, "max_bytes")):
        with pytest.raises(InvalidRequest, match=f"^{name} must be a whole number"):
            page_parameters(query)


def test_the_http_api_pages_and_refuses_a_bad_parameter(server, store):
    creds = store.enroll("pc-1")
    ids = [store.queue_task("pc-1", "RunScript", {"script": "true"}) for _ in range(3)]
    with httpx.Client(base_url=server.url, timeout=5,
                      headers={"Authorization": f"Bearer {creds['token']}"}) as http:
        answer = http.get("/api/v1/clients/pc-1/tasks", params={"limit": 2, "max_bytes": 65536})
        doc = xmltodict.parse(answer.content, force_list=("Task",))["ClientTasks"]
        assert doc["@more"] == "true" and [t["@id"] for t in doc["Task"]] == ids[:2]
        bad = http.get("/api/v1/clients/pc-1/tasks", params={"limit": "x"})
        assert bad.status_code == 400 and bad.json()["error"].startswith("limit must be")
        old = http.get("/api/v1/clients/pc-1/tasks")              # a v1.0 agent: defaults
        assert "more" not in old.text and len(parse_client_tasks(old.content).tasks) == 3


def test_the_server_sheds_load_with_retry_after(server, store):
    creds = store.enroll("pc-1")
    server.max_in_flight = 0                       # every request is one too many
    answer = httpx.get(f"{server.url}/api/v1/clients/pc-1/tasks", timeout=5,
                       headers={"Authorization": f"Bearer {creds['token']}"})
    assert answer.status_code == 503 and 3 <= int(answer.headers["Retry-After"]) <= 8
    assert server.shed == 1


# ---- the agent -------------------------------------------------------------------

def test_three_9_mb_tasks_all_run_and_a_20_mb_one_fails_by_name(chain):
    """16 MiB per page: one 9 MB task a page, the agent pulling page after page
    on more="true"; the 20 MB task is a stand-in that fails naming both sizes."""
    nine = [chain.queue("RunScript", script(9 * MB)) for _ in range(2)]
    huge = chain.queue("RunScript", script(20 * MB))
    nine.append(chain.queue("RunScript", script(9 * MB)))
    small = chain.queue("RunScript", {"script": "echo small"})
    assert chain.tickle() == "OK"
    assert chain.wait(nine + [huge, small], 120)
    for task in nine + [small]:
        assert [e["state"] for e in chain.events(task)][-1] == "succeeded", chain.events(task)
    events = chain.events(huge)
    assert [e["state"] for e in events] == ["received", "failed"]
    assert f"over the {MAX_DOCUMENT_BYTES:,} bytes this agent takes in one pull" \
        in events[-1]["message"]
    assert "the task is 20,0" in events[-1]["message"], events[-1]["message"]
    log = chain.log_path.read_text()
    assert "(pulled after page 1 said more)" in log
    assert "response larger than" not in log                  # never a refused pull


def test_retry_after_on_status_is_obeyed_while_tickles_keep_pulling(chain):
    """503 with Retry-After: 5 on status posts, tickles every 0.5 s: no post for
    5 s after the refused one, the pulls go on, and every status arrives."""
    chain.server.set_fault(503, endpoints=["status"], retry_after=5)
    counts = lambda: chain.server.request_counts(chain.client_id)   # noqa: E731
    before = counts()
    task = chain.queue("RunScript", {"script": "echo hi"})
    assert chain.tickle() == "OK"
    wait_until(lambda: counts().get("status", 0) > before.get("status", 0), 10,
               "the first (refused) status post")
    refused_at, posts, pulls = time.monotonic(), counts()["status"], counts()["tasks"]
    while time.monotonic() - refused_at < 4.5:
        chain.tickle()
        time.sleep(0.5)
        assert counts()["status"] == posts, "a status post before Retry-After ran out"
    assert counts()["tasks"] >= pulls + 6, "tickles stopped pulling"
    chain.server.set_fault(None)
    assert chain.wait([task], 20)
    assert [e["state"] for e in chain.events(task)] == ["received", "running", "succeeded"]
    assert "(as the server asked)" in chain.log_path.read_text()


def _event(task_id, seq, state):
    import uuid
    return {"event_id": str(uuid.uuid4()), "task_id": task_id, "seq": seq, "state": state,
            "progress": None, "message": "", "details": {}, "at": "2026-12-07T10:00:00Z"}


def test_query_parsing_matches_the_agents_request():
    """What the agent sends (serverapi.get_tasks) is what the server reads."""
    request = httpx.Request("GET", "http://ns/api/v1/clients/x/tasks",
                            params={"limit": 100, "max_bytes": MAX_DOCUMENT_BYTES})
    assert page_parameters(parse_qs(request.url.query.decode())) == (100, MAX_DOCUMENT_BYTES)


def test_cancel_queued_tasks_from_the_command_line(tmp_path):
    """A queued task nobody took can be cancelled (its history says by whom); one
    an agent took cannot, and the command says why and exits 1."""
    import subprocess
    import sys

    from taskserver.store import TaskStore

    db = tmp_path / "ns.db"
    with TaskStore(str(db)) as store:
        store.enroll("pc-1")
        taken = store.queue_task("pc-1", "RunScript", {"script": "true"})
        queued = store.queue_task("pc-1", "RunScript", script(20 * MB))
        store.record_events("pc-1", [_event(taken, 1, "received")])
    done = subprocess.run([sys.executable, "-m", "taskserver", "cancel", "--db", str(db),
                           "--client", "pc-1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert f"{queued}\tcancelled" in done.stdout
    assert f"{taken}\tnot cancelled: the agent has taken it" in done.stdout
    with TaskStore(str(db)) as store:
        [event] = store.events(queued)
        assert (event["state"], event["details"]) == ("cancelled",
                                                      {"by": "server", "forced": False})
        assert "cancelled at the server" in event["message"]
        assert store.deliverable_tasks("pc-1", 10) == []
        assert store.cancel_tasks([queued, "nope"]) == {queued: "it already ended (cancelled)",
                                                        "nope": "no such task"}
        assert store.cancel_tasks([taken], force=True) == {taken: None}   # lost by its agent
        assert [(e["seq"], e["state"]) for e in store.events(taken)] == [
            (1, "received"), (2, "cancelled")]
        assert store.events(taken)[-1]["details"] == {"by": "server", "forced": True}
