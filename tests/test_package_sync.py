"""Package replication driven by the reference server (issue #15), end to end:
two site servers (two ``dsagent run`` agents) and a package's source of truth
on loopback; ``dsagent-server packages`` queues, tickles and shows; the agents
replicate through the real ReplicatePackage; a rebuild queued with its drivers
runs only after they arrived (taskserver/packages.py, taskserver/chain.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from replicationlab import PKG, source  # noqa: F401 (a fixture)
from taskserver.cli import main as server_cli
from taskserver.loopback import LoopbackChain, free_port, wait_port

KO = "lib/modules/6.1.0/extra/e1000.ko"
FW = "lib/firmware/e1000.bin"


@pytest.fixture
def sites(tmp_path):
    """Two site servers, site-a and site-b, served by one task server; site-a
    serves its packages over HTTP (``site-a``'s ``packages_url``)."""
    chains = []
    for name in ("site-a", "site-b"):
        folder = tmp_path / name
        stores = {key: folder / key for key in ("package_store", "preboot_store",
                                                "image_store")}
        for path in stores.values():
            path.mkdir(parents=True)
        port = free_port()
        chain = LoopbackChain(folder, client_id=name, db=str(tmp_path / "server.db"),
                              handlers={k: str(v) for k, v in stores.items()},
                              extra_config="" if chains else
                              f'[packages]\nlisten = "127.0.0.1:{port}"\n')
        chain.packages_url = f"http://127.0.0.1:{port}/"
        if chains:
            chain.server_url = chains[0].server.url
            chain.start_agent()
        else:
            chain.start()
        chain.wait_first_pull()
        chains.append(chain)
    yield {c.client_id: c for c in chains}
    for chain in reversed(chains):
        chain.stop()


def cli(capsys, db, *args) -> list[list[str]]:
    """Run ``dsagent-server`` in this process; its stdout's tab-separated lines."""
    code = server_cli([*args[:2], "--db", db, *args[2:]])
    out = capsys.readouterr().out
    assert code == 0, out
    return [line.split("\t") for line in out.splitlines() if "\t" in line]


def replicated(chain: LoopbackChain, queued: list[list[str]]) -> dict:
    """Wait for this site server's ReplicatePackage; its succeeded details."""
    (task_id,) = [t for _, client, t in queued if client == chain.client_id]
    assert chain.wait([task_id], 60), chain.log_path.read_text()[-3000:]
    last = chain.events(task_id)[-1]
    assert last["state"] == "succeeded", last
    return last["details"]


def files_at(chain: LoopbackChain) -> dict[str, bytes]:
    folder = Path(chain.handlers["package_store"]) / PKG
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def states(capsys, db) -> dict[str, str]:
    server_cli(["packages", "list", "--db", db, "--json"])
    (package,) = json.loads(capsys.readouterr().out)
    return {h["client_id"]: h["state"] for h in package["holders"]}


def test_a_driver_package_follows_its_source_to_two_site_servers(sites, source, capsys):
    db = str(sites["site-a"].store.db_path)
    files = {KO: os.urandom(400_000), FW: os.urandom(150_000), "README": b"e1000\n"}
    source.write(files)
    queued = cli(capsys, db, "packages", "add", PKG, "--kind", "driver", "--source",
                 source.url(), "--to", "site-a", "--to", "site-b")
    assert sorted(client for _, client, _ in queued) == ["site-a", "site-b"]
    for chain in sites.values():
        assert replicated(chain, queued)["bytes_fetched"] == sum(map(len, files.values()))
        assert files_at(chain) == files
    assert states(capsys, db) == {"site-a": "replicated", "site-b": "replicated"}
    assert cli(capsys, db, "packages", "check") == []          # nothing changed

    # one file changes: only it crosses the wire, to each
    files[FW] = os.urandom(150_000)
    source.write(files)
    queued = cli(capsys, db, "packages", "check")
    for chain in sites.values():
        details = replicated(chain, queued)
        assert details["files_fetched"] == [FW] and details["bytes_fetched"] == 150_000
        assert details["bytes_reused"] == 400_000 + 6
        assert files_at(chain) == files

    # the connection is cut in the middle of the file for one of them: it resumes
    files[KO] = os.urandom(400_000)
    source.write(files)
    source.cut[f"{PKG}/{KO}"] = 100_000
    queued = cli(capsys, db, "packages", "check")
    done = [replicated(chain, queued) for chain in sites.values()]
    assert sorted(d["resumed"] for d in done) == [0, 1]
    assert all(files_at(chain) == files for chain in sites.values())

    # a byte corrupted on the wire, for one of them: caught, fetched again
    files[KO] = os.urandom(400_000)
    source.write(files)
    source.corrupt[f"{PKG}/{KO}"] = 1
    queued = cli(capsys, db, "packages", "check")
    done = [replicated(chain, queued) for chain in sites.values()]
    assert sorted(d["bytes_fetched"] for d in done) == [400_000, 800_000]
    assert all(files_at(chain) == files for chain in sites.values())

    # a file deleted at a replica comes back with the next resync; the other holder
    # (intact) fetches nothing
    site_b = Path(sites["site-b"].handlers["package_store"]) / PKG
    os.unlink(site_b.resolve() / FW)
    queued = cli(capsys, db, "packages", "check", "--resync")
    assert replicated(sites["site-a"], queued)["unchanged"] is True
    assert replicated(sites["site-b"], queued)["files_fetched"] == [FW]
    assert files_at(sites["site-b"]) == files

    # deleted at the source: deleted at both, and shown so
    shutil.rmtree(source.root / PKG)
    queued = cli(capsys, db, "packages", "check")
    for chain in sites.values():
        assert replicated(chain, queued)["deleted"] is True
        assert not (Path(chain.handlers["package_store"]) / PKG).exists()
    assert states(capsys, db) == {"site-a": "deleted", "site-b": "deleted"}


def test_add_drivers_then_rebuild_at_once_runs_in_that_order(sites, source, capsys,
                                                              tmp_path):
    """The seed's failure made impossible: the rebuild is queued before the driver
    package has even started to replicate; it runs after, and its initrd holds
    the new driver files (listed by the real cpio)."""
    from test_bootwiz import cpio, make_base

    site = sites["site-a"]
    db = str(site.store.db_path)
    preboot = Path(site.handlers["preboot_store"])
    make_base(preboot, tmp=tmp_path)
    files = {KO: os.urandom(300_000), FW: os.urandom(90_000)}
    source.write(files)
    source.cut[f"{PKG}/{KO}"] = 50_000          # and it takes a resume to get there
    (replicate,) = cli(capsys, db, "packages", "add", PKG, "--kind", "driver", "--source",
                       source.url(), "--to", "site-a", "--no-tickle")
    rebuild = server_cli(["queue", "--db", db, "--client", "site-a", "--type",
                          "BootWizRebuild", "--param", "config=linux-auto", "--param",
                          "base=debian12", "--param", f"drivers={PKG}", "--tickle"])
    assert rebuild == 0
    rebuild_id = capsys.readouterr().out.split()[0]
    assert site.store.history(task_id=rebuild_id)[0]["state"] == "waiting"
    assert site.wait([replicate[2], rebuild_id], 90), site.log_path.read_text()[-3000:]
    replication, build = site.events(replicate[2]), site.events(rebuild_id)
    assert replication[-1]["state"] == "succeeded" and build[-1]["state"] == "succeeded", build
    assert replication[-1]["details"]["resumed"] == 1
    assert replication[-1]["received_at"] <= build[0]["received_at"]   # after, never before

    folder = preboot / "linux-auto" / build[-1]["details"]["version"]
    manifest = json.loads((folder / "manifest.json").read_text())
    drivers_part = (folder / "initrd.img").read_bytes()[manifest["drivers_offset"]:]
    listing = subprocess.run([cpio(), "-t", "--quiet"], input=drivers_part,
                             capture_output=True, check=True).stdout.decode().split()
    assert {KO, FW} <= set(listing)


def test_an_image_captured_on_a_site_server_is_deployed_from_another(sites, capsys, tmp_path):
    """The seed's case: the image is captured on site-a, whose package server is
    its source of truth (never copied back to the NS first); a deploy on site-b,
    queued before the image is there, waits for its replication."""
    from test_imaging import make_ext4, make_tree, random_file, sha256_file

    site_a, site_b = sites["site-a"], sites["site-b"]
    db = str(site_a.store.db_path)
    disk = make_ext4(tmp_path / "disk.img", 48, make_tree(tmp_path / "tree"))
    captured = site_a.queue("CreateImage", {"source": str(disk), "image": "golden"})
    assert site_a.tickle() == "OK" and site_a.wait([captured], 60)
    assert site_a.events(captured)[-1]["state"] == "succeeded"
    assert wait_port(int(site_a.packages_url.rsplit(":", 1)[1].strip("/")), 30)

    target = random_file(tmp_path / "target.img", 48 * 2**20)
    (replicate,) = cli(capsys, db, "packages", "add", "golden", "--kind", "image", "--source",
                       f"{site_a.packages_url}images/golden/", "--to", "site-b", "--no-tickle")
    deploy = site_b.queue("DeployImage", {"image": "golden", "target": str(target)})
    assert site_b.store.history(task_id=deploy)[0]["state"] == "waiting"
    assert site_a.server.tickle("site-b") == "OK"
    assert site_b.wait([replicate[2], deploy], 90), site_b.log_path.read_text()[-3000:]
    replication, deployed = site_b.events(replicate[2]), site_b.events(deploy)
    assert replication[-1]["state"] == "succeeded", replication[-1]
    assert deployed[-1]["state"] == "succeeded", deployed[-1]
    assert replication[-1]["received_at"] <= deployed[0]["received_at"]
    assert deployed[-1]["details"]["target_sha256"] == sha256_file(disk)
    assert (Path(site_b.handlers["image_store"]) / "golden").is_symlink()   # a replica
