"""A PXE lab on this machine, for tests and the bench (/work/shared/pxe-lab.md).

``Lab`` is a network namespace with ``lo`` up and a bridge ``br0`` holding
``198.18.X.1/24`` (X = ``subnet``); on it, as asked: the site's plain DHCP
server (a second dnsmasq in its own namespace, joined by a veth, with router
advertisements for ``fd18::/64`` so iPXE does not wait 15 s for IPv6), taps
for VMs, veth ports for ``agent.pxe.probe``, any command run inside the
namespace (``Lab.run``), and QEMU BIOS PXE boots (``Lab.boot``) whose serial
console text comes back. ``build_initrd`` makes the busybox initrd those VMs
boot into: it prints ``MARKER`` and a text given at build time on the serial
console, then powers off.

Rules kept here, all learnt on this machine:
- Every subprocess is a ``Child``: a Popen that is always waited for (orphans
  are not reaped here), killed at the latest when the lab closes, with its
  output (stdout and stderr together) read by a thread into ``lines``. It gets
  SIGKILL if the thread that started it dies (PR_SET_PDEATHSIG; a process
  that changes its uid, like dnsmasq dropping privileges, loses that).
- Names are unique per run (``pxlab-<pid>-<n>``), so parallel runs and
  leftovers of killed runs never collide; ``remove_stale()`` deletes the
  namespaces of runs whose pid is gone. Interfaces live inside the
  namespaces, so their names are fixed. Addresses only from 198.18.0.0/15.
- A missing tool raises ``MissingTool`` naming the Debian package: a test
  that needs the lab fails (never skips) where QEMU or dnsmasq are missing.
"""

from __future__ import annotations

import ctypes
import gzip
import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "pxlab"
MARKER = "PXELAB-BOOTED"
NOTHING_TO_BOOT = "Nothing to boot"
NO_BOOTABLE_DEVICE = "No bootable device"
KERNEL_ARGS = "console=ttyS0 panic=-1 quiet"
BUSYBOX = "/bin/busybox"
IPXE_DIR = Path("/usr/lib/ipxe")
# tool -> the Debian package that provides it
PACKAGES = {
    "ip": "iproute2", "dnsmasq": "dnsmasq-base", "qemu-system-x86_64": "qemu-system-x86",
    BUSYBOX: "busybox-static",
    "/usr/lib/ipxe/qemu/pxe-virtio.rom": "ipxe-qemu", "/usr/lib/ipxe/undionly.kpxe": "ipxe",
    "/usr/lib/ipxe/ipxe.efi": "ipxe", "/boot/vmlinuz-*": "linux-image-amd64",
}
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_seq = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)


class LabError(RuntimeError):
    """The lab could not do what was asked (the message says what was seen)."""


class MissingTool(LabError):
    def __init__(self, tool: str):
        self.package = PACKAGES.get(tool, "?")
        super().__init__(f"{tool} not found: install the Debian package {self.package} "
                         f"(apt-get install {self.package})")


def need(tool: str) -> str:
    """The path of ``tool`` (a command, a file, or a glob; see PACKAGES), else MissingTool."""
    if "/" not in tool:
        found = shutil.which(tool, path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        if found:
            return found
    else:
        matches = sorted(Path("/").glob(tool.lstrip("/")))
        if matches:
            return str(matches[-1])
    raise MissingTool(tool)


def need_all() -> None:
    """Fail at once (MissingTool) unless every tool of a QEMU boot is here."""
    for tool in PACKAGES:
        need(tool)


def kernel() -> Path:
    """This machine's newest kernel (``/boot/vmlinuz-*``)."""
    return Path(need("/boot/vmlinuz-*"))


def ipxe_file(name: str) -> Path:
    """A file of Debian's ``ipxe`` (``undionly.kpxe``, ``ipxe.efi``)."""
    return Path(need(str(IPXE_DIR / name)))


def _die_with_parent() -> None:
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Child:
    """A subprocess we always wait for; its output is read into ``lines``."""

    def __init__(self, argv: list[str], name: str = "", **popen):
        self.argv = [str(a) for a in argv]
        self.name = name or Path(self.argv[0]).name
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
                                     **popen)
        self._reader = threading.Thread(target=self._read, name=f"{self.name}-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            with self._changed:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 10.0, start: int = 0) -> str:
        """The first line from index ``start`` on matching the regex ``pattern``.

        LabError (with the output) past ``timeout`` s or if the process exits first.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[start:]:
                    if re.search(pattern, line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (not self._reader.is_alive() and self.proc.poll() is not None):
                    state = "still running" if self.alive() else f"exited {self.proc.poll()}"
                    raise LabError(f"{self.name} ({state}) did not print /{pattern}/ within "
                                   f"{timeout:g} s; its output:\n" + "\n".join(self.lines)[-4000:])
                self._changed.wait(min(left, 0.1))

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def stop(self, grace: float = 5.0) -> int:
        """SIGTERM, then SIGKILL after ``grace`` s; always waited for. The exit status."""
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        code = self.proc.wait()
        self._reader.join(5)
        self.proc.stdout.close()
        return code

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class Boot:
    """One VM boot: the serial console text; which ``done`` text was seen (None:
    QEMU exited or timed out first) and seconds from QEMU's start to it (else
    to QEMU's end, else the timeout); QEMU's exit status and seconds to its
    end (None: we stopped it); when each watched text first showed."""
    serial: str
    done: str | None
    seconds: float
    returncode: int | None
    times: dict[str, float] = field(default_factory=dict)
    exited_after: float | None = None


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([need("ip"), *args], capture_output=True, text=True, timeout=30,
                          check=False)
    if check and done.returncode:
        raise LabError(f"ip {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    return done


def delete_namespace(name: str) -> None:
    """Kill what still runs in namespace ``name`` (lab processes by construction),
    then delete it. Never raises."""
    for pid in ip("netns", "pids", name, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ValueError, OSError):
            pass
    ip("netns", "delete", name, check=False)


def remove_stale() -> list[str]:
    """Delete the namespaces (killing what still runs in them) and public dirs
    left by lab runs whose process is gone (a killed run); what was removed."""
    removed = []
    for path in Path("/tmp").glob(f"{PREFIX}-*"):
        m = re.match(rf"{PREFIX}-(\d+)-", path.name)
        if m and path.is_dir() and not Path(f"/proc/{m.group(1)}").exists():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    for line in ip("netns", "list").stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{PREFIX}-(\d+)-\d+(-[a-z]+)?", name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            # what the dead run left running in it (a dnsmasq that dropped
            # privileges loses PR_SET_PDEATHSIG): lab processes by construction
            delete_namespace(name)
            removed.append(name)
    return removed


def proxy_args(root: Path | str, run: Path | str, address: str = "198.18.0.1",
               network: str = "198.18.0.0", interface: str = "br0") -> list[str]:
    """The PXE process's own dnsmasq command line (agent/pxe/dnsmasq.py, checked
    by hand on this machine: /tmp/pxelab-findings.md), for a dnsmasq the test
    runs itself: answers only the MACs of ``run/hosts`` (one bare MAC a line,
    or ``*:*:*:*:*:*`` for all), re-read on SIGHUP; iPXE gets
    ``dsagent-pxe/boot.ipxe`` straight in the offer, other PXE ROMs chain-load
    iPXE from ``root/dsagent-pxe/``. Logs to stderr."""
    import ipaddress

    from agent.pxe.dnsmasq import command_line

    prefix = ipaddress.ip_network(f"{network}/24").prefixlen
    return command_line("dnsmasq", interface, ipaddress.IPv4Interface(f"{address}/{prefix}"),
                        Path(root), Path(run) / "hosts")[1:]


class Opened:
    """A lab as a context manager: ``open()`` on entering (``close()`` if it fails
    halfway, so nothing is left behind), ``close()`` on leaving."""

    def __enter__(self):
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Lab(Opened):
    """A namespace with ``br0`` = ``198.18.<subnet>.1/24``; a context manager.

    Everything made through it (children, namespaces) goes in ``close()``.
    """

    bridge = "br0"

    def __init__(self, workdir: Path | str, subnet: int = 0):
        if not 0 <= subnet <= 255:
            raise ValueError("subnet: 0..255 (198.18.<subnet>.0/24)")
        self.workdir = Path(workdir)
        self.name = f"{PREFIX}-{os.getpid()}-{next(_seq)}"
        self.ns = self.name
        self.site_ns = f"{self.name}-site"
        self.network = f"198.18.{subnet}.0"
        self.address = f"198.18.{subnet}.1"
        self.site_address = f"198.18.{subnet}.2"
        self.children: list[Child] = []
        self.site: Child | None = None
        self._namespaces: list[str] = []
        self._dirs: list[Path] = []
        self._taps = itertools.count()
        self._ports = itertools.count()
        self._boots = itertools.count()

    # -- life cycle
    def open(self) -> None:
        if os.geteuid() != 0:
            raise LabError("the PXE lab needs root (network namespaces, taps)")
        need("ip")
        remove_stale()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._add_namespace(self.ns)
        self.ip("link", "add", self.bridge, "type", "bridge", "stp_state", "0",
                "forward_delay", "0")
        self.ip("addr", "add", f"{self.address}/24", "dev", self.bridge)
        self.ip("link", "set", self.bridge, "up")

    def close(self) -> None:
        """Stop every child (waited for), then delete the namespaces. Never raises."""
        for child in reversed(self.children):
            try:
                child.stop()
            except Exception:
                pass
        for name in reversed(self._namespaces):
            ip("netns", "delete", name, check=False)
        self._namespaces.clear()
        for path in self._dirs:
            shutil.rmtree(path, ignore_errors=True)
        self._dirs.clear()

    def _add_namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self._namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def public_dir(self, name: str) -> Path:
        """A new folder dnsmasq can read once it dropped privileges (to
        ``nobody``): ``/tmp/<lab name>-<name>``, mode 0755, removed at
        ``close()``. pytest's tmp_path is not (/tmp/pytest-of-root is 0700):
        a TFTP root there stops dnsmasq at start, a hosts file there is
        silently not read. Files in it must be world-readable (umask 022)."""
        path = Path(f"/tmp/{self.name}-{name}")
        path.mkdir(mode=0o755)
        path.chmod(0o755)
        self._dirs.append(path)
        return path

    # -- commands inside the namespace
    def ip(self, *args: str) -> str:
        """``ip -n NS args``; its stdout (LabError if it fails)."""
        return ip("-n", self.ns, *args).stdout

    def run(self, argv: list[str], name: str = "", ns: str | None = None, **popen) -> Child:
        """``argv`` inside the namespace (``ip netns exec``, which execs: the
        child's pid is the command's); killed and waited for at ``close()``."""
        child = Child([need("ip"), "netns", "exec", ns or self.ns, *map(str, argv)],
                      name=name or Path(str(argv[0])).name, **popen)
        self.children.append(child)
        return child

    def check(self, argv: list[str], timeout: float = 30) -> str:
        """Run ``argv`` inside the namespace to its end; its stdout (LabError if it fails)."""
        done = subprocess.run([need("ip"), "netns", "exec", self.ns, *map(str, argv)],
                              capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode:
            raise LabError(f"{argv} exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    @contextmanager
    def inside(self):
        """This thread in the namespace (setns) for the block; sockets made in
        it stay there (``agent.pxe.probe.discover`` on a ``port()``)."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.ns}", os.O_RDONLY)
        try:
            if _libc.setns(target, _CLONE_NEWNET):
                raise LabError(f"setns into {self.ns}: {os.strerror(ctypes.get_errno())}")
            try:
                yield self
            finally:
                if _libc.setns(own, _CLONE_NEWNET):  # cannot go on in the wrong namespace
                    os.write(2, f"pxelab: could not leave {self.ns}\n".encode())
                    os._exit(70)
        finally:
            os.close(target)
            os.close(own)

    def proxy(self, root: Path, run: Path, extra: tuple[str, ...] = ()) -> Child:
        """The proxy DHCP + TFTP dnsmasq of ``proxy_args`` on br0 (plus ``extra``)."""
        return self.dnsmasq([*proxy_args(root, run, self.address, self.network), *extra],
                            name="proxy-dnsmasq")

    def dnsmasq(self, args: list[str], name: str = "dnsmasq", ready: str = r"started, version",
                timeout: float = 10.0, ns: str | None = None) -> Child:
        """dnsmasq with ``args`` in the namespace, once it logged ``ready``
        (give ``--keep-in-foreground --log-facility=-`` so it logs here)."""
        child = self.run([need("dnsmasq"), *args], name=name, ns=ns)
        child.wait_for(ready, timeout)
        return child

    # -- the network
    def site_dhcp(self) -> Child:
        """The site's plain DHCP server (198.18.X.50-100, RA for fd18::/64),
        in its own namespace joined to br0 by a veth; started once."""
        if self.site is None:
            self.join(self.site_ns, self.site_address)
            ip("-n", self.site_ns, "addr", "add", "fd18::2/64", "dev", "eth0", "nodad")
            base = self.network.rsplit(".", 1)[0]
            self.site = self.dnsmasq(
                ["--keep-in-foreground", "--conf-file=/dev/null", "--port=0", "--bind-interfaces",
                 "--interface=eth0", f"--dhcp-range={base}.50,{base}.100,255.255.255.0,10m",
                 "--no-ping", "--enable-ra", "--dhcp-range=fd18::,ra-only,64,10m",
                 "--leasefile-ro", "--pid-file=", "--log-facility=-",
                 "--log-dhcp"], name="site-dnsmasq", ns=self.site_ns)
        return self.site

    def join(self, ns: str, address: str) -> str:
        """Make namespace ``ns`` (a name ``<lab>-<word>``) and join it to br0 by a
        veth whose end there is ``eth0`` with ``address``/24: another host on the
        link (the site's DHCP server, another PXE server). Returns ``ns``."""
        self._add_namespace(ns)
        outside = f"v{len(self._namespaces)}{ns.rsplit('-', 1)[-1]}"[:15]
        self.ip("link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", ns)
        self.ip("link", "set", outside, "master", self.bridge, "up")
        for args in (("addr", "add", f"{address}/24", "dev", "eth0"), ("link", "set", "eth0", "up")):
            ip("-n", ns, *args)
        return ns

    def add_tap(self) -> str:
        """A new tap on br0 (for one VM at a time); its name."""
        tap = f"tap{next(self._taps)}"
        self.ip("tuntap", "add", "dev", tap, "mode", "tap")
        self.ip("link", "set", tap, "master", self.bridge, "up")
        return tap

    def port(self) -> str:
        """A veth pair, one end on br0; the other end's name (up, no address),
        from which frames reach the bridge as from another computer."""
        n = next(self._ports)
        end, peer = f"probe{n}", f"probe{n}br"
        self.ip("link", "add", end, "type", "veth", "peer", "name", peer)
        self.ip("link", "set", peer, "master", self.bridge, "up")
        self.ip("link", "set", end, "up")
        return end

    # -- VMs
    def boot(self, mac: str, done: tuple[str, ...] = (MARKER,), timeout: float = 60.0,
             tap: str | None = None, grace: float = 2.0,
             watch: tuple[str, ...] = (NOTHING_TO_BOOT, NO_BOOTABLE_DEVICE, MARKER)) -> Boot:
        """A QEMU BIOS PXE boot of ``mac`` (TCG, 256 MB, virtio-net, iPXE ROM),
        on ``tap`` (a new one if None), until a ``done`` text shows on the
        serial console (then up to ``grace`` s for QEMU to end by itself, e.g.
        the initrd's poweroff), QEMU exits, or ``timeout`` s; then QEMU is
        stopped. It is our child (no ``timeout`` command between: QEMU keeps
        PR_SET_PDEATHSIG and dies with us). ``Boot.times``: when each of the
        ``done`` and ``watch`` texts first showed."""
        for tool in ("qemu-system-x86_64", "/usr/lib/ipxe/qemu/pxe-virtio.rom"):
            need(tool)
        tap = tap or self.add_tap()
        serial = self.workdir / f"serial-{next(self._boots)}-{mac.replace(':', '')}.txt"
        serial.write_bytes(b"")
        argv = [need("qemu-system-x86_64"),
                "-accel", "tcg", "-m", "256", "-nographic", "-monitor", "none",
                "-serial", f"file:{serial}",
                "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
                "-device", f"virtio-net-pci,netdev=n0,mac={mac}",
                "-boot", "order=n,reboot-timeout=0", "-no-reboot"]
        times: dict[str, float] = {}
        start = time.monotonic()
        qemu = self.run(argv, name=f"qemu-{mac}")

        def look() -> str | None:
            text = serial.read_text(errors="replace")
            for t in (*done, *watch):
                if t not in times and t in text:
                    times[t] = round(time.monotonic() - start, 2)
            return next((d for d in done if d in times), None)

        seen, end = None, None
        try:
            while time.monotonic() - start < timeout:
                exited = not qemu.alive()
                seen = look()
                if seen or exited:
                    break
                time.sleep(0.05)
            if seen:
                try:
                    qemu.proc.wait(grace)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            code = qemu.proc.poll()
            if code is not None:
                end = time.monotonic() - start
            qemu.stop(grace=1.0)
            self.children.remove(qemu)
        look()
        text = serial.read_text(errors="replace")
        if qemu.lines and code not in (0, None):
            text += "\n[qemu] " + "\n[qemu] ".join(qemu.lines)
        return Boot(serial=text, done=seen, seconds=times.get(seen, end or timeout),
                    returncode=code, times=times, exited_after=end)


# -- the test initrd ---------------------------------------------------------

def _cpio_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
                ino: int = 0) -> bytes:
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def build_initrd(folder: Path | str, show: str | bytes | Path | None = None,
                 marker: str = MARKER, name: str = "initrd.img", cat: str = "/show") -> Path:
    """A gzip newc initrd in ``folder``: busybox-static and an ``/init`` that
    mounts proc (and devtmpfs), prints ``marker`` and then the file ``cat``
    to /dev/ttyS0, and runs ``poweroff -f``. ``/show`` holds ``show`` (a text,
    or a file's content read now); with ``show=None``, ``cat`` names a file
    another archive part brings (BootWizRebuild's drivers)."""
    if isinstance(show, Path):
        show = show.read_bytes()
    elif isinstance(show, str):
        show = show.encode()
    init = (f"#!{BUSYBOX} sh\n"
            f"{BUSYBOX} mount -t proc proc /proc\n"
            f"{BUSYBOX} mount -t devtmpfs devtmpfs /dev\n"
            f"echo {marker} > /dev/ttyS0\n"
            f"{BUSYBOX} cat {cat} > /dev/ttyS0\n"
            f"{BUSYBOX} poweroff -f\n").encode()
    entries = [("dev", 0o040755, b""), ("dev/console", 0o020600, b""), ("proc", 0o040755, b""),
               ("bin", 0o040755, b""), ("bin/busybox", 0o100755, Path(need(BUSYBOX)).read_bytes()),
               ("init", 0o100755, init)] + ([("show", 0o100644, show)] if show is not None else [])
    raw = b"".join(_cpio_entry(n, m, d, (5, 1) if n == "dev/console" else (0, 0), ino=i + 1)
                   for i, (n, m, d) in enumerate(entries))
    raw += _cpio_entry("TRAILER!!!", 0)
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw, compresslevel=1))
    path.chmod(0o644)
    return path
