"""The automation base: a kernel and an initrd that carry the agent (PROTOCOL.md §8).

``dsagent-server bootwiz-base NAME --preboot-store DIR --server-url URL`` writes
``DIR/NAME/vmlinuz`` and ``DIR/NAME/initrd.img``, the layout BootWizRebuild
takes as a ``base`` (§4), plus ``DIR/NAME/base.json`` saying what it holds.
A bare computer PXE-booted into it gets an address by DHCP and runs
``python3 -m agent run`` in automation mode against the server baked in.

The initrd is packed from what is installed on this machine (docs/automation-base.md
says why): this Python (its stdlib trimmed of tests, tkinter, idle, ensurepip…,
precompiled and shipped as .pyc only), the distribution ``dsagent`` and what it
requires, found through ``importlib.metadata`` (sources kept, precompiled
beside them; an editable install is copied as real files), the imaging tools
with the shared libraries ``ldd`` names, busybox-static for the shell,
``udhcpc`` and ``modprobe``, the kernel modules a computer needs to reach the
network and its disks (with a ``modules.dep`` subset), and ``/init`` and the
udhcpc script (``taskserver/automation_base/``).

Reproducible: entries sorted, uid/gid 0, every mtime ``SOURCE_DATE_EPOCH``
(default 0), inodes numbered in order, .pyc files with unchecked hashes
(compiled in fixed batches, so marshal sees the same history), gzip with
mtime 0 and no name: two builds on one machine give the same sha256.

Standard library, ``agent.common`` and ``agent.tools`` only (docs/architecture.md).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path

from agent import __version__
from agent.common.config import check_config, render_config
from agent.common.errors import ConfigError, DsagentError

DATA = Path(__file__).with_name("automation_base")
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
URL_RE = re.compile(r"https?://[^\s\"'\\`$]+")
LIB = "usr/lib/dsagent-automation"
STATE_DIR = "/run/dsagent"                # tmpfs (docs/automation.md)
POLL_INTERVAL_S = 15                     # nobody waits 5 minutes at a bare computer
DHCP_WAIT_S = 120
BUSYBOX = "/bin/busybox"
ROOT_DISTRIBUTION = "dsagent"
NOT_IN_BASE = {"taskserver"}          # the reference server is not part of the agent
# what imaging and a technician need; command -> Debian package (for the error)
TOOLS = {"sfdisk": "fdisk", "e2fsck": "e2fsprogs", "mke2fs": "e2fsprogs",
         "resize2fs": "e2fsprogs", "debugfs": "e2fsprogs", "dumpe2fs": "e2fsprogs",
         "tune2fs": "e2fsprogs", "zstd": "zstd"}
TOOL_LINKS = {"mkfs.ext4": "mke2fs", "fsck.ext4": "e2fsck", "unzstd": "zstd"}
# NICs and disks of common computers and of QEMU/KVM, ext4 (with its crc32c)
DEFAULT_MODULES = ("virtio_pci", "virtio_net", "virtio_blk", "virtio_scsi", "e1000", "e1000e",
                   "igb", "r8169", "ahci", "nvme", "sd_mod", "loop", "crc32c_generic",
                   "crc32c_intel", "ext4")
STDLIB_SKIP = {"test", "tests", "idlelib", "idle_test", "tkinter", "turtledemo", "turtle.py",
               "ensurepip", "lib2to3", "pydoc_data", "distutils", "venv", "unittest", "curses",
               "site-packages", "dist-packages", "__pycache__", "__phello__"}
DYNLOAD_SKIP = re.compile(r"(_test|_ctypes_test|xxlimited|_xx|_tkinter|_curses|audioop|"
                          r"ossaudiodev|nis|spwd|_crypt)[.\w-]*\.so$")
SITE_SKIP = {"__pycache__", "tests", "test"}
DIST_INFO_SKIP = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
COMPILE_BATCHES = 4
COMPILE = r"""
import json, py_compile, sys
failed = []
for src, cfile, dfile in json.load(open(sys.argv[1])):
    try:
        py_compile.compile(src, cfile=cfile, dfile=dfile, doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    except Exception as exc:
        failed.append([src, str(exc).splitlines()[0] if str(exc) else type(exc).__name__])
json.dump(failed, sys.stdout)
"""


class BaseBuildError(DsagentError):
    """The automation base cannot be built; the message says what is missing."""


@dataclass
class Options:
    name: str
    preboot_store: str
    server_url: str
    enrollment_key: str | None = None
    image_store: str | None = None            # None: <server_url>/images/; "": not set
    kernel: str | None = None                 # default: this machine's newest /boot/vmlinuz-*
    modules: tuple[str, ...] = DEFAULT_MODULES
    extra_modules: tuple[str, ...] = ()
    tools: tuple[str, ...] = ()               # more commands to carry (with their libraries)
    distributions: tuple[str, ...] = ()       # more Python distributions (third-party handlers)
    log: object = None                        # a callable(str) for progress lines


@dataclass
class Node:
    mode: int
    data: bytes = b""                         # a file's content, a symlink's target
    kind: str = "system"                      # what it counts as in the summary
    rdev: tuple[int, int] = (0, 0)


@dataclass
class BaseInfo:
    """What was built (written as base.json, printed by the command)."""
    name: str
    folder: str
    kernel: str
    kernel_version: str
    kernel_size: int
    initrd_size: int
    initrd_sha256: str
    unpacked_size: int
    entries: int
    python: str
    distributions: dict[str, str]
    tools: list[str]
    busybox: str
    modules: list[str]
    stripped: bool
    server_url: str
    enrollment_key_baked: bool
    image_store: str | None
    source_date_epoch: int
    sizes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def _run(argv: list[str], what: str, timeout: float = 120) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BaseBuildError(f"{what}: {exc}") from None
    if done.returncode:
        raise BaseBuildError(f"{what}: {argv[0]} exited {done.returncode}: "
                             f"{(done.stderr or done.stdout).strip()[-500:]}")
    return done.stdout


def find_command(name: str, package: str = "") -> str:
    found = shutil.which(name, path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    if not found:
        hint = f" (Debian package {package})" if package else ""
        raise BaseBuildError(f"{name} is not installed on this machine{hint}; "
                             "the automation base carries it")
    return found


def newest_kernel() -> Path:
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    if not kernels:
        raise BaseBuildError("no kernel in /boot (install linux-image-amd64, or give --kernel)")
    return kernels[-1]


def source_date_epoch() -> int:
    value = os.environ.get("SOURCE_DATE_EPOCH", "0")
    if not value.isdigit():
        raise BaseBuildError(f"SOURCE_DATE_EPOCH={value!r}: expected whole seconds")
    return int(value)


def _newc(name: str, node: Node | None, ino: int, mtime: int) -> bytes:
    mode, data, rdev = (node.mode, node.data, node.rdev) if node else (0, b"", (0, 0))
    nlink = 2 if stat.S_ISDIR(mode) else 1
    fields = (ino, mode, 0, 0, nlink, mtime, len(data), 0, 0, rdev[0], rdev[1],
              len(name.encode()) + 1, 0)
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
    return head + b"\0" * (-len(head) % 4) + data + b"\0" * (-len(data) % 4)


class Tree:
    """The initrd's files by path (no leading /); parents are added as folders."""

    def __init__(self):
        self.nodes: dict[str, Node] = {}

    def _parents(self, path: str) -> None:
        parent = path.rpartition("/")[0]
        if parent and parent not in self.nodes:
            self.folder(parent)

    def folder(self, path: str, mode: int = 0o755) -> None:
        self._parents(path)
        self.nodes[path] = Node(stat.S_IFDIR | mode)

    def file(self, path: str, data: bytes, mode: int = 0o644, kind: str = "system") -> None:
        self._parents(path)
        self.nodes[path] = Node(stat.S_IFREG | mode, data, kind)

    def symlink(self, path: str, target: str) -> None:
        self._parents(path)
        self.nodes[path] = Node(stat.S_IFLNK | 0o777, target.encode())

    def device(self, path: str, mode: int, rdev: tuple[int, int]) -> None:
        self._parents(path)
        self.nodes[path] = Node(stat.S_IFCHR | mode, rdev=rdev)

    def archive(self, mtime: int) -> Iterator[bytes]:
        """The newc archive: sorted (a folder before what it holds), then TRAILER!!!."""
        for ino, path in enumerate(sorted(self.nodes), 1):
            yield _newc(path, self.nodes[path], ino, mtime)
        yield _newc("TRAILER!!!", None, 0, 0)

    def sizes(self) -> dict[str, int]:
        kinds = sorted({node.kind for node in self.nodes.values()})
        return {k: sum(len(n.data) for n in self.nodes.values() if n.kind == k) for k in kinds}


class Builder:
    def __init__(self, opts: Options, work: Path):
        self.opts = opts
        self.work = work
        self.tree = Tree()
        self.strip = shutil.which("strip")
        self.multiarch = sysconfig.get_config_var("MULTIARCH") or f"{os.uname().machine}-linux-gnu"
        self.libdir = f"usr/lib/{self.multiarch}"
        self.libs: dict[str, str] = {}                       # soname -> host path
        self.compile: list[tuple[str, str, str, str]] = []   # (source, initrd .pyc, dfile, kind)
        self.say = opts.log or (lambda text: None)

    # -- ELF files and their libraries
    def elf(self, src: str, dest: str, kind: str, mode: int = 0o755, follow: bool = True) -> None:
        data = Path(src).read_bytes()
        if self.strip and data[:4] == b"\x7fELF":
            out = self.work / "stripped"
            done = subprocess.run([self.strip, "--strip-unneeded", "-o", str(out), src],
                                  capture_output=True, check=False)
            if done.returncode == 0:
                data = out.read_bytes()
        self.tree.file(dest, data, mode, kind)
        if follow:
            self._libraries(src)

    def _libraries(self, src: str) -> None:
        """The shared libraries ``ldd`` names (all of them, transitively), the loader
        at its own path, the others in the multiarch folder under their soname."""
        done = subprocess.run(["ldd", src], capture_output=True, text=True, check=False)
        if done.returncode or "not a dynamic executable" in done.stdout + done.stderr:
            return                                     # static (busybox) or not ELF
        for line in done.stdout.splitlines():
            line = line.strip()
            if "=> not found" in line:
                raise BaseBuildError(f"{src} needs {line.split()[0]}, which is not installed")
            m = re.match(r"(\S+) => (/\S+) \(", line) or re.match(r"(/\S+) \(", line)
            if not m or (name := m.group(1)) in self.libs:
                continue                               # linux-vdso.so.1, or known
            self.libs[name] = path = m.group(m.lastindex)
            if name.startswith("/"):                   # /lib64/ld-linux-x86-64.so.2
                dest = name[1:] if name.startswith("/usr/") else "usr" + name
            else:
                dest = f"{self.libdir}/{name}"
            self.elf(os.path.realpath(path), dest, "libraries", follow=False)

    # -- Python, its stdlib and the distributions
    def python(self) -> None:
        exe = os.path.realpath(getattr(sys, "_base_executable", "") or sys.executable)
        py = f"python{sys.version_info[0]}.{sys.version_info[1]}"
        self.elf(exe, f"usr/bin/{py}", "python")
        self.tree.symlink("usr/bin/python3", py)
        stdlib = Path(sysconfig.get_path("stdlib"))
        dynload = next((Path(p) for p in sys.path if p.endswith("/lib-dynload")
                        and os.path.isdir(p)), stdlib / "lib-dynload")
        target = f"usr/{sys.platlibdir}/{py}"
        for src in sorted(stdlib.rglob("*")):
            rel = src.relative_to(stdlib)
            if set(rel.parts) & STDLIB_SKIP or rel.parts[0].startswith("config-") \
                    or rel.parts[0] == "lib-dynload" or not src.is_file():
                continue
            if src.suffix == ".py":
                dest = f"{target}/{rel.with_suffix('.pyc')}"       # sourceless: half the size
                self.compile.append((str(src), dest, f"/{target}/{rel}", "stdlib"))
            elif src.suffix not in (".pyc", ".exe", ".bat", ".ps1"):
                self.tree.file(f"{target}/{rel}", src.read_bytes(), 0o644, "stdlib")
        for src in sorted(dynload.glob("*.so")):
            if not DYNLOAD_SKIP.match(src.name):
                self.elf(str(src), f"{target}/lib-dynload/{src.name}", "stdlib", 0o755)
        # where this Python looks for packages once its prefix is /usr (Debian: dist-packages)
        site = _run([exe, "-I", "-S", "-c", "import site; print(site.getsitepackages(['/usr'])[0])"
                     ], "finding the site-packages folder of this Python").strip().lstrip("/")
        self.dists: dict[str, str] = {}
        for dist in self._distributions():
            self._distribution(dist, site)

    def _distributions(self) -> list[metadata.Distribution]:
        todo, seen, out = [ROOT_DISTRIBUTION, *self.opts.distributions], set(), []
        while todo:
            name = todo.pop(0)
            key = re.sub(r"[-_.]+", "-", name).lower()
            if key in seen:
                continue
            seen.add(key)
            dist = _installed(name)
            if dist is None:
                raise BaseBuildError(f"the Python distribution {name!r} is not installed "
                                     f"in {sys.prefix}")
            out.append(dist)
            for req in dist.requires or []:
                req_name, _, marker = req.partition(";")
                if re.search(r"\bextra\s*==", marker):
                    continue
                req_name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req_name).group(1)
                if _installed(req_name) is None:
                    if marker.strip():             # e.g. python_version < "3.11": not here
                        continue
                    raise BaseBuildError(f"{dist.metadata['Name']} requires {req_name}, "
                                         "which is not installed")
                todo.append(req_name)
        return out

    def _distribution(self, dist: metadata.Distribution, site: str) -> None:
        name = dist.metadata["Name"]
        self.dists[name] = dist.version
        kind = "dsagent" if name == ROOT_DISTRIBUTION else "packages"
        files = dist.files
        if files is None:
            raise BaseBuildError(f"cannot tell the files of {name} (no RECORD)")
        editable = json.loads(dist.read_text("direct_url.json") or "{}").get(
            "dir_info", {}).get("editable", False)
        sources: list[tuple[Path, str]] = []
        for f in files:
            parts = f.parts
            if parts[0] == ".." or set(parts) & SITE_SKIP or f.suffix == ".pyc" \
                    or parts[0].startswith("__editable__") or parts[0].endswith(".pth"):
                continue
            if parts[0].endswith(".dist-info"):
                if f.name not in DIST_INFO_SKIP:
                    sources.append((Path(dist.locate_file(f)), str(f)))
            elif not editable and parts[0] not in NOT_IN_BASE:
                sources.append((Path(dist.locate_file(f)), str(f)))
        if editable:      # `pip install -e`: the packages are where the finder says
            for top in (dist.read_text("top_level.txt") or "").split():
                spec = find_spec(top) if top not in NOT_IN_BASE else None
                if spec is None or not spec.origin:
                    continue
                root = Path(spec.origin).parent if spec.submodule_search_locations \
                    else Path(spec.origin)
                # modules only, as the wheel holds them (no package data is declared);
                # a working tree's stray files stay out
                for src in sorted(root.rglob("*.py") if root.is_dir() else [root]):
                    rel = src.relative_to(root.parent)
                    if src.is_file() and not set(rel.parts) & SITE_SKIP:
                        sources.append((src, str(rel)))
        for src, rel in sorted(sources, key=lambda item: item[1]):
            dest = f"{site}/{rel}"
            if src.suffix == ".py":
                self.tree.file(dest, src.read_bytes(), 0o644, kind)
                cache = Path(rel).parent / "__pycache__" / \
                    f"{src.stem}.{sys.implementation.cache_tag}.pyc"
                self.compile.append((str(src), f"{site}/{cache}", f"/{dest}", kind))
            elif ".so" in src.suffixes:
                self.elf(str(src), dest, kind)
            else:
                self.tree.file(dest, src.read_bytes(), 0o644, kind)

    def precompile(self) -> None:
        """Compile every module in COMPILE_BATCHES fixed batches, each in a fresh Python."""
        jobs = sorted(self.compile, key=lambda job: job[1])
        size = -(-len(jobs) // COMPILE_BATCHES) or 1
        batches = [jobs[i:i + size] for i in range(0, len(jobs), size)]

        def run(index: int) -> list:
            listing = self.work / f"compile-{index}.json"
            listing.write_text(json.dumps([[src, str(self.work / "pyc" / dest), dfile]
                                           for src, dest, dfile, _ in batches[index]]))
            return json.loads(_run([sys.executable, "-I", "-S", "-c", COMPILE, str(listing)],
                                   "precompiling Python modules", timeout=900))

        with ThreadPoolExecutor(max_workers=min(COMPILE_BATCHES, os.cpu_count() or 1)) as pool:
            failed = dict(f for result in pool.map(run, range(len(batches))) for f in result)
        for src, dest, _, kind in jobs:
            if src in failed:
                if kind == "stdlib":                  # not Python 3 (a template, an example)
                    continue
                raise BaseBuildError(f"cannot compile {src}: {failed[src]}")
            self.tree.file(dest, (self.work / "pyc" / dest).read_bytes(), 0o644, kind)

    # -- tools, busybox, kernel modules, the small files
    def tools(self) -> None:
        for name in [*TOOLS, *self.opts.tools]:
            self.elf(find_command(name, TOOLS.get(name, "")), f"usr/sbin/{name}", "tools")
        for link, target in TOOL_LINKS.items():
            if f"usr/sbin/{target}" in self.tree.nodes:
                self.tree.symlink(f"usr/sbin/{link}", target)
        busybox = BUSYBOX if os.path.exists(BUSYBOX) else find_command("busybox", "busybox-static")
        self.elf(busybox, "usr/bin/busybox", "tools")
        self.busybox = _run([busybox], "busybox").splitlines()[0].strip()
        for applet in sorted(_run([busybox, "--list-full"], "busybox --list-full").split()):
            where, name = applet.rpartition("/")[::2]
            folder = "usr/sbin" if where.endswith("sbin") else "usr/bin"
            if not any(f"{d}/{name}" in self.tree.nodes for d in ("usr/bin", "usr/sbin")):
                self.tree.symlink(f"{folder}/{name}", "../bin/busybox" if folder == "usr/sbin"
                                  else "busybox")

    def kernel_modules(self, version: str) -> list[str]:
        if not (self.opts.modules or self.opts.extra_modules):
            return []
        root = Path("/lib/modules") / version
        if not (root / "modules.dep").is_file():
            raise BaseBuildError(f"no modules for Linux {version} in {root} "
                                 "(install its linux-image package, or give --modules '')")
        deps: dict[str, list[str]] = {}
        path_of: dict[str, str] = {}
        for line in (root / "modules.dep").read_text().splitlines():
            rel, _, rest = line.partition(":")
            deps[rel] = rest.split()
            path_of[_module_name(rel)] = rel
        builtin = {_module_name(line) for line in _lines(root / "modules.builtin")}
        aliases = [line.split() for line in _lines(root / "modules.alias") if line.count(" ") == 2]
        by_alias = {}                     # exact aliases (crypto-crc32c), not wildcards
        for _, alias, module in aliases:
            by_alias.setdefault(alias.replace("-", "_"), []).append(_module_name(module))
        softdeps = {_module_name(w[1]): " ".join(w[3:]).split(" post:")[0].split()
                    for w in map(str.split, _lines(root / "modules.softdep"))
                    if len(w) > 3 and w[0] == "softdep" and w[2] == "pre:"}
        chosen: dict[str, None] = {}          # insertion order: the load order

        def add(name: str, explicit: bool) -> None:
            name = _module_name(name)
            if name in chosen or name in builtin:
                return
            if name not in path_of:
                for hit in by_alias.get(name, []):
                    add(hit, explicit)
                if by_alias.get(name):
                    return
                if explicit:
                    raise BaseBuildError(f"kernel module {name!r} is not in {root}")
                self.say(f"note: kernel module {name} is not in {root}; left out")
                return
            for pre in softdeps.get(name, []):
                add(pre, False)
            chosen[name] = None

        for name in self.opts.modules:
            add(name, False)
        for name in self.opts.extra_modules:
            add(name, True)
        files: set[str] = set()
        todo = [path_of[name] for name in chosen]
        while todo:
            rel = todo.pop()
            if rel not in files:
                files.add(rel)
                todo += deps[rel]
        dest = f"usr/lib/modules/{version}"
        for rel in sorted(files):
            data = (root / rel).read_bytes()
            if rel.endswith(".xz"):
                data = lzma.decompress(data)
            elif not rel.endswith(".ko"):
                raise BaseBuildError(f"{root / rel}: compressed modules other than .xz "
                                     "are not supported (busybox modprobe loads plain .ko)")
            self.tree.file(f"{dest}/{_plain(rel)}", data, 0o644, "modules")
        names = {_module_name(rel) for rel in files}
        dep_text = "".join(f"{_plain(rel)}:{''.join(' ' + _plain(d) for d in deps[rel])}\n"
                           for rel in sorted(files))
        alias_text = "".join(f"alias {a} {m}\n" for _, a, m in aliases
                             if _module_name(m) in names)
        self.tree.file(f"{dest}/modules.dep", dep_text.encode(), 0o644, "modules")
        self.tree.file(f"{dest}/modules.alias", alias_text.encode(), 0o644, "modules")
        return list(chosen)

    def system(self, version: str, modules: list[str]) -> None:
        t, o = self.tree, self.opts
        for folder in ("proc", "sys", "dev", "run", "tmp", "root", "mnt", "etc", "usr/lib64"):
            t.folder(folder, 0o1777 if folder == "tmp" else 0o700 if folder == "root" else 0o755)
        for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"),
                             ("lib64", "usr/lib64"), ("etc/resolv.conf", "../run/resolv.conf"),
                             ("etc/mtab", "../proc/self/mounts"),          # e2fsprogs read it
                             ("etc/localtime", "../usr/share/zoneinfo/Etc/UTC")):
            t.symlink(link, target)
        t.device("dev/console", 0o600, (5, 1))
        t.device("dev/null", 0o666, (1, 3))
        zone = Path("/usr/share/zoneinfo/Etc/UTC")
        if zone.is_file():
            t.file("usr/share/zoneinfo/Etc/UTC", zone.read_bytes())
            t.symlink("usr/share/zoneinfo/UTC", "Etc/UTC")
        t.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"
                             b"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
        t.file("etc/group", b"root:x:0:\ntty:x:5:\nnogroup:x:65534:\n")
        t.file("etc/hosts", b"127.0.0.1\tlocalhost\n::1\tlocalhost\n")
        t.file("etc/timezone", b"Etc/UTC\n")
        t.file("etc/os-release", f'NAME="dsagent automation environment"\nID=dsagent-automation\n'
                                 f'VERSION_ID="{__version__}"\n'
                                 f'PRETTY_NAME="dsagent automation environment ({o.name})"\n'
                                 .encode())
        t.file("etc/profile", b"export PATH=/usr/sbin:/usr/bin:/sbin:/bin\nPS1='automation:\\w# '\n"
                              b"echo 'dsagent automation environment: boot log "
                              b"/run/dsagent-automation/boot.log, agent output "
                              b"/run/dsagent-automation/agent.log, logs /run/dsagent/logs'\n")
        t.file("init", (DATA / "init").read_bytes(), 0o755)
        t.file(f"{LIB}/udhcpc.script", (DATA / "udhcpc.script").read_bytes(), 0o755)
        settings = {"DSAGENT_BASE_NAME": o.name, "DSAGENT_VERSION": __version__,
                    "DSAGENT_KERNEL": version, "DSAGENT_SERVER_URL": o.server_url,
                    "DSAGENT_STATE_DIR": STATE_DIR, "DSAGENT_DHCP_WAIT_S": str(DHCP_WAIT_S),
                    "DSAGENT_MODULES": " ".join(modules)}
        t.file(f"{LIB}/settings.env", "".join(f"{k}='{v}'\n" for k, v in settings.items())
               .encode())
        t.file(f"{LIB}/agent.toml", agent_config(o).encode(), 0o600)


def _installed(name: str) -> metadata.Distribution | None:
    """The distribution installed in this environment's site-packages (not one that
    the current folder holds, like a source tree's egg-info)."""
    paths = list(dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]))
    return next(iter(metadata.distributions(name=name, path=paths)), None)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def _plain(rel: str) -> str:
    return rel[:-3] if rel.endswith(".ko.xz") else rel


def _module_name(rel: str) -> str:
    name = rel.rpartition("/")[2]
    for suffix in (".xz", ".zst", ".gz", ".ko"):
        name = name.removesuffix(suffix)
    return name.replace("-", "_")


def agent_config(o: Options) -> str:
    """The agent.toml /init installs: automation mode, state on tmpfs, the baked server."""
    agent = {"mode": "automation", "server_url": o.server_url, "state_dir": STATE_DIR}
    if o.enrollment_key:
        agent["enrollment_key"] = o.enrollment_key
    sections: dict[str, dict] = {"agent": agent, "cta": {"poll_interval_s": POLL_INTERVAL_S}}
    if o.image_store:
        sections["handlers"] = {"image_store": o.image_store}
    text = render_config(sections, [
        f"dsagent automation environment '{o.name}': written by `dsagent-server bootwiz-base`,",
        "installed by /init as /etc/dsagent/agent.toml (state on tmpfs: nothing survives a boot)"])
    try:
        check_config(sections, "agent.toml")         # the agent must accept what it gets
    except ConfigError as exc:
        raise BaseBuildError(f"the agent would refuse its config: {exc}") from None
    return text


def check_options(o: Options) -> None:
    if not NAME_RE.fullmatch(o.name) or o.name in (".", "..", "dsagent-pxe"):
        raise BaseBuildError(f"base name {o.name!r}: use [A-Za-z0-9._-], at most 64 characters "
                             "(not '.', '..' or 'dsagent-pxe')")
    if not URL_RE.fullmatch(o.server_url):
        raise BaseBuildError(f"--server-url {o.server_url!r}: expected http:// or https:// "
                             "and no blanks or quotes")
    o.server_url = o.server_url.rstrip("/")
    if o.image_store is None:         # the reference server's store (docs/image-store-http.md)
        o.image_store = f"{o.server_url}/images/"
    if not Path(o.preboot_store).is_dir():
        raise BaseBuildError(f"--preboot-store {o.preboot_store}: not a folder")
    if o.enrollment_key is not None and not o.enrollment_key.strip():
        raise BaseBuildError("--enrollment-key is empty")


def _write(path: Path, write, mode: int = 0o644) -> None:
    """``write(fh)`` into a temporary file beside ``path``, fsync'ed, renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def build_base(o: Options) -> BaseInfo:
    """Build ``<preboot_store>/<name>/`` (vmlinuz, initrd.img, base.json); BaseBuildError."""
    started = time.monotonic()
    say = o.log or (lambda text: None)
    check_options(o)
    epoch = source_date_epoch()
    kernel = Path(o.kernel) if o.kernel else newest_kernel()
    if not kernel.is_file():
        raise BaseBuildError(f"--kernel {kernel}: no such file")
    version = kernel.name.removeprefix("vmlinuz-")
    if version == kernel.name and (o.modules or o.extra_modules):
        raise BaseBuildError(f"cannot tell the kernel version from {kernel.name!r} "
                             "(expected vmlinuz-<version>)")
    for name, package in {"ldd": "libc-bin", **TOOLS, **dict.fromkeys(o.tools, "")}.items():
        find_command(name, package)                   # a missing tool fails before the work
    with tempfile.TemporaryDirectory(prefix="bootwiz-base-") as work:
        b = Builder(o, Path(work))
        say(f"Python {sys.version.split()[0]} and the distributions of {ROOT_DISTRIBUTION}")
        b.python()
        say(f"precompiling {len(b.compile)} modules")
        b.precompile()
        say("tools, busybox, kernel modules")
        b.tools()
        modules = b.kernel_modules(version)
        b.system(version, modules)
    folder = Path(o.preboot_store) / o.name
    folder.mkdir(mode=0o755, exist_ok=True)
    folder.chmod(0o755)                               # served by TFTP as nobody
    say(f"writing {folder}/initrd.img ({len(b.tree.nodes)} entries)")
    unpacked = 0

    def initrd(fh) -> None:
        nonlocal unpacked
        with gzip.GzipFile(filename="", mode="wb", compresslevel=6, fileobj=fh, mtime=0) as gz:
            for entry in b.tree.archive(epoch):
                unpacked += len(entry)
                gz.write(entry)

    _write(folder / "initrd.img", initrd)
    _write(folder / "vmlinuz", lambda fh: fh.write(kernel.read_bytes()))
    with open(folder / "initrd.img", "rb") as fh:
        sha256 = hashlib.file_digest(fh, "sha256").hexdigest()
    info = BaseInfo(
        name=o.name, folder=str(folder), kernel=str(kernel), kernel_version=version,
        kernel_size=kernel.stat().st_size, initrd_size=(folder / "initrd.img").stat().st_size,
        initrd_sha256=sha256, unpacked_size=unpacked, entries=len(b.tree.nodes),
        python=sys.version.split()[0],
        distributions=dict(sorted(b.dists.items(), key=lambda kv: kv[0].lower())),
        tools=sorted([*TOOLS, *o.tools, *TOOL_LINKS]), busybox=b.busybox, modules=modules,
        stripped=bool(b.strip), server_url=o.server_url,
        enrollment_key_baked=bool(o.enrollment_key), image_store=o.image_store or None,
        source_date_epoch=epoch, sizes=b.tree.sizes(),
        seconds=round(time.monotonic() - started, 1))
    text = json.dumps(asdict(info), indent=2) + "\n"
    _write(folder / "base.json", lambda fh: fh.write(text.encode()))
    return info
