"""``dsagent doctor`` on a PXE site server: the seed's classic PXE failures.

- ``pxe-engine``: dnsmasq not installed, not running, or not bound to the
  DHCP proxy (67, 4011) and TFTP (69) ports; the PXE process's own reason.
- ``pxe-other-servers``: another PXE server answering on the interface (two
  proxies answering the same clients boot them at random). Found by a real
  PXE DHCPDISCOVER (probe.py) for a MAC nobody lists.
- ``pxe-configurations``: a computer set to ``automation`` whose preboot
  configuration has no ``current`` build in the TFTP root.
(Files piling up in the SBS folder are the ``sbs`` check's, which every
agent with an SBS folder runs.)

Each check returns a Finding; the doctor turns it into its table row. They
read only: the status file, ``pxe.db`` (read-only) and the process table.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from agent.common.config import Config, pxe_tftp_root
from agent.common.findings import Finding
from agent.common.statedb import connect_read_only
from agent.pxe.state import pxe_db_path

PORTS = {67: "DHCP", 4011: "PXE proxy", 69: "TFTP"}
PROBE_S = 2.0


def _status(config: Config) -> dict:
    try:
        return json.loads((Path(config.state_dir) / "status" / "pxe.json").read_text())
    except (OSError, ValueError):
        return {}


def check_engine(config: Config) -> Finding:
    interface = config.get("pxe", "interface")
    if not (shutil.which("dnsmasq") or os.access("/usr/sbin/dnsmasq", os.X_OK)):
        return Finding("fail", "dnsmasq is not installed: no PXE client can be answered",
                       "install Debian's dnsmasq-base (apt-get install dnsmasq-base)")
    facts = _status(config)
    pid = facts.get("dnsmasq_pid")
    if not facts:
        return Finding("fail", "the PXE process has not run (no status file)",
                       "start the agent: dsagent run --config " + config.path)
    if not facts.get("serving") or not pid:
        return Finding("fail", f"PXE is not served on {interface}: "
                       f"{facts.get('reason') or 'no reason given'}",
                       "read `dsagent logs` (lines of pxe and pxe.dnsmasq)")
    import psutil

    try:
        proc = psutil.Process(pid)
        if "dnsmasq" not in proc.name():
            raise psutil.NoSuchProcess(pid)
        bound = {c.laddr.port for c in proc.net_connections(kind="udp")}
    except psutil.NoSuchProcess:
        return Finding("fail", f"dnsmasq (pid {pid}) is not running although the PXE process "
                       "said it was", "see `dsagent status` and `dsagent logs`")
    except psutil.AccessDenied:
        return Finding("skip", f"cannot see dnsmasq's sockets (pid {pid}): run as root")
    missing = [f"{port} ({what})" for port, what in PORTS.items() if port not in bound]
    if missing:
        return Finding("fail", f"dnsmasq (pid {pid}) is not bound to UDP {', '.join(missing)}",
                       "another program may hold the port: ss -ulpn")
    return Finding("ok", f"dnsmasq (pid {pid}) answers on {interface} "
                   f"({facts.get('address')}), UDP 67, 4011 and 69")


def check_other_servers(config: Config) -> Finding:
    from agent.pxe.probe import discover

    interface = config.get("pxe", "interface")
    ours = (_status(config).get("address") or "").split("/")[0]
    # a locally administered MAC nobody lists: only a server answering every
    # computer answers it (our own dnsmasq never sees a frame sent from its
    # own interface, probe.py)
    mac = bytes([0x02]) + os.urandom(5)
    try:
        offers = discover(interface, mac, timeout=PROBE_S)
    except OSError as exc:
        return Finding("skip", f"cannot send a PXE request on {interface}: "
                       f"{exc.strerror or exc} (needs root)")
    others = sorted({o.server for o in offers if o.server != ours and o.vendor_class.startswith(
        "PXEClient")})
    if others:
        return Finding("fail", f"another PXE server answers on {interface}: {', '.join(others)}",
                       "clients would boot from either at random: stop the other one, or "
                       "answer only known computers there")
    return Finding("ok", f"no other PXE server answered a PXE request on {interface} "
                   f"within {PROBE_S:g} s")


def check_configurations(config: Config) -> Finding:
    root = Path(pxe_tftp_root(config) or "")
    path = pxe_db_path(config.state_dir)
    if not path.exists():
        return Finding("skip", "no PXE state yet (the PXE process has not applied a file)")
    db = connect_read_only(path)
    try:
        settings = dict(db.execute("SELECT name, value FROM settings"))
        fallback = settings.get("automation_config")
        users: dict[str, int] = {}
        for (config_name,) in db.execute(
                "SELECT coalesce(config, ?) FROM computers WHERE action = 'automation'",
                (fallback,)):
            if config_name:
                users[config_name] = users.get(config_name, 0) + 1
    finally:
        db.close()
    unknown_boots = settings.get("unknown_computers") == "automation" and fallback
    if unknown_boots:
        users.setdefault(fallback, 0)
    unbuilt = sorted(c for c in users if not (root / c / "current" / "boot.ipxe").exists())
    if unbuilt:
        listed = ", ".join(f"{c} ({users[c]} computer(s)"
                           + (" and every unknown computer)" if c == fallback and unknown_boots
                              else ")") for c in unbuilt)
        return Finding("fail", f"automation configuration(s) with no current build in {root}: "
                       f"{listed}", "run BootWizRebuild for each, or change those computers' "
                       "action (dsagent-server pxe set-action)")
    return Finding("ok", f"{len(users)} automation configuration(s) in use, each built"
                   if users else "no computer is set to automation")


CHECKS = (("pxe-engine", check_engine), ("pxe-other-servers", check_other_servers),
          ("pxe-configurations", check_configurations))
