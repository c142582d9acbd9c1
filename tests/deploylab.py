"""The initial deployment of a bare computer, on one machine (issue #13,
PROTOCOL.md §8): the whole site inside a pxelab.Lab, for
tests/test_initial_deployment.py.

``Deployment`` sets up, in the lab's namespace:

- the reference task server on the lab address (``URL``), serving an image
  store folder under ``/images/``;
- the product's PXE site server: ``dsagent run`` with ``[pxe] interface =
  "br0"`` (a ``LoopbackChain`` agent, enrolled as ``site-1``, whose server is
  the one above), with its SBS folder, preboot store (a ``lab.public_dir``,
  which dnsmasq reads as ``nobody``) and package store;
- the site's plain DHCP server (``lab.site_dhcp()``);
- the automation base, built by ``dsagent-server bootwiz-base`` into the
  preboot store with the lab URL baked in, and configuration ``auto64`` built
  from it by a BootWizRebuild task the site server runs;
- the computer ``pc-0042`` predefined on the console (``dsagent-server pxe
  add-computer``, action ``ignore``);
- the capture image ``gold`` of a small ext4 disk, uploaded to the server's
  store over HTTP with the site server's credentials.

``VM`` is a bare computer: QEMU (TCG, BIOS, 512 MiB, iPXE ROM, network boot
first, ``-no-reboot``) with a blank virtio disk, on a tap of the lab. Every
tool missing fails (pxelab.MissingTool / ``need_tool``), never skips.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pxelab
from handlers.imaging.capture import capture
from handlers.imaging.store import open_store
from taskserver.app import TaskServer
from taskserver.loopback import LoopbackChain
from taskserver.pxe import PXEStore

REPO = Path(__file__).resolve().parent.parent
SERVER = "198.18.0.1"                 # the lab's bridge address (subnet 0)
PORT = 8080                           # free in the lab's own namespace
URL = f"http://{SERVER}:{PORT}"
SITE = "site-1"                       # the PXE site server's client id
BASE = "auto-base"
CONFIG = "auto64"
MAC = "52:54:00:00:0d:42"
COMPUTER = "pc-0042"
IMAGE = "gold"
SOURCE_MB = 32                        # the gold image's source disk
DISK_MB = 40                          # the bare computer's blank disk: larger than the source
E2FSPROGS = ("mkfs.ext4", "e2fsck", "debugfs")


def need_tool(name: str) -> str:
    """An e2fsprogs command's path; a failure naming the package when missing."""
    for folder in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"):
        if os.access(f"{folder}/{name}", os.X_OK):
            return f"{folder}/{name}"
    raise pxelab.LabError(f"{name} not found: install the Debian package e2fsprogs "
                          "(apt-get install e2fsprogs)")


def run(*argv, timeout: float = 120) -> str:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout, check=False)
    if done.returncode:
        raise pxelab.LabError(f"{argv} exited {done.returncode}: {done.stdout}{done.stderr}")
    return done.stdout


def sha256_of(path: Path, length: int | None = None, offset: int = 0) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(offset)
        left = float("inf") if length is None else length
        while left > 0:
            buf = fh.read(int(min(1 << 22, left)))
            if not buf:
                break
            h.update(buf)
            left -= len(buf)
    return h.hexdigest()


def make_tree(root: Path) -> Path:
    """Files of every kind the image should carry: random, text, empty, nested."""
    (root / "etc").mkdir(parents=True)
    (root / "srv" / "data" / "deep").mkdir(parents=True)
    (root / "srv" / "random.bin").write_bytes(os.urandom(3 * 2**20))
    (root / "etc" / "hostname").write_text("pc-0042\n")
    (root / "etc" / "motd").write_text("".join(f"deployed line {i}\n" for i in range(20_000)))
    (root / "srv" / "data" / "deep" / "small.bin").write_bytes(os.urandom(5000))
    (root / "srv" / "empty").write_bytes(b"")
    return root


def make_ext4(path: Path, size_mb: int, tree: Path) -> Path:
    """A fresh ext4 disk file (unused space zero: a sparse file) holding ``tree``."""
    with open(path, "wb") as fh:
        fh.truncate(size_mb * 2**20)
    run(need_tool("mkfs.ext4"), "-q", "-F", "-d", tree, path)
    return path


def files_of(disk: Path, out: Path) -> dict[str, bytes]:
    """Every file of an ext4 disk file, extracted with ``debugfs -R "rdump / OUT"``."""
    out.mkdir()
    run(need_tool("debugfs"), "-R", f"rdump / {out}", disk)
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*")
            if p.is_file() and "lost+found" not in p.parts}


def e2fsck(disk: Path) -> subprocess.CompletedProcess:
    return subprocess.run([need_tool("e2fsck"), "-fn", str(disk)], capture_output=True,
                          text=True, timeout=120)


def ipxe_name(mac: str) -> str:
    return mac.replace(":", "-") + ".ipxe"


class Timings:
    """Seconds per phase, printed at the end."""

    def __init__(self):
        self.phases: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        start = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] = round(time.monotonic() - start, 1)

    def __str__(self) -> str:
        return ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items())


class VM:
    """A bare computer booting from the network first: QEMU (TCG, BIOS, 512 MiB,
    virtio-net with its iPXE ROM, ``-no-reboot``) with a virtio disk (a raw
    file) on ``tap``; the serial console goes to ``serial``. Our child: stopped
    with the lab at the latest."""

    def __init__(self, lab: pxelab.Lab, mac: str, tap: str, serial: Path,
                 disk: Path | None = None):
        self.lab, self.mac, self.serial = lab, mac, serial
        serial.write_bytes(b"")
        argv = [pxelab.need("qemu-system-x86_64"), "-accel", "tcg", "-m", "512",
                "-nographic", "-monitor", "none", "-serial", f"file:{serial}",
                "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
                "-device", f"virtio-net-pci,netdev=n0,mac={mac}",
                "-boot", "order=n,reboot-timeout=0", "-no-reboot"]
        if disk is not None:
            argv += ["-drive", f"file={disk},if=virtio,format=raw"]
        self.started = time.monotonic()
        self.qemu = lab.run(argv, name=f"qemu-{mac}")
        self.times: dict[str, float] = {}
        self.exited_after: float | None = None

    def now(self) -> float:
        return round(time.monotonic() - self.started, 1)

    def text(self) -> str:
        return self.serial.read_text(errors="replace")

    def tail(self, n: int = 4000) -> str:
        out = self.text()[-n:]
        if not self.qemu.alive() and self.qemu.lines:
            out += "\n[qemu] " + "\n[qemu] ".join(self.qemu.lines[-20:])
        return out

    def alive(self) -> bool:
        alive = self.qemu.alive()
        if not alive and self.exited_after is None:
            self.exited_after = self.now()
        return alive

    def seen(self, pattern: str) -> bool:
        """Whether ``pattern`` (a regex) showed on the console; notes when."""
        if pattern in self.times:
            return True
        if re.search(pattern, self.text()):
            self.times[pattern] = self.now()
            return True
        return False

    def wait_for(self, pattern: str, timeout: float, what: str = "") -> float:
        """Seconds from QEMU's start until ``pattern`` shows; AssertionError with the
        console's tail if QEMU exits or ``timeout`` s pass first."""
        deadline = time.monotonic() + timeout
        while not self.seen(pattern):
            if not self.alive() or time.monotonic() > deadline:
                state = "still running" if self.alive() else f"exited {self.qemu.proc.poll()}"
                raise AssertionError(f"the VM ({state}, {self.now():.1f} s) did not show "
                                     f"{what or pattern!r}; its console:\n{self.tail()}")
            time.sleep(0.1)
        return self.times[pattern]

    def wait_exit(self, timeout: float) -> int:
        """QEMU's exit status (it exits by itself: ``-no-reboot``)."""
        try:
            code = self.qemu.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"QEMU still running after {timeout:g} s more; its console:\n"
                                 f"{self.tail()}") from None
        self.alive()
        return code

    def stop(self) -> None:
        self.alive()
        if self.qemu in self.lab.children:
            self.lab.children.remove(self.qemu)
        self.qemu.stop(grace=1.0)


class Deployment:
    """The site (module docstring), set up by ``open()``; ``close()`` ends all of it."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.timings = Timings()
        self.lab: pxelab.Lab | None = None
        self.server: TaskServer | None = None
        self.chain: LoopbackChain | None = None
        self._tap: str | None = None
        self._boots = 0

    # -- life cycle
    def open(self) -> "Deployment":
        pxelab.need_all()
        for tool in E2FSPROGS:
            need_tool(tool)
        self.lab = lab = pxelab.Lab(self.workdir / "lab").__enter__()
        lab.site_dhcp()
        self.preboot = lab.public_dir("preboot")
        self.images = self.workdir / "images"
        self.sbs = self.workdir / "sbs" / "SBS"
        self.packages = self.workdir / "packages"
        for folder in (self.images, self.sbs, self.packages):
            folder.mkdir(parents=True)
        self.chain = chain = LoopbackChain(
            self.workdir / "site", client_id=SITE, poll_interval_s=5,
            handlers={"sbs_dir": str(self.sbs), "preboot_store": str(self.preboot),
                      "package_store": str(self.packages)},
            extra_config='[pxe]\ninterface = "br0"\n')
        self.store = chain.store
        self.console = PXEStore(self.store)
        with self.timings.phase("site up (task server, PXE site server serving)"):
            with lab.inside():
                # the reference server on the lab address (the site agent's server_url
                # and the one baked into the base), with its HTTP image store
                self.server = chain.server = TaskServer(self.store, SERVER, PORT,
                                                        image_store=str(self.images)).start()
                chain.start_agent()
                chain.wait_first_pull()
            self.wait(self.serving, 60, "the PXE site server to serve")
        with self.timings.phase("bootwiz-base"):
            self.base_out = self.server_cli("bootwiz-base", BASE, "--preboot-store",
                                            str(self.preboot), "--server-url", URL,
                                            db=False, timeout=600)
        with self.timings.phase("BootWizRebuild auto64"):
            task = chain.queue("BootWizRebuild", {"config": CONFIG, "base": BASE})
            with lab.inside():
                chain.tickle()
            if not chain.wait([task], 300):
                raise pxelab.LabError(f"BootWizRebuild did not end: {chain.events(task)}")
            self.rebuild = chain.events(task)[-1]
            if self.rebuild["state"] != "succeeded":
                raise pxelab.LabError(f"BootWizRebuild {self.rebuild}")
        with self.timings.phase("console: add-computer"):
            self.server_cli("pxe", "add-computer", "--mac", MAC, "--name", COMPUTER,
                            "--action", "ignore", "--config", CONFIG)
        with self.timings.phase("gold image captured over HTTP"):
            self.source = make_ext4(self.workdir / "gold-source.img", SOURCE_MB,
                                    make_tree(self.workdir / "gold-tree"))
            self.gold = self.capture_host(self.source, IMAGE)
        return self

    def close(self) -> None:
        if self.lab is None:
            return
        try:
            with self.lab.inside():
                if self.chain is not None:
                    self.chain.stop()            # the agent, then the server, the store
        finally:
            self.lab.__exit__(None, None, None)
            self.lab = None

    # -- helpers
    @staticmethod
    def wait(condition, timeout: float, what: str, interval: float = 0.1):
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
            time.sleep(interval)

    def serving(self) -> dict | None:
        from agent.common.statusfile import read_all
        facts = read_all(self.chain.workdir / "state").get("pxe") or {}
        return facts if facts.get("serving") and facts.get("dnsmasq_pid") else None

    def server_cli(self, *args: str, db: bool = True, timeout: float = 60) -> str:
        """``dsagent-server ARGS [--db DB]`` in the namespace (its tickles reach the site
        agent); its stdout."""
        argv = [sys.executable, "-m", "taskserver", *args]
        if db:
            argv += ["--db", str(self.store.db_path)]
        return self.lab.check(argv, timeout=timeout)

    def server_command(self, *args: str) -> pxelab.Child:
        """``dsagent-server ARGS --db DB`` started in the namespace (a Child)."""
        return self.lab.run([sys.executable, "-m", "taskserver", *args, "--db",
                             str(self.store.db_path)], name=f"dsagent-server-{args[0]}",
                            cwd=REPO)

    def script(self, mac: str) -> str:
        """The site server's per-MAC iPXE script (what that computer's iPXE runs);
        ``mac="unknown"``: the script of computers on neither list."""
        path = self.preboot / "dsagent-pxe" / (f"{mac}.ipxe" if mac == "unknown"
                                               else ipxe_name(mac))
        return path.read_text() if path.exists() else ""

    def wait_script(self, mac: str, wanted: str, timeout: float = 30) -> str:
        return self.wait(lambda: wanted in self.script(mac) and self.script(mac), timeout,
                         f"the per-MAC script of {mac} to say {wanted!r} "
                         f"(it says {self.script(mac)!r})")

    def write_url(self) -> str:
        """The image store URL with an enrolled client's credentials (PUT needs them)."""
        return f"http://{self.chain.creds['client_id']}:{self.chain.creds['token']}@" \
               f"{SERVER}:{PORT}/images/"

    def capture_host(self, source: Path, name: str) -> dict:
        """CreateImage's capture of ``source`` into the server's store, over HTTP."""
        with self.lab.inside():
            return capture(str(source), open_store(self.write_url()), name, "capture",
                           lambda *a, **k: None)

    def stop_server(self) -> None:
        self.server.stop()

    def start_server(self) -> None:
        with self.lab.inside():             # its socket and threads in the namespace
            self.server.start()

    def disk(self, name: str, size_mb: int = DISK_MB) -> Path:
        """A blank disk (a sparse file of zeros)."""
        path = self.workdir / name
        with open(path, "wb") as fh:
            fh.truncate(size_mb * 2**20)
        return path

    def vm(self, mac: str, disk: Path | None = None, tag: str = "") -> VM:
        if self._tap is None:
            self._tap = self.lab.add_tap()
        self._boots += 1
        serial = self.workdir / f"serial-{self._boots}-{tag or mac.replace(':', '')}.txt"
        return VM(self.lab, mac, self._tap, serial, disk)
