"""The Server's answers, rendered as files dnsmasq and iPXE read.

Why files: dnsmasq re-reads its hosts file on SIGHUP and iPXE fetches a
script per MAC over TFTP, so a changed decision never restarts dnsmasq
(the seed's Server kept its computer lists in memory, reloaded from the
Interface). What is rendered:

- ``<run_dir>/hosts``: the MACs dnsmasq answers (``--dhcp-ignore=tag:!known``),
  one bare MAC a line. With ``unknown_computers = automation`` it is the one
  wildcard line ``*:*:*:*:*:*``: every MAC is answered. (Bare MACs only: a
  ``set:TAG`` on a hosts line crashed dnsmasq 2.90 on SIGHUP, pxe-lab.md.)
- ``<tftp_root>/dsagent-pxe/``: what iPXE loads.
  ``boot.ipxe`` (every client first) chains ``${mac:hexhyp}.ipxe``, else
  ``unknown.ipxe``; each listed MAC's script says ``automation`` (chain the
  configuration's ``/<config>/current/boot.ipxe``, BootWizRebuild's), or
  ``production``/``ignore`` (``exit``: the firmware goes on to its next boot
  device, the local disk). ``undionly.kpxe``, ``ipxe.efi`` and ``snponly.efi``
  are copied from Debian's ``ipxe`` package for clients whose firmware is not
  iPXE yet.

An ``ignore``d MAC is left out of the hosts file, so it gets no answer at
all, except under ``unknown_computers = automation``: dnsmasq cannot exclude
one MAC from a wildcard in proxy mode (``dhcp-host=MAC,ignore`` does not stop
a proxy's PXE answer), so that MAC's script ends iPXE at once instead.

Files are written only when their content changes (write to a temporary
name, then rename: iPXE never reads half a script), so a one-computer update
of 10,000 rewrites one script and the hosts file. Order: scripts, then the
hosts file (the caller then HUPs), then stale scripts are deleted.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from agent.pxe.state import Decision

log = logging.getLogger("dsagent.pxe")

BOOT_DIR = "dsagent-pxe"           # under tftp_root; a configuration may not take this name
IPXE_DIR = Path("/usr/lib/ipxe")   # Debian's ipxe package
LOADERS = ("undionly.kpxe", "ipxe.efi", "snponly.efi")
EVERYONE = "*:*:*:*:*:*"
SCRIPT_RE = re.compile(r"^[0-9a-f]{2}(-[0-9a-f]{2}){5}\.ipxe$")

COMMON_SCRIPT = """#!ipxe
# dsagent PXE: every client starts here; its own script says what it boots
chain ${mac:hexhyp}.ipxe || chain unknown.ipxe || exit
"""


def script_name(mac: str) -> str:
    """``52:54:00:12:34:56`` -> ``52-54-00-12-34-56.ipxe`` (iPXE's ``${mac:hexhyp}``)."""
    return mac.replace(":", "-") + ".ipxe"


def script_for(decision: Decision, who: str) -> str:
    """The iPXE script that carries out one decision; ``who`` names it in comments."""
    if decision.action == "automation" and decision.config:
        target = f"/{decision.config}/current/boot.ipxe"
        return ("#!ipxe\n"
                f"# dsagent PXE: {who}: automation, configuration {decision.config}\n"
                f"chain {target} || goto failed\n"
                ":failed\n"
                f"echo dsagent PXE: cannot load {target}: configuration {decision.config} "
                "is not built on this PXE server (BootWizRebuild)\n"
                "sleep 10\n"
                "exit 1\n")
    why = {"production": "production: boot from the local disk",
           "automation": "automation, but no configuration is named "
                         "(automation_config is not set)"}.get(decision.action,
                                                              "ignore: not booted over the network")
    return f"#!ipxe\n# dsagent PXE: {who}: {why}\nexit\n"


@dataclass
class Rendered:
    written: int = 0          # files whose content changed
    deleted: int = 0          # scripts of MACs no longer listed
    hosts_changed: bool = False
    answered: int = 0         # MACs in the hosts file (-1: every MAC)
    unbuilt: dict[str, list[str]] = field(default_factory=dict)  # config -> MACs booting it


class BootFiles:
    """Renders decisions into ``run_dir`` (dnsmasq's) and ``tftp_root/dsagent-pxe``."""

    def __init__(self, run_dir: Path, tftp_root: Path, ipxe_dir: Path = IPXE_DIR):
        self.run_dir = Path(run_dir)
        self.tftp_root = Path(tftp_root)
        self.boot_dir = self.tftp_root / BOOT_DIR
        self.ipxe_dir = Path(ipxe_dir)
        self.hosts_path = self.run_dir / "hosts"
        self._known: dict[str, str] | None = None   # file name -> content, as on disk

    def _make_folders(self) -> None:
        """Readable by dnsmasq once it has dropped root."""
        for folder in (self.run_dir, self.boot_dir):
            if not folder.is_dir():
                folder.mkdir(parents=True, exist_ok=True)
                os.chmod(folder, 0o755)

    def prepare(self) -> None:
        """Create the folders and copy the iPXE loaders; raise OSError naming
        what is missing or what dnsmasq, once it has dropped root, could not read."""
        self._make_folders()
        for folder in (self.run_dir, self.boot_dir):
            closed = closed_to_others(folder)
            if closed:
                raise PermissionError(
                    f"{folder} cannot be read by dnsmasq, which runs as user nobody: {closed} "
                    "is closed to other users (chmod o+rx, or choose another [pxe] tftp_root)")
        for name in LOADERS:
            source, target = self.ipxe_dir / name, self.boot_dir / name
            if not source.exists():
                if name == "undionly.kpxe":
                    raise FileNotFoundError(f"{source} is missing: install Debian's ipxe package")
                continue
            if not target.exists() or target.stat().st_size != source.stat().st_size:
                tmp = target.with_name(f".{name}.tmp")
                shutil.copyfile(source, tmp)
                os.chmod(tmp, 0o644)
                os.replace(tmp, target)

    def render(self, decisions: dict[str, Decision], unknown: Decision,
               names: dict[str, str] | None = None) -> Rendered:
        """Bring every file in line with ``decisions`` (MAC -> Decision) and the
        ``unknown`` decision; return what changed."""
        names = names or {}
        self._make_folders()
        if self._known is None:
            self._known = self._read_existing()
        wanted = {"boot.ipxe": COMMON_SCRIPT, "unknown.ipxe": script_for(unknown, "unknown computer")}
        for mac, decision in decisions.items():
            who = f"{mac} ({names[mac]})" if names.get(mac) else mac
            wanted[script_name(mac)] = script_for(decision, who)
        result = Rendered()
        for name, text in wanted.items():
            if self._known.get(name) != text:
                _write(self.boot_dir / name, text)
                self._known[name] = text
                result.written += 1
        if unknown.action == "automation":
            hosts = EVERYONE + "\n"
            result.answered = -1
        else:
            answered = sorted(m for m, d in decisions.items() if d.action != "ignore")
            hosts = "".join(m + "\n" for m in answered)
            result.answered = len(answered)
        if self._known.get("\0hosts") != hosts:
            _write(self.hosts_path, hosts)
            self._known["\0hosts"] = hosts
            result.hosts_changed = True
        for name in [n for n in self._known if SCRIPT_RE.match(n) and n not in wanted]:
            try:
                os.unlink(self.boot_dir / name)
            except FileNotFoundError:
                pass
            del self._known[name]
            result.deleted += 1
        built: dict[str, bool] = {}   # one stat per configuration, not per computer
        for mac, decision in [*decisions.items(), ("unknown computers", unknown)]:
            if decision.action == "automation" and decision.config:
                if decision.config not in built:
                    built[decision.config] = (
                        self.tftp_root / decision.config / "current" / "boot.ipxe").exists()
                if not built[decision.config]:
                    result.unbuilt.setdefault(decision.config, []).append(mac)
        return result

    def remove_run_dir(self) -> None:
        """dnsmasq's folder, when the PXE process stops (it is rendered anew at start)."""
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def _read_existing(self) -> dict[str, str]:
        """What a previous run left, so that only differences are written."""
        known: dict[str, str] = {}
        try:
            entries = os.listdir(self.boot_dir)
        except FileNotFoundError:
            entries = []
        for name in entries:
            if SCRIPT_RE.match(name) or name in ("boot.ipxe", "unknown.ipxe"):
                try:
                    known[name] = (self.boot_dir / name).read_text()
                except (OSError, UnicodeDecodeError):
                    known[name] = ""
        try:
            known["\0hosts"] = self.hosts_path.read_text()
        except (OSError, UnicodeDecodeError):
            pass
        return known


def closed_to_others(folder: Path) -> str | None:
    """The first folder on the way to ``folder`` that other users cannot enter
    (with its mode), or None if dnsmasq's user can reach it."""
    folder = Path(folder).resolve()
    for part in [*reversed(folder.parents), folder]:
        mode = part.stat().st_mode
        if not mode & 0o001 or (part == folder and not mode & 0o004):
            return f"{part} (mode {mode & 0o777:04o})"
    return None


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
