"""A LAN of network namespaces for multicast DeployImage (tests/test_multicast.py,
bench/multicast.py).

``McastLab`` makes a namespace holding a bridge ``br0`` (no address: a plain
switch, multicast snooping off so every port sees the groups, as on a small
unmanaged switch) and, per ``host()``, a namespace joined to it by a veth pair
whose end inside is ``eth0`` with ``198.18.<subnet>.<n>/24`` **and its broadcast
address** (``brd +``: udpcast's sender and receivers find each other by
broadcast; without one they never meet). ``lossy()`` puts a token bucket
(``tc tbf``) on the switch port of a host: what exceeds its rate beyond a small
queue is dropped, so that host's link loses datagrams under udpcast's bursts
(this kernel has no netem: CONFIG_NET_SCH_NETEM is not set). ``agent()`` runs
``python -m agent run-task TASK.xml --json --config CFG`` inside a host's
namespace: each computer reports its own statuses.

Names follow tests/pxelab.py (``pxlab-<pid>-<n>[-word]``), so its
``remove_stale()`` deletes what a killed run left; ``close()`` deletes every
namespace made (and kills what still runs in them). Needs root and iproute2.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

try:
    from tests import pxelab
except ImportError:                     # pytest puts tests/ itself on sys.path
    import pxelab

REPO = Path(__file__).resolve().parent.parent
_seq = itertools.count()


ip = pxelab.ip


@dataclass
class Host:
    ns: str
    address: str
    port: str              # its veth end on the switch (in the lab's namespace)


class McastLab(pxelab.Opened):
    def __init__(self, subnet: int = 40, mtu: int = 1500):
        self.name = f"{pxelab.PREFIX}-{os.getpid()}-{900 + next(_seq)}"
        self.subnet, self.mtu = subnet, mtu
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []

    def open(self) -> None:
        if os.geteuid() != 0:
            raise pxelab.LabError("the multicast lab needs root (network namespaces)")
        pxelab.remove_stale()
        self._namespace(self.name)
        ip("-n", self.name, "link", "add", "br0", "type", "bridge", "stp_state", "0",
           "forward_delay", "0", "mcast_snooping", "0")
        ip("-n", self.name, "link", "set", "br0", "up")

    def _namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self._namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def host(self, word: str) -> Host:
        """A computer on the switch: namespace ``<lab>-<word>`` (``word``: a-z only)."""
        n = len(self.hosts) + 10
        ns, port = f"{self.name}-{word}", f"v{word}"[:15]
        self._namespace(ns)
        address = f"198.18.{self.subnet}.{n}"
        ip("-n", self.name, "link", "add", port, "mtu", str(self.mtu), "type", "veth",
           "peer", "name", "eth0", "netns", ns)
        ip("-n", self.name, "link", "set", port, "master", "br0", "up")
        ip("-n", ns, "link", "set", "eth0", "mtu", str(self.mtu))
        ip("-n", ns, "addr", "add", f"{address}/24", "brd", "+", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        self.hosts[word] = Host(ns, address, port)
        return self.hosts[word]

    def set_mtu(self, mtu: int) -> None:
        for host in self.hosts.values():
            ip("-n", self.name, "link", "set", host.port, "mtu", str(mtu))
            ip("-n", host.ns, "link", "set", "eth0", "mtu", str(mtu))
        self.mtu = mtu

    def lossy(self, word: str, rate: str = "100mbit", burst: str = "32kb",
              limit: str = "64kb") -> None:
        """Datagrams to ``word`` beyond ``rate`` (after a ``limit`` queue) are dropped."""
        ip("netns", "exec", self.name, pxelab.need("tc"), "qdisc", "replace", "dev",
           self.hosts[word].port, "root", "tbf", "rate", rate, "burst", burst, "limit", limit)

    def shape(self, rate: str | None) -> None:
        """Every link at ``rate`` both ways (``1gbit``: a switched gigabit LAN), or
        back to unlimited (None)."""
        tc = pxelab.need("tc")
        for host in self.hosts.values():
            for ns, dev in ((self.name, host.port), (host.ns, "eth0")):
                if rate is None:
                    ip("netns", "exec", ns, tc, "qdisc", "del", "dev", dev, "root", check=False)
                else:
                    ip("netns", "exec", ns, tc, "qdisc", "replace", "dev", dev, "root", "tbf",
                       "rate", rate, "burst", "1mb", "limit", "4mb")

    def dropped(self, word: str) -> int:
        """Datagrams the switch port of ``word`` dropped so far."""
        out = ip("netns", "exec", self.name, pxelab.need("tc"), "-s", "qdisc", "show", "dev",
                 self.hosts[word].port).stdout
        return sum(int(n) for n in re.findall(r"dropped (\d+)", out))

    def clear(self, word: str) -> None:
        ip("netns", "exec", self.name, pxelab.need("tc"), "qdisc", "del", "dev",
           self.hosts[word].port, "root", check=False)

    def agent(self, word: str, workdir: Path, task_type: str, params: dict[str, str],
              image_store: str) -> AgentRun:
        return AgentRun(self.hosts[word].ns, workdir / word, task_type, params, image_store)

    def close(self) -> None:
        for name in reversed(self._namespaces):
            pxelab.delete_namespace(name)
        self._namespaces.clear()


class AgentRun:
    """``dsagent run-task`` of one task inside a namespace, started at once."""

    def __init__(self, ns: str, workdir: Path, task_type: str, params: dict[str, str],
                 image_store: str):
        workdir.mkdir(parents=True, exist_ok=True)
        self.task_id = str(uuid.uuid4())
        config = workdir / "agent.toml"
        config.write_text(f'[handlers]\nimage_store = "{image_store}"\n')
        xml = workdir / "task.xml"
        xml.write_text(
            f'<ClientTasks><Task id="{self.task_id}" type="{task_type}"><Parameters>'
            + "".join(f'<Parameter name="{k}">{escape(v)}</Parameter>' for k, v in params.items())
            + "</Parameters></Task></ClientTasks>")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [pxelab.need("ip"), "netns", "exec", ns, sys.executable, "-m", "agent", "run-task",
             str(xml), "--json", "--config", str(config)],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        self.events: list[dict] = []
        self.stderr = ""

    def wait(self, timeout: float = 120) -> dict:
        """The task's terminal event (after the process ended)."""
        try:
            out, self.stderr = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, self.stderr = self.proc.communicate()
        self.events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        finals = [e for e in self.events if e["state"] in ("succeeded", "failed", "cancelled",
                                                            "timed_out")]
        if not finals:
            raise AssertionError(f"no terminal status (exit {self.proc.returncode}); "
                                 f"stderr: {self.stderr[-2000:]}")
        return finals[-1]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
