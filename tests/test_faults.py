"""Hostile conditions through the whole chain (task server, `dsagent run`,
real processes and sockets): a kill storm, server outages, hostile handlers.

Nothing may be lost, nothing may run twice, and the agent must neither
hammer a server that is away nor stop serving because one handler misbehaves.
The campaign's machinery lives in bench/faults.py, whose full run (1,000
tasks, 60 s outages) prints the figures in docs/reliability.md; the versions
here are small enough for CI.
"""

import os
import random
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not installed

from agent import supervisor  # noqa: E402
from agent.common.config import SCHEMA  # noqa: E402
from bench import faults  # noqa: E402
from bench.report import table  # noqa: E402
from conftest import wait_until  # noqa: E402
from taskserver.loopback import LoopbackChain  # noqa: E402

SEED = int(os.environ.get("DSAGENT_FAULT_SEED") or random.randrange(1 << 30))


def show(capsys, text: str) -> None:
    """Print the counts even when pytest captures output."""
    with capsys.disabled():
        print("\n" + text)


# ---- supervisor restart backoff -----------------------------------------------

class _DeadProc:
    pid = 4242

    def poll(self):
        return -9


def _backoffs(monkeypatch, value, n=7):
    if value is None:
        monkeypatch.delenv(supervisor.BACKOFF_MAX_ENV, raising=False)
    else:
        monkeypatch.setenv(supervisor.BACKOFF_MAX_ENV, value)
    sup = supervisor.Supervisor(SimpleNamespace(path="agent.toml", has_section=lambda _: False))
    child = sup.children[0]
    seen = []
    for _ in range(n):
        child.proc = _DeadProc()
        sup._check(child)
        seen.append(child.backoff)
    return seen


def test_restart_backoff_doubles_to_30_s_by_default(monkeypatch):
    assert _backoffs(monkeypatch, None) == [1, 2, 4, 8, 16, 30, 30]


def test_restart_backoff_cap_from_the_environment(monkeypatch):
    assert _backoffs(monkeypatch, "5") == [1, 2, 4, 5, 5, 5, 5]
    assert _backoffs(monkeypatch, "0.25") == [0.25] * 7


@pytest.mark.parametrize("bad", ["soon", "0", "-1", "inf", "nan"])
def test_restart_backoff_cap_bad_value_is_logged_and_ignored(monkeypatch, caplog, bad):
    assert _backoffs(monkeypatch, bad) == [1, 2, 4, 8, 16, 30, 30]
    assert f"ignoring {supervisor.BACKOFF_MAX_ENV}=" in caplog.text


# ---- kill storm -----------------------------------------------------------------

def test_kill_storm_loses_nothing_and_runs_nothing_twice(tmp_path, capsys):
    """300 tasks; the CTA, the ctdataloader and the objecthost SIGKILLed 20 times
    in all, at random moments (seed in the output: DSAGENT_FAULT_SEED=...)."""
    res = faults.kill_storm(tmp_path, n_tasks=300, n_kills=20, seed=SEED)
    a = res.audit
    show(capsys, f"kill storm, DSAGENT_FAULT_SEED={SEED}\n" + table(faults.storm_rows(res)))
    assert sum(res.kills.values()) == 20
    assert res.restarts_logged == res.kills  # the supervisor saw and restarted every one
    assert not res.other_exits, res.other_exits  # nothing crashed by itself
    assert res.all_terminal, a.problems
    assert a.ok, a.problems  # seq 1..n, received -> running -> progress* -> one terminal
    assert sum(a.terminal.values()) == a.tasks == 300
    assert set(a.terminal) <= {"succeeded", "failed"}
    assert a.terminal["failed"] == a.interrupted  # failed only when the CTA died under it
    assert a.failed_other == 0
    assert a.double_runs == 0 and a.succeeded_not_run == 0
    assert a.completions <= a.tasks
    assert a.events_at_server == a.events_recorded and a.lost == 0
    assert a.duplicates == 0
    assert res.outbox_left == 0


# ---- server outages -------------------------------------------------------------

# What the backoff allows in a 10 s outage. Uploader: 0.5 s doubling to 60 s,
# each wait drawn in [b/2, b], so the shortest waits are 0.25, 0.5, 1, 2, 4 s:
# at most 1 + 5 = 6 POSTs. CTA (poll_interval_s = 5): failed pulls retried
# after 2 s, then 4, 5, 5 s (x 0.8..1.2), plus the 5 s poll timer: about 6 GETs.
MAX_POSTS_10S = 7
MAX_REQUESTS_10S = 30


def _check_outage(res, n_tasks):
    a = res.audit
    assert res.all_terminal, a.problems
    assert a.ok, a.problems
    assert a.terminal == {"succeeded": n_tasks}
    assert a.events_at_server == a.events_recorded and a.duplicates == 0
    assert res.outbox_left == 0
    assert res.finished_during > 0 and res.peak_outbox > 0  # the run went on meanwhile


def test_server_503_outage_backs_off_then_everything_arrives(tmp_path, capsys):
    res = faults.server_outage(tmp_path, "503", n_tasks=100, outage_s=10, poll_interval_s=5)
    show(capsys, "server answering 503 for 10 s\n" + table(faults.outage_rows(res)))
    _check_outage(res, 100)
    counted = res.requests["tasks"] + res.requests["status"]
    assert counted < MAX_REQUESTS_10S, res.requests
    assert res.requests["status"] <= MAX_POSTS_10S, res.requests
    # the agent logs every failed request, and the server counted them all
    assert res.log_failures["upload failed"] == res.requests["status"]
    assert res.drain_s < 30


def test_server_stopped_then_back_everything_arrives(tmp_path, capsys):
    """The server really gone (connections refused): it cannot count requests,
    so the agent's own log lines (one per failed request) are counted."""
    res = faults.server_outage(tmp_path, "stop", n_tasks=60, outage_s=8, poll_interval_s=5)
    show(capsys, "server stopped for 8 s\n" + table(faults.outage_rows(res)))
    _check_outage(res, 60)
    assert res.log_failures["upload failed"] <= MAX_POSTS_10S
    assert sum(res.log_failures.values()) < MAX_REQUESTS_10S
    assert res.drain_s < 30


def test_pull_retries_do_not_pile_up_during_a_long_outage(tmp_path):
    chain = faults.start_chain(tmp_path / "chain", poll_interval_s=1)
    try:
        chain.wait_first_pull()
        chain.server.set_fault(503, ["tasks"])
        # the backoff settles: its delay is capped at poll_interval_s from the first failure
        wait_until(lambda: chain.log_path.read_text().count("pull failed: GET") >= 2, 10,
                   "two failed pulls")
        before = chain.server.request_counts(chain.client_id)["tasks"]
        time.sleep(8.0)  # a sleep, not a wait: the GETs in 8 s of outage are what is counted
        gets = chain.server.request_counts(chain.client_id)["tasks"] - before
        chain.server.set_fault(None)
    finally:
        chain.stop()
    # retries at most every poll_interval_s (1 s, x 1.2 jitter) plus the poll
    # timer's own pulls: about 16 in 8 s, never more than 24
    assert gets <= 24, f"{gets} GET tasks in 8 s of outage with poll_interval_s = 1"


# ---- hostile handlers -----------------------------------------------------------

def _procs_with(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _final(chain, task_id):
    events = chain.events(task_id)
    states = [e["state"] for e in events]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), events
    assert sum(s in ("succeeded", "failed", "cancelled", "timed_out") for s in states) == 1
    return events[-1]


@pytest.fixture
def chain(tmp_path):
    made = []

    def make(**kwargs):
        c = LoopbackChain(tmp_path / f"chain{len(made)}", max_concurrent_tasks=3, **kwargs)
        made.append(c)
        with faults.env(faults.BACKOFF_ENV, faults.RESTART_BACKOFF_S):
            return c.start()

    yield make
    for c in made:
        c.stop()


def test_hostile_handlers_fail_alone_while_quick_tasks_complete(chain):
    chain = chain()
    n = random.randrange(100, 999)
    hang_marker, kept_marker, escaped_marker = f"1000{n}", f"1001{n}", f"1002{n}"
    hang = chain.queue("RunScript", {"script": f"sleep {hang_marker}"}, timeout=4)
    spawner = chain.queue("RunScript", {
        "script": f"(sleep {kept_marker} &) ; setsid sleep {escaped_marker} & exit 0"})
    crash = chain.queue("Example.Crash")
    exit3 = chain.queue("RunScript", {"script": "echo bad input >&2; exit 3"})
    raises = chain.queue("Example.Echo", {"text": "fail"})
    quick = [chain.queue("RunScript", {"script": "true"}) for _ in range(8)]
    assert chain.tickle() == "OK"
    assert chain.wait([crash, exit3, raises] + quick, 30)
    more = [chain.queue("RunScript", {"script": "true"}) for _ in range(4)]
    assert chain.tickle() == "OK"
    assert chain.wait(more, 30)
    assert chain.wait([hang, spawner], 30)

    end = _final(chain, hang)
    assert end["state"] == "timed_out"
    assert end["message"] == "timed out after 4 s; handler stopped"
    # quick tasks went on while the hung one held a slot: all done before it ended
    for task in quick + more:
        final = _final(chain, task)
        assert final["state"] == "succeeded"
        assert final["at"] <= end["at"]

    end = _final(chain, crash)
    assert end["state"] == "failed"
    assert re.fullmatch(r"handler process \d+ was killed by signal 9 while running the task",
                        end["message"]), end["message"]
    end = _final(chain, exit3)
    assert (end["state"], end["message"]) == ("failed", "script exited with code 3")
    assert end["details"]["exit_code"] == 3 and end["details"]["stderr_tail"] == "bad input\n"
    end = _final(chain, raises)
    assert (end["state"], end["message"]) == ("failed", "asked to fail")

    end = _final(chain, spawner)
    assert end["state"] == "succeeded"
    # what stayed in the script's group dies with it; what escaped with setsid is
    # killed by the supervisor's sweep (every 10 s) at the latest
    wait_until(lambda: _procs_with(escaped_marker) == [], 15, "the sweep of the escaped sleep")
    assert _procs_with(kept_marker) == []
    assert _procs_with(hang_marker) == []
    assert chain.child("cta").is_running()


MEMORY_EATER = """\
import time
hog = []
while len(hog) < 256:              # up to 4 GiB, 16 MiB at a time, touched
    hog.append(b"\\x01" * (16 << 20))
    time.sleep(0.01)
time.sleep(1000)
"""


def test_memory_eater_is_contained(chain):
    limit = "max_memory_mb" in SCHEMA.get("handlers", {})
    chain = chain(handlers={"max_memory_mb": 512} if limit else None)
    eater = chain.queue("RunScript", {"script": MEMORY_EATER, "interpreter": sys.executable},
                        timeout=3)
    quick = [chain.queue("RunScript", {"script": "true"}) for _ in range(4)]
    assert chain.tickle() == "OK"
    assert chain.wait(quick + [eater], 30)
    assert all(_final(chain, t)["state"] == "succeeded" for t in quick)
    end = _final(chain, eater)
    if not limit:
        # no memory limit yet: the task is at least contained by its timeout
        assert end["state"] == "timed_out", end
        assert chain.child("cta").is_running()
        pytest.skip("[handlers] max_memory_mb is not in agent/common/config.py yet: the memory "
                    "limit is not asserted (the eater was stopped by its 3 s timeout)")
    assert end["state"] == "failed", end
    text = (end["message"] + " " + str(end["details"].get("stderr_tail", ""))).lower()
    assert "memory" in text, end
    assert chain.child("cta").is_running()
