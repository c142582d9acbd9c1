"""The automation base (docs/automation-base.md, PROTOCOL.md §8): built by
``dsagent-server bootwiz-base`` from what is installed here, the same bytes
twice, holding Python, the agent and the imaging tools; its userland runs in
a chroot; and a bare computer (QEMU, TCG, iPXE ROM) PXE-boots it in a
pxelab namespace, gets its address from the site's DHCP server, starts the
agent, which registers with the reference task server in automation mode and
runs a task there. Fails, never skips, when a tool is missing."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pxelab
from handlers.bootwiz.cpio import scan_initrd
from handlers.bootwiz.rebuild import boot_ipxe
from taskserver.app import TaskServer
from taskserver.pxe import PXEStore
from taskserver.store import TaskStore

REPO = Path(__file__).resolve().parent.parent
NAME = "auto-base"
SERVER = "198.18.0.1"                 # the lab's bridge address (subnet 0)
PORT = 8080                           # free in the lab's own namespace
URL = f"http://{SERVER}:{PORT}"
KEY = "automation-base-test-key"
MAC = "52:54:00:00:0b:01"
COMPUTER = "auto-vm"
PY = f"python{sys.version_info.major}.{sys.version_info.minor}"    # the Python packed: this one
STDLIB = f"usr/lib/{PY}"
# the command, as dsagent-server will run it once taskserver/cli.py adds basecli's commands
RUNNER = "import sys; from taskserver.basecli import main; sys.exit(main(sys.argv[1:]))"


def build(store: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    store.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-c", RUNNER, "bootwiz-base", NAME, "--preboot-store",
                           str(store), "--server-url", URL + "/", "--enrollment-key", KEY, *extra],
                          capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "SOURCE_DATE_EPOCH": "0"})
    if check:
        assert done.returncode == 0, done.stderr
    return done


def newc(path: Path) -> list[dict]:
    """The entries of a gzip newc initrd, with every header field."""
    raw, at, out = gzip.decompress(path.read_bytes()), 0, []
    while True:
        assert raw[at:at + 6] == b"070701", f"bad magic at {at}"
        f = [int(raw[at + 6 + 8 * i: at + 14 + 8 * i], 16) for i in range(13)]
        name_at = at + 110
        name = raw[name_at:name_at + f[11] - 1].decode()
        data_at = name_at + f[11] + (-(110 + f[11]) % 4)
        data = raw[data_at:data_at + f[6]]
        at = data_at + f[6] + (-f[6] % 4)
        if name == "TRAILER!!!":
            return out
        out.append({"name": name, "ino": f[0], "mode": f[1], "uid": f[2], "gid": f[3],
                    "mtime": f[5], "rdev": (f[9], f[10]), "data": data})


def unpack(entries: list[dict], root: Path) -> None:
    """The initrd as Linux unpacks it (devices left out: devtmpfs brings them)."""
    for e in entries:
        path, kind = root / e["name"], stat.S_IFMT(e["mode"])
        if kind == stat.S_IFDIR:
            path.mkdir(mode=e["mode"] & 0o7777)
        elif kind == stat.S_IFLNK:
            path.symlink_to(e["data"].decode())
        elif kind == stat.S_IFREG:
            path.write_bytes(e["data"])
            path.chmod(e["mode"] & 0o7777)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    store = tmp_path_factory.mktemp("preboot")
    started = time.monotonic()
    done = build(store)
    seconds = time.monotonic() - started
    folder = store / NAME
    return {"store": store, "folder": folder, "stdout": done.stdout, "stderr": done.stderr,
            "seconds": seconds, "info": json.loads((folder / "base.json").read_text()),
            "entries": newc(folder / "initrd.img")}


def test_two_builds_give_the_same_bytes_and_the_command_says_what_it_holds(base, tmp_path):
    again = build(tmp_path / "preboot", "--json")
    first, second = base["folder"], tmp_path / "preboot" / NAME
    for name in ("initrd.img", "vmlinuz"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    info, info2 = base["info"], json.loads(again.stdout)
    assert info2["initrd_sha256"] == info["initrd_sha256"] == \
        hashlib.sha256((first / "initrd.img").read_bytes()).hexdigest()
    assert {k: v for k, v in info2.items() if k not in ("folder", "seconds")} == \
        {k: v for k, v in info.items() if k not in ("folder", "seconds")}

    out = base["stdout"]
    assert f"automation base '{NAME}' built in" in out and info["initrd_sha256"] in out
    assert re.search(r"initrd\.img +\d+\.\d MiB +gzip newc, \d+ entries", out), out
    for word in ("Python 3.", "dsagent 0.", "httpx", "pluggy", "zstandard", "sfdisk", "e2fsck",
                 "virtio_net", "ext4", f"server: {URL};", "baked in"):
        assert word in out, (word, out)
    assert "warning: the enrollment key is baked into initrd.img" in base["stderr"]
    assert info["server_url"] == URL and info["enrollment_key_baked"] is True
    assert KEY not in (first / "base.json").read_text()      # base.json is public (TFTP root)
    assert oct((first / "initrd.img").stat().st_mode & 0o777) == "0o644"
    print(f"\nautomation base: initrd {info['initrd_size'] / 2**20:.1f} MiB "
          f"({info['unpacked_size'] / 2**20:.1f} MiB unpacked, {info['entries']} entries), "
          f"kernel {info['kernel_size'] / 2**20:.1f} MiB, built in {base['seconds']:.1f} s")


def test_the_initrd_holds_python_the_agent_and_the_imaging_tools(base):
    entries = base["entries"]
    names = [e["name"] for e in entries]
    by_name = {e["name"]: e for e in entries}
    # site-packages as this Python sees it under /usr (Debian's own Python: dist-packages)
    site = next(n for n in names if n.endswith("/agent/__main__.py")).rpartition("/agent/")[0]
    # BootWizRebuild takes it as a base: one gzip member, one complete newc archive
    scanned = scan_initrd(base["folder"] / "initrd.img")
    assert scanned.format == "gzip" and len(scanned.entries) == len(entries)
    # reproducible archive: sorted, numbered in order, owned by root, one mtime
    assert names == sorted(names) and len(set(names)) == len(names)
    assert [e["ino"] for e in entries] == list(range(1, len(entries) + 1))
    assert {(e["uid"], e["gid"], e["mtime"]) for e in entries} == {(0, 0, 0)}
    for e in entries:                  # Linux creates no missing parents: each is listed first
        parent = e["name"].rpartition("/")[0]
        assert not parent or stat.S_ISDIR(by_name[parent]["mode"]), e["name"]

    for path in ("init", f"usr/bin/{PY}", "usr/bin/busybox", "usr/sbin/sfdisk",
                 "usr/sbin/e2fsck", "usr/sbin/mke2fs", "usr/sbin/resize2fs", "usr/sbin/debugfs",
                 "usr/sbin/zstd", "usr/lib64/ld-linux-x86-64.so.2",
                 "usr/lib/x86_64-linux-gnu/libc.so.6", f"{STDLIB}/os.pyc",
                 "usr/lib/dsagent-automation/udhcpc.script",
                 f"{site}/agent/__pycache__/__main__.{sys.implementation.cache_tag}.pyc",
                 f"{site}/handlers/imaging/plugin.py", f"{site}/httpx/__init__.py"):
        assert path in by_name, path
    assert stat.S_ISCHR(by_name["dev/console"]["mode"]) and by_name["dev/console"]["rdev"] == (5, 1)
    for link, target in (("bin", b"usr/bin"), ("lib64", b"usr/lib64"),
                         ("usr/sbin/mkfs.ext4", b"mke2fs"), ("usr/bin/sh", b"busybox"),
                         ("usr/sbin/udhcpc", b"../bin/busybox"),
                         ("usr/bin/python3", PY.encode())):
        assert stat.S_ISLNK(by_name[link]["mode"]) and by_name[link]["data"] == target, link
    assert stat.S_IMODE(by_name["init"]["mode"]) == 0o755
    assert by_name["init"]["data"].startswith(b"#!/bin/sh\n")
    # the handlers are found through the dsagent.handlers entry points of the dist-info
    points = next(e["data"] for e in entries if re.fullmatch(
        rf"{site}/dsagent-[\d.]+\.dist-info/entry_points\.txt", e["name"])).decode()
    assert "[dsagent.handlers]" in points and "handlers.imaging.plugin" in points
    # trimmed: no reference server, no tests, no tkinter/idle/ensurepip, no sources in the stdlib
    assert not [n for n in names if n.startswith((f"{site}/taskserver", f"{site}/pytest",
                                                  f"{STDLIB}/test/", f"{STDLIB}/tkinter",
                                                  f"{STDLIB}/idlelib", f"{STDLIB}/ensurepip"))]
    assert not [n for n in names if n.startswith(f"{STDLIB}/") and n.endswith(".py")
                and not n.startswith(site)]
    # every .pyc is hash-based and unchecked: never recompiled, the same bytes every build
    pycs = [e for e in entries if e["name"].endswith(".pyc")]
    assert len(pycs) > 500 and {int.from_bytes(e["data"][4:8], "little") for e in pycs} == {1}
    # kernel modules with their modules.dep subset
    modules = "usr/lib/modules/" + base["info"]["kernel_version"]
    dep = by_name[f"{modules}/modules.dep"]["data"].decode()
    assert "kernel/drivers/net/virtio_net.ko:" in dep and "kernel/fs/ext4/ext4.ko:" in dep
    for line in dep.splitlines():
        for rel in line.replace(":", " ").split():
            assert f"{modules}/{rel}" in by_name, rel
    # the agent's config: automation mode, the server and key baked in, private
    config = by_name["usr/lib/dsagent-automation/agent.toml"]
    assert stat.S_IMODE(config["mode"]) == 0o600
    text = config["data"].decode()
    for line in ('mode           = "automation"', f'server_url     = "{URL}"',
                 'state_dir      = "/run/dsagent"', f'enrollment_key = "{KEY}"',
                 f'image_store = "{URL}/images/"', "poll_interval_s = 15"):
        assert line in text.splitlines(), (line, text)


def test_its_userland_runs_in_a_chroot_and_compiles_nothing(base, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    unpack(base["entries"], root)
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))

    def run(*argv: str) -> str:
        """``argv`` chrooted, with /proc mounted in a mount namespace of its own (gone with it)."""
        done = subprocess.run(["unshare", "--mount", "--fork", "chroot", str(root), "/bin/sh", "-c",
                               'mount -t proc proc /proc && exec "$@"', "sh", *argv],
                              capture_output=True, text=True, timeout=120,
                              env={"PATH": "/usr/sbin:/usr/bin", "HOME": "/root"})
        assert done.returncode == 0, (argv, done.stdout, done.stderr)
        return done.stdout + done.stderr

    out = run("/usr/bin/python3", "-c", "import sys, importlib.metadata as m\n"
              "import agent.supervisor, agent.cta.service, agent.cta.worker, objecthost.server\n"
              "import ctdataloader.uploader, handlers.imaging.plugin, handlers.bootwiz.plugin\n"
              "import sqlite3, ssl, zstandard, psutil, httpx, xmltodict, inotify_simple\n"
              "import apscheduler.schedulers.background, tzlocal\n"
              "print(sys.prefix, sorted(e.name for e in m.entry_points(group='dsagent.handlers')),"
              " tzlocal.get_localzone())")
    assert out.startswith("/usr ") and "'imaging'" in out and "'runscript'" in out, out
    assert "RunScript" in run("/usr/bin/python3", "-m", "agent", "handlers")
    assert "util-linux" in run("/usr/sbin/sfdisk", "--version")
    assert "Zstandard" in run("/usr/sbin/zstd", "--version")
    run("/bin/sh", "-c", "mkfs.ext4 -q -F /tmp/disk.img 8M && e2fsck -fn /tmp/disk.img "
        "&& resize2fs /tmp/disk.img 12M && debugfs -R stats /tmp/disk.img | grep -q 'Block count'")
    assert "udhcpc" in run("/bin/sh", "-c", "udhcpc --help 2>&1; true")
    after = sorted(str(p.relative_to(root)) for p in root.rglob("*") if "tmp/disk" not in str(p))
    assert after == before          # no .pyc written: everything was precompiled


def test_bad_requests_are_refused_with_the_reason(tmp_path):
    done = build(tmp_path / "a", "--server-url", "ftp://x", check=False)
    assert done.returncode == 1 and "--server-url 'ftp://x'" in done.stderr
    done = build(tmp_path / "b", "--tool", "no-such-tool-here", check=False)
    assert done.returncode == 1 and "no-such-tool-here is not installed" in done.stderr
    done = subprocess.run([sys.executable, "-c", RUNNER, "bootwiz-base", "../x", "--preboot-store",
                           str(tmp_path), "--server-url", URL], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert done.returncode == 1 and "base name '../x'" in done.stderr
    assert not (tmp_path / "a" / NAME).exists() and not (tmp_path / "b" / NAME).exists()


# ---- a bare computer boots it ------------------------------------------------------

MARKS = {
    "network up": r"dsagent automation: network up on eth0 198\.18\.0\.\d+",
    "server reachable": rf"dsagent automation: task server {re.escape(URL)} reachable",
    "starting the agent": rf"dsagent automation: starting the agent, server {re.escape(URL)}",
    "first agent line": r"\d{4}-\d\d-\d\dT[\d:.]+Z (INFO|WARNING|ERROR) dsagent\[\d+\]: ",
    "registered": rf"registered as {COMPUTER} \(automation\)",
}
SCRIPT = ("sfdisk --version; e2fsck -V 2>&1 | head -1; zstd --version; "
          "python3 -c 'import zstandard, sqlite3, ssl; print(\"python modules ok\")'; "
          "grep MemTotal /proc/meminfo; ip -4 -o addr show eth0")


class Requests(logging.Handler):
    """The reference server's request log lines (TaskServer(verbose=True))."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_bare_computer_pxe_boots_the_base_registers_and_runs_a_task(base, tmp_path):
    """QEMU's iPXE loads the base through a PXE proxy (the boot.ipxe BootWizRebuild
    writes), the kernel's console stays on the screen as a BootWiz boot has it, and
    /init's progress reaches the serial port by itself. 512 MiB: see the docs."""
    pxelab.need_all()
    requests, logger = Requests(), logging.getLogger("taskserver")
    level = logger.level
    logger.addHandler(requests)
    logger.setLevel(logging.INFO)
    store = TaskStore(str(tmp_path / "server.db"))
    PXEStore(store).add_computers([{"mac": MAC, "name": COMPUTER, "action": "automation",
                                    "config": NAME}])          # predefined on the console
    server = None
    try:
        with pxelab.Lab(tmp_path / "lab") as lab:
            root, run = lab.public_dir("root"), lab.public_dir("run")
            shutil.copytree(base["folder"], root / NAME)
            (root / "dsagent-pxe").mkdir(mode=0o755)
            (root / "dsagent-pxe" / "boot.ipxe").write_text(
                boot_ipxe(NAME, "test", f"{NAME}/vmlinuz", f"{NAME}/initrd.img"))
            (run / "hosts").write_text(MAC + "\n")
            site = lab.site_dhcp()
            lab.proxy(root, run)
            with lab.inside():
                server = TaskServer(store, SERVER, PORT, enrollment_key=KEY, verbose=True).start()
            serial, times, task = _boot(lab, tmp_path / "serial.txt", store, server)
            site_log = site.output()
    finally:
        logger.removeHandler(requests)
        logger.setLevel(level)
        if server is not None:
            server.stop()
    tail = serial[-4000:]
    for mark in MARKS:
        assert mark in times, (mark, tail)
    address = re.search(MARKS["network up"], serial).group(0).rsplit(" ", 1)[1]
    # the address came from the site's DHCP server, asked by udhcpc (not iPXE)
    assert re.search(rf"DHCPACK\(eth0\) {re.escape(address)} {MAC} auto-", site_log), site_log
    # /init's probe and the agent's requests reached the reference server from the VM
    assert any(line.startswith(f"{address} \"GET / ") for line in requests.lines)
    assert any(line.startswith(f"{address} \"POST /api/v1/register ") for line in requests.lines)
    counts = store.request_counts(COMPUTER)
    assert counts["register"] >= 1 and counts["tasks"] >= 1 and counts["status"] >= 1, counts
    history = store.history(task_id=task)[0]
    assert history["state"] == "succeeded", (history, tail)
    out = history["events"][-1]["details"]["stdout_tail"]
    for word in ("util-linux", "e2fsck 1.", "Zstandard", "python modules ok", address):
        assert word in out, (word, out)
    order = ["network up", "server reachable", "starting the agent", "first agent line",
             "registered", "task succeeded"]
    assert [times[m] for m in order] == sorted(times[m] for m in order), times
    print("\nVM (TCG) from QEMU's start: " + ", ".join(f"{m} {times[m]:.1f} s" for m in order))


def _boot(lab: pxelab.Lab, serial_file: Path, store: TaskStore, server: TaskServer,
          timeout: float = 240.0) -> tuple[str, dict[str, float], str | None]:
    """Boot MAC (QEMU as pxelab.Lab.boot does, with 512 MiB) until the task queued
    once the computer registered is terminal; the serial text, when each mark
    showed (seconds from QEMU's start) and the task's id."""
    serial_file.write_bytes(b"")
    tap = lab.add_tap()
    qemu = lab.run([pxelab.need("qemu-system-x86_64"), "-accel", "tcg", "-m", "512",
                    "-nographic", "-monitor", "none", "-serial", f"file:{serial_file}",
                    "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
                    "-device", f"virtio-net-pci,netdev=n0,mac={MAC}",
                    "-boot", "order=n,reboot-timeout=0", "-no-reboot"], name="qemu")
    start, times, task, tickled = time.monotonic(), {}, None, 0.0
    text = ""
    try:
        while time.monotonic() - start < timeout and qemu.alive():
            now = time.monotonic() - start
            text = serial_file.read_text(errors="replace")
            for mark, pattern in MARKS.items():
                if mark not in times and re.search(pattern, text):
                    times[mark] = round(now, 1)
            if task is None and store.request_counts(COMPUTER)["register"]:
                # queued as the agent starts its CTA, which pulls it at its start
                task = store.queue_task(COMPUTER, "RunScript", {"script": SCRIPT}, 300)
            if task is not None:
                state = store.history(task_id=task)[0]["state"]
                if state in ("succeeded", "failed", "timed_out", "cancelled"):
                    times["task " + state] = round(now, 1)
                    break
                if state == "queued" and now - tickled > 5:   # the objecthost may be up now
                    tickled = now
                    try:
                        with lab.inside():
                            server.tickle(COMPUTER, timeout=2)
                    except Exception:
                        pass
            time.sleep(0.2)
    finally:
        lab.children.remove(qemu)
        qemu.stop(grace=1.0)
    return serial_file.read_text(errors="replace"), times, task
