"""Automation end to end (issue #13, PROTOCOL.md §8; docs/automation.md): the reference
server and `dsagent run` with ``[agent] mode = "automation"`` on loopback. The agent
registers with this machine's MACs as the console's computer, runs a RunScript, then a
Reboot: the reboot command (a script that writes down what the server holds at that
moment) runs only once every status, the Reboot's ``succeeded`` included, is at the
server, and after the server switched the computer's PXE answer to production and
queued the UpdateSBSInfo for its PXE server. With the server unreachable the reboot
waits, and the console says why."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from agent.common.serverapi import machine_macs
from conftest import TickleListener, wait_until
from taskserver.loopback import LoopbackChain
from taskserver.pxe import PXEStore

# Runs as [agent] reboot_command: notes what the server's database holds right now.
REBOOT_SCRIPT = """\
import json, sqlite3, sys, time
db = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
events = db.execute("SELECT t.task_id, t.type, e.state FROM events e JOIN tasks t "
                    "USING (task_id) WHERE t.client_id = ? ORDER BY t.seq, e.seq",
                    (sys.argv[3],)).fetchall()
actions = dict(db.execute("SELECT mac, action FROM pxe_computers").fetchall())
site = [json.loads(p) for (p,) in db.execute(
    "SELECT params FROM tasks WHERE client_id = 'site-1' ORDER BY seq").fetchall()]
with open(sys.argv[2], "w") as fh:
    json.dump({"events": events, "actions": actions, "site": site, "at": time.time()}, fh)
"""


class AutomationChain(LoopbackChain):
    """A LoopbackChain whose agent runs in automation mode: no identity in its config."""

    def __init__(self, workdir, **kwargs):
        super().__init__(workdir, poll_interval_s=1, **kwargs)
        self.marker = self.workdir / "rebooted.json"
        self.script = self.workdir / "reboot.py"
        self.script.write_text(REBOOT_SCRIPT)
        self.expected_id = "lab-7"

    def write_config(self) -> None:
        command = [sys.executable, str(self.script), str(self.workdir / "server.db"),
                   str(self.marker), self.expected_id]
        self.config_path.write_text(textwrap.dedent(f"""\
            [agent]
            server_url = "{self.server.url}"
            state_dir = "{self.workdir / 'state'}"
            mode = "automation"
            reboot_command = {json.dumps(command)}

            [objecthost]
            listen = "127.0.0.1:{self.objecthost_port}"

            [cta]
            listen = "127.0.0.1:{self.cta_port}"
            poll_interval_s = {self.poll_interval_s}
            max_concurrent_tasks = 1
            """))

    def start_agent(self, timeout: float = 30.0) -> None:
        super().start_agent(timeout)     # the ports open once it registered
        creds = json.loads((self.workdir / "state" / "credentials.json").read_text())
        self.client_id = creds["client_id"]

    def console(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def lab(tmp_path):
    """The console's side: computer lab-7 (this machine's MAC) on the predefined list,
    one PXE server ``site-1`` (a fake objecthost notes its tickles), then the agent."""
    site = TickleListener()
    chain = AutomationChain(tmp_path / "chain")
    chain.start_server()
    chain.store.enroll("site-1", tickle_addr=site.addr)
    pxe = PXEStore(chain.store)
    pxe.startup("site-1")
    mac = machine_macs()[0]
    pxe.add_computer(mac, "automation", name="lab-7", config="auto64")
    chain.start_agent()
    yield chain, pxe, mac, site
    chain.stop()
    site.close()


def test_registers_runs_then_reboots_only_when_every_status_is_at_the_server(lab):
    chain, pxe, mac, site = lab
    assert chain.client_id == "lab-7"
    client = chain.store.client("lab-7")
    assert client["macs"] == machine_macs()                 # every MAC, not getnode's one
    assert client["tickle_addr"] == f"127.0.0.1:{chain.objecthost_port}"
    assert pxe.computer(mac).list == "managed"               # predefined -> managed
    console = chain.console()
    assert "automation mode: registering with" in console and "registered as lab-7" in console

    script = chain.queue("RunScript", {"script": "echo deployed"})
    assert chain.tickle() == "OK"
    assert chain.wait([script], 30)
    reboot = chain.queue("Reboot", {"to": "production"})
    assert chain.tickle() == "OK"
    wait_until(chain.marker.exists, 30, "the reboot command")
    seen = json.loads(chain.marker.read_text())
    # at the moment of the reboot, the server held every status of both tasks ...
    assert seen["events"] == [[script, "RunScript", s] for s in ("received", "running",
                                                                  "succeeded")] + \
                             [[reboot, "Reboot", s] for s in ("received", "running",
                                                              "succeeded")]
    # ... had switched the computer to production and queued that for its PXE server
    assert {m: a for m, a in seen["actions"].items() if m == mac} == {mac: "production"}
    last = seen["site"][-1]
    assert last["kind"] in ("update", "clients") and f'mac="{mac}"' in last["payload"]
    assert 'action="production"' in last["payload"]
    assert site.times                                       # and tickled it
    assert chain.agent.wait(30) == 0                        # the agent stops for the reboot
    console = chain.console()
    assert f"reboot to production requested by task {reboot}" in console
    assert "all statuses accepted by the server; rebooting (to production)" in console
    assert console.index("requested by task") < console.index("all statuses accepted")
    assert not (chain.workdir / "state" / "reboot-request.json").exists()


def test_the_reboot_waits_while_the_server_is_down_and_says_why(lab):
    chain, pxe, mac, site = lab
    port = chain.server.port
    chain.server.set_fault(503, ["status"])       # the pull works, statuses do not get in
    reboot = chain.queue("Reboot", {"to": "production"})
    assert chain.tickle() == "OK"
    wait_until(lambda: "status(es) to reach the server" in chain.console(), 30,
               "the supervisor saying it waits")
    chain.stop_server()                           # and now the server is gone altogether
    wait_until(lambda: "the server does not take them" in chain.console(), 30,
               "the console saying why")
    assert not chain.marker.exists()
    assert pxe.computer(mac).action == "automation"          # nothing reached the server
    assert chain.agent.poll() is None
    console = chain.console()
    line = next(x for x in console.splitlines() if "status(es) to reach the server" in x)
    assert f"reboot to production requested by task {reboot}; waiting for 3 status(es)" in line
    logged = (chain.workdir / "state" / "logs" / "dsagent.log").read_text()
    assert "the server does not take them" in logged              # the log file says it too
    chain.start_server(port)                      # back: the statuses go, then the reboot
    wait_until(chain.marker.exists, 90, "the reboot command once the server is back")
    seen = json.loads(chain.marker.read_text())
    assert [s for _, _, s in seen["events"]] == ["received", "running", "succeeded"]
    assert seen["actions"][mac] == "production"
    assert chain.agent.wait(30) == 0


def test_a_reboot_after_a_failed_task_does_not_restart_and_leaves_the_pxe_answer(lab):
    """DeployImage and Reboot are pulled together (dsagent-server deploy): the Reboot
    waits for the deploy, and when that failed it ends failed without restarting,
    so the computer stays in automation (and its PXE answer with it)."""
    chain, pxe, mac, _ = lab
    failing = chain.queue("RunScript", {"script": "sleep 1; exit 3"})
    reboot = chain.queue("Reboot", {"to": "production"})
    assert chain.tickle() == "OK"
    assert chain.wait([failing, reboot], 60)
    events = chain.events(reboot)
    assert [e["state"] for e in events] == ["received", "failed"]   # never `running`
    assert f"did not succeed: {failing} (failed)" in events[-1]["message"]
    assert chain.events(failing)[-1]["at"] <= events[-1]["at"]
    assert pxe.computer(mac).action == "automation"
    assert not chain.marker.exists() and chain.agent.poll() is None
