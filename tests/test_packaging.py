"""`make package`: systemd units, sdist, wheel and the .deb, each really used.

The .deb is installed, upgraded, removed and purged with the real dpkg and its
real maintainer scripts, without touching this machine: in a throwaway root,
an overlay of this machine's own root in a private mount namespace
(tests/packaged.py, the `root` fixture). Every file the package changes lands
in the overlay's upper layer, which makes "nothing is left after removal"
checkable. Needs root and overlayfs; skips with that reason otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tarfile
from pathlib import Path

import pytest

from packaged import FAKE_BIN, PATH, PYTHONS, ROOT, VERSION, Root, needs_dpkg, ok, run

UNITS = ROOT / "packaging" / "systemd"
BUILTIN_TYPES = ("BootWizRebuild", "CreateBackupImage", "CreateImage", "DeployImage",
                 "Reboot", "ReplicatePackage", "RestoreBackupImage", "RunScript",
                 "UpdateSBSInfo")


# -- systemd units -------------------------------------------------------------

def verify_units(*units: str, chroot: "Root | None" = None) -> None:
    """`systemd-analyze verify` passes and prints nothing (an unknown or
    misspelt key is only a warning, with exit status 0)."""
    cmd = ["systemd-analyze", "verify", *units]
    done = chroot.chroot(*cmd) if chroot else run(cmd, env={"PATH": PATH})
    assert done.returncode == 0 and not done.stdout + done.stderr, done.stdout + done.stderr


def test_units_verify(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze not found (make test installs systemd)")
    # verify insists that ExecStart's program exists: check copies that start
    # an existing one (the installed units are verified as they are below).
    copies = []
    for unit in sorted(UNITS.glob("*.service")):
        text = unit.read_text()
        assert re.search(r"^ExecStart=/opt/dsagent/venv/bin/\S+ ", text, re.M), unit
        copy = tmp_path / unit.name
        copy.write_text(re.sub(r"^ExecStart=\S+", f"ExecStart={sys.executable}", text,
                               flags=re.M))
        copies.append(str(copy))
    assert len(copies) == 2
    verify_units(*copies)


def unit_settings(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().replace("\\\n", "").splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_agent_unit_hardening():
    unit = unit_settings("dsagent.service")
    assert unit["ExecStart"] == ["/opt/dsagent/venv/bin/dsagent run --config /etc/dsagent/agent.toml"]
    assert unit["Restart"] == ["on-failure"] and unit["KillMode"] == ["mixed"]
    from agent.supervisor import CHILDREN, PXE_CHILD, STOP_GRACE_S
    # The supervisor drains its children one after the other (the PXE process too).
    assert int(unit["TimeoutStopSec"][0].rstrip("s")) > len(CHILDREN + (PXE_CHILD,)) * STOP_GRACE_S
    for key, value in {"ProtectSystem": "strict", "NoNewPrivileges": "yes", "PrivateTmp": "yes",
                       "ProtectHome": "yes", "ProtectKernelTunables": "yes",
                       "StateDirectory": "dsagent", "LogsDirectory": "dsagent",
                       "ConfigurationDirectory": "dsagent", "DevicePolicy": "closed"}.items():
        assert unit[key] == [value], key
    assert unit["CapabilityBoundingSet"] == ["CAP_DAC_OVERRIDE CAP_KILL"]
    assert set(unit["RestrictAddressFamilies"][0].split()) == {
        "AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}


def test_config_template_is_a_valid_config(tmp_path):
    from agent.common.config import SCHEMA, load_config
    template = ROOT / "packaging" / "agent.toml.example"
    config = load_config(template)
    assert config.state_dir == Path("/var/lib/dsagent")
    assert not any(config.get("agent", k) for k in ("token", "tickle_key", "enrollment_key"))
    assert not config.has_section("pxe")
    # Its commented examples, uncommented, are valid too and show every
    # [logging], [trace] and [pxe] key.
    examples = tmp_path / "examples.toml"
    examples.write_text(re.sub(r"^# (\w+ = .+|\[\w+\])$", r"\1", template.read_text(),
                               flags=re.M))
    uncommented = load_config(examples, check_mode=False)
    for section in ("logging", "trace", "pxe"):
        assert set(uncommented.sections[section]) == set(SCHEMA[section]), section
    assert uncommented.get("logging", "dir") == "/var/log/dsagent"


# -- sdist and wheel -------------------------------------------------------------

@needs_dpkg
def test_sdist_contents(built):
    with tarfile.open(built["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        pkg_info = tar.extractfile(f"dsagent-{VERSION}/PKG-INFO").read().decode()
    for needed in ("README.md", "setup.cfg", "pyproject.toml", "MANIFEST.in", "SECURITY.md",
                   "docs/install.md", "agent/tools/cli.py", "handlers/imaging/deploy.py",
                   "packaging/systemd/dsagent.service", "packaging/build-package.sh",
                   "packaging/debian/postinst", "packaging/agent.toml.example"):
        assert needed in names, needed
    assert not any(n.startswith("tests/") or "__pycache__" in n for n in names)
    # README.md is the long description.
    assert "Description-Content-Type: text/markdown" in pkg_info
    assert "\n# dsagent\n" in pkg_info


@needs_dpkg
def test_wheel_installs_into_a_fresh_venv(built, tmp_path):
    venv = tmp_path / "venv"
    ok([sys.executable, "-m", "venv", str(venv)])
    ok([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(built["wheel"])])
    listed = ok([str(venv / "bin" / "dsagent"), "handlers"])
    assert [line.split()[0] for line in listed.splitlines()[1:]
            if not line.startswith(" ")] == list(BUILTIN_TYPES)  # not the parameter lines
    assert ok([str(venv / "bin" / "dsagent-server"), "--help"])


# -- the .deb --------------------------------------------------------------------

@needs_dpkg
def test_deb_control_and_contents(built):
    deb = str(built["deb"])
    fields = dict(re.findall(r"^(\S+): (.*)$", ok(["dpkg-deb", "-f", deb]), re.M))
    assert fields["Package"] == "dsagent" and fields["Version"] == VERSION
    assert fields["Architecture"] == ok(["dpkg", "--print-architecture"]).strip()
    assert fields["Depends"] == "python3 (>= 3.11), python3 (<< 3.14), python3-venv"
    info = ok(["dpkg-deb", "-I", deb])
    for script in ("postinst", "prerm", "postrm", "conffiles"):
        assert f" {script} " in info, script
    listing = {}
    for line in ok(["dpkg-deb", "-c", deb]).splitlines():
        mode, owner, *_, path = line.split(None, 5)
        listing[path.split(" -> ")[0].lstrip(".")] = (mode, owner, line)
    assert listing["/"][0] == "drwxr-xr-x"
    assert listing["/etc/dsagent/agent.toml.example"][:2] == ("-rw-------", "root/root")
    assert "/etc/dsagent/agent.toml" not in listing  # the admin's file is never shipped
    for unit in ("dsagent.service", "dsagent-server.service"):
        assert listing[f"/lib/systemd/system/{unit}"][:2] == ("-rw-r--r--", "root/root")
    assert listing["/usr/bin/dsagent"][2].endswith("-> /opt/dsagent/venv/bin/dsagent")
    wheels = {p.rsplit("/", 1)[1] for p in listing if p.startswith("/opt/dsagent/wheels/")}
    assert f"dsagent-{VERSION}-py3-none-any.whl" in wheels
    for v in PYTHONS:  # the one compiled dependency without an abi3 wheel
        tag = "cp" + v.replace(".", "")
        assert any(w.startswith("zstandard-") and f"-{tag}-{tag}-" in w for w in wheels), v
    assert not any(p.startswith("/opt/dsagent/venv") for p in listing)
    conffiles = run(["dpkg-deb", "-I", deb, "conffiles"]).stdout.split()
    assert conffiles == ["/etc/dsagent/agent.toml.example"]


# Stands in for systemctl so the maintainer scripts' systemd branch runs:
# it logs its arguments and calls the unit active when /run/fake-active exists.
# In FAKE_BIN (/run: a tmpfs of the tree), first on the chroot's PATH.
FAKE_SYSTEMCTL = """#!/bin/sh
echo "$*" >> /run/systemctl.log
case "$1" in is-active) [ -e /run/fake-active ] ;; esac
"""


TASK_XML = """<ClientTasks client="local">
  <Task id="0b8e8c5e-3f7a-4f63-9d8f-2a61c1e0e4a1" type="RunScript" timeout="60">
    <Parameters><Parameter name="script">echo installed-from-deb; id -u</Parameter></Parameters>
  </Task>
</ClientTasks>
"""


@needs_dpkg
def test_deb_install_upgrade_remove_purge(built, root):
    r = root.path
    shutil.copy(built["deb"], r / "tmp" / "dsagent.deb")
    (r / "run" / "systemd" / "system").mkdir(parents=True)  # "systemd is running"
    fake = r / FAKE_BIN.lstrip("/") / "systemctl"
    fake.parent.mkdir(parents=True)
    fake.write_text(FAKE_SYSTEMCTL)
    fake.chmod(0o755)
    systemctl_log = r / "run" / "systemctl.log"

    def dpkg(*args: str) -> None:
        done = root.chroot("dpkg", *args)
        assert done.returncode == 0, f"dpkg {' '.join(args)}:\n{done.stdout}\n{done.stderr}"

    def systemctl_calls() -> list[str]:
        calls = systemctl_log.read_text().splitlines() if systemctl_log.exists() else []
        systemctl_log.unlink(missing_ok=True)
        return calls

    # Install: venv built, systemd reloaded, the agent neither enabled nor started.
    dpkg("-i", "/tmp/dsagent.deb")
    assert systemctl_calls() == ["daemon-reload"]
    assert (r / "opt/dsagent/venv/bin/python").exists()
    listed = root.chroot("/opt/dsagent/venv/bin/dsagent", "handlers")
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()[1:]
            if not line.startswith(" ")] == list(BUILTIN_TYPES)
    (r / "tmp" / "task.xml").write_text(TASK_XML)
    ran = root.chroot("dsagent", "run-task", "/tmp/task.xml", "--json")  # via /usr/bin
    assert ran.returncode == 0, ran.stdout + ran.stderr
    final = json.loads(ran.stdout.splitlines()[-1])
    assert final["state"] == "succeeded"
    assert final["details"]["stdout_tail"] == "installed-from-deb\n0\n"
    assert (r / "etc/dsagent/agent.toml.example").stat().st_mode & 0o777 == 0o600
    verify_units("/lib/systemd/system/dsagent.service",
                 "/lib/systemd/system/dsagent-server.service", chroot=root)

    # The admin's config and the agent's state, which removal must keep.
    config = r / "etc/dsagent/agent.toml"
    shutil.copy(r / "etc/dsagent/agent.toml.example", config)
    config.write_text(config.read_text().replace("taskserver.example", "ns.site.example"))
    (r / "var/lib/dsagent").mkdir(mode=0o700, exist_ok=True)
    (r / "var/lib/dsagent/credentials.json").write_text("{}")

    # Upgrade (the same version again) while the agent runs: stopped, venv
    # rebuilt, started again; the admin's config untouched.
    (r / "run" / "fake-active").touch()
    dpkg("-i", "/tmp/dsagent.deb")
    calls = systemctl_calls()
    assert "stop dsagent.service" in calls and calls[-1] == "start dsagent.service", calls
    assert "ns.site.example" in config.read_text()
    assert root.chroot("dsagent", "handlers").returncode == 0

    # Remove: the agent stopped, venv and package files gone; config and state kept.
    dpkg("-r", "dsagent")
    calls = systemctl_calls()
    assert "stop dsagent.service" in calls and calls[-1] == "daemon-reload", calls
    for gone in ("opt/dsagent", "usr/bin/dsagent", "lib/systemd/system/dsagent.service"):
        assert not os.path.lexists(r / gone), gone
    status = root.chroot("dpkg-query", "-W", "-f=${db:Status-Abbrev}", "dsagent")
    assert status.stdout.strip() == "rc"  # removed, config files remain
    assert root.leftovers() == {"/etc/dsagent/agent.toml", "/etc/dsagent/agent.toml.example",
                                "/var/lib/dsagent/credentials.json"}

    # Purge: config, state and logs gone too; nothing of the package is left.
    dpkg("--purge", "dsagent")
    assert not (r / "etc/dsagent").exists() and not (r / "var/lib/dsagent").exists()
    assert root.chroot("dpkg-query", "-W", "dsagent").returncode != 0
    assert root.leftovers() == set()
