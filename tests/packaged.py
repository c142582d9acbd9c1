"""The built package and a throwaway root to install it in (test_packaging,
test_walkthrough).

`build` is what `make package` runs. `Root` is this machine's root as a
copy-on-write tree: in a private mount namespace, an overlay whose lower layer
is this machine's own root (so python3, python3-venv and the dpkg database are
the real ones) and whose upper layer is a tmpfs, entered with chroot.
`dpkg --root`/`--instdir` would chroot into an empty root for the maintainer
scripts, where no python3 exists to build the venv. Every file the package
changes lands in the upper layer, and the namespace (mounts included)
disappears with its last process. The `built` and `root` fixtures are in
conftest.py.
"""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_SETUP = configparser.ConfigParser()
_SETUP.read(ROOT / "setup.cfg")
VERSION = _SETUP["metadata"]["version"]
PYTHONS = ("3.11", "3.12", "3.13")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Folder for stand-in programs (test_packaging's systemctl), first on the chroot's PATH.
FAKE_BIN = "/run/fakebin"
CHROOT_ENV = {"PATH": f"{FAKE_BIN}:{PATH}", "LANG": "C.UTF-8"}

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None,
                                reason="dpkg-deb not found: the .deb is built only on Debian/Ubuntu")


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


def ok(cmd, **kw) -> str:
    done = run(cmd, **kw)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def build(out: Path) -> dict[str, Path]:
    """What `make package` makes (same script), into ``out``."""
    lines = ok(["bash", str(ROOT / "packaging" / "build-package.sh"), str(out)],
               env={**os.environ, "DSAGENT_DEB_PYTHONS": " ".join(PYTHONS)}).split()
    sdist, wheel, deb = map(Path, lines)
    assert sdist.name == f"dsagent-{VERSION}.tar.gz"
    assert wheel.name == f"dsagent-{VERSION}-py3-none-any.whl"
    return {"sdist": sdist, "wheel": wheel, "deb": deb}


class Root:
    """This machine's root as a throwaway copy-on-write tree (see the module
    docstring): `sh` runs a command in the namespace, `chroot` and `popen`
    inside the tree."""

    def __init__(self, base: Path):
        self.base = base
        self.holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private",
                                        "sleep", "infinity"])
        # Until unshare has run, nsenter would join (and mount in) ours.
        ours, deadline = os.readlink("/proc/self/ns/mnt"), time.monotonic() + 10
        while os.readlink(f"/proc/{self.holder.pid}/ns/mnt") == ours:
            if self.holder.poll() is not None or time.monotonic() > deadline:
                self.holder.kill()
                self.holder.wait()
                raise RuntimeError(f"unshare --mount did not make a mount namespace "
                                   f"(exit status {self.holder.poll()})")
            time.sleep(0.01)
        self.namespace = os.readlink(f"/proc/{self.holder.pid}/ns/mnt")
        # The mounts exist only in the namespace: this process sees them
        # through the holder's /proc/PID/root.
        seen = Path(f"/proc/{self.holder.pid}/root") / base.relative_to("/")
        self.path, self.upper = seen / "root", seen / "layer" / "upper"

    def sh(self, script: str) -> subprocess.CompletedProcess:
        return run(["nsenter", "-t", str(self.holder.pid), "-m", "sh", "-euc", script],
                   env={"PATH": PATH})

    def _argv(self, cmd: tuple[str, ...]) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-m", "chroot", str(self.base / "root"),
                *cmd]

    def chroot(self, *cmd: str) -> subprocess.CompletedProcess:
        """Run ``cmd`` in the tree and wait for it."""
        return run(self._argv(cmd), env=CHROOT_ENV, stdin=subprocess.DEVNULL)

    def popen(self, *cmd: str, **kw) -> subprocess.Popen:
        """Start ``cmd`` in the tree; its pid is the program's own (nsenter
        and chroot exec it), so signals reach it."""
        return subprocess.Popen(self._argv(cmd), env=CHROOT_ENV, stdin=subprocess.DEVNULL,
                                text=True, **kw)

    def mount(self) -> str:
        """Mount the tree; '' or why it cannot be done here."""
        layer, root = self.base / "layer", self.path
        done = self.sh(textwrap.dedent(f"""
            mkdir -p {layer} {root}
            mount -t tmpfs tmpfs {layer}
            mkdir {layer}/upper {layer}/work
            mount -t overlay overlay -o lowerdir=/,upperdir={layer}/upper,workdir={layer}/work {root}
            mount --bind /proc {root}/proc
            mount --rbind /dev {root}/dev
            mount -t tmpfs tmpfs {root}/tmp
            mount -t tmpfs tmpfs {root}/run
        """))
        return "" if done.returncode == 0 else done.stderr.strip()

    def leftovers(self) -> set[str]:
        """Files (not folders) the package runs created or changed, minus dpkg's
        own bookkeeping and what the test wrote into /tmp and /run."""
        found = set()
        for path in self.upper.rglob("*"):
            rel = "/" + str(path.relative_to(self.upper))
            if path.is_dir() and not path.is_symlink():
                continue
            if rel.startswith(("/var/lib/dpkg/", "/var/log/dpkg.log", "/tmp/", "/run/")):
                continue
            found.add(rel)
        return found

    def close(self) -> None:
        """Kill what still runs in the namespace (all started in it by the
        test), then the holder: the namespace and its mounts go with them."""
        try:
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit() or int(entry.name) == self.holder.pid:
                    continue
                try:
                    if os.readlink(entry / "ns" / "mnt") == self.namespace:
                        os.kill(int(entry.name), signal.SIGKILL)
                except OSError:
                    pass  # exited meanwhile, or not ours to look at (EACCES)
        finally:
            self.holder.kill()
            self.holder.wait()
