"""The acceptance test of issue #13: the initial deployment of a bare computer
(PROTOCOL.md §8, docs/automation.md), everything real, in one pxelab.Lab:

the reference task server on the lab address with its HTTP image store; the
product's PXE site server (``dsagent run`` with ``[pxe]``); the site's own
DHCP server; the automation base built by ``dsagent-server bootwiz-base`` and
configuration ``auto64`` built from it by BootWizRebuild on the site server;
``pc-0042`` predefined on the console; the capture image ``gold`` of an ext4
disk in the store. Then ``dsagent-server deploy`` and a bare QEMU computer
(TCG, BIOS, iPXE ROM, a blank virtio disk): it PXE-boots automation, its
agent registers as pc-0042, deploys ``gold`` onto /dev/vda and restarts to
production; judged from outside (e2fsck, debugfs, the server's statuses, the
PXE answer, a second boot that goes to the disk). Then ``dsagent-server
capture``: the same computer captures its disk from automation to the HTTP
store, and that image deploys elsewhere byte-identical. Then the faults: an
unknown computer refused, the task server unreachable at boot.

One lab, one task server, one site server and one VM disk for the whole file
(module fixture ``site``); the tests run in file order. Fails, never skips,
when a tool is missing. Timings are printed (``pytest -s``).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time

import pytest

from deploylab import (BASE, CONFIG, COMPUTER, DISK_MB, IMAGE, MAC, SOURCE_MB, URL,
                       Deployment, e2fsck, files_of, ipxe_name, sha256_of)
from handlers.imaging.deploy import deploy
from handlers.imaging.store import open_store
from taskserver.automation import attempts

UNKNOWN = "52:54:00:00:0d:99"          # on no list
TERMINAL = ("succeeded", "failed", "timed_out", "cancelled")
ESC = re.escape

# the automation environment's console (taskserver/automation_base/init, agent/supervisor.py)
NETWORK_UP = r"dsagent automation: network up on eth0 198\.18\.0\.\d+"
STARTING = rf"dsagent automation: starting the agent, server {ESC(URL)}"
REGISTERED = rf"registered as {COMPUTER} \(automation\)"
REBOOT_ASKED = r"reboot to production requested by task"
REBOOTING = r"all statuses accepted by the server; rebooting \(to production\): reboot -f"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    d = Deployment(tmp_path_factory.mktemp("deployment"))
    try:
        d.open()
        print(f"\nsite set up: {d.timings}")
        yield d
    finally:
        d.close()
        print(f"\ntimings: {d.timings}")


def states(events: list[dict]) -> list[str]:
    return [e["state"] for e in events]


def test_a_bare_computer_is_deployed_from_automation_then_boots_its_disk(site):
    store, console = site.store, site.console
    assert console.computer(MAC).action == "ignore"
    assert f"automation base '{BASE}' built in" in site.base_out
    disk = site.disk("pc-0042.raw")

    # the console: deploy gold to pc-0042 (in the namespace: its tickles reach the site)
    started = time.monotonic()
    job = site.server_command("deploy", "--mac", MAC, "--image", IMAGE, "--target",
                                 "/dev/vda", "--timeout", "600")
    line = job.wait_for(r"set to automation on \d+ PXE server\(s\); queued DeployImage", 60)
    m = re.search(r"(\S+) \((\S+)\) set to automation on (\d+) PXE server\(s\); queued "
                  r"DeployImage (\S+), Reboot (\S+)", line)
    assert m and m.group(1) == COMPUTER and m.group(3) == "1", line
    deploy_id, reboot_id = m.group(4), m.group(5).rstrip(",")
    site.wait_script(MAC, f"chain /{CONFIG}/current/boot.ipxe")
    site.timings.phases["deploy queued → PXE answer automation"] = round(
        time.monotonic() - started, 1)

    # the bare computer: network boot first, a blank disk
    vm = site.vm(MAC, disk, "deploy")
    marks = {"network up": NETWORK_UP, "starting the agent": STARTING,
             "registered": REGISTERED, "reboot requested": REBOOT_ASKED,
             "rebooting": REBOOTING}
    seen: dict[str, float] = {}
    try:
        while vm.alive() and vm.now() < 400:
            for name, pattern in marks.items():
                if name not in seen and vm.seen(pattern):
                    seen[name] = vm.times[pattern]
            for name, task in (("DeployImage", deploy_id), ("Reboot", reboot_id)):
                for state in states(store.events(task)):
                    seen.setdefault(f"{name} {state} at the server", vm.now())
            time.sleep(0.2)
        for name, pattern in marks.items():
            if name not in seen and vm.seen(pattern):
                seen[name] = vm.now()
        assert not vm.alive(), f"the VM did not restart within 400 s:\n{vm.tail()}"
        code = vm.wait_exit(5)
    finally:
        vm.stop()
    qemu_exit = vm.exited_after
    text = vm.text()
    assert code == 0, vm.tail()                  # -no-reboot: the guest's reboot ends QEMU
    assert job.proc.wait(30) == 0, job.output()
    out = job.output()
    assert f"deploy done: {COMPUTER} ({MAC}) deployed and restarted to production" in out, out
    for name in marks:
        assert name in seen, (name, vm.tail())
    assert seen["registered"] < seen["reboot requested"] < seen["rebooting"], seen
    # pulled together, the Reboot waited for the DeployImage before it (agent/cta/service.py)
    assert re.search(rf"task {reboot_id} \(Reboot\) starts once the 1 task\(s\) received "
                     "before it have ended", text), vm.tail()
    for name, state in (("DeployImage", "received"), ("DeployImage", "running"),
                        ("DeployImage", "succeeded"), ("Reboot", "running"),
                        ("Reboot", "succeeded")):
        assert re.search(rf"  {COMPUTER}  {name} +{state}", out), (name, state, out)
    site.timings.phases["VM: QEMU start → QEMU exit (deployed, rebooted)"] = qemu_exit
    print("\nVM (TCG) from QEMU's start: " + ", ".join(
        f"{k} {v:.1f} s" for k, v in sorted(seen.items(), key=lambda kv: kv[1]))
        + f", QEMU exited {qemu_exit:.1f} s")

    # the server: every status of both, in order, exactly one terminal state each
    dep, reb = store.events(deploy_id), store.events(reboot_id)
    assert states(dep)[:2] == ["received", "running"] and states(dep)[-1] == "succeeded", dep
    assert set(states(dep)[2:-1]) <= {"progress"} and len(states(dep)) >= 4, states(dep)
    assert states(reb) == ["received", "running", "succeeded"], reb
    for events in (dep, reb):
        assert sum(s in TERMINAL for s in states(events)) == 1
        assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    # the Reboot started only once the deploy was over (its running switches the PXE answer)
    assert dep[-1]["at"] <= reb[1]["at"], (dep[-1], reb[1])
    assert store.client(COMPUTER) is not None
    details = dep[-1]["details"]
    assert details["target_sha256"] == sha256_of(site.source), details
    # from the server's HTTP store (the base's default image_store), the version captured
    assert details["version"] == site.gold["version"] and details["http_requests"] >= 1, details
    assert any(m == "GET" and path.endswith(f"/{IMAGE}/{details['version']}/data.zst")
               for m, path, _ in site.server.images.requests)

    # the console: pc-0042 is managed now, its action production; its script sends it to disk
    computer = console.computer(MAC)
    assert (computer.action, computer.list, computer.name) == ("production", "managed", COMPUTER)
    assert site.wait_script(MAC, "exit").strip().splitlines()[-1] == "exit"

    # the disk, from outside: a clean ext4 holding the image's files, byte for byte
    check = e2fsck(disk)
    assert check.returncode == 0, check.stdout + check.stderr
    assert files_of(disk, site.workdir / "out-deployed") == \
        files_of(site.source, site.workdir / "out-source")
    size = SOURCE_MB * 2**20
    assert sha256_of(disk, size) == sha256_of(site.source)      # unused space was zero
    assert sha256_of(disk, offset=size) == hashlib.sha256(bytes(DISK_MB * 2**20 - size)).hexdigest()
    deployed = sha256_of(disk)

    # booted again: the PXE answer sends it to its local disk, not to automation
    vm = site.vm(MAC, disk, "production")
    try:
        at = vm.wait_for(r"Booting from Hard Disk", 90, "SeaBIOS trying the hard disk")
        vm.wait_exit(30)            # not bootable (an ext4 file system, no boot loader)
    finally:
        vm.stop()
    text = vm.text()
    assert "dsagent automation" not in text and "vmlinuz" not in text, vm.tail()
    assert text.index("iPXE") < text.index("Booting from Hard Disk"), vm.tail()
    assert f"{ipxe_name(MAC)}... ok" in text, vm.tail()          # its script: `exit`
    assert text.index(f"{ipxe_name(MAC)}... ok") < text.index("Booting from Hard Disk")
    assert sha256_of(disk) == deployed
    site.timings.phases["VM: production boot → Booting from Hard Disk"] = at
    print(f"production boot: 'Booting from Hard Disk' after {at:.1f} s")


def test_the_same_computer_captures_its_disk_from_automation_and_it_deploys_elsewhere(site):
    """``dsagent-server capture``: pc-0042 boots automation again, registers (a new
    token), captures /dev/vda into the server's HTTP store with the credentials
    the registration gave it (no store credentials are baked into the base:
    agent/common/config.py lend_credentials) and restarts to production. The
    image made deploys onto another disk byte for byte what pc-0042's disk is."""
    store, disk = site.store, site.workdir / "pc-0042.raw"
    assert disk.exists(), "needs the disk the first test deployed"
    disk_before = sha256_of(disk)
    job = site.server_command("capture", "--mac", MAC, "--image", "%COMPNAME%-captured",
                              "--source", "/dev/vda", "--timeout", "400")
    line = job.wait_for(r"set to automation on \d+ PXE server\(s\); queued CreateImage", 60)
    create_id, reboot_id = re.search(r"queued CreateImage (\S+), Reboot (\S+)", line).groups()
    site.wait_script(MAC, f"chain /{CONFIG}/current/boot.ipxe")
    vm = site.vm(MAC, disk, "capture")
    try:
        vm.wait_for(REGISTERED, 120, "the registration")
        vm.wait_exit(300)                      # the Reboot: QEMU ends (-no-reboot)
    finally:
        vm.stop()
    assert job.proc.wait(30) == 0, job.output()
    assert f"capture done: {COMPUTER} ({MAC}) captured and restarted to production" \
        in job.output(), job.output()
    site.timings.phases["VM: capture from automation → rebooted"] = vm.exited_after
    print(f"\ncapture from automation: QEMU exited {vm.exited_after:.1f} s after its start")

    made, reb = store.events(create_id), store.events(reboot_id)
    assert states(made)[:2] == ["received", "running"] and states(made)[-1] == "succeeded", made
    assert states(reb) == ["received", "running", "succeeded"], reb
    assert made[-1]["at"] <= reb[1]["at"]
    name = f"{COMPUTER}-captured"                         # the token replaced
    version = made[-1]["details"]["version"]
    puts = [path for method, path, _ in site.server.images.requests if method == "PUT"]
    assert puts[-1] == f"/images/{name}/current" and \
        f"/images/{name}/{version}/meta.json" in puts, puts
    assert (site.images / name / "current").read_text().strip() == version
    assert site.console.computer(MAC).action == "production"
    assert sha256_of(disk) == disk_before                 # a capture only reads

    # elsewhere: a disk of random bytes, the same size, gets the image over HTTP
    other = site.workdir / "elsewhere.raw"
    other.write_bytes(os.urandom(DISK_MB * 2**20))
    with site.lab.inside():
        done = deploy(open_store(f"{URL}/images/"), name, "capture", str(other),
                      lambda *a, **k: None, lambda: False)
    assert done["version"] == version
    assert sha256_of(other) == disk_before, "the deployed copy differs from pc-0042's disk"


# ---- faults ------------------------------------------------------------------------

def test_an_unknown_computer_is_refused_on_its_console_and_in_the_automation_log(site):
    """Unknown computers boot automation at this site (unknown_computers =
    automation), but the task server does not know this one: it is refused, the
    technician reads why on its console, and the console's automation log has it."""
    before = len(attempts(site.store, 10_000))
    site.server_cli("pxe", "set", "unknown_computers=automation", f"automation_config={CONFIG}")
    try:
        site.wait_script("unknown", f"chain /{CONFIG}/current/boot.ipxe")
        vm = site.vm(UNKNOWN, tag="unknown")
        try:
            at = vm.wait_for(rf"registration attempt 1 refused: this computer \(MACs "
                             rf"{ESC(UNKNOWN)}, uuid [^)]*\) is not known to the task server "
                             rf"{ESC(URL)}: unknown computer: no managed or predefined computer "
                             rf"has MAC {ESC(UNKNOWN)}.*; asking again in \d+ s", 120,
                             "the refusal")
        finally:
            vm.stop()
    finally:
        site.server_cli("pxe", "set", "unknown_computers=ignore")
    site.timings.phases["VM: unknown computer → refused on its console"] = at
    print(f"\nunknown computer: refused on its console {at:.1f} s after QEMU's start")

    rows = attempts(site.store, 10_000)
    assert len(rows) == before + 1, rows[:3]
    row = rows[0]
    assert (row["outcome"], row["client_id"], row["macs"]) == ("refused", None, [UNKNOWN]), row
    assert row["reason"].startswith(f"unknown computer: no managed or predefined computer has "
                                    f"MAC {UNKNOWN}"), row
    assert any(ip.startswith("198.18.0.") for ip in row["ips"]), row       # its lab address
    log = subprocess.run([sys.executable, "-m", "taskserver.automation", "log", "--db",
                          str(site.store.db_path), "--limit", "1"], capture_output=True,
                         text=True, timeout=60)
    assert log.returncode == 0 and "refused" in log.stdout and UNKNOWN in log.stdout, log
    # nothing was made for it: no client, on no list
    assert site.store.client(UNKNOWN.replace(":", "-")) is None
    assert site.console.computer(UNKNOWN) is None


def test_the_task_server_unreachable_at_boot_the_computer_retries_then_registers(site):
    """pc-0042 is set to automation again and the task server is stopped before it
    boots: the site server still answers from its saved state, the computer's
    console says the server is not reachable and that the agent retries; the
    server comes back, the computer registers and runs its tasks (a RunScript
    reading its disk, then a Reboot)."""
    store, disk = site.store, site.workdir / "pc-0042.raw"
    assert disk.exists(), "needs the disk the first test deployed"
    site.server_cli("pxe", "set-action", "--mac", MAC, "--action", "automation")
    site.wait_script(MAC, f"chain /{CONFIG}/current/boot.ipxe")
    registrations = len([r for r in attempts(store, 10_000) if r["outcome"] == "registered"])
    create = store.queue_task(COMPUTER, "RunScript", {"script": "sha256sum /dev/vda"})
    reboot = store.queue_task(COMPUTER, "Reboot", {"to": "production"})
    disk_before = sha256_of(disk)

    site.stop_server()
    vm = site.vm(MAC, disk, "unreachable")
    try:
        said = vm.wait_for(rf"dsagent automation: task server {ESC(URL)} not reachable yet", 90,
                           "/init saying the server is not reachable")
        first = vm.wait_for(r"registration attempt 1 failed: cannot reach the task server: "
                            r".*; retrying in \d+ s", 60, "the agent saying it retries")
        vm.wait_for(r"registration attempt 2 failed: cannot reach the task server", 30)
        down_for = vm.now()
        site.start_server()
        registered = vm.wait_for(REGISTERED, 90, "the registration once the server is back")
        vm.wait_exit(240)                      # the Reboot: QEMU ends (-no-reboot)
    finally:
        vm.stop()
        if not site.server.running:
            site.start_server()
    site.timings.phases["VM: server down → registered once back → rebooted"] = vm.exited_after
    print(f"\nserver unreachable: /init said so {said:.1f} s, agent retried {first:.1f} s, "
          f"server started {down_for:.1f} s, registered {registered:.1f} s, QEMU exited "
          f"{vm.exited_after:.1f} s")
    assert registered > down_for
    rows = [r for r in attempts(store, 10_000) if r["outcome"] == "registered"]
    assert len(rows) == registrations + 1 and rows[0]["client_id"] == COMPUTER, rows[:2]

    cap, reb = store.events(create), store.events(reboot)
    assert states(reb) == ["received", "running", "succeeded"], reb
    assert cap[-1]["state"] in TERMINAL and cap[-1]["at"] <= reb[1]["at"], (cap, reb)
    assert site.console.computer(MAC).action == "production"
    assert sha256_of(disk) == disk_before          # only read
    assert cap[-1]["state"] == "succeeded", cap[-1]
    assert disk_before in cap[-1]["details"]["stdout_tail"]   # the VM read the disk we wrote
