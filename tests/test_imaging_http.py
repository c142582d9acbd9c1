"""Images over HTTP (PROTOCOL.md §8 ``image_store`` as a URL): capture with PUT,
deploy with ranged GETs that resume, against the reference server's store and
a real nginx (``dav_methods PUT``) started here on a free loopback port.

Real mkfs.ext4 disks; every deployed disk passes ``e2fsck -fn`` and holds
the same files (debugfs rdump). nginx missing is a failure naming its Debian
package, not a skip: an ordinary web server being a store is the point.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from handlers.imaging.capture import capture
from handlers.imaging.deploy import deploy
from handlers.imaging.store import VERSION_RE, ImageError, ImageStore, open_store
from taskserver import TaskServer, TaskStore
from test_imaging import (e2fsck_clean, files_of, make_ext4, make_tree, progress_log,
                          random_file, sha256_file)

NGINX = "/usr/sbin/nginx"
NGINX_PACKAGE = "nginx-light"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"nginx exited ({proc.returncode}): "
                        f"{log.read_text() if log.exists() else proc.stderr.read()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    pytest.fail(f"nginx did not listen on 127.0.0.1:{port} within {timeout} s")


NGINX_CONF = """\
{user}worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    sendfile on;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{
            dav_methods PUT;
            create_full_put_path on;
            client_max_body_size 0;
            dav_access user:rw group:r all:r;
        }}
        location /readonly/ {{ alias {root}/; }}
        location /forbidden/ {{ deny all; }}
    }}
}}
"""


@pytest.fixture
def nginx(tmp_path):
    """nginx serving ``root`` (GET with Range, PUT) on a free loopback port:
    yields (base URL, root folder). Its own config, prefix folder and logs;
    stopped (SIGTERM to its master, which we started) afterwards."""
    if not os.access(NGINX, os.X_OK):
        pytest.fail(f"nginx is not installed ({NGINX} missing): install the Debian package "
                    f"{NGINX_PACKAGE} (apt-get install -y {NGINX_PACKAGE}; make test does it)")
    prefix, root = tmp_path / "nginx", tmp_path / "www"
    prefix.mkdir()
    root.mkdir()
    for attempt in range(3):
        port = free_port()
        conf = prefix / "nginx.conf"
        user = "user root root;\n" if os.geteuid() == 0 else ""
        conf.write_text(NGINX_CONF.format(user=user, prefix=prefix, root=root, port=port))
        proc = subprocess.Popen([NGINX, "-p", str(prefix), "-e", str(prefix / "error.log"),
                                 "-c", str(conf)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            wait_port(port, proc, prefix / "error.log")
            break
        except BaseException:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(10)
            if attempt == 2 or "Address already in use" not in (prefix / "error.log").read_text():
                raise
    try:
        yield f"http://127.0.0.1:{port}", root
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def refserver(tmp_path):
    """The reference task server with an image store: yields (server, URL to
    write with (an enrolled client's id:token), URL to read with (no credentials))."""
    db = TaskStore(str(tmp_path / "server.db"))
    token = db.enroll("imager")["token"]
    folder = tmp_path / "refstore"
    folder.mkdir()
    server = TaskServer(db, image_store=str(folder)).start()
    host = server.url.split("//", 1)[1]
    try:
        yield server, f"http://imager:{token}@{host}/images/", f"{server.url}/images/"
    finally:
        server.stop()
        db.close()


def layout(folder: Path) -> list[str]:
    """The files of an image store, versions named V (to compare layouts)."""
    names = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            parts = list(path.relative_to(folder).parts)
            names.append("/".join("V" if VERSION_RE.fullmatch(p) else p for p in parts))
    return sorted(names)


def check_deployed(target, disk, result, tmp_path, tag):
    assert result["target_sha256"] == sha256_file(disk) == sha256_file(target, os.path.getsize(disk))
    e2fsck_clean(target)
    assert files_of(target, tmp_path / f"out-{tag}") == files_of(disk, tmp_path / f"ref-{tag}")


# -- the reference server's store -------------------------------------------------

def test_capture_to_the_reference_server_and_deploy_from_it(tmp_path, refserver):
    server, write_url, read_url = refserver
    disk = make_ext4(tmp_path / "disk.img", 64, make_tree(tmp_path / "tree"))
    made = capture(str(disk), open_store(write_url), "golden", "capture", progress_log()[1])
    assert made["image_url"].startswith(read_url) and "imager" not in json.dumps(made)
    # the same layout as a local store (.lock aside), nothing temporary left behind
    local = ImageStore(tmp_path / "local")
    (tmp_path / "local").mkdir()
    capture(str(disk), local, "golden", "capture", progress_log()[1])
    assert layout(server.images.root) == [n for n in layout(local.root) if not n.endswith(".lock")]
    server.images.requests.clear()
    target = random_file(tmp_path / "target.img", 80 * 2**20)
    events, report = progress_log()
    result = deploy(open_store(read_url), "golden", "capture", str(target), report)
    check_deployed(target, disk, result, tmp_path, "ref")
    assert events[-1][0] == 100.0 and [p for p, _ in events] == sorted(p for p, _ in events)
    gets = [(path.rsplit("/", 1)[1], rng) for method, path, rng in server.images.requests]
    # current, meta.json whole; index.bin and data.zst in one ranged GET each
    assert gets == [("current", None), ("meta.json", None),
                    ("index.bin", f"bytes=0-{32 + 64 * made['runs'] - 1}"),
                    ("data.zst", f"bytes=0-{made['compressed_size'] - 1}")]
    assert result["http_requests"] == 1 and result["http_resumes"] == 0


def test_a_connection_dropped_mid_deploy_resumes_and_the_disk_is_identical(tmp_path, refserver):
    server, write_url, read_url = refserver
    tree = make_tree(tmp_path / "tree")
    (tree / "more.bin").write_bytes(os.urandom(24 * 2**20))
    disk = make_ext4(tmp_path / "disk.img", 64, tree)
    made = capture(str(disk), open_store(write_url), "img", "capture", progress_log()[1])
    assert made["compressed_size"] > 20 * 2**20
    server.images.fail_after(7 * 2**20, "GET", "/data.zst", times=2)  # cut twice, 7 MiB each
    target = random_file(tmp_path / "target.img", 64 * 2**20)
    events, report = progress_log()
    result = deploy(open_store(read_url), "img", "capture", str(target), report)
    assert result["http_resumes"] == 2 and result["http_requests"] == 3
    ranges = [rng for method, path, rng in server.images.requests
              if method == "GET" and path.endswith("data.zst")]
    end = made["compressed_size"] - 1
    assert ranges == [f"bytes=0-{end}", f"bytes={7 * 2**20}-{end}", f"bytes={14 * 2**20}-{end}"]
    assert [p for p, _ in events] == sorted(p for p, _ in events) and events[-1][0] == 100.0
    check_deployed(target, disk, result, tmp_path, "resumed")


def test_a_corrupt_byte_on_the_server_fails_naming_the_run_and_the_image(tmp_path, refserver):
    server, write_url, read_url = refserver
    disk = make_ext4(tmp_path / "disk.img", 64, make_tree(tmp_path / "tree"))
    capture(str(disk), open_store(write_url), "img", "capture", progress_log()[1])
    data = next(server.images.root.glob("img/*/data.zst"))
    with open(data, "r+b") as fh:
        fh.seek(os.path.getsize(data) // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))
    target = random_file(tmp_path / "target.img", 64 * 2**20)
    with pytest.raises(ImageError) as caught:
        deploy(open_store(read_url), "img", "capture", str(target), progress_log()[1])
    message = str(caught.value)
    assert message.startswith(f"image 'img' ({read_url}img/")
    assert "data.zst): frame " in message and "fails its sha256 check" in message
    assert " (run " in message or " (runs " in message


def test_a_capture_whose_upload_fails_leaves_no_metadata_and_the_old_version(tmp_path, refserver):
    server, write_url, read_url = refserver
    disk = random_file(tmp_path / "disk.img", 24 * 2**20)
    first = capture(str(disk), open_store(write_url), "img", "capture", progress_log()[1])
    other = random_file(tmp_path / "other.img", 24 * 2**20)
    for name in ("img", "fresh"):
        # the empty PUT that checks access comes first; the data's PUT is cut at 6 MiB
        server.images.fail_after(6 * 2**20, "PUT", "/data.zst")
        with pytest.raises(ImageError, match=rf"PUT {read_url}{name}/\d{{8}}T\d+Z-[0-9a-f]{{4}}"
                                             r"/data\.zst: .*(closed|reset) the connection"):
            capture(str(other), open_store(write_url), name, "capture", progress_log()[1])
    root = server.images.root
    assert [p.parent.name for p in root.rglob("meta.json")] == [first["version"]]
    assert not [p for p in root.rglob(".put-*")]              # the cut PUT left nothing
    assert (root / "img" / "current").read_text().strip() == first["version"]
    target = random_file(tmp_path / "target.img", 24 * 2**20)
    result = deploy(open_store(read_url), "img", "capture", str(target), progress_log()[1])
    assert result["version"] == first["version"] and result["target_sha256"] == sha256_file(disk)
    with pytest.raises(ImageError, match=r"image 'fresh' is not complete: .*fresh/current is "
                                         r"missing \(its capture did not finish\)"):
        deploy(open_store(read_url), "fresh", "capture", str(target), progress_log()[1])


def test_errors_name_the_url_and_what_happened(tmp_path, refserver):
    server, write_url, read_url = refserver
    disk = make_ext4(tmp_path / "disk.img", 16)
    target = random_file(tmp_path / "target.img", 16 * 2**20)
    with pytest.raises(ImageError, match=rf"image 'nope' does not exist in {read_url}"):
        deploy(open_store(read_url), "nope", "capture", str(target), progress_log()[1])
    with pytest.raises(ImageError, match=rf"PUT {read_url}img/.*/data.zst: HTTP 401 "
                                         r"Unauthorized: the server wants credentials"):
        capture(str(disk), open_store(read_url), "img", "capture", progress_log()[1])
    wrong = write_url.replace("imager:", "imager:x")
    with pytest.raises(ImageError, match="HTTP 401") as caught:
        capture(str(disk), open_store(wrong), "img", "capture", progress_log()[1])
    assert "imager" not in str(caught.value)                  # no credentials in a message
    assert not list(server.images.root.rglob("*.*"))          # nothing was stored
    closed = free_port()
    started = time.monotonic()
    with pytest.raises(ImageError, match=rf"connection refused by 127.0.0.1:{closed}"):
        deploy(open_store(f"http://127.0.0.1:{closed}/images/"), "img", "capture", str(target),
               progress_log()[1])
    assert time.monotonic() - started < 2                     # no retries for a refused start
    host = read_url.split("//", 1)[1]
    with pytest.raises(ImageError, match=r"TLS with 127.0.0.1:\d+ failed: .*WRONG_VERSION_NUMBER"
                                         r".*is it an http:// server"):
        deploy(open_store(f"https://{host}"), "img", "capture", str(target), progress_log()[1])


# -- nginx ------------------------------------------------------------------------

def test_nginx_is_a_store_both_ways_and_a_local_image_copied_there_deploys(tmp_path, nginx):
    url, root = nginx
    disk = make_ext4(tmp_path / "disk.img", 64, make_tree(tmp_path / "tree"))
    made = capture(str(disk), open_store(f"{url}/images/"), "golden", "capture",
                   progress_log()[1])
    assert (root / "images" / "golden" / "current").read_text().strip() == made["version"]
    target = random_file(tmp_path / "target.img", 64 * 2**20)
    result = deploy(open_store(f"{url}/images"), "golden", "capture", str(target),
                    progress_log()[1])
    check_deployed(target, disk, result, tmp_path, "nginx")
    # a local capture copied as is onto the web server deploys from it ...
    local = tmp_path / "local"
    local.mkdir()
    capture(str(disk), ImageStore(local), "copied", "backup", progress_log()[1])
    shutil.copytree(local / "copied", root / "images" / "copied")
    target2 = random_file(tmp_path / "target2.img", 64 * 2**20)
    result = deploy(open_store(f"{url}/images/"), "copied", "backup", str(target2),
                    progress_log()[1])
    assert result["target_sha256"] == sha256_file(disk)
    # ... and what was captured onto nginx deploys from a local copy of its folder
    shutil.copytree(root / "images" / "golden", local / "golden")
    result = deploy(ImageStore(local), "golden", "capture", str(target2), progress_log()[1])
    assert result["target_sha256"] == sha256_file(disk)


def test_nginx_half_uploaded_images_are_refused_as_not_complete(tmp_path, nginx):
    url, root = nginx
    disk = make_ext4(tmp_path / "disk.img", 16)
    local = tmp_path / "local"
    local.mkdir()
    made = capture(str(disk), ImageStore(local), "half", "capture", progress_log()[1])
    shutil.copytree(local / "half", root / "images" / "half")
    (root / "images" / "half" / made["version"] / "meta.json").unlink()
    target = random_file(tmp_path / "target.img", 16 * 2**20)
    with pytest.raises(ImageError, match=rf"image 'half' is not complete: {url}/images/half/"
                                         rf"{made['version']}/meta.json is missing"):
        deploy(open_store(f"{url}/images/"), "half", "capture", str(target), progress_log()[1])
    (root / "images" / "half" / "current").unlink()           # data only, no pointer yet
    with pytest.raises(ImageError, match="image 'half' is not complete: .*current is missing"):
        deploy(open_store(f"{url}/images/"), "half", "capture", str(target), progress_log()[1])


def test_nginx_refusals_are_named(tmp_path, nginx):
    url, root = nginx
    disk = make_ext4(tmp_path / "disk.img", 16)
    target = random_file(tmp_path / "target.img", 16 * 2**20)
    with pytest.raises(ImageError, match=r"HTTP 405 Not Allowed: .*dav_methods PUT"):
        capture(str(disk), open_store(f"{url}/readonly/"), "img", "capture", progress_log()[1])
    with pytest.raises(ImageError, match=rf"image 'img': GET {url}/forbidden/img/current: "
                                         r"HTTP 403 Forbidden"):
        deploy(open_store(f"{url}/forbidden/"), "img", "capture", str(target), progress_log()[1])
    assert not list(root.rglob("meta.json"))


# -- the reference server's HTTP, request by request ------------------------------

def request(url, method="GET", headers=None, body=None):
    host = url.split("//", 1)[1].split("/", 1)[0]
    conn = http.client.HTTPConnection(host, timeout=10)
    conn.request(method, "/" + url.split("//", 1)[1].split("/", 1)[1], body=body,
                 headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response, data


def test_the_reference_store_serves_ranges_and_takes_atomic_puts(tmp_path, refserver):
    server, write_url, read_url = refserver
    auth = {"Authorization": "Basic " + base64.b64encode(
        write_url.split("//", 1)[1].split("@", 1)[0].encode()).decode()}
    payload = os.urandom(100_000)
    r, _ = request(read_url + "a/b/file.bin", "PUT", auth, payload)
    assert r.status == 201
    r, _ = request(read_url + "a/b/file.bin", "PUT", auth, payload)
    assert r.status == 204                                    # replaced
    r, body = request(read_url + "a/b/file.bin", headers={"Range": "bytes=10-19"})
    assert (r.status, body, r.getheader("content-range")) == (206, payload[10:20],
                                                             "bytes 10-19/100000")
    r, body = request(read_url + "a/b/file.bin", headers={"Range": "bytes=-5"})
    assert (r.status, body) == (206, payload[-5:])
    r, _ = request(read_url + "a/b/file.bin", headers={"Range": "bytes=100000-"})
    assert (r.status, r.getheader("content-range")) == (416, "bytes */100000")
    r, body = request(read_url + "a/b/file.bin", "HEAD")
    assert (r.status, r.getheader("content-length"), body) == (200, "100000", b"")
    assert r.getheader("accept-ranges") == "bytes" and r.getheader("etag")
    r, body = request(read_url + "a/b/file.bin", headers={"Range": "bytes=0-9",
                                                          "If-Range": '"other"'})
    assert (r.status, body) == (200, payload)                 # changed: the whole file
    r, _ = request(read_url + "a/b/", "HEAD")
    assert r.status == 403                                    # a folder: there, not listed
    (server.images.root.parent / "secret.txt").write_text("no")
    for bad in ("../secret.txt", "%2e%2e/secret.txt", "a/..%2f..%2fsecret.txt", ".hidden",
                "a/%00x", "a//b/file.bin"):
        r, body = request(read_url + bad)
        assert r.status in (400, 404) and b"no" != body, bad
        r, _ = request(read_url + bad, "PUT", auth, b"x")
        assert r.status in (400, 404), bad
    (server.images.root / "out").symlink_to(server.images.root.parent)
    r, _ = request(read_url + "out/secret.txt")
    assert r.status == 404
    r, _ = request(read_url + "x.bin", "PUT", {}, b"data")
    assert r.status == 401 and r.getheader("www-authenticate").startswith("Basic")
    r, _ = request(read_url + "chunked.bin", "PUT", auth, iter([b"ab", b"cd", b"ef"]))
    assert r.status == 201 and (server.images.root / "chunked.bin").read_bytes() == b"abcdef"
    # a PUT cut short leaves nothing: neither the file nor a temporary one
    with socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(f"PUT /images/cut.bin HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: {auth['Authorization']}\r\n"
                     f"Content-Length: 1000\r\n\r\n".encode() + b"x" * 10)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and list(server.images.root.glob(".put-*")):
        time.sleep(0.02)
    time.sleep(0.1)
    assert not (server.images.root / "cut.bin").exists()
    assert not list(server.images.root.rglob(".put-*"))


def test_serve_image_store_from_the_command_line(tmp_path):
    folder = tmp_path / "images" / "x"
    folder.mkdir(parents=True)
    (folder / "current").write_text("v\n")
    proc = subprocess.Popen([sys.executable, "-m", "taskserver", "serve", "--db",
                             str(tmp_path / "s.db"), "--listen", "127.0.0.1:0",
                             "--image-store", str(tmp_path / "images")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        r, body = request(f"{url}/images/x/current")
        assert (r.status, body) == (200, b"v\n")
    finally:
        proc.terminate()
        proc.wait(10)


def test_run_task_with_an_http_image_store(tmp_path, refserver):
    """The handler end to end (dsagent run-task): the URL is accepted as
    [handlers] image_store, capture and deploy go over HTTP."""
    _server, write_url, _read_url = refserver
    disk = make_ext4(tmp_path / "disk.img", 32, make_tree(tmp_path / "tree"))
    target = random_file(tmp_path / "target.img", 32 * 2**20)
    config = tmp_path / "agent.toml"
    config.write_text(f'[handlers]\nimage_store = "{write_url}"\n')
    ids = [str(uuid.uuid4()) for _ in range(2)]
    xml = tmp_path / "t.xml"
    xml.write_text(
        "<ClientTasks>"
        f'<Task id="{ids[0]}" type="CreateImage"><Parameters><Parameter name="source">{disk}'
        '</Parameter><Parameter name="image">golden</Parameter></Parameters></Task>'
        f'<Task id="{ids[1]}" type="DeployImage"><Parameters><Parameter name="image">golden'
        f'</Parameter><Parameter name="target">{target}</Parameter></Parameters></Task>'
        "</ClientTasks>")
    result = subprocess.run([sys.executable, "-m", "agent", "run-task", str(xml), "--json",
                             "--config", str(config)], capture_output=True, text=True,
                            timeout=120)
    events = [json.loads(line) for line in result.stdout.splitlines()]
    finals = {e["task_id"]: e for e in events if e["state"] in ("succeeded", "failed")}
    assert result.returncode == 0, result.stdout + result.stderr
    assert finals[ids[1]]["details"]["target_sha256"] == sha256_file(disk)
    assert "imager:" not in result.stdout                     # the token stays out of reports
    e2fsck_clean(target)


def test_an_agent_lends_its_credentials_to_a_store_on_its_servers_origin_only(tmp_path,
                                                                            refserver):
    """An automation environment has no store credentials of its own: an
    image_store on the task server's origin, without user:password, is used
    with the agent's id and token (agent/common/config.py lend_credentials);
    a store elsewhere never gets them."""
    server, write_url, read_url = refserver
    token = write_url.split("imager:", 1)[1].split("@", 1)[0]
    disk = make_ext4(tmp_path / "disk.img", 16, make_tree(tmp_path / "tree"))
    port = server.url.rsplit(":", 1)[1]

    def create(server_url: str, tag: str) -> dict:
        config = tmp_path / f"agent-{tag}.toml"
        config.write_text(f'[agent]\nserver_url = "{server_url}"\nstate_dir = "{tmp_path}"\n'
                          f'client_id = "imager"\ntoken = "{token}"\ntickle_key = "{"00" * 32}"\n'
                          f'[handlers]\nimage_store = "{read_url}"\n')
        config.chmod(0o600)
        xml = tmp_path / f"{tag}.xml"
        xml.write_text(f'<ClientTasks><Task id="{uuid.uuid4()}" type="CreateImage"><Parameters>'
                       f'<Parameter name="source">{disk}</Parameter><Parameter name="image">'
                       f'{tag}</Parameter></Parameters></Task></ClientTasks>')
        done = subprocess.run([sys.executable, "-m", "agent", "run-task", str(xml), "--json",
                               "--config", str(config)], capture_output=True, text=True,
                              timeout=120)
        assert token not in done.stdout + done.stderr
        return [json.loads(line) for line in done.stdout.splitlines()][-1]

    lent = create(server.url, "lent")
    assert lent["state"] == "succeeded", lent
    assert ("PUT", "/images/lent/current", None) in server.images.requests
    elsewhere = create(f"http://localhost:{port}", "elsewhere")     # another origin's server
    assert elsewhere["state"] == "failed", elsewhere
    assert "HTTP 401" in elsewhere["message"] and "wants credentials" in elsewhere["message"]


def test_doctor_checks_an_http_store(refserver):
    from handlers.imaging.plugin import check_image_store

    _server, write_url, _read_url = refserver
    ok = check_image_store({"image_store": write_url})
    assert ok.status == "ok" and "imager" not in ok.finding
    down = check_image_store({"image_store": f"http://127.0.0.1:{free_port()}/images/"})
    assert down.status == "fail" and "connection refused" in down.finding
