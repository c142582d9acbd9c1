"""BootWizRebuild: driver packages checked, initrd rebuilt, current switched.

Base initrds are made with the real ``cpio -o -H newc``; the rebuilt initrd
is listed with the real ``cpio -t`` part by part (it stops at the first
TRAILER!!!) and the drivers' part unpacked with ``cpio -idm``. Skipped, with
the tool named, where cpio is missing.
"""

import errno
import gzip
import hashlib
import json
import logging
import os
import shutil
import subprocess
import uuid
import xml.etree.ElementTree as ET

import pytest

from agent.common.errors import BadParameters, TaskFailed
from agent.common.task import Task
from agent.plugin.manager import load_handlers
from agent.plugin.tasks import TaskContext
from handlers.bootwiz import plugin
from handlers.bootwiz import rebuild as rb
from handlers.bootwiz.errors import Cancelled
from handlers.bootwiz.versions import list_versions
from handlers.shared import sbsdrop
from handlers.bootwiz.cpio import CpioError, NewcWriter, Output, scan_initrd

KO = "lib/modules/6.1.0/extra/e1000e.ko"
FW = "lib/firmware/intel/ibt-12.sfi"
TOOL = "usr/sbin/nictool"


def cpio():
    path = shutil.which("cpio")
    if path is None:
        pytest.fail("cpio is not installed (make test installs it: packaging/ensure-system-tools.sh)")
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def newc_of(tree, fmt="newc") -> bytes:
    """The tree as an archive made by the real cpio (paths relative, like initrds)."""
    names = subprocess.run(["find", "."], cwd=tree, check=True, capture_output=True).stdout
    return subprocess.run([cpio(), "-o", "-H", fmt, "--quiet"], cwd=tree, input=names,
                          check=True, capture_output=True).stdout


def make_base(store, name="debian12", kind="plain", tmp=None):
    tree = (tmp or store.parent) / f"tree-{name}-{uuid.uuid4().hex[:6]}"
    (tree / "bin").mkdir(parents=True)
    (tree / "etc").mkdir()
    (tree / "init").write_text("#!/bin/sh\nexec /bin/sh\n")
    (tree / "init").chmod(0o755)
    (tree / "bin" / "sh").write_bytes(os.urandom(3000))
    (tree / "etc" / "hostname").write_text("automation\n")
    data = newc_of(tree, "crc" if kind == "crc" else "newc")
    if kind == "gzip":
        data = gzip.compress(data, mtime=0)
    elif kind == "odd":
        data += b"\0\0\0"  # trailing zeros the kernel skips; the length is not a multiple of 4
    folder = store / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "initrd.img").write_bytes(data)
    (folder / "vmlinuz").write_bytes(b"MZ" + os.urandom(4000))
    return {"init", "bin", "bin/sh", "etc", "etc/hostname"}


def make_package(pkgs, pid, files, executable=(), manifest=None):
    folder = pkgs / pid
    folder.mkdir(parents=True)
    for path, data in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
        if path in executable:
            (folder / path).chmod(0o755)
    if manifest is None:
        manifest = {"id": pid, "files": [{"path": p, "sha256": sha(d)} for p, d in files.items()]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture
def env(tmp_path):
    e = {"preboot": tmp_path / "preboot", "pkgs": tmp_path / "packages", "sbs": tmp_path / "sbs"}
    for path in e.values():
        path.mkdir()
    e["base_files"] = make_base(e["preboot"], tmp=tmp_path)
    e["files"] = {
        "e1000e": {KO: os.urandom(20000), "lib/modules/6.1.0/extra/e1000e.conf": b"options\n"},
        "intel-bt": {FW: os.urandom(7001), TOOL: b"#!/bin/sh\necho nic\n"},
    }
    make_package(e["pkgs"], "e1000e", e["files"]["e1000e"])
    make_package(e["pkgs"], "intel-bt", e["files"]["intel-bt"], executable={TOOL})
    e["config"] = {"preboot_store": str(e["preboot"]), "package_store": str(e["pkgs"]),
                   "sbs_dir": str(e["sbs"]), "preboot_keep_versions": 3}
    return e


def run(env, cfg=None, **params):
    """Validate and run a BootWizRebuild in-process, as a worker would."""
    params.setdefault("config", "linux-auto")
    params.setdefault("base", "debian12")
    params.setdefault("drivers", "e1000e,intel-bt")
    cfg = dict(env["config"], **(cfg or {}))
    task = Task(str(uuid.uuid4()), "BootWizRebuild", params)
    events = []
    load_handlers(entry_points=False, extra_plugins=[("bootwiz", plugin)]).validate(task, cfg)
    ctx = TaskContext(task, cfg, lambda pct, msg, det: events.append((pct, msg, det)),
                      logging.LoggerAdapter(logging.getLogger("test.bootwiz"), {}))
    details = plugin.dsagent_run_task(task, ctx)
    return details, events


def snapshot(*roots):
    """Every path under the roots, with link targets and file digests."""
    seen = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                if os.path.islink(path):
                    seen[path] = "-> " + os.readlink(path)
                elif os.path.isfile(path):
                    seen[path] = sha(open(path, "rb").read())
                else:
                    seen[path] = "dir"
    return seen


def current(env, config="linux-auto"):
    link = env["preboot"] / config / "current"
    return os.readlink(link) if os.path.islink(link) else None


def cpio_list(data: bytes, verbose=False) -> list[str]:
    flags = "-tv" if verbose else "-t"
    out = subprocess.run([cpio(), flags, "--quiet"], input=data, capture_output=True, check=True)
    return out.stdout.decode().splitlines()


# ---------------------------------------------------------------------------
# successful builds
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["plain", "gzip", "odd", "crc"])
def test_rebuild_appends_a_newc_drivers_archive_that_cpio_lists_and_unpacks(env, tmp_path, kind):
    if kind != "plain":
        shutil.rmtree(env["preboot"] / "debian12")
        make_base(env["preboot"], kind=kind, tmp=tmp_path)
    base = (env["preboot"] / "debian12" / "initrd.img").read_bytes()
    details, events = run(env)
    version = details["version"]
    assert current(env) == version
    folder = env["preboot"] / "linux-auto" / version
    initrd = (folder / "initrd.img").read_bytes()
    manifest = json.loads((folder / "manifest.json").read_text())

    assert details["initrd_sha256"] == sha(initrd) == manifest["initrd_sha256"]
    assert (folder / "vmlinuz").read_bytes() == (env["preboot"] / "debian12" / "vmlinuz").read_bytes()
    offset = manifest["drivers_offset"]
    assert offset % 4 == 0 and len(base) <= offset < len(base) + 4
    assert initrd[:len(base)] == base and initrd[len(base):offset] == b"\0" * (offset - len(base))

    # the base part, listed by the real cpio
    base_part = gzip.decompress(initrd[:len(base)]) if kind == "gzip" else initrd[:offset]
    assert set(cpio_list(base_part)) - {"."} == env["base_files"]
    # the drivers' part, listed and unpacked by the real cpio
    drivers_part = initrd[offset:]
    listing = cpio_list(drivers_part, verbose=True)
    names = [line.split()[-1] for line in listing]
    wanted = {p for files in env["files"].values() for p in files}
    parents = {"lib", "lib/modules", "lib/modules/6.1.0", "lib/modules/6.1.0/extra",
               "lib/firmware", "lib/firmware/intel", "usr", "usr/sbin"}
    assert set(names) == wanted | parents
    for line in listing:  # every parent is a directory entry, listed before its files
        name = line.split()[-1]
        assert line.startswith("drwxr-xr-x" if name in parents else "-rw")
        if "/" in name:
            assert names.index(name.rsplit("/", 1)[0]) < names.index(name)
    out = tmp_path / "unpacked"
    out.mkdir()
    subprocess.run([cpio(), "-idm", "--quiet"], cwd=out, input=drivers_part, check=True)
    for files in env["files"].values():
        for path, data in files.items():
            assert (out / path).read_bytes() == data
    assert os.stat(out / TOOL).st_mode & 0o777 == 0o755
    assert os.stat(out / KO).st_mode & 0o777 == 0o644

    # the whole image parses like the kernel reads it: base part(s), then the drivers
    info = scan_initrd(folder / "initrd.img")
    assert info.parts[-1].offset == offset and info.parts[-1].kind == "newc"
    assert {e.name for e in info.entries} - {"."} == env["base_files"] | wanted | parents

    # boot files name this version's kernel and initrd (paths from the store root)
    ipxe = (folder / "boot.ipxe").read_text()
    pxe = (folder / "pxelinux.cfg" / "default").read_text()
    assert f"kernel /linux-auto/{version}/vmlinuz" in ipxe
    assert f"initrd /linux-auto/{version}/initrd.img" in ipxe
    assert f"KERNEL linux-auto/{version}/vmlinuz" in pxe
    assert f"INITRD linux-auto/{version}/initrd.img" in pxe
    assert (env["preboot"] / manifest["kernel"]).is_file()
    assert (env["preboot"] / manifest["initrd"]).read_bytes() == initrd

    assert manifest["version"] == version and manifest["base"]["name"] == "debian12"
    assert manifest["built_at"].endswith("Z")
    ko = next(f for d in manifest["drivers"] if d["id"] == "e1000e" for f in d["files"]
              if f["path"] == KO)
    assert ko["sha256"] == sha(env["files"]["e1000e"][KO])
    assert details["previous"] is None and details["files"] == 4
    assert details["kept_versions"] == [version]
    assert any(pct is not None and pct < 40 for pct, _, _ in events)  # checking
    assert any(pct is not None and pct > 40 for pct, _, _ in events)  # building
    # no temp folder or temp link left
    assert sorted(os.listdir(env["preboot"] / "linux-auto")) == [".lock", version, "current"]


def test_second_build_sorts_after_first_old_versions_pruned(env, monkeypatch):
    frozen = rb._now()
    monkeypatch.setattr(rb, "_now", lambda: frozen)  # the same microsecond every time
    versions = []
    for _ in range(5):
        details, _ = run(env, cfg={"preboot_keep_versions": 2})
        if versions:
            assert details["previous"] == versions[-1]
        versions.append(details["version"])
        assert current(env) == details["version"]
    assert versions == sorted(versions) and len(set(versions)) == 5
    left = list_versions(str(env["preboot"] / "linux-auto"))
    assert left == versions[-2:] == details["kept_versions"]
    assert details["removed_versions"] == [versions[-3]]
    # the kept previous version is complete: rollback is repointing current
    old = env["preboot"] / "linux-auto" / versions[-2]
    assert sha((old / "initrd.img").read_bytes()) == json.loads(
        (old / "manifest.json").read_text())["initrd_sha256"]


def test_concurrent_builds_of_one_config_take_turns(env):
    import threading

    results, errors = [], []

    def one():
        try:
            results.append(run(env)[0])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors and len(results) == 3
    versions = sorted(r["version"] for r in results)
    assert current(env) == versions[-1]
    assert sorted(r["previous"] or "" for r in results) == ["", versions[0], versions[1]]
    assert list_versions(str(env["preboot"] / "linux-auto")) == versions


def test_no_drivers_means_the_base_initrd_unchanged(env):
    details, _ = run(env, drivers="")
    folder = env["preboot"] / "linux-auto" / details["version"]
    assert (folder / "initrd.img").read_bytes() == (env["preboot"] / "debian12" / "initrd.img").read_bytes()
    assert details["drivers"] == [] and details["drivers_offset"] is None
    assert json.loads((folder / "manifest.json").read_text())["drivers"] == []


def test_drivers_list_tolerates_blanks_and_repeats(env):
    details, _ = run(env, drivers=" e1000e , intel-bt,e1000e,")
    assert details["drivers"] == ["e1000e", "intel-bt"]


def test_symlink_inside_the_package_is_followed_and_stored_as_a_file(env):
    folder = env["pkgs"] / "e1000e"
    (folder / "lib/modules/6.1.0/extra/alias.ko").symlink_to("e1000e.ko")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"].append({"path": "lib/modules/6.1.0/extra/alias.ko",
                              "sha256": sha(env["files"]["e1000e"][KO])})
    (folder / "manifest.json").write_text(json.dumps(manifest))
    details, _ = run(env, drivers="e1000e")
    entries = scan_initrd(env["preboot"] / "linux-auto" / details["version"] / "initrd.img").entries
    alias = next(e for e in entries if e.name.endswith("alias.ko"))
    assert alias.mode == 0o100644 and alias.size == len(env["files"]["e1000e"][KO])


def test_merged_usr_base_keeps_its_symlinks(env, tmp_path):
    """Linux replaces a path of another type, so a folder entry 'lib' would delete
    the base's lib -> usr/lib: files go through the base's symlinks instead."""
    tree = tmp_path / "merged"
    (tree / "usr/lib/modules/6.1.0/extra").mkdir(parents=True)
    (tree / "usr/sbin").mkdir(parents=True)
    (tree / "usr/sbin").chmod(0o750)
    (tree / "lib").symlink_to("usr/lib")
    (tree / "sbin").symlink_to("/usr/sbin")
    (tree / "usr/lib/modules/6.1.0/extra/e1000e.ko").write_bytes(b"old driver")
    (tree / "init").write_text("#!/bin/sh\n")
    folder = env["preboot"] / "bookworm"
    folder.mkdir()
    (folder / "initrd.img").write_bytes(gzip.compress(newc_of(tree)))
    (folder / "vmlinuz").write_bytes(b"kernel")
    make_package(env["pkgs"], "helper", {"sbin/helper": b"#!/bin/sh\n"}, executable={"sbin/helper"})
    details, _ = run(env, base="bookworm", drivers="e1000e,helper")
    assert details["replaces_base_files"] == ["usr/lib/modules/6.1.0/extra/e1000e.ko"]
    version_dir = env["preboot"] / "linux-auto" / details["version"]
    manifest = json.loads((version_dir / "manifest.json").read_text())
    initrd = (version_dir / "initrd.img").read_bytes()
    drivers_part = initrd[manifest["drivers_offset"]:]
    listing = {line.split()[-1]: line.split()[0] for line in cpio_list(drivers_part, verbose=True)}
    assert "lib" not in listing and "sbin" not in listing
    assert listing["usr/sbin"] == "drwxr-x---"  # the base's mode, not 0755
    assert listing["usr/lib/modules/6.1.0/extra"] == "drwxr-xr-x"
    assert listing["usr/sbin/helper"] == "-rwxr-xr-x"
    ko = next(f for f in manifest["drivers"][0]["files"] if f["path"] == KO)
    assert ko["initrd_path"] == "usr/lib/modules/6.1.0/extra/e1000e.ko"
    # unpack both parts in turn: the symlinks survive, the new driver is found through them
    root = tmp_path / "root"
    root.mkdir()
    base_part = gzip.decompress(initrd[:manifest["base"]["initrd_size"]])
    subprocess.run([cpio(), "-idm", "--quiet"], cwd=root, input=base_part, check=True)
    subprocess.run([cpio(), "-idmu", "--quiet"], cwd=root, input=drivers_part, check=True)
    assert (root / "lib").is_symlink() and (root / "sbin").is_symlink()
    assert (root / KO).read_bytes() == env["files"]["e1000e"][KO]
    assert (root / "usr/sbin/helper").read_bytes() == b"#!/bin/sh\n"


def test_base_file_where_a_driver_needs_a_folder_is_refused(env, tmp_path):
    tree = tmp_path / "odd"
    tree.mkdir()
    (tree / "lib").write_text("not a folder")
    folder = env["preboot"] / "odd"
    folder.mkdir()
    (folder / "initrd.img").write_bytes(newc_of(tree))
    (folder / "vmlinuz").write_bytes(b"kernel")
    with pytest.raises(TaskFailed, match=r"driver package 'e1000e': the base initrd holds lib "
                                         r"as a file, but .* needs it to be a folder"):
        run(env, base="odd")
    assert not (env["preboot"] / "linux-auto").exists()


# ---------------------------------------------------------------------------
# PXE server update (SBS file)
# ---------------------------------------------------------------------------
def test_pxe_update_file_names_config_and_version(env, tmp_path):
    marker = tmp_path / "woken"
    details, _ = run(env, cfg={"sbs_wake_command": f"/bin/sh -c 'echo \"$0\" > {marker}'"})
    files = os.listdir(env["sbs"])
    assert len(files) == 1 and files[0].endswith(".sbs")
    uuid.UUID(files[0][:-4])
    text = (env["sbs"] / files[0]).read_text()
    root = ET.fromstring(text)           # PROTOCOL.md §7: <Update> holding one <Image/>
    assert root.tag == "Update" and [child.tag for child in root] == ["Image"]
    image = root[0].attrib
    assert image["config"] == "linux-auto" and image["version"] == details["version"]
    assert image["initrd"] == f"linux-auto/{details['version']}/initrd.img"
    assert image["initrd_sha256"] == details["initrd_sha256"]
    pxe = details["pxe_update"]
    assert pxe["written"] and pxe["file"] == str(env["sbs"] / files[0]) and pxe["content"] == text
    assert pxe["woken"] and marker.read_text().strip() == pxe["file"]


def test_no_sbs_dir_means_no_file_and_says_why(env):
    details, _ = run(env, cfg={"sbs_dir": None})
    assert details["pxe_update"]["written"] is False
    assert "sbs_dir is not configured" in details["pxe_update"]["reason"]


def test_sbs_write_failure_after_the_switch_is_a_warning(env, monkeypatch):
    def broken(*a, **k):
        raise sbsdrop.SBSError("disk on fire")

    monkeypatch.setattr(sbsdrop, "write_sbs_file", broken)
    details, _ = run(env)
    assert current(env) == details["version"]
    assert details["pxe_update"]["written"] is False
    assert "disk on fire" in details["warnings"][0]


# ---------------------------------------------------------------------------
# refusals: clear message, nothing new visible, current unchanged
# ---------------------------------------------------------------------------
def _rewrite_manifest(env, pid, change):
    path = env["pkgs"] / pid / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _escape_file(env):
    (env["pkgs"].parent / "secret").write_bytes(b"secret")
    target = env["pkgs"] / "e1000e" / KO
    target.unlink()
    target.symlink_to(env["pkgs"].parent / "secret")
    _rewrite_manifest(env, "e1000e", lambda m: m["files"][0].update(sha256=sha(b"secret")))


def _escape_dir(env):
    outside = env["pkgs"].parent / "outside" / "extra"
    outside.mkdir(parents=True)
    (outside / "e1000e.ko").write_bytes(env["files"]["e1000e"][KO])
    (outside / "e1000e.conf").write_bytes(b"options\n")
    shutil.rmtree(env["pkgs"] / "e1000e" / "lib/modules/6.1.0/extra")
    (env["pkgs"] / "e1000e" / "lib/modules/6.1.0/extra").symlink_to(outside)


def _corrupt_gzip(env):
    path = env["preboot"] / "debian12" / "initrd.img"
    data = bytearray(gzip.compress(path.read_bytes()))
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


FAILURES = {
    "package folder missing": (
        lambda env: None, {"drivers": "e1000e,r8169"},
        r"driver package 'r8169' has not replicated yet: its folder .*r8169 is missing"),
    "manifest missing": (
        lambda env: (env["pkgs"] / "intel-bt" / "manifest.json").unlink(), {},
        r"driver package 'intel-bt' has not replicated yet: .*manifest.json is missing"),
    "file missing": (
        lambda env: (env["pkgs"] / "e1000e" / KO).unlink(), {},
        rf"driver package 'e1000e' has not replicated yet: {KO} is missing"),
    "sha256 mismatch": (
        lambda env: (env["pkgs"] / "intel-bt" / FW).write_bytes(b"half"), {},
        rf"driver package 'intel-bt' has not replicated yet: {FW} sha256 mismatch "
        r"\(half-replicated\?\)"),
    "manifest not JSON": (
        lambda env: (env["pkgs"] / "e1000e" / "manifest.json").write_text('{"id": "e1000e", "fi'),
        {}, r"driver package 'e1000e': manifest.json is not valid JSON"),
    "manifest id mismatch": (
        lambda env: _rewrite_manifest(env, "e1000e", lambda m: m.update(id="r8169")), {},
        r"driver package 'e1000e': manifest.json names package 'r8169', not 'e1000e'"),
    "path traversal": (
        lambda env: _rewrite_manifest(env, "e1000e",
                                      lambda m: m["files"][0].update(path="../intel-bt/x")), {},
        r"driver package 'e1000e': manifest.json files\[0\] path '../intel-bt/x' is not "
        r"allowed \(contains '..'\)"),
    "absolute path": (
        lambda env: _rewrite_manifest(env, "e1000e",
                                      lambda m: m["files"][0].update(path="/etc/passwd")), {},
        r"path '/etc/passwd' is not allowed \(absolute\)"),
    "unnormalised path": (
        lambda env: _rewrite_manifest(env, "e1000e",
                                      lambda m: m["files"][0].update(path="lib//./x.ko")), {},
        r"path 'lib//./x.ko' is not allowed \(not normalised\)"),
    "symlink escaping the package": (
        _escape_file, {}, rf"driver package 'e1000e': {KO} resolves outside the package folder"),
    "symlinked folder escaping the package": (
        _escape_dir, {}, rf"driver package 'e1000e': {KO} resolves outside the package folder"),
    "two packages disagree": (
        lambda env: make_package(env["pkgs"], "e1000e-new", {KO: b"other build"}),
        {"drivers": "e1000e,e1000e-new"},
        rf"driver packages 'e1000e' and 'e1000e-new' both provide {KO} with different content"),
    "corrupt base initrd (truncated)": (
        lambda env: os.truncate(env["preboot"] / "debian12" / "initrd.img", 700), {},
        r"base 'debian12': initrd.img is not a valid newc cpio archive .*initrd.img: "
        r".*truncated"),
    "corrupt base initrd (garbage)": (
        lambda env: (env["preboot"] / "debian12" / "initrd.img").write_bytes(os.urandom(999) + b"x"),
        {}, r"base 'debian12': initrd.img is not a valid newc cpio archive"),
    "corrupt base initrd (gzip)": (
        _corrupt_gzip, {}, r"initrd.img is not a valid newc cpio archive .*gzip data starting "
                           r"at offset 0 is (corrupt|truncated)"),
    "base missing": (
        lambda env: None, {"base": "debian13"}, r"base 'debian13': folder .*debian13 is missing"),
    "base initrd missing": (
        lambda env: (env["preboot"] / "debian12" / "initrd.img").unlink(), {},
        r"base 'debian12': .*initrd.img is missing"),
    "sbs_dir missing": (
        lambda env: shutil.rmtree(env["sbs"]), {}, r"sbs_dir .*sbs is not a folder"),
    "current is not a symlink": (
        lambda env: ((env["preboot"] / "linux-auto" / "current").unlink(),
                     (env["preboot"] / "linux-auto" / "current").mkdir()), {},
        r"current exists but is not a symlink"),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_refusal_leaves_everything_as_it_was(env, case):
    setup, params, message = FAILURES[case]
    first, _ = run(env)
    setup(env)
    before = snapshot(env["preboot"], env["sbs"])
    with pytest.raises(TaskFailed, match=message) as failure:
        run(env, **params)
    assert snapshot(env["preboot"], env["sbs"]) == before
    if case != "current is not a symlink":
        assert current(env) == first["version"] == failure.value.details["current"]


def test_every_problem_is_listed_in_details(env):
    (env["pkgs"] / "e1000e" / KO).unlink()
    (env["pkgs"] / "intel-bt" / FW).write_bytes(b"half")
    with pytest.raises(TaskFailed, match=r"\(and 1 more problem\(s\)\)") as failure:
        run(env)
    problems = failure.value.details["problems"]
    assert [(p["package"], p["file"]) for p in problems] == [("e1000e", KO), ("intel-bt", FW)]
    assert problems[1]["expected"] == sha(env["files"]["intel-bt"][FW])


def test_first_build_failing_leaves_no_config_folder(env):
    (env["pkgs"] / "e1000e" / KO).unlink()
    with pytest.raises(TaskFailed, match="is missing"):
        run(env)
    assert not (env["preboot"] / "linux-auto").exists()


@pytest.mark.parametrize("params, message", [
    ({"config": "../evil"}, r"parameter 'config' '../evil' is not allowed"),
    ({"config": ".."}, r"parameter 'config' '..' is not allowed"),
    ({"config": "a/b"}, r"parameter 'config' 'a/b' is not allowed"),
    ({"base": "../../etc"}, r"parameter 'base' '../../etc' is not allowed"),
    ({"base": "."}, r"parameter 'base' '.' is not allowed"),
    ({"drivers": "e1000e,../x"}, r"parameter 'drivers': driver package id '../x' is not allowed"),
    ({"drivers": "a/b"}, r"parameter 'drivers': driver package id 'a/b' is not allowed"),
    ({"config": ""}, r"parameter 'config' is empty"),
    ({"config": "dsagent-pxe"}, r"parameter 'config' 'dsagent-pxe' is reserved: the PXE process"),
    ({"kernel_args": "quiet"},
     r"unknown parameter 'kernel_args' \(BootWizRebuild takes config, base, drivers\)"),
])
def test_bad_parameters_refused_before_running(env, params, message):
    before = snapshot(env["preboot"])
    with pytest.raises(BadParameters, match=message):
        run(env, **params)
    assert snapshot(env["preboot"]) == before


@pytest.mark.parametrize("missing", ["package_store", "preboot_store"])
def test_store_config_needed(env, missing):
    with pytest.raises(BadParameters, match=rf"needs \[handlers\] {missing}"):
        run(env, cfg={missing: None})


def test_disk_full_while_writing_the_initrd(env, monkeypatch):
    first, _ = run(env)
    before = snapshot(env["preboot"], env["sbs"])
    real_write = os.write
    written = [0]

    def filling(fd, data):
        written[0] += len(data)
        if written[0] > 8000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", filling)
    with pytest.raises(TaskFailed, match=r"building linux-auto failed: no space left on device"):
        run(env)
    monkeypatch.undo()
    assert snapshot(env["preboot"], env["sbs"]) == before
    assert current(env) == first["version"]


def test_switching_current_fails_no_new_version_visible(env, monkeypatch):
    first, _ = run(env)
    before = snapshot(env["preboot"], env["sbs"])
    real_replace = os.replace

    def refuse(src, dst, *a, **k):
        if str(dst).endswith("current"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(dst))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(TaskFailed, match=r"building linux-auto failed: Input/output error"):
        run(env)
    monkeypatch.undo()
    assert snapshot(env["preboot"], env["sbs"]) == before


def test_unwritable_preboot_store(env, monkeypatch):
    real_mkdir = os.mkdir

    def denied(path, *a, **k):
        if str(path).startswith(str(env["preboot"])):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_mkdir(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", denied)
    with pytest.raises(TaskFailed, match=r"cannot create .*linux-auto: permission denied"):
        run(env)
    monkeypatch.undo()
    assert not (env["preboot"] / "linux-auto").exists()


def test_cancel_while_building_leaves_nothing(env):
    first, _ = run(env)
    before = snapshot(env["preboot"], env["sbs"])
    req = plugin.request_from({"config": "linux-auto", "base": "debian12",
                               "drivers": "e1000e,intel-bt"}, env["config"])
    seen = []

    def report(pct, msg="", **d):
        seen.append(pct)

    with pytest.raises(Cancelled):
        rb.rebuild(req, report, cancelled=lambda: bool(seen) and seen[-1] is not None
                   and seen[-1] > 40)
    assert snapshot(env["preboot"], env["sbs"]) == before


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_real_full_disk_on_a_small_tmpfs(env, small_tmpfs, tmp_path):
    make_base(small_tmpfs, tmp=tmp_path)
    cfg = {"preboot_store": str(small_tmpfs)}
    first, _ = run(env, cfg=cfg, drivers="e1000e")
    make_package(env["pkgs"], "big", {"lib/firmware/big.bin": os.urandom(2 << 20)})
    before = snapshot(small_tmpfs, env["sbs"])
    with pytest.raises(TaskFailed, match=r"no space left on device"):
        run(env, cfg=cfg, drivers="e1000e,big")
    assert snapshot(small_tmpfs, env["sbs"]) == before
    assert os.readlink(small_tmpfs / "linux-auto" / "current") == first["version"]
    # space is back: the next build works
    second, _ = run(env, cfg=cfg, drivers="e1000e")
    assert second["previous"] == first["version"]


def test_read_only_preboot_store(env, small_tmpfs, tmp_path):
    make_base(small_tmpfs, tmp=tmp_path)
    cfg = {"preboot_store": str(small_tmpfs)}
    first, _ = run(env, cfg=cfg, drivers="e1000e")
    before = snapshot(small_tmpfs, env["sbs"])
    done = subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot remount the tmpfs read-only")
    with pytest.raises(TaskFailed, match=r"read-only file system"):
        run(env, cfg=cfg, drivers="e1000e")
    assert snapshot(small_tmpfs, env["sbs"]) == before


# ---------------------------------------------------------------------------
# the newc reader and writer
# ---------------------------------------------------------------------------
def test_writer_output_is_read_by_cpio_and_by_the_reader(tmp_path):
    path = tmp_path / "a.cpio"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    out = Output(fd)
    writer = NewcWriter(out)
    writer.add_directory("etc", 1_700_000_000)
    writer.add_file("etc/odd-name.txt", 5, 1_700_000_000, 0o644, [b"ab", b"cde"])
    writer.add_file("etc/empty", 0, 1_700_000_000, 0o755, [])
    writer.close()
    out.flush()
    os.close(fd)
    assert out.offset % 4 == 0
    data = path.read_bytes()
    assert cpio_list(data) == ["etc", "etc/odd-name.txt", "etc/empty"]
    assert [(e.name, oct(e.mode), e.size) for e in scan_initrd(path).entries] == [
        ("etc", "0o40755", 0), ("etc/odd-name.txt", "0o100644", 5), ("etc/empty", "0o100755", 0)]
    with pytest.raises(CpioError, match="grew while"):
        NewcWriter(Output(os.open(os.devnull, os.O_WRONLY))).add_file("x", 1, 0, 0o644, [b"ab"])


def test_reader_refuses_misaligned_second_archive_and_other_compressions(tmp_path):
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "f").write_bytes(b"x")
    path = tmp_path / "initrd"
    path.write_bytes(newc_of(tree))
    archive = path.read_bytes()[:scan_initrd(path).parts[0].end]  # without cpio's block padding
    assert len(archive) % 4 == 0
    path.write_bytes(archive + b"\0" * 2 + archive)
    with pytest.raises(CpioError, match="not 4-byte aligned"):
        scan_initrd(path)
    path.write_bytes(archive + b"\0" * 4 + archive)
    assert len(scan_initrd(path).parts) == 2
    path.write_bytes(b"\xfd7zXZ\0" + os.urandom(50))
    with pytest.raises(CpioError, match="xz-compressed data at offset 0; only plain or gzip"):
        scan_initrd(path)
    path.write_bytes(b"\0" * 64)
    with pytest.raises(CpioError, match="holds no cpio archive"):
        scan_initrd(path)


# ---------------------------------------------------------------------------
# end to end: reference server -> tickle -> agent -> handler -> status
# ---------------------------------------------------------------------------
def test_end_to_end_through_the_loopback_chain(env, tmp_path):
    from taskserver.loopback import LoopbackChain

    handlers = {k: v for k, v in env["config"].items() if v is not None}
    with LoopbackChain(tmp_path / "chain", handlers=handlers) as chain:
        good = chain.queue("BootWizRebuild", {"config": "linux-auto", "base": "debian12",
                                              "drivers": "e1000e,intel-bt"})
        bad = chain.queue("BootWizRebuild", {"config": "linux-auto", "base": "debian12",
                                             "drivers": "r8169"})
        chain.tickle()
        assert chain.wait([good, bad], 60)
        good_events, bad_events = chain.events(good), chain.events(bad)
    final = good_events[-1]
    assert final["state"] == "succeeded", final
    version = final["details"]["version"]
    folder = env["preboot"] / "linux-auto" / version
    assert final["details"]["initrd_sha256"] == sha((folder / "initrd.img").read_bytes())
    assert any(e["state"] == "progress" for e in good_events)
    sbs_files = os.listdir(env["sbs"])
    assert len(sbs_files) == 1 and sbs_files[0].endswith(".sbs")
    assert f'version="{version}"' in (env["sbs"] / sbs_files[0]).read_text()
    assert final["details"]["pxe_update"]["file"] == str(env["sbs"] / sbs_files[0])
    assert bad_events[-1]["state"] == "failed"
    assert "driver package 'r8169' has not replicated yet" in bad_events[-1]["message"]
    assert current(env) == version


def test_the_reserved_name_is_the_pxe_process_folder():
    from agent.pxe.bootfiles import BOOT_DIR
    from handlers.bootwiz.plugin import PXE_FOLDER

    assert PXE_FOLDER == BOOT_DIR
