"""ReplicatePackage (PROTOCOL.md §4, issue #15): a package made equal to its
source of truth over real HTTP on loopback, through the real dispatch
(``dsagent_run``): only what changed is fetched, a cut connection resumes, a
byte corrupted on the wire is caught and fetched again, deletions follow the
source, a bad manifest changes nothing, and a reader keeps the version it
found (handlers/replication/)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from handlers.bootwiz.packages import PackageChecker
from handlers.replication.manifest import ManifestError, parse_manifest
from replicationlab import PKG, Source, source  # noqa: F401 (a fixture)



@pytest.fixture
def store(tmp_path) -> Path:
    """The site server's package store (empty)."""
    folder = tmp_path / "packages"
    folder.mkdir()
    return folder


def files_v1() -> dict[str, bytes]:
    return {"e1000.ko": os.urandom(300_000), "firmware/e1000.bin": os.urandom(120_000),
            "README": b"intel e1000\n", "empty.conf": b""}


def replicate(dsagent_run, store: Path, url: str, **handlers):
    run = dsagent_run("ReplicatePackage", {"package": PKG, "kind": "driver", "source": url},
                      handlers={"package_store": str(store), **handlers}, wait_s=120)
    return run


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def test_a_driver_package_replicates_and_bootwiz_accepts_it(dsagent_run, source, store):
    files = files_v1()
    source.write(files)
    run = replicate(dsagent_run, store, source.url())
    assert run.states[-1] == "succeeded", run.log
    assert run.details["files"] == 4 and run.details["bytes_reused"] == 0
    assert run.details["bytes_fetched"] == sum(map(len, files.values()))
    assert (store / PKG).is_symlink() and tree(store / PKG) == files
    checker = PackageChecker(str(store), lambda: False, lambda n: None)
    assert len(checker.check(PKG)) == 4 and checker.problems == []

    again = replicate(dsagent_run, store, source.url())            # nothing changed
    assert again.details.get("unchanged") is True and again.details["bytes_fetched"] == 0


def test_a_changed_file_is_the_only_one_fetched_and_a_reader_keeps_its_version(
        dsagent_run, source, store):
    files = files_v1()
    source.write(files)
    replicate(dsagent_run, store, source.url())
    reader = (store / PKG).resolve()                 # BootWiz resolves the folder once
    old_ko = (reader / "e1000.ko").stat().st_ino
    files["firmware/e1000.bin"] = os.urandom(130_000)
    del files["README"]                              # gone at the source: gone here
    source.write(files)
    run = replicate(dsagent_run, store, source.url())
    assert run.states[-1] == "succeeded", run.log
    assert run.details["files_fetched"] == ["firmware/e1000.bin"]
    assert run.details["bytes_fetched"] == 130_000 and run.details["bytes_reused"] == 300_000
    assert tree(store / PKG) == files
    assert (store / PKG / "e1000.ko").stat().st_ino == old_ko        # linked, not copied
    assert (reader / "README").exists() and len((reader / "firmware/e1000.bin").read_bytes()) \
        == 120_000                                   # the reader's version is still whole


def test_a_cut_connection_resumes_and_a_corrupt_byte_is_fetched_again(
        dsagent_run, source, store):
    files = files_v1()
    source.write(files)
    source.cut[f"{PKG}/e1000.ko"] = 100_000
    source.corrupt[f"{PKG}/firmware/e1000.bin"] = 1
    run = replicate(dsagent_run, store, source.url())
    assert run.states[-1] == "succeeded", run.log
    assert run.details["resumed"] == 1, run.details
    assert tree(store / PKG) == files
    # the resumed file came in two parts (no byte twice), the corrupt one twice
    assert run.details["bytes_fetched"] == sum(map(len, files.values())) + 120_000


def test_a_file_that_keeps_coming_wrong_fails_naming_it_and_changes_nothing(
        dsagent_run, source, store):
    files = files_v1()
    source.write(files)
    replicate(dsagent_run, store, source.url())
    before = (store / PKG).resolve()
    files["e1000.ko"] = os.urandom(300_000)
    source.write(files)
    source.corrupt[f"{PKG}/e1000.ko"] = 5
    run = replicate(dsagent_run, store, source.url())
    assert run.states[-1] == "failed"
    assert "e1000.ko" in run.message and "sha256 differs" in run.message, run.message
    assert (store / PKG).resolve() == before and "e1000.ko" in tree(before)


@pytest.mark.parametrize("path, why", [
    ("/etc/passwd", "absolute"), ("../escape", "contains '..'"), ("a\\b", "backslash"),
    ("README", "repeats another")])
def test_a_bad_manifest_path_is_refused_before_anything_is_written(
        dsagent_run, source, store, path, why):
    source.write({"README": b"x"})
    manifest = json.loads((source.root / PKG / "manifest.json").read_text())
    manifest["files"].append({**manifest["files"][0], "path": path})
    (source.root / PKG / "manifest.json").write_text(json.dumps(manifest))
    run = replicate(dsagent_run, store, source.url())
    assert run.states[-1] == "failed" and why in run.message, run.message
    assert list(store.iterdir()) == []


def _manifest_of(paths) -> bytes:
    return json.dumps({"id": PKG, "files": [{"path": p, "sha256": "0" * 64, "size": 1}
                                            for p in paths]}).encode()


@pytest.mark.parametrize("paths", [["a/b", "a"], ["a", "a/b"], ["x/a/b/c", "x/a"],
                                   ["x/a", "x/a/b/c"]])
def test_a_file_where_another_needs_a_folder_is_refused(paths):
    with pytest.raises(ManifestError, match="is a folder of another file or inside one"):
        parse_manifest(_manifest_of(paths), PKG)


def test_names_sharing_a_prefix_are_not_a_clash():
    paths = ["ab", "a/b", "a/bc", "a/b.d/e", "a/bb/c"] + [f"d{i}/f{i}" for i in range(20_000)]
    assert [f.path for f in parse_manifest(_manifest_of(paths), PKG)] == paths


def test_deletions_follow_the_source(dsagent_run, source, store):
    files = files_v1()
    source.write(files)
    replicate(dsagent_run, store, source.url())
    (store / PKG / "README").unlink()                  # deleted at the replica: back again
    run = replicate(dsagent_run, store, source.url())
    assert run.details["files_fetched"] == ["README"] and tree(store / PKG) == files
    shutil.rmtree(source.root / PKG)                   # deleted at the source: gone here
    run = replicate(dsagent_run, store, source.url())
    assert run.states[-1] == "succeeded" and run.details["deleted"] is True
    assert [p.name for p in store.iterdir() if p.name != ".replicas"] == []
    assert list((store / ".replicas").iterdir()) == []


def test_a_full_disk_fails_clearly_and_the_version_in_place_stays_usable(source, store,
                                                                        tmp_path):
    """The package store on a 1 MiB tmpfs (in a mount namespace of the run's own):
    a first version fits, the next does not; the task fails saying so, and the
    first version is still whole in place."""
    import subprocess
    import sys
    import uuid

    small = files_v1()
    big = {**small, "firmware/huge.bin": os.urandom(1_500_000)}
    source.write(small)
    big_source = Source(tmp_path / "source2")
    big_source.root.mkdir()
    big_source.write(big)
    config = tmp_path / "agent.toml"
    config.write_text(f'[handlers]\npackage_store = "{store}"\n')
    docs = []
    for name, url in (("v1", source.url()), ("v2", big_source.url())):
        doc = tmp_path / f"{name}.xml"
        doc.write_text(f'<ClientTasks><Task id="{uuid.uuid4()}" type="ReplicatePackage">'
                       f'<Parameters><Parameter name="package">{PKG}</Parameter><Parameter '
                       f'name="kind">driver</Parameter><Parameter name="source">{url}'
                       '</Parameter></Parameters></Task></ClientTasks>')
        docs.append(doc)
    check = ("import hashlib,json,pathlib,sys; d=pathlib.Path(sys.argv[1]); print(json.dumps("
             "{str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() "
             "for p in sorted(d.rglob('*')) if p.is_file()}))")
    script = (f'mount -t tmpfs -o size=1m tmpfs {store} && '
              f'"$0" -m agent run-task {docs[0]} --json --config {config}; '
              f'"$0" -m agent run-task {docs[1]} --json --config {config}; '
              f'"$0" -c "$1" {store / PKG}')
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           script, sys.executable, check], capture_output=True, text=True,
                          timeout=120)
    big_source.server.shutdown()
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    finals = [e for e in lines if e.get("state") in ("succeeded", "failed")]
    assert [e["state"] for e in finals] == ["succeeded", "failed"], done.stdout + done.stderr
    assert "no space left on device; the version in place is unchanged" in finals[1]["message"]
    in_place = lines[-1]
    assert {k: v for k, v in in_place.items() if k != "manifest.json"} == {
        p: hashlib.sha256(d).hexdigest() for p, d in small.items()}


def test_replication_kbps_paces_the_download(dsagent_run, source, store):
    """A lower bound only (the limiter's job): 600 kB at 300 kB/s cannot take under 2 s."""
    from datetime import datetime

    source.write({"big.bin": os.urandom(600_000)})
    run = replicate(dsagent_run, store, source.url(), replication_kbps=300)
    assert run.states[-1] == "succeeded", run.message
    at = {e["state"]: datetime.fromisoformat(e["at"].replace("Z", "+00:00")) for e in run.events}
    assert (at["succeeded"] - at["running"]).total_seconds() >= 1.9
    assert run.details["bytes_fetched"] == 600_000


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=12),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.sampled_from(["id", "files", "path", "sha256", "size"])
                                       | st.text(max_size=6), inner, max_size=5), max_leaves=20)
_entry = st.fixed_dictionaries({
    "path": st.text(alphabet="ab/.\\\0 \n", max_size=10) | st.sampled_from(["a", "a/b", ".."]),
    "sha256": st.sampled_from(["0" * 64, "F" * 64, "xyz", ""]) | st.integers(),
    "size": st.integers(min_value=-2, max_value=3) | st.booleans() | st.none()})


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300) | _json.map(lambda v: json.dumps(v).encode())
       | st.lists(_entry, max_size=6).map(
           lambda files: json.dumps({"id": PKG, "files": files}).encode()))
def test_any_manifest_is_taken_whole_or_refused_by_name(raw):
    """The manifest comes from the network: whatever it holds, the parser
    returns checked files or raises ManifestError, never anything else."""
    try:
        files = parse_manifest(raw, PKG)
    except ManifestError as exc:
        assert str(exc)
        return
    paths = [f.path for f in files]
    assert len(set(paths)) == len(paths)
    for f in files:
        assert not f.path.startswith("/") and ".." not in f.path.split("/")
        assert "\\" not in f.path and "\0" not in f.path
        assert len(f.sha256) == 64 and f.size >= 0
