"""Disk imaging on disk files: capture, deploy, verify with e2fsck and debugfs.

Real mkfs.ext4 file systems, real sfdisk partition tables, partclone for the
size comparison; skipped (with the tool named) where a tool is missing.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid

import pytest

from handlers.imaging.capture import capture
from handlers.imaging.deploy import deploy
from handlers.imaging.store import ImageError, ImageStore

SBIN = ["/usr/sbin", "/sbin"]


def tool(name):
    path = shutil.which(name) or next((os.path.join(d, name) for d in SBIN
                                       if os.path.exists(os.path.join(d, name))), None)
    if path is None:
        pytest.fail(f"{name} is not installed (make test installs it: "
                    "packaging/ensure-system-tools.sh)")
    return path


def run(*cmd, **kw):
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True, **kw)


def sha256_file(path, length=None):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        left = length if length is not None else float("inf")
        while left > 0:
            buf = fh.read(int(min(1 << 22, left)))
            if not buf:
                break
            h.update(buf)
            left -= len(buf)
    return h.hexdigest()


def make_tree(root):
    """Mixed content: random (incompressible), text, an empty file, nesting."""
    root.mkdir()
    (root / "random.bin").write_bytes(os.urandom(6 * 2**20))
    (root / "text.txt").write_text("".join(f"line {i}\n" for i in range(200_000)))
    (root / "empty").write_bytes(b"")
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "sub" / "small.bin").write_bytes(os.urandom(5000))
    return root


def make_ext4(path, size_mb, tree=None, opts=()):
    run("truncate", "-s", f"{size_mb}M", path)
    cmd = [tool("mkfs.ext4"), "-q", "-F", *opts]
    if tree:
        cmd += ["-d", tree]
    run(*cmd, path)
    return path


def random_file(path, size):
    with open(path, "wb") as fh:
        for _ in range(size // 2**20):
            fh.write(os.urandom(2**20))
    return path


def files_of(disk, out):
    """Every file of an ext4 disk image, extracted with debugfs rdump."""
    out.mkdir()
    run(tool("debugfs"), "-R", f"rdump / {out}", disk)
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def e2fsck_clean(disk):
    result = subprocess.run([tool("e2fsck"), "-fn", str(disk)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    return ImageStore(root)


def progress_log():
    seen = []
    return seen, lambda pct, msg, **d: seen.append((pct, d))


@pytest.mark.parametrize("create_kind", ["capture", "backup"])
def test_ext4_round_trip_onto_random_target_is_byte_identical(tmp_path, store, create_kind):
    disk = make_ext4(tmp_path / "disk.img", 128, make_tree(tmp_path / "tree"))
    target = random_file(tmp_path / "target.img", 160 * 2**20)
    events, report = progress_log()
    made = capture(str(disk), store, "golden", create_kind, report)
    assert made["strategy"] == ["whole disk: ext4-bitmap"]
    assert made["bytes_stored"] < 40 * 2**20  # only used blocks, not 128 MiB
    assert events and events[-1][0] == 100.0
    result = deploy(store, "golden", create_kind, str(target), progress_log()[1])
    size = os.path.getsize(disk)
    assert result["target_sha256"] == sha256_file(disk) == sha256_file(target, size)
    e2fsck_clean(target)
    assert files_of(target, tmp_path / "out") == files_of(disk, tmp_path / "ref")


def test_deleted_files_stale_blocks_not_stored_and_no_larger_than_partclone(tmp_path, store):
    tree = make_tree(tmp_path / "tree")
    for i in range(4):
        (tree / f"doomed{i}.bin").write_bytes(os.urandom(4 * 2**20))
    disk = make_ext4(tmp_path / "disk.img", 96, tree)
    for i in range(4):
        run(tool("debugfs"), "-w", "-R", f"rm /doomed{i}.bin", disk)
    e2fsck_clean(disk)
    made = capture(str(disk), store, "stale", "capture", progress_log()[1])
    assert made["bytes_stored"] < 20 * 2**20  # the 16 MiB of deleted data is not stored
    target = random_file(tmp_path / "target.img", 96 * 2**20)
    deploy(store, "stale", "capture", str(target), progress_log()[1])
    e2fsck_clean(target)
    assert files_of(target, tmp_path / "out") == files_of(disk, tmp_path / "ref")
    # the image is no larger than partclone's used-block image compressed the same way
    partclone, zstd = tool("partclone.ext4"), tool("zstd")
    cmd = f"{partclone} -a0 -c -s {disk} -o - 2>/dev/null | {zstd} -1 -T2 -c | wc -c"
    theirs = int(subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout)
    assert made["compressed_size"] <= theirs * 1.02, (made["compressed_size"], theirs)


def test_partitioned_disk_round_trips(tmp_path, store):
    sfdisk = tool("sfdisk")
    disk = tmp_path / "disk.img"
    run("truncate", "-s", "200M", disk)
    layout = "label: gpt\nsize=80M, type=linux\nsize=60M, type=linux\n"
    subprocess.run([sfdisk, "-q", str(disk)], input=layout, text=True, check=True,
                   capture_output=True)
    table = json.loads(run(sfdisk, "--json", disk).stdout)["partitiontable"]
    parts = table["partitions"]
    fs = make_ext4(tmp_path / "p1.img", parts[0]["size"] * 512 // 2**20,
                   make_tree(tmp_path / "tree"))
    run("dd", f"if={fs}", f"of={disk}", "bs=512", f"seek={parts[0]['start']}", "conv=notrunc",
        "status=none")
    with open(disk, "r+b") as fh:  # something that is not ext4 in partition 2
        fh.seek(parts[1]["start"] * 512 + 5 * 2**20)
        fh.write(os.urandom(2**20))
    made = capture(str(disk), store, "parted", "capture", progress_log()[1])
    assert "partition" in made["strategy"][0] and made["strategy"][0].endswith("ext4-bitmap")
    assert made["strategy"][1].endswith("zero-skip")
    target = random_file(tmp_path / "target.img", 200 * 2**20)
    result = deploy(store, "parted", "capture", str(target), progress_log()[1])
    assert sha256_file(target) == sha256_file(disk) == result["target_sha256"]
    restored = json.loads(run(sfdisk, "--json", target).stdout)["partitiontable"]["partitions"]
    strip = lambda ps: [{k: v for k, v in p.items() if k != "node"} for p in ps]  # noqa: E731
    assert strip(restored) == strip(parts)


def test_wrong_kind_is_refused_both_ways(tmp_path, store):
    disk = make_ext4(tmp_path / "disk.img", 32)
    target = random_file(tmp_path / "target.img", 32 * 2**20)
    capture(str(disk), store, "cap", "capture", progress_log()[1])
    capture(str(disk), store, "bak", "backup", progress_log()[1])
    with pytest.raises(ImageError, match="'bak' is a backup image; DeployImage takes only capture"):
        deploy(store, "bak", "capture", str(target), progress_log()[1])
    with pytest.raises(ImageError, match="'cap' is a capture image; RestoreBackupImage"):
        deploy(store, "cap", "backup", str(target), progress_log()[1])


def test_small_target_and_missing_image_refused(tmp_path, store):
    disk = make_ext4(tmp_path / "disk.img", 32)
    capture(str(disk), store, "img", "capture", progress_log()[1])
    small = random_file(tmp_path / "small.img", 16 * 2**20)
    with pytest.raises(ImageError, match="smaller than the image's source"):
        deploy(store, "img", "capture", str(small), progress_log()[1])
    with pytest.raises(ImageError, match="does not exist"):
        deploy(store, "nope", "capture", str(small), progress_log()[1])


def test_corrupted_chunk_is_detected_and_named(tmp_path, store):
    disk = make_ext4(tmp_path / "disk.img", 64, make_tree(tmp_path / "tree"))
    capture(str(disk), store, "img", "capture", progress_log()[1])
    version = store.open_current("img")
    data = version.dir / "data.zst"
    version.close()
    with open(data, "r+b") as fh:
        fh.seek(os.path.getsize(data) // 2)
        fh.write(b"\xff" * 64)
    target = random_file(tmp_path / "target.img", 64 * 2**20)
    with pytest.raises(ImageError, match=r"frame \d+ .*(corrupt|sha256)|chunk at source offset"):
        deploy(store, "img", "capture", str(target), progress_log()[1])


def test_concurrent_capture_of_same_name_refused(tmp_path, store):
    disk = make_ext4(tmp_path / "disk.img", 32)
    held = store.lock("busy")
    try:
        with pytest.raises(ImageError, match="another capture of image 'busy' is running"):
            capture(str(disk), store, "busy", "capture", progress_log()[1])
    finally:
        held.close()


KILLED_CAPTURE = textwrap.dedent("""
    import os, signal, sys
    from handlers.imaging.capture import capture
    from handlers.imaging.store import ImageStore
    def report(pct, msg, **d):
        if d["bytes_done"] > 8 * 2**20:
            os.kill(os.getpid(), signal.SIGKILL)  # die mid-capture, like a power cut
    capture(sys.argv[1], ImageStore(sys.argv[2]), sys.argv[3], "capture", report)
""")


def test_killed_capture_leaves_nothing_usable_and_keeps_the_old_version(tmp_path, store):
    disk = random_file(tmp_path / "disk.img", 64 * 2**20)
    target = random_file(tmp_path / "target.img", 64 * 2**20)
    script = tmp_path / "kill.py"
    script.write_text(KILLED_CAPTURE)
    for name in ("fresh", "replaced"):
        if name == "replaced":
            capture(str(disk), store, name, "capture", progress_log()[1])
        result = subprocess.run([sys.executable, script, disk, store.root, name])
        assert result.returncode == -signal.SIGKILL
    with pytest.raises(ImageError, match="image 'fresh' is incomplete"):
        deploy(store, "fresh", "capture", str(target), progress_log()[1])
    # the complete earlier version of 'replaced' is still the one in use
    result = deploy(store, "replaced", "capture", str(target), progress_log()[1])
    assert result["target_sha256"] == sha256_file(disk)


def test_image_names_validated_through_run_task(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    config = tmp_path / "agent.toml"
    config.write_text(f'[handlers]\nimage_store = "{images}"\n')
    xml = tmp_path / "t.xml"
    ids = [str(uuid.uuid4()) for _ in range(3)]
    xml.write_text(
        "<ClientTasks>"
        f'<Task id="{ids[0]}" type="CreateImage"><Parameters><Parameter name="source">/dev/null'
        '</Parameter><Parameter name="image">../escape</Parameter></Parameters></Task>'
        f'<Task id="{ids[1]}" type="DeployImage"><Parameters><Parameter name="image">x</Parameter>'
        '<Parameter name="target">relative.img</Parameter></Parameters></Task>'
        f'<Task id="{ids[2]}" type="RestoreBackupImage"><Parameters><Parameter name="image">x'
        '</Parameter></Parameters></Task>'
        "</ClientTasks>")
    result = subprocess.run([sys.executable, "-m", "agent", "run-task", str(xml), "--json",
                             "--config", str(config)], capture_output=True, text=True, timeout=60)
    finals = [json.loads(line) for line in result.stdout.splitlines()]
    finals = [e for e in finals if e["state"] == "failed"]
    assert result.returncode == 1
    assert "image name '../escape' is not allowed" in finals[0]["message"]
    assert "'target' must be an absolute path" in finals[1]["message"]
    assert "'target' is missing" in finals[2]["message"]
    assert list(images.iterdir()) == []


def test_capture_and_deploy_through_the_whole_chain(tmp_path):
    from taskserver.loopback import LoopbackChain

    images = tmp_path / "images"
    images.mkdir()
    disk = make_ext4(tmp_path / "disk.img", 96, make_tree(tmp_path / "tree"))
    target = random_file(tmp_path / "target.img", 96 * 2**20)
    with LoopbackChain(tmp_path / "chain", handlers={"image_store": str(images)}) as chain:
        made = chain.queue("CreateImage", {"source": str(disk), "image": "golden"})
        chain.tickle()
        assert chain.wait([made], 60)
        deployed = chain.queue("DeployImage", {"image": "golden", "target": str(target)})
        wrong = chain.queue("RestoreBackupImage", {"image": "golden", "target": str(target)})
        chain.tickle()
        assert chain.wait([deployed, wrong], 60)
        capture_events = chain.events(made)
        deploy_events = chain.events(deployed)
        wrong_events = chain.events(wrong)
    assert capture_events[-1]["state"] == "succeeded", capture_events[-1]
    assert deploy_events[-1]["state"] == "succeeded", deploy_events[-1]
    progress = [e for e in deploy_events if e["state"] == "progress"]
    assert progress and "bytes_per_s" in progress[-1]["details"]
    assert deploy_events[-1]["details"]["target_sha256"] == sha256_file(disk)
    assert capture_events[-1]["details"]["image_sha256"]
    assert wrong_events[-1]["state"] == "failed"
    assert "is a capture image; RestoreBackupImage takes only backup" in wrong_events[-1]["message"]
    e2fsck_clean(target)


def test_target_attached_to_a_loop_device_is_refused(tmp_path, store):
    losetup = tool("losetup")
    disk = make_ext4(tmp_path / "disk.img", 32)
    capture(str(disk), store, "img", "capture", progress_log()[1])
    target = random_file(tmp_path / "target.img", 32 * 2**20)
    attach = subprocess.run([losetup, "-f", "--show", str(target)], capture_output=True, text=True)
    if attach.returncode != 0:
        pytest.skip(f"no loop device here: {attach.stderr.strip()}")
    try:
        with pytest.raises(ImageError, match="attached to /dev/loop"):
            deploy(store, "img", "capture", str(target), progress_log()[1])
    finally:
        subprocess.run([losetup, "-d", attach.stdout.strip()])


def test_a_cancelled_capture_stops_through_ctx_cancelled_and_leaves_no_image(tmp_path):
    """The worker's cancel (timeout, shutdown) reaches the capture loop via ctx.cancelled()."""
    import logging

    from agent.common.errors import TaskFailed
    from agent.common.task import Task
    from agent.plugin.tasks import TaskContext
    from handlers.imaging import plugin

    images = tmp_path / "images"
    images.mkdir()
    disk = random_file(tmp_path / "disk.img", 256 * 2**20)
    task = Task(str(uuid.uuid4()), "CreateImage", {"source": str(disk), "image": "big"})
    progress = []

    def on_progress(percent, message, details):
        progress.append(percent)
        ctx.request_cancel()          # what the worker does when the task times out

    ctx = TaskContext(task, {"image_store": str(images)}, on_progress,
                      logging.LoggerAdapter(logging.getLogger("test"), {}))
    with pytest.raises(TaskFailed, match="capture cancelled"):
        plugin.dsagent_run_task(task=task, ctx=ctx)
    assert progress and progress[-1] < 100
    with pytest.raises(ImageError):                  # nothing that looks usable
        ImageStore(images).open_current("big")


def test_a_tampered_current_pointer_cannot_leave_the_image_folder(tmp_path, store):
    disk = make_ext4(tmp_path / "disk.img", 16)
    capture(str(disk), store, "img", "capture", progress_log()[1])
    capture(str(disk), store, "other", "capture", progress_log()[1])
    folder = store.folder("img")
    good = (folder / "current").read_text().strip()
    other = (store.folder("other") / "current").read_text().strip()
    target = random_file(tmp_path / "target.img", 16 * 2**20)
    for pointer in (f"../other/{other}", "/etc", "..", ""):
        (folder / "current").write_text(pointer + "\n")
        with pytest.raises(ImageError, match="not a version of this image; refused"):
            deploy(store, "img", "capture", str(target), progress_log()[1])
    fake = folder / "20260101T000000000000Z-abcd"            # a version-shaped symlink
    fake.symlink_to(store.folder("other") / other)
    (folder / "current").write_text(fake.name + "\n")
    with pytest.raises(ImageError, match="is a symlink; refused"):
        deploy(store, "img", "capture", str(target), progress_log()[1])
    (folder / "current").write_text(good + "\n")
    deploy(store, "img", "capture", str(target), progress_log()[1])
