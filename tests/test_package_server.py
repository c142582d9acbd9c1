"""The package server (agent/packages/, issue #15; docs/package-server.md): a
site server serves its driver packages and images read-only over HTTP, as the
source of truth of ReplicatePackage. The real process (``python -m
agent.packages``) on a loopback port, real sockets, no mocks: generated and
replicated manifests, ranges, what is refused, images offered only when
complete, ReplicatePackage (the real dispatch) copying a driver package and a
captured image from it byte for byte, and ``dsagent run`` starting it."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import wait_until
from agent.common.config import load_config
from agent.common.errors import ConfigError
from agent.common.statusfile import read_all
from agent.packages.checks import check_server
from agent.packages.manifests import HashCache, make_manifest
from taskserver.loopback import LoopbackChain, free_port, wait_port

VERSION = "20260101T000000000000Z-0001"
NEXT = "20260102T000000000000Z-0002"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_tree(folder: Path, files: dict[str, bytes]) -> None:
    for path, data in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)


def tree(folder: Path) -> dict[str, bytes]:
    """Every regular file under ``folder`` (symlinks followed), but manifest.json."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def write_config(path: Path, state: Path, port: int, **handlers: str) -> Path:
    lines = ["[agent]", 'server_url = "http://127.0.0.1:9"', f'state_dir = "{state}"',
             "", "[handlers]", *(f'{k} = "{v}"' for k, v in handlers.items()),
             "", "[packages]", f'listen = "127.0.0.1:{port}"', ""]
    path.write_text("\n".join(lines))
    return path


class Site:
    """A package server process serving ``packages`` and ``images``."""

    def __init__(self, root: Path):
        self.packages, self.images = root / "packages", root / "images"
        self.packages.mkdir()
        self.images.mkdir()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.state = root / "state"
        self.config = write_config(root / "agent.toml", self.state, self.port,
                                   package_store=str(self.packages),
                                   image_store=str(self.images))
        self.log = root / "packages.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent.packages", "--config", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        if not wait_port(self.port, 20):
            self.proc.kill()
            raise RuntimeError(f"the package server did not start: {self.log.read_text()}")
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def get(self, path: str, **kwargs) -> httpx.Response:
        return self.http.get(path, **kwargs)

    def manifest(self, kind: str, pid: str) -> dict:
        answer = self.get(f"{kind}/{pid}/manifest.json")
        assert answer.status_code == 200, answer.text
        return answer.json()

    def raw(self, target: str, method: str = "GET") -> tuple[int, bytes]:
        """One request with ``target`` sent as is (no client normalises its dots)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                         .encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    def stop(self) -> int:
        self.http.close()
        self.proc.terminate()
        return self.proc.wait(timeout=15)


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path)
    yield s
    if s.proc.poll() is None:
        assert s.stop() == 0, s.log.read_text()


def driver_files() -> dict[str, bytes]:
    return {"e1000e.ko": os.urandom(200_000), "firmware/e1000.bin": os.urandom(70_000),
            "README": b"intel e1000e\n"}


def image_files(version: str, size: int = 50_000) -> dict[str, bytes]:
    return {f"{version}/data.zst": os.urandom(size), f"{version}/index.bin": os.urandom(512),
            f"{version}/meta.json": json.dumps({"format": "dsagent-image/1"}).encode()}


def entries(files: dict[str, bytes]) -> list[dict]:
    return [{"path": p, "sha256": sha(d), "size": len(d)} for p, d in sorted(files.items())]


# ---- manifests ---------------------------------------------------------------------------
def test_a_package_placed_by_hand_gets_a_generated_manifest(site, tmp_path):
    files = driver_files()
    folder = site.packages / "nic-e1000"
    write_tree(folder, {**files, ".hidden": b"x", ".git/config": b"y", "sub/.dot": b"z"})
    (folder / "alias.ko").symlink_to("e1000e.ko")                 # inside: listed
    (tmp_path / "secret").write_bytes(b"not a driver")
    (folder / "leak").symlink_to(tmp_path / "secret")             # leaves the folder: not
    (folder / "linked-dir").symlink_to(folder / "firmware")       # a folder symlink: not walked
    manifest = site.manifest("drivers", "nic-e1000")
    assert manifest == {"id": "nic-e1000",
                        "files": entries({**files, "alias.ko": files["e1000e.ko"]})}
    first = site.get("drivers/nic-e1000/manifest.json").content
    assert site.get("drivers/nic-e1000/manifest.json").content == first   # deterministic
    for path, data in files.items():
        assert site.get(f"drivers/nic-e1000/{path}").content == data

    changed = os.urandom(200_001)                 # a new size and mtime: hashed again
    (folder / "e1000e.ko").write_bytes(changed)
    again = {e["path"]: e for e in site.manifest("drivers", "nic-e1000")["files"]}
    assert again["e1000e.ko"] == {"path": "e1000e.ko", "sha256": sha(changed), "size": 200_001}
    assert site.get("").json() == {"drivers": ["nic-e1000"], "images": []}
    assert site.get("drivers/").json() == {"drivers": ["nic-e1000"]}
    log = site.log.read_text()
    assert "manifest of driver package 'nic-e1000' generated: 4 file(s)" in log
    assert log.count("manifest of driver package 'nic-e1000' generated") == 2   # not per request
    assert "(200001 newly hashed)" in log        # only the changed file was read again


def test_a_replicated_package_serves_its_own_manifest_byte_for_byte(site):
    files = driver_files()
    version = site.packages / ".replicas" / "nic" / "20260101T000000Z-abcdef"
    write_tree(version, files)
    own = json.dumps({"id": "nic", "files": entries(files)}, indent=3).encode() + b"\n\n"
    (version / "manifest.json").write_bytes(own)
    (site.packages / "nic").symlink_to(Path(".replicas") / "nic" / version.name)
    answer = site.get("drivers/nic/manifest.json")
    assert answer.status_code == 200 and answer.content == own
    assert answer.headers["content-type"].startswith("application/json")
    assert site.get("drivers/nic/firmware/e1000.bin").content == files["firmware/e1000.bin"]
    assert site.get("").json()["drivers"] == ["nic"]         # .replicas is not a package


def test_a_range_request_gets_206_and_the_bytes_from_there(site):
    data = os.urandom(100_000)
    write_tree(site.packages / "p", {"big.bin": data})
    answer = site.get("drivers/p/big.bin", headers={"Range": "bytes=40000-"})
    assert answer.status_code == 206 and answer.content == data[40000:]
    assert answer.headers["content-range"] == "bytes 40000-99999/100000"
    head = site.http.head("drivers/p/big.bin")
    assert head.status_code == 200 and head.headers["content-length"] == "100000"
    assert head.headers["accept-ranges"] == "bytes" and head.headers.get("etag")
    assert site.get("drivers/p/big.bin", headers={"Range": "bytes=100000-"}).status_code == 416


def test_hidden_paths_dots_and_escaping_symlinks_are_404(site, tmp_path):
    write_tree(site.packages / "p", {"ok.bin": b"ok", ".secret": b"s", "d/.partial/x": b"p"})
    write_tree(site.packages / ".replicas" / "q" / "v1", {"f": b"f", "manifest.json": b"{}"})
    outside = tmp_path / "outside"
    write_tree(outside, {"passwd": b"root:x:0:0", "manifest.json": b"{}"})
    (site.packages / "escape").symlink_to(outside)                # a package leaving the store
    (site.packages / "p" / "leak").symlink_to(outside / "passwd")  # a file leaving its package
    os.mkfifo(site.packages / "p" / "fifo")                       # would hang a reader
    assert site.get("drivers/p/ok.bin").status_code == 200
    for target in ("/drivers/p/.secret", "/drivers/p/d/.partial/x",
                   "/drivers/.replicas/q/v1/f", "/drivers/.replicas/q/v1/manifest.json",
                   "/drivers/p/../p/ok.bin", "/drivers/p/%2e%2e/p/ok.bin",
                   "/drivers/../packages/p/ok.bin", "/drivers/p/d//x", "/drivers/p/",
                   "/drivers/escape/passwd", "/drivers/escape/manifest.json",
                   "/drivers/p/leak", "/drivers/p/fifo", "/drivers/p/d",
                   "/drivers/%2e%2e/p/ok.bin", "/drivers/p%2f..%2f..%2fetc/passwd",
                   "/images/p/ok.bin", "/other/p/ok.bin"):
        status, body = site.raw(target)
        assert status == 404, (target, body)
        assert b"root:x" not in body
    assert site.raw("/drivers/p/ok.bin", "POST")[0] == 405
    assert site.raw("/drivers/p/ok.bin", "DELETE")[0] == 405
    assert (site.packages / "p" / "ok.bin").read_bytes() == b"ok"


def test_an_image_lists_current_and_its_complete_version_only(site):
    image = site.images / "golden"
    old, current = image_files(VERSION), image_files(NEXT)
    in_progress = {f"{k.split('/')[0]}-capturing/{k.split('/')[1]}": v
                   for k, v in image_files("20260103T000000000000Z-0003").items()
                   if not k.endswith("meta.json")}
    write_tree(image, {**old, **current, **in_progress, ".lock": b"",
                       "current": f"{NEXT}\n".encode()})
    manifest = site.manifest("images", "golden")
    assert manifest == {"id": "golden",
                        "files": entries({**current, "current": f"{NEXT}\n".encode()})}
    assert site.get(f"images/golden/{NEXT}/data.zst").content == current[f"{NEXT}/data.zst"]
    assert site.get("images/golden/current").content == f"{NEXT}\n".encode()
    capturing = next(iter(in_progress))
    assert site.get(f"images/golden/{capturing}").status_code == 404   # never served
    assert site.get("images/golden/.lock").status_code == 404


def test_an_image_whose_current_version_is_incomplete_is_503_saying_why(site):
    """Not 404: a replica would take that as deleted at the source."""
    image = site.images / "half"
    files = image_files(VERSION)
    del files[f"{VERSION}/meta.json"]
    write_tree(image, {**files, "current": f"{VERSION}\n".encode()})
    answer = site.get("images/half/manifest.json")
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "60"
    assert f"its current version {VERSION} has no meta.json" in answer.text
    assert "capture in progress is never offered" in answer.text

    write_tree(site.images / "first", image_files(VERSION))           # no `current` yet
    answer = site.get("images/first/manifest.json")
    assert answer.status_code == 503 and "has no complete version yet" in answer.text
    assert site.get(f"images/first/{VERSION}/data.zst").status_code == 200  # complete, though
    assert site.log.read_text().count("has no meta.json") == 1        # said once, not per ask
    site.get("images/half/manifest.json")
    assert site.log.read_text().count("has no meta.json") == 1


def test_current_switching_while_the_files_are_hashed_makes_the_manifest_again(tmp_path):
    image = tmp_path / "golden"
    write_tree(image, {**image_files(VERSION), **image_files(NEXT),
                       "current": f"{VERSION}\n".encode()})

    class CaptureFinishing(HashCache):
        """A cache during whose first read of data.zst a capture switches `current`."""
        switched = False

        def digest(self, path):
            if not self.switched and path.endswith("data.zst"):
                self.switched = True
                (image / "current").write_text(f"{NEXT}\n")
            return super().digest(path)

    made, skipped = make_manifest("images", "golden", str(image), CaptureFinishing())
    assert json.loads(made.body)["files"] == entries(
        {**image_files_on_disk(image, NEXT), "current": f"{NEXT}\n".encode()})
    assert skipped == []


def image_files_on_disk(image: Path, version: str) -> dict[str, bytes]:
    return {f"{version}/{p.name}": p.read_bytes() for p in (image / version).iterdir()}


# ---- end to end: ReplicatePackage from this server --------------------------------------
def test_replicate_package_copies_a_driver_package_and_a_captured_image(
        site, dsagent_run, tmp_path):
    files = driver_files()
    write_tree(site.packages / "nic-e1000", files)
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(1 << 20) + bytes(2 << 20) + os.urandom(1 << 20))
    made = dsagent_run("CreateImage", {"source": str(disk), "image": "golden"},
                       handlers={"image_store": str(site.images)}, wait_s=60)
    assert made.state == "succeeded", made.log
    replica = tmp_path / "replica"
    (replica / "packages").mkdir(parents=True)
    (replica / "images").mkdir()
    handlers = {"package_store": str(replica / "packages"), "image_store": str(replica / "images")}

    for kind, store, pid in (("driver", "drivers", "nic-e1000"), ("image", "images", "golden")):
        run = dsagent_run("ReplicatePackage", {"package": pid, "kind": kind,
                                               "source": f"{site.url}{store}/{pid}/"},
                          handlers=handlers, wait_s=60)
        assert run.state == "succeeded", run.log
        served = site.get(f"{store}/{pid}/manifest.json").content
        here = replica / ("packages" if kind == "driver" else "images") / pid
        assert (here / "manifest.json").read_bytes() == served
        source = site.packages / pid if kind == "driver" else site.images / pid
        expected = tree(source) if kind == "driver" else {
            p: d for p, d in tree(source).items()
            if p == "current" or p.startswith(source.joinpath("current").read_text().strip())}
        assert tree(here) == expected and run.details["files"] == len(expected)
    assert set(tree(replica / "images" / "golden")) == {"current", *(
        f"{(site.images / 'golden' / 'current').read_text().strip()}/{n}"
        for n in ("data.zst", "index.bin", "meta.json"))}

    again = dsagent_run("ReplicatePackage", {"package": "golden", "kind": "image",
                                             "source": f"{site.url}images/golden/"},
                        handlers=handlers, wait_s=60)
    assert again.details.get("unchanged") is True, again.log   # the same manifest, byte for byte


# ---- config, doctor, supervisor ----------------------------------------------------------
@pytest.mark.parametrize("handlers, packages, message", [
    ({"package_store": "/srv/p"}, 'listen = "nowhere"', "[packages] listen: expected HOST:PORT"),
    ({"image_store": "https://ns.example/images/"}, "",
     "[packages] needs [handlers] package_store, or image_store"),
    ({}, 'listen = "127.0.0.1:1"', "[packages] needs"),
    ({"package_store": "/srv/p"}, "port = 1", "unknown key 'port' in [packages]"),
])
def test_a_bad_packages_section_is_refused(tmp_path, handlers, packages, message):
    config = tmp_path / "agent.toml"
    config.write_text('[agent]\nserver_url = "http://127.0.0.1:9"\nstate_dir = "/tmp/x"\n'
                      "[handlers]\n" + "".join(f'{k} = "{v}"\n' for k, v in handlers.items())
                      + f"[packages]\n{packages}\n")
    with pytest.raises(ConfigError, match="agent.toml: " + message.replace("[", r"\[")):
        load_config(config)


def test_the_doctor_row_says_whether_it_answers(site):
    config = load_config(site.config)
    wait_until(lambda: read_all(site.state).get("packages", {}).get("serving"), 10,
               "the status file")
    found = check_server(config)
    assert found.status == "ok" and "127.0.0.1:" in found.finding, found
    assert site.stop() == 0
    found = check_server(config)
    assert found.status == "fail" and "stopped" in found.finding, found


def packages_child(chain: LoopbackChain) -> psutil.Process | None:
    for proc in psutil.Process(chain.agent.pid).children():
        try:
            if proc.cmdline()[-3:-2] == ["agent.packages"]:
                return proc
        except psutil.NoSuchProcess:
            pass
    return None


def test_dsagent_run_with_packages_starts_the_package_server(tmp_path, monkeypatch):
    monkeypatch.setenv("DSAGENT_RESTART_BACKOFF_MAX_S", "0.2")
    store = tmp_path / "packages"
    write_tree(store / "nic", {"a.bin": b"a" * 1000})
    port = free_port()
    chain = LoopbackChain(tmp_path / "chain", handlers={"package_store": str(store)},
                          extra_config=f'[packages]\nlisten = "127.0.0.1:{port}"\n')
    with chain:
        assert wait_port(port, 20), chain.log_path.read_text()
        url = f"http://127.0.0.1:{port}/"
        assert httpx.get(url).json() == {"drivers": ["nic"]}
        first = wait_until(lambda: packages_child(chain), 10, "the packages child")
        wait_until(lambda: read_all(chain.workdir / "state")["dsagent"]["children"]
                   ["packages"]["pid"] == first.pid, 10, "dsagent status naming the child")

        first.send_signal(signal.SIGKILL)                  # restarted, with back-off
        second = wait_until(lambda: (c := packages_child(chain)) and c.pid != first.pid and c,
                            10, "the packages child restarted")
        assert wait_port(port, 10)
        manifest = wait_until(lambda: httpx.get(url + "drivers/nic/manifest.json").json(), 10,
                              "the manifest from the restarted server")
        assert manifest["files"] == [{"path": "a.bin", "sha256": sha(b"a" * 1000),
                                      "size": 1000}]
    assert not second.is_running() or second.status() == psutil.STATUS_ZOMBIE
    assert "packages exited" in chain.log_path.read_text() or \
        "packages killed by signal 9" in chain.log_path.read_text()
