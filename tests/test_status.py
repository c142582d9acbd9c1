"""`dsagent status` against a real running chain: processes, tasks running,
the outbox while the server is away, last contact, last tickle accepted and
refused; and the status files it reads."""

import json
import os
import subprocess
import sys
import time

from agent.tools.status import _process, human_age
from agent.common.statusfile import StatusFile, read_all
from agent.common.tickle import exchange_line, make_tickle
from conftest import wait_until
from taskserver.loopback import LoopbackChain

PY = sys.executable


def status(chain):
    result = subprocess.run([PY, "-m", "agent", "status", "--config", str(chain.config_path),
                             "--json"], capture_output=True, text=True, timeout=60)
    return result.returncode, json.loads(result.stdout)


def wait_status(chain, predicate, timeout=30):
    def holds():
        code, facts = status(chain)
        assert predicate(facts), json.dumps(facts, indent=1)
        return code, facts

    return wait_until(holds, timeout, "the status the test expects", interval=0.2)


def test_status_of_a_running_agent(tmp_path):
    with LoopbackChain(tmp_path / "chain") as chain:
        task_id = chain.queue("RunScript", {"script": "sleep 8"})
        assert chain.tickle() == "OK"
        forged = make_tickle(chain.client_id, bytes(32))
        assert exchange_line("127.0.0.1", chain.objecthost_port, forged) == "ERR bad-signature"
        code, facts = wait_status(chain, lambda f: f["tasks"].get("running")
                                  and f["tickles"].get("last_refused")
                                  and f["server"]["last_contact_s"] is not None)
        assert code == 0 and facts["running"]
        for name in ("dsagent", "objecthost", "cta", "ctdataloader"):
            proc = facts["processes"][name]
            assert proc["running"] and proc["pid"] and proc["rss_bytes"] > 1_000_000, (name, proc)
        assert facts["processes"]["cta"]["pid"] == chain.child("cta").pid
        assert [t["task_id"] for t in facts["tasks"]["running"]] == [task_id]
        assert facts["tickles"]["accepted"] >= 1
        assert facts["tickles"]["last_refused"]["code"] == "bad-signature"
        assert facts["server"]["last_contact_s"] is not None and facts["server"]["last_contact_s"] < 30

        text = subprocess.run([PY, "-m", "agent", "status", "--config", str(chain.config_path)],
                              capture_output=True, text=True).stdout
        assert text.startswith("dsagent: running (pid ")
        assert task_id in text and "(bad-signature)" in text and "1 running, 0 queued" in text
    code, facts = status(chain)
    assert code == 3 and not facts["running"]
    assert not any(p["running"] for p in facts["processes"].values())


def test_status_shows_the_outbox_growing_while_the_server_is_away(tmp_path):
    with LoopbackChain(tmp_path / "chain") as chain:
        task_id = chain.queue("RunScript", {"script": "sleep 1"})
        assert chain.tickle() == "OK"
        wait_status(chain, lambda f: f["tasks"].get("running"))
        port = chain.server.port
        chain.stop_server()
        code, facts = wait_status(chain, lambda f: not f["tasks"]["running"]
                                  and f["tasks"]["outbox_depth"] >= 1
                                  and f["server"]["last_error"])
        assert facts["tasks"]["outbox_oldest_s"] >= 0
        assert "upload failed" in facts["server"]["last_error"]["message"]
        text = subprocess.run([PY, "-m", "agent", "status", "--config", str(chain.config_path)],
                              capture_output=True, text=True).stdout
        assert "event(s) waiting, oldest" in text and "last error" in text
        chain.start_server(port=port)
        chain.tickle()   # the CTA reaches the server and ends the uploader's backoff
        wait_status(chain, lambda f: f["tasks"]["outbox_depth"] == 0, timeout=90)
        assert chain.wait([task_id], 30)


def test_status_files_are_coalesced_and_torn_files_skipped(tmp_path):
    published = StatusFile(tmp_path, "cta", min_interval=0.2)
    for n in range(1000):
        published.update(n=n)
    published.count("tickles")
    # the pending write carries the last values
    wait_until(lambda: read_all(tmp_path)["cta"].get("tickles"), 5, "the pending write")
    facts = read_all(tmp_path)["cta"]
    assert facts["n"] == 999 and facts["tickles"] == 1 and facts["pid"] == os.getpid()
    (tmp_path / "status" / "torn.json").write_text('{"pid": 12')
    assert set(read_all(tmp_path)) == {"cta"}
    published.close()


def test_a_reused_pid_is_not_taken_for_the_agent():
    mine = {"pid": os.getpid(), "started_at": time.time()}
    assert _process(mine)["running"]
    # the facts say the process started in 1970: this pid now belongs to someone else
    assert not _process({"pid": os.getpid(), "started_at": 0})["running"]
    assert not _process({"pid": os.getpid(), "started_at": time.time(), "stopped_at": 1})["running"]


def test_human_age():
    assert [human_age(s) for s in (None, 5, 125, 7300, 90000)] == \
        ["never", "5 s", "2 min 5 s", "2 h 1 min", "1 d 1 h"]
