"""One stream to many (issue #16, PROTOCOL.md §4 v1.1): DeployImage over multicast
with real udpcast, between computers that are network namespaces of the test's
own (tests/mcastlab.py: a switch, a sender, four receivers on 198.18.42.0/24).

Every computer is a real ``dsagent run-task`` inside its namespace, reporting
its own statuses: the receivers' DeployImage (``multicast=true``) queued first,
then the sender's (``targets``). Needs root, iproute2 (ip, tc) and udpcast; a
missing one fails the test, never skips it.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

import mcastlab
from handlers.imaging.capture import capture
from handlers.imaging.store import ImageStore

RECEIVERS = ("rxa", "rxb", "rxc", "rxd")
DISK_MB = 96


def need(name):
    path = shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        pytest.fail(f"{name} is not installed (packaging/ensure-system-tools.sh installs it)")
    return path


def sha256_file(path, length):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while length > 0 and (buf := fh.read(min(4 << 20, length))):
            digest.update(buf)
            length -= len(buf)
    return digest.hexdigest()


def make_disk(path, tree, seed):
    """An ext4 disk with incompressible and compressible files (~40 MB stored)."""
    tree.mkdir()
    (tree / "random.bin").write_bytes(os.urandom(24 << 20))
    (tree / "text.txt").write_text("".join(f"{seed} line {i}\n" for i in range(400_000)))
    subprocess.run(["truncate", "-s", f"{DISK_MB}M", str(path)], check=True)
    subprocess.run([need("mkfs.ext4"), "-q", "-F", "-d", str(tree), str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("the multicast tests need root (network namespaces)")
    for name in ("ip", "tc", "udp-sender", "udp-receiver"):
        need(name)
    work = tmp_path_factory.mktemp("multicast")
    images = work / "images"
    images.mkdir()
    disk = make_disk(work / "disk.img", work / "tree", "golden")
    other = make_disk(work / "other.img", work / "tree2", "other")
    store = ImageStore(images)
    capture(str(disk), store, "golden", "capture", lambda *a, **k: None)
    capture(str(other), store, "other", "capture", lambda *a, **k: None)
    with mcastlab.McastLab(subnet=42) as lab:
        for word in ("sender", *RECEIVERS):
            lab.host(word)
        yield lab, images, disk, sha256_file(disk, os.path.getsize(disk))


def session(lab, work, store, port, images=None, receivers=RECEIVERS, sender_store=None):
    """The receivers' DeployImage first, then the sender's; every terminal event."""
    targets = {}
    runs = {}
    for word in receivers:
        targets[word] = work / f"{word}.img"
        targets[word].write_bytes(os.urandom(DISK_MB << 20))     # old data everywhere
        runs[word] = lab.agent(word, work, "DeployImage", {
            "image": (images or {}).get(word, "golden"), "target": str(targets[word]),
            "multicast": "true", "multicast_port": str(port), "multicast_wait_s": "60"}, store)
    started = time.monotonic()
    runs["sender"] = lab.agent("sender", work, "DeployImage", {
        "image": "golden", "targets": ",".join(receivers), "multicast_port": str(port),
        "multicast_wait_s": "30"}, sender_store or store)
    finals = {word: run.wait(120) for word, run in runs.items()}
    return finals, targets, time.monotonic() - started


def assert_verified(final, target, sha):
    assert final["state"] == "succeeded", final
    assert final["details"]["target_sha256"] == sha
    assert sha256_file(target, DISK_MB << 20) == sha          # byte-identical to the source
    assert final["details"]["multicast"] == "receiver"


def test_one_stream_to_four_receivers_each_verified_and_byte_identical(site, tmp_path):
    lab, images, _disk, sha = site
    finals, targets, elapsed = session(lab, tmp_path, str(images), 9010)
    for word in RECEIVERS:
        assert_verified(finals[word], targets[word], sha)
    sender = finals["sender"]
    assert sender["state"] == "succeeded", sender
    details = sender["details"]
    assert details["receivers_completed"] == 4 and details["targets"] == list(RECEIVERS)
    assert sorted(r["address"] for r in details["receivers"]) == \
        sorted(lab.hosts[w].address for w in RECEIVERS)
    assert {r["result"] for r in details["receivers"]} == {"completed"}
    assert details["bytes_sent"] == finals["rxa"]["details"]["stream_bytes"]
    assert elapsed < 40


def test_a_receiver_whose_link_drops_packets_ends_verified_or_fails_alone(site, tmp_path):
    lab, images, _disk, sha = site
    lab.lossy("rxd")
    try:
        finals, targets, _ = session(lab, tmp_path, str(images), 9020)
        dropped = lab.dropped("rxd")
    finally:
        lab.clear("rxd")
    assert dropped > 100, "the lossy link dropped nothing: the test proves nothing"
    for word in ("rxa", "rxb", "rxc"):
        assert_verified(finals[word], targets[word], sha)
    lossy = finals["rxd"]
    if lossy["state"] == "succeeded":                  # udpcast asked again for what it lost
        assert_verified(lossy, targets["rxd"], sha)
        assert finals["sender"]["details"]["retransmitted_blocks"] > 0
    else:
        assert lossy["state"] == "failed" and "multicast" in lossy["message"], lossy
    assert finals["sender"]["state"] == "succeeded", finals["sender"]


def test_a_receiver_with_the_wrong_image_fails_alone_naming_the_frame(site, tmp_path):
    lab, images, _disk, sha = site
    finals, targets, elapsed = session(lab, tmp_path, str(images), 9030,
                                       images={"rxd": "other"})
    for word in ("rxa", "rxb", "rxc"):
        assert_verified(finals[word], targets[word], sha)
    wrong = finals["rxd"]
    assert wrong["state"] == "failed"
    assert "frame 0 (" in wrong["message"] and "fails its sha256 check" in wrong["message"]
    assert "not that frame of image 'other'" in wrong["message"]
    assert "the others go on" in wrong["message"]
    sender = finals["sender"]
    assert sender["state"] == "succeeded" and sender["details"]["receivers_completed"] == 3
    left = [r for r in sender["details"]["receivers"] if r["address"] == lab.hosts["rxd"].address]
    assert left == [{"address": lab.hosts["rxd"].address, "result": "left during the transfer"}]
    assert elapsed < 40          # it left at once: the others did not wait for it to time out


def test_a_receiver_killed_mid_stream_fails_alone_and_the_others_go_on_at_once(site,
                                                                              tmp_path):
    """udp-receiver killed by a signal cannot tell the sender it left (udpcast would
    wait minutes for it, stalling everyone): its agent says so in its name."""
    lab, images, _disk, sha = site
    lab.lossy("rxd", rate="40mbit")            # its stream lasts seconds: time to kill it
    killed = []

    def kill_when_flowing():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not killed:
            for pid in mcastlab.ip("netns", "pids", lab.hosts["rxd"].ns).stdout.split():
                try:
                    comm = open(f"/proc/{pid}/comm").read().strip()
                    io = open(f"/proc/{pid}/io").read()
                except OSError:
                    continue
                if comm == "udp-receiver" and int(io.split("wchar: ")[1].split()[0]) > 2 << 20:
                    os.kill(int(pid), signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_flowing)
    killer.start()
    try:
        finals, targets, elapsed = session(lab, tmp_path, str(images), 9050)
    finally:
        killer.join()
        lab.clear("rxd")
    assert killed, "udp-receiver of rxd was never seen writing"
    for word in ("rxa", "rxb", "rxc"):
        assert_verified(finals[word], targets[word], sha)
    dead = finals["rxd"]
    assert dead["state"] == "failed" and "udp-receiver was killed (signal 9) after" in dead["message"]
    sender = finals["sender"]
    assert sender["state"] == "succeeded" and sender["details"]["receivers_completed"] == 3
    assert elapsed < 40          # udpcast alone would wait ~3 minutes to drop it


def test_from_an_http_store_on_a_jumbo_frame_link(site, tmp_path):
    """The sender pipes data.zst from the store's web server into udp-sender; the
    receivers take meta.json and index.bin from it; 9000-byte frames carry
    8 KiB datagrams."""
    lab, images, _disk, sha = site
    sender = lab.hosts["sender"]
    lab.set_mtu(9000)
    server = subprocess.Popen(
        ["ip", "netns", "exec", sender.ns, sys.executable, "-m", "taskserver", "serve",
         "--db", str(tmp_path / "server.db"), "--listen", f"{sender.address}:0",
         "--image-store", str(images)], cwd=mcastlab.REPO, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=dict(os.environ, PYTHONPATH=str(mcastlab.REPO)))
    try:
        url = server.stdout.readline().strip()
        assert url.startswith("http://"), url
        finals, targets, _ = session(lab, tmp_path, f"{url}/images/", 9040,
                                     receivers=("rxa", "rxb"))
    finally:
        server.kill()
        server.wait()
        lab.set_mtu(1500)
    for word in ("rxa", "rxb"):
        assert_verified(finals[word], targets[word], sha)
    details = finals["sender"]["details"]
    assert finals["sender"]["state"] == "succeeded", finals["sender"]
    assert details["block_size"] == 8192 and details["receivers_completed"] == 2


def test_nobody_on_the_other_side_fails_clearly_and_in_time(site, tmp_path):
    lab, images, _disk, _sha = site
    target = tmp_path / "t.img"
    target.write_bytes(b"\0" * (DISK_MB << 20))
    started = time.monotonic()
    receiver = lab.agent("rxa", tmp_path, "DeployImage", {
        "image": "golden", "target": str(target), "multicast": "true",
        "multicast_port": "9100", "multicast_wait_s": "2"}, str(images))
    sender = lab.agent("sender", tmp_path, "DeployImage", {
        "image": "golden", "targets": "rxa,rxb", "multicast_port": "9102",
        "multicast_wait_s": "2"}, str(images))
    alone, lonely = receiver.wait(60), sender.wait(60)
    assert time.monotonic() - started < 20
    assert alone["state"] == "failed"
    assert "no multicast stream within 2 s (multicast_wait_s) on port 9100" in alone["message"]
    assert "no sender answered" in alone["message"]
    assert lonely["state"] == "failed"
    assert "no receiver connected within 2 s (multicast_wait_s)" in lonely["message"]


def stream_of(tmp_path, data, size, script="", wait_s=30):
    """A ReceiverStream over a stand-in for udp-receiver: a shell printing ``data``
    on stdout, then running ``script``."""
    from handlers.imaging.multicast import ReceiverStream

    (tmp_path / "stream.bin").write_bytes(data)
    argv = ["/bin/sh", "-c", f'cat "$1"; {script or "true"}', "sh", str(tmp_path / "stream.bin")]
    return ReceiverStream(argv, size, 9000, "eth0", "127.0.0.1", wait_s, lambda: False,
                          lambda *a, **k: None)


def test_the_stream_is_read_in_order_and_its_end_awaited_after_the_deploy(tmp_path):
    from handlers.imaging.store import ImageError

    data = os.urandom(3 << 20)
    stream = stream_of(tmp_path, data + b"tail", len(data))
    assert stream.read(0, 1 << 20) == data[:1 << 20]
    assert stream.read(2 << 20, 1 << 20) == data[2 << 20:]        # a gap: read and dropped
    with pytest.raises(ImageError, match="a stream is read once, in order"):
        stream.read(0, 10)
    details = stream.stats()
    stream.proc.wait(10)              # udp-receiver may be gone before deploy's close() ...
    stream.close()                    # ... which leaves the end to finish()
    assert stream.finish() == {"udp_receiver_exit": 0, "stream_extra_bytes": 4}
    stream.close()
    assert details["stream_bytes"] == len(data) and details["multicast"] == "receiver"


def test_a_stream_that_ends_early_or_never_comes_fails_naming_where(tmp_path):
    from handlers.imaging.store import ImageError

    short = stream_of(tmp_path, b"x" * 1000, 5000, script="exit 3")
    with pytest.raises(ImageError, match=r"udp-receiver ended \(exit status 3\) after 1000 of "
                                         r"5000 bytes of data.zst, in frame 0 \(data.zst bytes "
                                         r"0\+5000\)"):
        short.read(0, 5000)
    short.close()
    late = stream_of(tmp_path, b"", 10, script="exec sleep 30", wait_s=1)
    started = time.monotonic()
    with pytest.raises(ImageError, match="no multicast stream within 1 s .* no sender answered"):
        late.read(0, 10)
    late.close()                      # killed at once: it was not in a session
    assert time.monotonic() - started < 5 and late.proc.returncode == -signal.SIGKILL


def test_parameters_that_do_not_go_together_are_refused(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    config = tmp_path / "agent.toml"
    config.write_text(f'[handlers]\nimage_store = "{images}"\n')
    cases = [
        ("DeployImage", {"target": "/dev/null", "targets": "a,b"},
         "takes 'target' (this computer's disk) or 'targets'"),
        ("DeployImage", {"targets": "a,b", "multicast": "false"}, "multicast=false contradicts"),
        ("DeployImage", {"multicast": "true"}, "'target' is missing (multicast=true is a"),
        ("DeployImage", {}, "parameter 'target' is missing"),
        ("DeployImage", {"targets": "a,b,a"}, "'targets' names a more than once"),
        ("DeployImage", {"target": "/dev/null", "multicast": "true", "multicast_port": "9001"},
         "multicast_port must be even"),
        ("DeployImage", {"target": "/dev/null", "multicast_wait_s": "5"},
         "multicast_wait_s: only for a multicast DeployImage"),
        ("DeployImage", {"targets": "pc 1"}, "parameter 'targets' must match"),
        ("RestoreBackupImage", {"target": "/dev/null", "multicast": "true"},
         "unknown parameter 'multicast'"),
    ]
    ids = [str(uuid.uuid4()) for _ in cases]
    xml = tmp_path / "t.xml"
    xml.write_text("<ClientTasks>" + "".join(
        f'<Task id="{i}" type="{kind}"><Parameters><Parameter name="image">golden</Parameter>'
        + "".join(f'<Parameter name="{k}">{v}</Parameter>' for k, v in params.items())
        + "</Parameters></Task>" for i, (kind, params, _) in zip(ids, cases)) + "</ClientTasks>")
    done = subprocess.run([sys.executable, "-m", "agent", "run-task", str(xml), "--json",
                           "--config", str(config)], capture_output=True, text=True, timeout=60)
    events = [json.loads(line) for line in done.stdout.splitlines()]
    for task_id, (_, _, words) in zip(ids, cases):
        final = [e for e in events if e["task_id"] == task_id][-1]
        assert final["state"] == "failed" and words in final["message"], (words, final)
