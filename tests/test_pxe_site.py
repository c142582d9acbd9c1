"""The PXE site server end to end (PROTOCOL.md §7, docs/pxe.md), in a network
namespace the test makes (tests/pxelab.py): the reference task server as the
NS, ``dsagent run`` with ``[pxe]`` on the lab's bridge, its own dnsmasq.
Answers are read back with a real PXE DHCPDISCOVER (agent/pxe/probe.py) and
TFTP; the QEMU boot is in test_pxe_boot.py. Fails, never skips, when dnsmasq
or iproute2 is missing."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys

import psutil
import pytest

import pxelab
from conftest import wait_until
from agent.common.statusfile import read_all
from agent.pxe.probe import discover
from agent.pxe.service import run_dir_for
from taskserver.loopback import LoopbackChain
from taskserver.pxe import PXEStore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUTO = "52:54:00:00:00:01"
PROD = "52:54:00:00:00:02"
IGN = "52:54:00:00:00:03"
ROGUE = "198.18.0.3"          # another PXE server on the link


class Site:
    """A lab, a task server and a PXE site server agent inside it."""

    def __init__(self, lab: pxelab.Lab, workdir):
        self.lab = lab
        self.preboot = lab.public_dir("preboot")
        self.sbs = workdir / "sbs" / "SBS"
        self.sbs.mkdir(parents=True)
        self.chain = LoopbackChain(
            workdir / "chain", client_id="site-1", poll_interval_s=5,
            handlers={"sbs_dir": str(self.sbs), "preboot_store": str(self.preboot),
                      "package_store": str(workdir / "packages")},
            extra_config='[pxe]\ninterface = "br0"\n')
        self.console = PXEStore(self.chain.store)
        self.port: str | None = None

    def state(self) -> dict:
        return read_all(self.chain.workdir / "state").get("pxe") or {}

    def serving(self) -> dict | None:
        facts = self.state()
        return facts if facts.get("serving") and facts.get("dnsmasq_pid") else None

    def offers(self, mac: str, timeout: float = 1.0):
        """Our PXE server's offers (not the site DHCP server's) for ``mac``."""
        if self.port is None:
            self.port = self.lab.port()
        with self.lab.inside():
            return [o for o in discover(self.port, mac, timeout=timeout, ipxe=True)
                    if o.server == self.lab.address]

    def answered(self, mac: str) -> bool:
        return bool(self.offers(mac))

    def server_cli(self, *args: str) -> str:
        """``dsagent-server pxe …`` in the namespace (its tickles reach the agent)."""
        return self.lab.check([sys.executable, "-m", "taskserver", "pxe", args[0], "--db",
                               str(self.chain.store.db_path), *args[1:]], timeout=60)

    def log(self) -> str:
        return self.chain.log_path.read_text(errors="replace")


@pytest.fixture
def site(tmp_path):
    pxelab.need("dnsmasq")
    pxelab.need("ip")
    with pxelab.Lab(tmp_path / "lab") as lab:
        s = Site(lab, tmp_path)
        try:
            yield s
        finally:
            with lab.inside():
                s.chain.stop()


def test_a_site_server_starts_after_its_startup_answer_and_follows_the_console(site):
    console, chain, lab = site.console, site.chain, site.lab
    console.set_settings({"unknown_computers": "ignore", "automation_config": "auto64"})
    console.add_computers([{"mac": AUTO, "name": "pc-auto", "action": "automation",
                            "config": "auto64"},
                           {"mac": PROD, "name": "pc-prod", "action": "production"},
                           {"mac": IGN, "name": "pc-ign", "action": "ignore"}])
    with lab.inside():
        chain.start_server()
        port = chain.server.port
        chain.stop_server()                      # the task server is down at first
        chain.server_url = f"http://127.0.0.1:{port}"
        chain.start_agent()

    # no startup answer ever applied: nothing is served, and the status says why
    facts = wait_until(lambda: "startup" in (site.state().get("reason") or "") and site.state(),
                       20, "the PXE process to wait for its startup answer")
    assert not facts["serving"] and facts["dnsmasq_pid"] is None
    assert not site.answered(AUTO)

    with lab.inside():
        chain.start_server(port)
    facts = wait_until(site.serving, 30, "dnsmasq to serve once the startup answer applied")
    pid = facts["dnsmasq_pid"]
    log = site.log()
    # every initial file applied before dnsmasq started (the seed's start order)
    started = log.index("dnsmasq started (pid")
    for name in ("initialPXEConfigPath.sbs", "-client.sbs", "PredefinedComputers.sbs",
                 "-image.sbs"):
        assert -1 < log.find(f"{name}: ", log.index("startup information received")) < started
    servers = {s["client_id"]: s for s in chain.server.pxe_servers()}
    wait_until(lambda: (s := {x["client_id"]: x for x in chain.server.pxe_servers()})
               ["site-1"]["state"] and s["site-1"]["state"]["serving"], 15,
               "the task server to hear that PXE is served")
    assert "site-1" in servers

    # dnsmasq runs on its own config file only, which dnsmasq itself finds sound
    conf = run_dir_for(chain.workdir / "state") / "dnsmasq.conf"
    assert psutil.Process(pid).cmdline()[1:] == ["--keep-in-foreground", f"--conf-file={conf}"]
    assert "interface=br0" in conf.read_text().splitlines()
    check = subprocess.run(["dnsmasq", "--test", f"--conf-file={conf}"], capture_output=True,
                           text=True)
    assert "syntax check OK" in check.stdout + check.stderr

    # the answers: automation and production are answered, ignore and unknown not
    offer = site.offers(AUTO)[0]
    assert offer.boot_file == "dsagent-pxe/boot.ipxe" and offer.vendor_class == "PXEClient"
    assert site.answered(PROD)
    assert not site.answered(IGN) and not site.answered("52:54:00:00:00:99")
    script = lab.check(["curl", "-sS", f"tftp://{lab.address}/dsagent-pxe/"
                        f"{AUTO.replace(':', '-')}.ipxe"])
    assert "chain /auto64/current/boot.ipxe" in script

    # a console change reaches the PXE answers with no dnsmasq restart
    site.server_cli("set-action", "--mac", IGN, "--action", "production")
    wait_until(lambda: site.answered(IGN), 30, "the console's change to reach dnsmasq")
    assert site.state()["dnsmasq_pid"] == pid
    site.server_cli("set", "unknown_computers=automation")
    wait_until(lambda: site.answered("52:54:00:00:00:99"), 30, "unknown computers answered")
    wait_until(lambda: site.state()["answered"] == -1, 5, "the status (written at most "
               "once a second) to say every MAC is answered")
    assert site.state()["dnsmasq_pid"] == pid

    # dnsmasq killed: restarted, the startup answer fetched again, serving again
    os.kill(pid, signal.SIGKILL)
    facts = wait_until(lambda: (f := site.serving()) and f["dnsmasq_pid"] != pid and f, 30,
                       "the PXE process to restart dnsmasq")
    assert facts["restarts"] == 1
    log = site.log()
    assert f"dnsmasq (pid {pid}) stopped: killed by signal 9" in log
    assert log.count("startup information received") == 2
    assert site.answered(AUTO)
    wait_until(lambda: chain.server.pxe_servers()[0]["state"]["serving"], 15,
               "the task server to hear that PXE is served again")

    # dnsmasq dies while the task server is down: the saved state is served
    with lab.inside():
        chain.stop_server()
    os.kill(facts["dnsmasq_pid"], signal.SIGKILL)
    facts = wait_until(lambda: (f := site.serving()) and f["dnsmasq_pid"] != pid
                       and f["restarts"] == 2 and f, 30, "dnsmasq restarted on the saved state")
    assert "(serving the state applied" in site.log()
    assert site.answered(AUTO)
    with lab.inside():
        chain.start_server(port)

    # the PXE process itself killed: dsagent run restarts it, and the new one
    # stops the dnsmasq it left (which would hold the ports) before its own
    pxe, orphan = chain.child("pxe"), facts["dnsmasq_pid"]
    pxe.kill()
    facts = wait_until(lambda: (c := chain.child("pxe")) and c.pid != pxe.pid
                       and (f := site.serving()) and f["dnsmasq_pid"] != orphan and f, 60,
                       "a new PXE process serving with a new dnsmasq")
    assert f"stopping dnsmasq pid {orphan}, left running by an earlier PXE process" \
        in site.log() or not psutil.pid_exists(orphan)
    wait_until(lambda: not psutil.pid_exists(orphan)
               or psutil.Process(orphan).status() == psutil.STATUS_ZOMBIE, 15,
               "the old dnsmasq to be gone")
    assert site.answered(AUTO)

    # dsagent status and doctor say the same
    status = subprocess.run([sys.executable, "-m", "agent", "status", "--config",
                             str(chain.config_path)], capture_output=True, text=True, cwd=REPO,
                            timeout=60)
    assert f"pxe: serving on br0 ({lab.address}/24), dnsmasq pid {facts['dnsmasq_pid']}" \
        in status.stdout, status.stdout
    doctor = subprocess.run(["ip", "netns", "exec", lab.ns, sys.executable, "-m", "agent",
                             "doctor", "--config", str(chain.config_path), "--json"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    rows = {r["name"]: r for r in json.loads(doctor.stdout)["checks"]}
    assert rows["pxe-engine"]["status"] == "ok", rows["pxe-engine"]
    assert rows["pxe-other-servers"]["status"] == "ok", rows["pxe-other-servers"]
    assert rows["pxe-configurations"]["status"] == "fail"      # auto64 was never built
    assert "auto64" in rows["pxe-configurations"]["finding"]

    # another PXE server on the link, answering every computer: the doctor names it
    rogue = lab.join(f"{lab.ns}-rogue", ROGUE)
    root, run = lab.public_dir("rogue-root"), lab.public_dir("rogue-run")
    (run / "hosts").write_text("*:*:*:*:*:*\n")
    lab.dnsmasq(pxelab.proxy_args(root, run, ROGUE, lab.network, "eth0"), ns=rogue)
    doctor = subprocess.run(["ip", "netns", "exec", lab.ns, sys.executable, "-m", "agent",
                             "doctor", "--config", str(chain.config_path), "--json"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    row = {r["name"]: r for r in json.loads(doctor.stdout)["checks"]}["pxe-other-servers"]
    assert row["status"] == "fail" and f"another PXE server answers on br0: {ROGUE}" \
        in row["finding"], row


# ---- a VM booted by QEMU's iPXE ROM ----------------------------------------------

DRIVER_FILE = "lib/firmware/dsagent-test/driver.txt"


def test_a_vm_boots_the_bootwiz_configuration_and_follows_its_action(site, tmp_path):
    """The judge is QEMU's iPXE: a computer set to automation boots the
    configuration BootWizRebuild built (its driver file shows on the serial
    console); set to production it goes on to its disks; set to ignore it gets
    no answer. One dnsmasq all along. TCG, BIOS (pxe-lab.md)."""
    pxelab.need_all()
    lab, chain, console = site.lab, site.chain, site.console
    lab.site_dhcp()                                   # the site's ordinary DHCP server
    base = site.preboot / "debian12"
    base.mkdir(mode=0o755)
    shutil.copy(pxelab.kernel(), base / "vmlinuz")
    pxelab.build_initrd(base, cat=f"/{DRIVER_FILE}")
    shown = f"driver content {secrets.token_hex(8)}\n".encode()
    package = tmp_path / "packages" / "nic-test"
    (package / os.path.dirname(DRIVER_FILE)).mkdir(parents=True)
    (package / DRIVER_FILE).write_bytes(shown)
    (package / "manifest.json").write_text(json.dumps({"id": "nic-test", "files": [
        {"path": DRIVER_FILE, "sha256": hashlib.sha256(shown).hexdigest()}]}))
    console.add_computers([{"mac": AUTO, "name": "pc-auto", "action": "automation",
                            "config": "auto64"}])
    with lab.inside():
        chain.start()
        chain.wait_first_pull()
    pid = wait_until(site.serving, 30, "the PXE process to serve")["dnsmasq_pid"]
    task = chain.queue("BootWizRebuild", {"config": "auto64", "base": "debian12",
                                          "drivers": "nic-test"})
    with lab.inside():
        chain.tickle()
    assert chain.wait([task], 120), chain.events(task)
    assert chain.events(task)[-1]["state"] == "succeeded", chain.events(task)[-1]

    done = (pxelab.MARKER, pxelab.NO_BOOTABLE_DEVICE, pxelab.NOTHING_TO_BOOT)
    automation = lab.boot(AUTO, done=done, timeout=60)
    assert automation.done == pxelab.MARKER, automation.serial[-3000:]
    assert shown.decode().strip() in automation.serial

    site.server_cli("set-action", "--mac", AUTO, "--action", "production")
    script = f"tftp://{lab.address}/dsagent-pxe/{AUTO.replace(':', '-')}.ipxe"
    wait_until(lambda: "production" in lab.check(["curl", "-sS", script]), 30,
               "the per-MAC script to say production")
    production = lab.boot(AUTO, done=done, timeout=60)
    assert production.done == pxelab.NO_BOOTABLE_DEVICE, production.serial[-3000:]
    assert pxelab.MARKER not in production.serial

    site.server_cli("set-action", "--mac", AUTO, "--action", "ignore")
    wait_until(lambda: not site.answered(AUTO), 30, "the PXE server to stop answering")
    ignored = lab.boot(AUTO, done=done, timeout=60)
    assert ignored.done == pxelab.NOTHING_TO_BOOT, ignored.serial[-3000:]
    assert site.state()["dnsmasq_pid"] == pid          # no restart for any of it
    print(f"boots: automation {automation.seconds:.1f} s, production "
          f"{production.seconds:.1f} s, ignore {ignored.seconds:.1f} s")
