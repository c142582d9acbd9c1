"""The Server's engine: one dnsmasq, owned by the PXE process.

dnsmasq (Debian's dnsmasq-base) answers as a *proxy* DHCP server beside the
site's own DHCP server (``dhcp-range=<net>,proxy``: it hands out no
addresses), serves TFTP from ``tftp_root``, and runs no DNS (``port=0``). It
reads only its own config file, written here at each start beside the hosts
file (``--conf-file``: never ``/etc/dnsmasq.conf``), and the hosts file
BootFiles renders, re-read on SIGHUP, so a decision changes with the same
process.

It runs in the foreground as our child (pxe-lab.md: orphans are not reaped on
these machines), logging to its stderr, which a thread copies into the
dsagent log as ``dsagent.pxe.dnsmasq`` lines. Chain-loading: a client whose
firmware is not iPXE yet gets ``undionly.kpxe`` (BIOS) or ``ipxe.efi``
(UEFI) through ``pxe-service``; an iPXE client (DHCP option 175) gets
``dsagent-pxe/boot.ipxe`` straight in the offer, with our address as the
server (in proxy mode iPXE refuses an offer without it).
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from agent.common.errors import DsagentError
from agent.pxe.bootfiles import BOOT_DIR

log = logging.getLogger("dsagent.pxe")
engine_log = logging.getLogger("dsagent.pxe.dnsmasq")

STARTED_WITHIN_S = 10.0          # dnsmasq binds and says "started" within this
STOP_WITHIN_S = 5.0
KEEP_LINES = 20                  # its last lines, quoted when it dies
PREFIX_RE = re.compile(r"^dnsmasq(?:-(\w+))?(?:\[\d+\])?: ")
# --log-dhcp's detail of each exchange (options sent, tags...): DEBUG, so that the
# log keeps one line per request ("PXE(eth1) <mac> proxy"), its boot file and
# each TFTP transfer
DETAIL_RE = re.compile(r"^dhcp: \d+ (sent size|available DHCP|vendor class|user class|tags:|"
                       r"next server|broadcast response|client provides)|compile time options")


class EngineError(DsagentError):
    """dnsmasq cannot be started or did not come up; the message says why."""


def find_dnsmasq() -> str:
    found = shutil.which("dnsmasq") or next(
        (p for p in ("/usr/sbin/dnsmasq", "/sbin/dnsmasq") if os.access(p, os.X_OK)), None)
    if not found:
        raise EngineError("dnsmasq is not installed (Debian package dnsmasq-base)")
    return found


def interface_address(name: str) -> ipaddress.IPv4Interface | None:
    """The first IPv4 address (with its prefix) of interface ``name``, or None."""
    import psutil

    for addr in psutil.net_if_addrs().get(name, []):
        if addr.family.name == "AF_INET" and addr.netmask:
            return ipaddress.IPv4Interface(f"{addr.address}/{addr.netmask}")
    return None


def command_line(binary: str, interface: str, address: ipaddress.IPv4Interface,
                 tftp_root: Path, hosts_file: Path) -> list[str]:
    network = address.network
    server = str(address.ip)
    return [
        binary, "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
        # --bind-dynamic, not --bind-interfaces: the same sockets, without a
        # "LOUD WARNING" for every new interface on the host (pxe-lab tests)
        "--bind-dynamic", f"--interface={interface}",
        f"--dhcp-range={network.network_address},proxy,{network.netmask}",
        "--enable-tftp", f"--tftp-root={tftp_root}",
        f"--dhcp-hostsfile={hosts_file}", "--dhcp-ignore=tag:!known",
        "--dhcp-match=set:ipxe,175",
        f"--dhcp-boot=tag:ipxe,{BOOT_DIR}/boot.ipxe,,{server}",
        f"--pxe-service=tag:!ipxe,x86PC,chainload-iPXE,{BOOT_DIR}/undionly.kpxe",
        f"--pxe-service=tag:!ipxe,X86-64_EFI,chainload-iPXE,{BOOT_DIR}/ipxe.efi",
        f"--pxe-service=tag:!ipxe,BC_EFI,chainload-iPXE,{BOOT_DIR}/ipxe.efi",
        "--log-facility=-", "--log-dhcp", "--pid-file=",
        "--leasefile-ro",   # a proxy hands out no leases
    ]


def write_conf(path: Path, options: list[str]) -> None:
    """The options as dnsmasq's own config file: one per line, what support reads
    (and checks with ``dnsmasq --test --conf-file=…``) to see what runs."""
    lines = [o[2:] for o in options if o not in ("--keep-in-foreground", "--conf-file=/dev/null")]
    text = ("# written by the dsagent PXE process (agent/pxe/dnsmasq.py) at each start;\n"
            "# dnsmasq reads this file only, never /etc/dnsmasq.conf\n" + "\n".join(lines) + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


class Dnsmasq:
    """Start, reload, watch and stop one dnsmasq child."""

    def __init__(self, interface: str, tftp_root: Path, hosts_file: Path):
        self.interface = interface
        self.tftp_root = Path(tftp_root)
        self.hosts_file = Path(hosts_file)
        self.conf_file = self.hosts_file.with_name("dnsmasq.conf")
        self.proc: subprocess.Popen | None = None
        self.last_lines: collections.deque[str] = collections.deque(maxlen=KEEP_LINES)
        self._started = threading.Event()
        self._reader: threading.Thread | None = None
        self.address: ipaddress.IPv4Interface | None = None
        self.started_at: float | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start dnsmasq and wait until it says it started; EngineError if not."""
        address = interface_address(self.interface)
        if address is None:
            raise EngineError(f"interface {self.interface} has no IPv4 address (or does not "
                              "exist): dnsmasq cannot answer PXE there")
        options = command_line(find_dnsmasq(), self.interface, address, self.tftp_root,
                               self.hosts_file)
        argv = [options[0], "--keep-in-foreground", f"--conf-file={self.conf_file}"]
        write_conf(self.conf_file, options[1:])
        self.stop_leftovers()
        self.last_lines.clear()
        self._started.clear()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self._reader = threading.Thread(target=self._copy_log, args=(self.proc,),
                                        name="dnsmasq-log", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + STARTED_WITHIN_S
        while not self._started.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                code = self.proc.poll()
                self.stop()
                self._reader.join(1.0)
                said = "; ".join(self.last_lines) or "nothing"
                raise EngineError(
                    f"dnsmasq on {self.interface} did not start "
                    f"({'exit code ' + str(code) if code is not None else 'no start line'}): "
                    f"{said}")
        self.address = address
        self.started_at = time.time()
        log.info("dnsmasq started (pid %d): proxy DHCP on %s (%s), TFTP from %s",
                 self.proc.pid, self.interface, address, self.tftp_root)

    def stop_leftovers(self) -> None:
        """Stop a dnsmasq a killed PXE process left running on our hosts file: it
        would hold the ports. (It cannot die with its parent: dropping root
        clears PR_SET_PDEATHSIG; ``dsagent run`` also stops orphans it adopts.)"""
        import psutil

        ours = f"--dhcp-hostsfile={self.hosts_file}"
        for proc in psutil.process_iter(["name", "cmdline"]):
            if proc.info["name"] == "dnsmasq" and ours in (proc.info["cmdline"] or ()):
                log.warning("stopping dnsmasq pid %d, left running by an earlier PXE process",
                            proc.pid)
                try:
                    proc.terminate()
                    proc.wait(STOP_WITHIN_S)
                except psutil.TimeoutExpired:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass

    def _copy_log(self, proc: subprocess.Popen) -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            # "dnsmasq-dhcp[812]: PXE(br0) ..." -> "dhcp: PXE(br0) ..."
            line = PREFIX_RE.sub(lambda m: f"{m.group(1) or 'dnsmasq'}: ",
                                 raw.decode("utf-8", "replace").rstrip(), count=1)
            if line.startswith("dnsmasq: started, version"):
                self._started.set()
            # "cannot read <hosts>": it then answers nobody, though it runs
            if "failed" in line.lower() or "cannot" in line or "bad " in line:
                level = logging.ERROR
            elif DETAIL_RE.search(line):
                level = logging.DEBUG
            else:
                level = logging.INFO
            if level > logging.DEBUG:
                self.last_lines.append(line)   # quoted if it dies: not its option dumps
            engine_log.log(level, "%s", line)

    def reload(self) -> None:
        """SIGHUP: dnsmasq re-reads the hosts file (same pid, no restart)."""
        if self.running():
            self.proc.send_signal(signal.SIGHUP)

    def exit_description(self) -> str:
        """Why the child is gone, with its last words (after poll() saw it end)."""
        code = self.proc.returncode if self.proc else None
        how = (f"killed by signal {-code}" if code is not None and code < 0
               else f"exit code {code}")
        last = "; ".join(list(self.last_lines)[-3:])
        return f"dnsmasq (pid {self.pid}) stopped: {how}" + (f"; it said: {last}" if last else "")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(STOP_WITHIN_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        log.info("dnsmasq (pid %d) stopped", self.proc.pid)
