"""``python -m bench.deployment``: issue #13's speed table (initial deployment).

Three measurements, one section (``## Initial deployment`` in bench/results.md):

1. **DeployImage over HTTP on loopback vs from a folder** (goal: ≥ 0.9× the
   folder's speed). A 512 MiB ext4 disk file (``mkfs.ext4 -d``) holding
   ~260 MiB of files (bench/imaging.py's deterministic contents: ~160 MiB
   random, ~100 MiB of log lines, CSV rows and binary records) is captured
   once into a folder store (CreateImage). The *same folder* is then the
   store of all: (a) the folder itself, (b) the reference server's HTTP
   store (``TaskServer(..., image_store=DIR)``, ``/images/``) started in this
   process, (b') the same server as its own process (``dsagent-server serve
   --image-store DIR``: (b) shares this interpreter, its GIL and its two
   cores' scheduling with the deploy's threads, as a site's server would
   not), and (c) nginx (``sendfile on``, a read-only ``alias``) when
   ``/usr/sbin/nginx`` is installed; so every store serves the same files
   from the same page cache. Each deploy is the imaging plugin's
   ``dsagent_run_task`` for a DeployImage task, called in this process with a real ``TaskContext``
   (after ``dsagent_validate_task``, untimed): the task's own code path
   (open_store, deploy, fsync of the target) without a process start.
   Target: one 512 MiB file, random bytes at first, overwritten by every
   deploy. One untimed warm-up deploy per store, then ``runs`` rounds, the
   stores in a rotated order each round; the median per store, and the
   median of the per-round ratios (folder time ÷ HTTP time). Every deploy's
   ``target_sha256`` must be the source disk's sha256.
2. **The automation initrd**: ``dsagent-server bootwiz-base`` run once as a
   command (wall time, and the ``seconds`` base.json records), its sizes
   from base.json and its entries counted by kind from the archive.
3. **PXE boot → agent registered** under TCG: that base, in a pxelab
   namespace (tests/pxelab.py) as tests/test_automation_base.py boots it:
   the proxy dnsmasq serving the ``boot.ipxe`` BootWizRebuild writes, the
   site's DHCP server, the reference task server at 198.18.0.1:8080 with the
   computer predefined (action ``automation``), QEMU (TCG, BIOS, iPXE ROM,
   virtio-net, 512 MiB). The serial console and the proxy's log are polled
   every 0.1 s; the timeline is seconds from QEMU's start.

Needs root (namespaces, taps), QEMU, dnsmasq, iPXE, busybox-static, a kernel,
e2fsprogs, fdisk and zstd; a missing one stops the bench at once, naming its
Debian package. Everything started (nginx, the task servers, the namespace,
dnsmasq, QEMU) is stopped on the way out, also after an error or SIGTERM.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import re
import shutil
import socket
import stat
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from bench import imaging as imaging_bench
from bench.report import (Conditions, Row, machine_lines, run_standalone, standalone_options,
                          table)
from tests import pxelab

HEADING = "## Initial deployment"
MiB = 1 << 20
DISK_BYTES = 512 * MiB
RANDOM_BYTES = 160 * MiB
TEXT_BYTES = 100 * MiB
SEED = 20261207
RATIO_GOAL = 0.9                 # HTTP deploy speed ÷ folder deploy speed
IMAGE = "golden"

BASE = "bench-base"
SERVER = "198.18.0.1"            # the lab's bridge (subnet 0)
PORT = 8080
URL = f"http://{SERVER}:{PORT}"
MACS = ("52:54:00:00:0d:01", "52:54:00:00:0d:02")
BOOT_TIMEOUT_S = 150.0
NGINX = "/usr/sbin/nginx"
NGINX_PACKAGE = "nginx-light"
# tool -> Debian package, beyond pxelab's (QEMU, dnsmasq, iPXE, busybox, kernel, ip)
TOOLS = {"mkfs.ext4": "e2fsprogs", "debugfs": "e2fsprogs", "e2fsck": "e2fsprogs",
         "dumpe2fs": "e2fsprogs", "sfdisk": "fdisk", "zstd": "zstd"}

INIT = "/init started (`dsagent automation: starting`)"
# (mark, where it shows, pattern); "serial" is the VM's first serial port, "proxy" the
# proxy dnsmasq's log (DHCP answers and TFTP transfers), in the order they happen
MARKS = (
    ("iPXE asked the proxy (first PXE answer)", "proxy", r"PXE\(br0\) .*{mac}"),
    ("TFTP: boot.ipxe sent", "proxy", r"sent .*/dsagent-pxe/boot\.ipxe to"),
    ("TFTP: vmlinuz sent", "proxy", rf"sent .*/{BASE}/vmlinuz to"),
    ("TFTP: initrd.img sent", "proxy", rf"sent .*/{BASE}/initrd\.img to"),
    (INIT, "serial", r"dsagent automation: starting: base"),
    ("kernel modules loaded", "serial", r"dsagent automation: kernel modules loaded"),
    ("network up (udhcpc lease)", "serial", r"dsagent automation: network up on eth0"),
    ("task server reachable (/init's GET)", "serial",
     rf"dsagent automation: task server {re.escape(URL)} reachable"),
    ("starting the agent", "serial",
     rf"dsagent automation: starting the agent, server {re.escape(URL)}"),
    ("the agent's first log line", "serial",
     r"\d{4}-\d\d-\d\dT[\d:.]+Z (INFO|WARNING|ERROR) dsagent\[\d+\]: "),
    ("registered (the agent's log line)", "serial", r"registered as {name} \(automation\)"),
)


class Unavailable(RuntimeError):
    """This machine cannot run the bench (the message says what to install or do)."""


def say(message: str) -> None:
    print(f"[bench.deployment {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr,
          flush=True)


def _sbin(name: str) -> str | None:
    return shutil.which(name, path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")


def check() -> None:
    """Unavailable unless we are root and every tool is here (nginx is optional)."""
    if os.geteuid() != 0:
        raise Unavailable("the deployment bench needs root (network namespaces and taps for "
                          "the QEMU boot)")
    try:
        pxelab.need_all()
    except pxelab.MissingTool as exc:
        raise Unavailable(f"the deployment bench cannot run: {exc}") from None
    for name, package in TOOLS.items():
        if _sbin(name) is None:
            raise Unavailable(f"the deployment bench cannot run: {name} not found: install the "
                              f"Debian package {package} (apt-get install {package})")
    if server_command() is None:
        raise Unavailable("dsagent-server is not installed in this environment "
                          "(pip install -e . in the venv)")


def server_command() -> str | None:
    beside = Path(sys.executable).parent / "dsagent-server"
    return str(beside) if beside.exists() else shutil.which("dsagent-server")


def secs(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f} s" if value < 10 else f"{value:.1f} s"


def tenths(value: float | None) -> str:
    """Boot times: read by polling every 0.1 s."""
    return "—" if value is None else f"{value:.1f} s"


# ---- 1. DeployImage: folder vs HTTP -------------------------------------------------

@dataclass
class DiskFacts:
    path: Path
    files: int
    tree_bytes: int
    compressible_bytes: int
    sha256: str
    build_s: float


def build_disk(workdir: Path) -> DiskFacts:
    """The 512 MiB ext4 disk file with ~260 MiB of files (bench/imaging.py's contents)."""
    started = time.monotonic()
    content = imaging_bench.Content(SEED)
    rng = content.rng
    tree, path = workdir / "tree", workdir / "disk.img"
    plan = [("random", size) for size in imaging_bench._sizes(rng, RANDOM_BYTES)]
    kinds = ["log", "csv", "rec"]
    plan += [(kinds[i % 3], size) for i, size in
             enumerate(imaging_bench._sizes(rng, TEXT_BYTES))]
    rng.shuffle(plan)
    for n, (kind, size) in enumerate(plan):
        folder = tree / rng.choice(imaging_bench.DIRS[kind])
        folder.mkdir(parents=True, exist_ok=True)
        data = content.random(size) if kind == "random" else content.compressible(kind, size)
        (folder / f"{kind}-{n:03d}{imaging_bench.EXT[kind]}").write_bytes(data)
    with open(path, "wb") as fh:
        fh.truncate(DISK_BYTES)
    imaging_bench.run(imaging_bench.tool("mkfs.ext4"), "-q", "-F", "-d", tree, path)
    shutil.rmtree(tree)
    ok, out = imaging_bench.e2fsck_clean(path)
    if not ok:
        raise RuntimeError(f"e2fsck -fn of the bench disk is not clean:\n{out}")
    return DiskFacts(path, len(plan), sum(s for _, s in plan),
                     sum(s for k, s in plan if k != "random"), imaging_bench.sha256_file(path),
                     time.monotonic() - started)


class Plugin:
    """The imaging plugin's hooks, called as the worker calls them (validate, then run)."""

    def __init__(self):
        from agent.plugin.tasks import TaskContext
        from handlers.imaging import plugin
        self.plugin, self.TaskContext = plugin, TaskContext
        self.log = logging.LoggerAdapter(logging.getLogger("bench.deployment"), {})

    def run(self, task_type: str, params: dict[str, str], store: str) -> tuple[float, dict]:
        from agent.common.task import Task
        task = Task(id=str(uuid.uuid4()), type=task_type, parameters=params)
        config = {"image_store": store}
        self.plugin.dsagent_validate_task(task, config)
        ctx = self.TaskContext(task, config, lambda percent, message, details: None, self.log)
        t0 = time.perf_counter()
        details = self.plugin.dsagent_run_task(task, ctx)
        return time.perf_counter() - t0, details


NGINX_CONF = """\
user root root;
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    sendfile on;
    server {{
        listen 127.0.0.1:{port};
        location /images/ {{ alias {store}/; }}
    }}
}}
"""


class Nginx:
    """nginx serving ``store`` read-only under /images/ on a free loopback port."""

    def __init__(self, prefix: Path, store: Path):
        self.prefix, self.store = prefix, store
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> Nginx:
        self.prefix.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            conf = self.prefix / "nginx.conf"
            conf.write_text(NGINX_CONF.format(prefix=self.prefix, port=port, store=self.store))
            self.proc = subprocess.Popen([NGINX, "-p", str(self.prefix), "-e",
                                          str(self.prefix / "error.log"), "-c", str(conf)],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    self.url = f"http://127.0.0.1:{port}/images/"
                    return self
                except OSError:
                    time.sleep(0.02)
            self.stop()
            log = (self.prefix / "error.log").read_text(errors="replace") \
                if (self.prefix / "error.log").exists() else ""
            if attempt == 2 or "Address already in use" not in log:
                raise RuntimeError(f"nginx did not start: {log[-2000:]}")
        raise AssertionError("unreachable")

    def version(self) -> str:
        done = subprocess.run([NGINX, "-v"], capture_output=True, text=True, check=False)
        return done.stderr.strip().rsplit("/", 1)[-1] or "?"

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` s; always reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ServeProcess:
    """``dsagent-server serve --image-store DIR`` as its own process on a free loopback port
    (the way a site runs it: the deploy shares no interpreter with it)."""

    def __init__(self, db: Path, store: Path):
        self.db, self.store = db, store
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> ServeProcess:
        self.proc = subprocess.Popen([server_command(), "serve", "--db", str(self.db),
                                      "--listen", "127.0.0.1:0", "--image-store",
                                      str(self.store)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline().strip()      # it prints its URL first
        if not line.startswith("http://"):
            self.stop()
            raise RuntimeError(f"dsagent-server serve did not start (printed {line!r})")
        self.url = f"{line}/images/"
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc.stdout.close()
            self.proc = None


@dataclass
class DeployResult:
    disk: DiskFacts
    capture_s: float
    captured: dict
    stores: dict[str, str]                        # label -> location
    times: dict[str, list[float]] = field(default_factory=dict)
    details: dict[str, dict] = field(default_factory=dict)   # label -> last run's details
    problems: list[str] = field(default_factory=list)
    nginx_missing: bool = False
    nginx_version: str = ""
    load_after: float = 0.0                      # 1-min load average when the rounds ended


FOLDER = "folder"
REFERENCE = "reference server"
SERVE = "dsagent-server serve"
NGINX_LABEL = "nginx"


def measure_deploy(workdir: Path, runs: int) -> DeployResult:
    from taskserver import TaskServer, TaskStore
    workdir.mkdir(parents=True, exist_ok=True)
    say(f"building the {DISK_BYTES // MiB} MiB ext4 disk (~{(RANDOM_BYTES + TEXT_BYTES) // MiB} "
        "MiB of files)")
    disk = build_disk(workdir)
    say(f"  built in {disk.build_s:.1f} s; capturing it into the folder store (CreateImage)")
    store = workdir / "store"
    store.mkdir()
    plugin = Plugin()
    capture_s, captured = plugin.run("CreateImage", {"source": str(disk.path), "image": IMAGE},
                                     str(store))
    target = workdir / "target.img"
    with open(target, "wb") as fh:
        fh.writelines(os.urandom(16 * MiB) for _ in range(DISK_BYTES // (16 * MiB)))
        os.fsync(fh.fileno())

    db = TaskStore(str(workdir / "server.db"))
    server = TaskServer(db, image_store=str(store)).start()
    nginx = serve = None
    result = DeployResult(disk, capture_s, captured,
                          {FOLDER: str(store), REFERENCE: f"{server.url}/images/"})
    try:
        serve = ServeProcess(workdir / "serve.db", store).start()
        result.stores[SERVE] = serve.url
        if os.access(NGINX, os.X_OK):
            nginx = Nginx(workdir / "nginx", store).start()
            result.stores[NGINX_LABEL] = nginx.url
            result.nginx_version = nginx.version()
        else:
            result.nginx_missing = True
        labels = list(result.stores)
        params = {"image": IMAGE, "target": str(target)}

        def one(label: str) -> float:
            seconds, details = plugin.run("DeployImage", params, result.stores[label])
            if details["target_sha256"] != disk.sha256:
                result.problems.append(f"{label}: the deployed disk's sha256 is not the "
                                       "source's")
            result.details[label] = details
            return seconds

        say("warm-up: one untimed deploy from each store")
        for label in labels:
            one(label)
        for label in labels:
            result.times[label] = []
        for r in range(runs):
            order = labels[r % len(labels):] + labels[:r % len(labels)]
            for label in order:
                result.times[label].append(one(label))
            say(f"round {r + 1}/{runs}: " + ", ".join(
                f"{label} {result.times[label][-1]:.3f} s" for label in labels))
        result.load_after = os.getloadavg()[0]
    finally:
        if nginx is not None:
            nginx.stop()
        if serve is not None:
            serve.stop()
        server.stop()
        db.close()
    return result


def deploy_rows(res: DeployResult, runs: int) -> list[Row]:
    cap = res.captured
    span = DISK_BYTES
    folder = res.times[FOLDER]
    t_folder = statistics.median(folder)
    rows = [Row(f"The image: {DISK_BYTES // MiB} MiB ext4 disk file, {res.disk.files} files "
                f"({res.disk.tree_bytes / MiB:.0f} MiB, {res.disk.compressible_bytes / MiB:.0f} "
                "MiB of it compressible)",
                f"{cap['bytes_stored'] / MiB:.0f} MiB stored, {cap['compressed_size'] / MiB:.0f} "
                f"MiB compressed ({cap['compressed_size'] / 1e6:.0f} MB), {cap['runs']} runs; "
                f"captured once (CreateImage, folder store) in {res.capture_s:.2f} s")]
    rows.append(Row(f"DeployImage from the folder store, median of {runs}",
                    f"{secs(t_folder)} ({span / 1e6 / t_folder:,.0f} MB/s of disk, "
                    f"{cap['compressed_size'] / 1e6 / t_folder:,.0f} MB/s of image); "
                    f"best {secs(min(folder))}"))
    for label in res.stores:
        if label == FOLDER:
            continue
        times = res.times[label]
        t = statistics.median(times)
        ratios = [f / h for f, h in zip(folder, times)]
        ratio = statistics.median(ratios)
        name = {REFERENCE: "the reference server's HTTP store (`TaskServer(image_store=DIR)` "
                           "in this process)",
                SERVE: "the reference server in its own process (`dsagent-server serve "
                       "--image-store DIR`)"}.get(label, f"nginx {res.nginx_version} "
                                                        "(`sendfile on`, its own process)")
        details = res.details.get(label, {})
        reqs = details.get("http_requests")
        rows.append(Row(f"DeployImage over HTTP on loopback from {name}, median of {runs}",
                        f"{secs(t)} ({span / 1e6 / t:,.0f} MB/s of disk, "
                        f"{cap['compressed_size'] / 1e6 / t:,.0f} MB/s of image); "
                        f"best {secs(min(times))}"
                        + (f"; {reqs} ranged GET of data.zst, "
                           f"{details.get('http_resumes', 0)} resumes" if reqs is not None
                           else "")))
        rows.append(Row(f"  ↳ speed × the folder's: {label} (median of the per-round ratios; "
                        "ratio of the medians, of the bests)",
                        f"{ratio:.2f}× ({t_folder / t:.2f}×, {min(folder) / min(times):.2f}×; "
                        "rounds: "
                        + ", ".join(f"{x:.2f}" for x in ratios) + ")",
                        f"≥ {RATIO_GOAL}×", ratio >= RATIO_GOAL and not res.problems))
    if res.nginx_missing:
        rows.append(Row("DeployImage from nginx", f"not measured: nginx is not installed "
                        f"(Debian package {NGINX_PACKAGE})"))
    rows.append(Row("  ↳ every deployed disk's sha256 = the source disk's",
                    "; ".join(res.problems[:3]) if res.problems else
                    f"yes ({sum(len(v) for v in res.times.values()) + len(res.stores)} deploys)",
                    "yes", not res.problems))
    return rows


# ---- 2. the automation initrd -------------------------------------------------------

@dataclass
class BaseResult:
    folder: Path
    info: dict
    wall_s: float
    kinds: dict[str, int]
    regular_bytes: int


def newc_kinds(path: Path) -> tuple[dict[str, int], int]:
    """Entries of a gzip newc archive by kind, and the bytes of its regular files."""
    raw, at = gzip.decompress(path.read_bytes()), 0
    kinds: dict[str, int] = {}
    names = {stat.S_IFREG: "files", stat.S_IFDIR: "folders", stat.S_IFLNK: "symlinks"}
    data_bytes = 0
    while raw[at:at + 6] == b"070701":
        mode = int(raw[at + 14:at + 22], 16)
        size = int(raw[at + 54:at + 62], 16)
        namesize = int(raw[at + 94:at + 102], 16)
        name = raw[at + 110:at + 110 + namesize - 1]
        if name == b"TRAILER!!!":
            break
        kind = names.get(stat.S_IFMT(mode), "devices")
        kinds[kind] = kinds.get(kind, 0) + 1
        if kind == "files":
            data_bytes += size
        data_at = at + 110 + namesize + (-(110 + namesize) % 4)
        at = data_at + size + (-size % 4)
    return kinds, data_bytes


def build_base(workdir: Path) -> BaseResult:
    store = workdir / "preboot"
    store.mkdir(parents=True, exist_ok=True)
    say(f"building the automation base: dsagent-server bootwiz-base {BASE}")
    t0 = time.monotonic()
    done = subprocess.run([server_command(), "bootwiz-base", BASE, "--preboot-store", str(store),
                           "--server-url", URL], capture_output=True, text=True, timeout=600,
                          check=False)
    wall = time.monotonic() - t0
    if done.returncode:
        raise RuntimeError(f"dsagent-server bootwiz-base failed ({done.returncode}): "
                           f"{done.stderr.strip()[-2000:]}")
    folder = store / BASE
    info = json.loads((folder / "base.json").read_text())
    kinds, data_bytes = newc_kinds(folder / "initrd.img")
    say(f"  built in {wall:.1f} s: initrd {info['initrd_size'] / MiB:.1f} MiB")
    return BaseResult(folder, info, wall, kinds, data_bytes)


def base_rows(base: BaseResult) -> list[Row]:
    info = base.info
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(base.kinds.items(), key=lambda kv: -kv[1]))
    sizes = ", ".join(f"{k} {v / MiB:.1f}" for k, v in info.get("sizes", {}).items())
    return [
        Row("Automation initrd (`dsagent-server bootwiz-base`, one build): size",
            f"{info['initrd_size'] / MiB:.1f} MiB gzip, {info['unpacked_size'] / MiB:.1f} MiB "
            f"unpacked; kernel {info['kernel_size'] / MiB:.1f} MiB (Linux "
            f"{info['kernel_version']})"),
        Row("  ↳ entries", f"{info['entries']:,} ({kinds}); regular files hold "
                           f"{base.regular_bytes / MiB:.1f} MiB"),
        Row("  ↳ by size (MiB)", sizes or "—"),
        Row("  ↳ build time", f"{base.wall_s:.1f} s wall for the command (the builder says "
                              f"{info.get('seconds', 0):.1f} s); Python {info['python']}, "
                              f"{len(info.get('modules', []))} kernel modules"),
    ]


# ---- 3. PXE boot -> registered ------------------------------------------------------

@dataclass
class BootResult:
    mac: str
    name: str
    times: dict[str, float] = field(default_factory=dict)
    at_server: float | None = None        # the server stored the register request
    address: str = ""
    tail: str = ""


def _boot_once(lab: pxelab.Lab, proxy: pxelab.Child, serial_file: Path, mac: str, name: str,
               store) -> BootResult:
    """QEMU as tests/test_automation_base.py's ``_boot`` runs it, until registered."""
    result = BootResult(mac, name)
    patterns = [(mark, where, re.compile(
        p.replace("{mac}", re.escape(mac)).replace("{name}", re.escape(name))))
                for mark, where, p in MARKS]
    serial_file.write_bytes(b"")
    first_proxy_line = len(proxy.lines)
    tap = lab.add_tap()
    start = time.monotonic()
    qemu = lab.run([pxelab.need("qemu-system-x86_64"), "-accel", "tcg", "-m", "512",
                    "-nographic", "-monitor", "none", "-serial", f"file:{serial_file}",
                    "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
                    "-device", f"virtio-net-pci,netdev=n0,mac={mac}",
                    "-boot", "order=n,reboot-timeout=0", "-no-reboot"], name="qemu")
    text = ""
    try:
        while time.monotonic() - start < BOOT_TIMEOUT_S and qemu.alive():
            now = time.monotonic() - start
            text = serial_file.read_text(errors="replace")
            proxied = "\n".join(proxy.lines[first_proxy_line:])
            for mark, where, pattern in patterns:
                if mark not in result.times and pattern.search(text if where == "serial"
                                                               else proxied):
                    result.times[mark] = now
            if result.at_server is None and store.request_counts(name)["register"]:
                result.at_server = now
            if result.at_server is not None and MARKS[-1][0] in result.times:
                break
            time.sleep(0.1)
    finally:
        lab.children.remove(qemu)
        qemu.stop(grace=1.0)
    found = re.search(r"network up on eth0 (198\.18\.0\.\d+)", text)
    result.address = found.group(1) if found else ""
    result.tail = text[-1500:]
    return result


def measure_boots(workdir: Path, base: BaseResult, boots: int) -> list[BootResult]:
    from handlers.bootwiz.rebuild import boot_ipxe
    from taskserver.app import TaskServer
    from taskserver.pxe import PXEStore
    from taskserver.store import TaskStore
    results: list[BootResult] = []
    workdir.mkdir(parents=True, exist_ok=True)
    store = TaskStore(str(workdir / "boot-server.db"))
    computers = [{"mac": mac, "name": f"bench-vm-{k + 1}", "action": "automation",
                  "config": BASE} for k, mac in enumerate(MACS[:boots])]
    PXEStore(store).add_computers(computers)               # predefined on the console
    server = None
    try:
        with pxelab.Lab(workdir / "lab") as lab:
            root, run = lab.public_dir("root"), lab.public_dir("run")
            shutil.copytree(base.folder, root / BASE)
            for path in (root / BASE).iterdir():
                path.chmod(0o644)
            (root / "dsagent-pxe").mkdir(mode=0o755)
            (root / "dsagent-pxe" / "boot.ipxe").write_text(
                boot_ipxe(BASE, "bench", f"{BASE}/vmlinuz", f"{BASE}/initrd.img"))
            (run / "hosts").write_text("".join(c["mac"] + "\n" for c in computers))
            lab.site_dhcp()
            proxy = lab.proxy(root, run)
            with lab.inside():
                server = TaskServer(store, SERVER, PORT).start()
            for k, computer in enumerate(computers):
                say(f"boot {k + 1}/{len(computers)}: QEMU (TCG) PXE-boots {computer['mac']}")
                res = _boot_once(lab, proxy, workdir / f"serial-{k + 1}.txt", computer["mac"],
                                 computer["name"], store)
                results.append(res)
                last = MARKS[-1][0]
                say(f"  registered after {tenths(res.times.get(last))}" if last in res.times else
                    f"  not registered within {BOOT_TIMEOUT_S:.0f} s; serial tail:\n{res.tail}")
            (workdir / "proxy.log").write_text(proxy.output() + "\n")   # kept with --keep
    finally:
        if server is not None:
            server.stop()
        store.close()
    return results


def boot_rows(boots: list[BootResult]) -> list[Row]:
    last = MARKS[-1][0]
    done = [b.times[last] for b in boots if last in b.times]
    n = len(boots)
    result = (", ".join(tenths(b.times.get(last)) for b in boots)
              if len(done) == n else f"{n - len(done)} of {n} boots not registered within "
              f"{BOOT_TIMEOUT_S:.0f} s")
    rows = [Row(f"PXE boot → agent registered in automation mode, QEMU start → the agent's "
                f"`registered` line (TCG, 512 MiB; {n} boot{'s' if n > 1 else ''})",
                result, "—", None if len(done) == n else False)]
    for mark, _, _ in MARKS[:-1]:
        values = [b.times.get(mark) for b in boots]
        if any(v is not None for v in values):
            rows.append(Row(f"  ↳ QEMU start → {mark}", ", ".join(tenths(v) for v in values)))
    rows.append(Row("  ↳ QEMU start → the server stored the register request",
                    ", ".join(tenths(b.at_server) for b in boots)))
    steps = []
    for b in boots:
        t = b.times
        parts = []
        for a, z, what in (("TFTP: boot.ipxe sent", "TFTP: initrd.img sent", "TFTP"),
                           ("TFTP: initrd.img sent", INIT, "Linux boot to /init"),
                           (INIT, "network up (udhcpc lease)", "/init to network"),
                           ("starting the agent", "the agent's first log line",
                            "Python start + imports"),
                           ("the agent's first log line", last, "registration")):
            if a in t and z in t:
                parts.append(f"{what} {t[z] - t[a]:.1f} s")
        steps.append("; ".join(parts))
    rows.append(Row("  ↳ stages", " / ".join(steps)))
    return rows


# ---- the section ----------------------------------------------------------------------

NOTES = """\
Notes: deploys are the imaging plugin's `dsagent_run_task` for a DeployImage
task, in this process with a real `TaskContext` (validated first, untimed): the
task's own code (open_store, the frames read, checked, decompressed and written,
fsync of the target), no process start. All stores serve one folder (the
reference server, in this process and as its own, and nginx from the same files
and page cache: warm, after one untimed deploy each); the 512 MiB target file
(on the same ext4 disk) is the same for every deploy. MB/s of disk = the
512 MiB span (as bytes, 10^6) over the deploy time; MB/s of image = the
compressed data.zst over it; "best" is the fastest round (the least disturbed
by anything else this machine ran). The ratio is folder time ÷ HTTP time of the
same round (≥ 1: HTTP as fast). The base's build time includes the
`dsagent-server` process start. Boot times are wall clock from just before QEMU
starts, read by polling every 0.1 s (serial console file, proxy dnsmasq's log);
TCG emulation, no KVM: a real computer boots Linux and Python much faster,
while TFTP and DHCP take about as long.
"""


def measure(workdir: Path, quick: bool = False, runs: int | None = None,
            boots: int | None = None) -> tuple[list[Row], str]:
    check()
    runs = runs or (3 if quick else 7)
    boots = boots or (1 if quick else 2)
    deployed = measure_deploy(workdir / "deploy", runs)
    shutil.rmtree(workdir / "deploy", ignore_errors=True)        # 1.5 GiB of files
    base = build_base(workdir / "base")
    boot_results = measure_boots(workdir / "boot", base, boots)
    rows = deploy_rows(deployed, runs) + base_rows(base) + boot_rows(boot_results)
    stores = ", ".join(deployed.stores)
    mode = (f"DeployImage × {runs} rounds from each of: {stores} (interleaved, warm cache, "
            f"median); 1 base build; {boots} VM boot{'s' if boots > 1 else ''}"
            + (" (quick)" if quick else "")
            + f"; 1-min load average {deployed.load_after:.2f} when the deploy rounds ended, "
              f"{os.getloadavg()[0]:.2f} after the boots (a deploy keeps ~1.3 cores busy, "
              "a TCG VM ~1)")
    return rows, mode


def section(workdir: Path, quick: bool = False, **kwargs) -> str:
    """The ``## Initial deployment`` Markdown section (bench/__main__.py's ``deployment``)."""
    conditions = Conditions()
    workdir.mkdir(parents=True, exist_ok=True)
    rows, mode = measure(workdir, quick, **kwargs)
    return "\n".join([HEADING, "", *machine_lines(workdir, mode), conditions.line(), "",
                      table(rows), "", NOTES])



def join_section(text: str, section_text: str) -> str:
    """``text`` with ``section_text`` (this bench's section) added at its end."""
    parts = [p for p in (text.strip(), section_text.strip()) if p]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.deployment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 deploy rounds, 1 VM boot")
    parser.add_argument("--runs", type=int, help="deploy rounds (default 7, quick 3)")
    parser.add_argument("--boots", type=int, choices=(1, 2), help="VM boots (default 2)")
    standalone_options(parser)
    args = parser.parse_args(argv)
    return run_standalone("bench.deployment", args, "dsagent-bench-deploy-",
                          lambda w: section(w, args.quick, runs=args.runs, boots=args.boots),
                          "everything it started was stopped", say, check)


if __name__ == "__main__":
    sys.exit(main())
