"""Partition tables on deploy: GPT and MBR restored exactly, the GPT backup moved
to a larger target's end, what lies past the image zeroed, ``grow``.

Disks are files, partitioned with sfdisk; each file system is made in a file
of its own (mkfs.vfat, mkntfs, mkfs.ext4) and dd'd into place; each is checked
by its own tool (fsck.vfat -n, ntfsfix -n, e2fsck -fn) on a copy of its
partition. No mounts. A missing tool fails the test, naming it.
"""

import json
import os
import re
import struct
import subprocess

import pytest

from handlers.imaging.capture import capture
from handlers.imaging.deploy import deploy
from handlers.imaging.store import ImageError, ImageStore
from test_imaging import (files_of, make_ext4, make_tree, progress_log, random_file, run,
                          sha256_file, tool)

MiB = 2**20
SECTOR = 512
NTFS_TYPE = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    return ImageStore(root)


def table(disk):
    return json.loads(run(tool("sfdisk"), "--json", disk).stdout)["partitiontable"]


def dump(disk):
    """sfdisk --dump with the disk's name taken out (GUIDs, types, names, attrs kept)."""
    return run(tool("sfdisk"), "--dump", disk).stdout.replace(str(disk), "DISK")


def verify(disk):
    """sfdisk --verify: clean, and no complaint about the backup GPT or the PMBR."""
    out = subprocess.run([tool("sfdisk"), "--verify", str(disk)], capture_output=True,
                         text=True)
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "No errors detected" in text, text
    assert not re.search(r"(?i)backup|mismatch|corrupt|error detected", text), text


def read(disk, offset, length):
    with open(disk, "rb") as fh:
        fh.seek(offset)
        return fh.read(length)


def extract(disk, part, out):
    """A copy of one partition, for a checker that takes no offset."""
    with open(disk, "rb") as src, open(out, "wb") as dst:
        src.seek(part["start"] * SECTOR)
        left = part["size"] * SECTOR
        while left:
            buf = src.read(min(4 * MiB, left))
            dst.write(buf)
            left -= len(buf)
    return out


def place(disk, fs_file, part):
    run("dd", f"if={fs_file}", f"of={disk}", "bs=1M", f"seek={part['start'] * SECTOR}",
        "oflag=seek_bytes", "conv=notrunc", "status=none")


def make_fs(kind, path, part, payload):
    """A file system of ``kind`` the size of ``part`` in ``path``, holding ``payload``
    (name -> bytes, written beside it first)."""
    run("truncate", "-s", str(part["size"] * SECTOR), path)
    src = path.parent / f"{path.name}.files"
    src.mkdir()
    for name, data in payload.items():
        (src / name).write_bytes(data)
    if kind == "fat":
        run(tool("mkfs.vfat"), "-F", "32", "-n", "ESP", path)
        run(tool("mmd"), "-i", path, "::/EFI", "::/EFI/BOOT")
        for name in payload:
            run(tool("mcopy"), "-i", path, src / name, f"::/EFI/BOOT/{name}")
    elif kind == "ntfs":
        run(tool("mkntfs"), "-F", "-Q", "-L", "data", "-p", str(part["start"]), path)
        for name in payload:
            run(tool("ntfscp"), path, src / name, name)
    else:
        run(tool("mkfs.ext4"), "-q", "-F", "-d", src, path)
    return path


def files_in(kind, part_file, names, out):
    """The payload read back by each file system's own tools."""
    out.mkdir()
    got = {}
    for name in names:
        if kind == "fat":
            run(tool("mcopy"), "-i", part_file, f"::/EFI/BOOT/{name}", out / name)
        elif kind == "ntfs":
            with open(out / name, "wb") as fh:
                subprocess.run([tool("ntfscat"), "-f", str(part_file), name], stdout=fh,
                               check=True)
        else:
            run(tool("debugfs"), "-R", f"dump /{name} {out / name}", part_file)
        got[name] = (out / name).read_bytes()
    return got


def check_fs(kind, part_file):
    cmd = {"fat": [tool("fsck.vfat"), "-n"], "ntfs": [tool("ntfsfix"), "-n"],
           "ext4": [tool("e2fsck"), "-fn"]}[kind]
    out = subprocess.run([*cmd, str(part_file)], capture_output=True, text=True)
    assert out.returncode == 0, f"{cmd[0]}: {out.stdout}{out.stderr}"


def fs_size(kind, part_file):
    """The file system's size as its own tools report it."""
    if kind == "ntfs":
        info = run(tool("ntfsinfo"), "-f", "-m", part_file).stdout
        clusters = int(re.search(r"Volume Size in Clusters: (\d+)", info).group(1))
        return clusters * int(re.search(r"Cluster Size: (\d+)", info).group(1))
    info = run(tool("dumpe2fs"), "-h", part_file).stdout
    return (int(re.search(r"Block count:\s+(\d+)", info).group(1))
            * int(re.search(r"Block size:\s+(\d+)", info).group(1)))


def gpt_disk(tmp_path, last):
    """160 MiB GPT disk: an EFI system partition (FAT32), then NTFS and ext4 in
    the order that puts ``last`` at the end, each with files in it."""
    disk = tmp_path / f"gpt-{last}.img"
    run("truncate", "-s", "160M", disk)
    middle = "ext4" if last == "ntfs" else "ntfs"
    types = {"ntfs": NTFS_TYPE, "ext4": LINUX_TYPE}
    layout = ('label: gpt\nsize=40M, type=uefi, name="EFI system partition", '
              'attrs="RequiredPartition"\n'
              f'size=40M, type={types[middle]}, name="{middle} data"\n'
              f'type={types[last]}, name="{last} last"\n')
    subprocess.run([tool("sfdisk"), "-q", str(disk)], input=layout, text=True, check=True,
                   capture_output=True)
    parts = table(disk)["partitions"]
    kinds = ["fat", middle, last]
    payloads = [{"BOOTX64.EFI": os.urandom(300_000)},
                {"middle.bin": os.urandom(2 * MiB), "note.txt": b"middle\n" * 1000},
                {"last.bin": os.urandom(3 * MiB), "note.txt": b"last\n" * 1000}]
    for n, (kind, part, payload) in enumerate(zip(kinds, parts, payloads)):
        place(disk, make_fs(kind, tmp_path / f"{last}-p{n + 1}.fs", part, payload), part)
    return disk, list(zip(kinds, payloads))


def check_partitions(tmp_path, disk, contents, skip_sizes=False):
    """Each partition's file system clean (its own tool) and holding its files."""
    for n, (part, (kind, payload)) in enumerate(zip(table(disk)["partitions"], contents)):
        copy = extract(disk, part, tmp_path / f"check-{disk.stem}-{n}.part")
        check_fs(kind, copy)
        assert files_in(kind, copy, payload, tmp_path / f"out-{disk.stem}-{n}") == payload
        copy.unlink()


def gpt_signatures(disk):
    """Every sector where a GPT header signature starts."""
    found = []
    with open(disk, "rb") as fh:
        base = 0
        while chunk := fh.read(4 * MiB):
            pos = chunk.find(b"EFI PART")
            while pos != -1:
                if pos % SECTOR == 0:
                    found.append((base + pos) // SECTOR)
                pos = chunk.find(b"EFI PART", pos + 1)
            base += len(chunk)
    return found


def test_gpt_with_esp_ntfs_ext4_round_trips_exactly(tmp_path, store):
    disk, contents = gpt_disk(tmp_path, "ext4")
    verify(disk)
    capture(str(disk), store, "uefi", "capture", progress_log()[1])
    target = random_file(tmp_path / "target.img", 160 * MiB)
    result = deploy(store, "uefi", "capture", str(target), progress_log()[1])
    assert dump(target) == dump(disk)       # disk and partition GUIDs, types, names, attrs
    assert sha256_file(target) == sha256_file(disk) == result["target_sha256"]
    assert result["gpt_backup_moved"] is None and result["zeroed_past_image"] == 0
    verify(target)
    check_partitions(tmp_path, target, contents)


@pytest.mark.parametrize("last", ["ext4", "ntfs"])
def test_grow_onto_a_disk_twice_the_size_fills_it(tmp_path, store, last):
    disk, contents = gpt_disk(tmp_path, last)
    capture(str(disk), store, "uefi", "capture", progress_log()[1])
    source = table(disk)
    target = random_file(tmp_path / "big.img", 320 * MiB)
    events, report = progress_log()
    result = deploy(store, "uefi", "capture", str(target), report, grow=True)
    verify(target)
    grown = table(target)
    # the same table, GUIDs and all; only the last usable LBA and the last partition's size
    assert grown["id"] == source["id"] and grown["firstlba"] == source["firstlba"]
    assert grown["lastlba"] == 320 * MiB // SECTOR - 34
    old_parts, new_parts = source["partitions"], grown["partitions"]
    for old, new in zip(old_parts[:-1], new_parts[:-1]):
        assert {**old, "node": ""} == {**new, "node": ""}
    assert {k: v for k, v in old_parts[-1].items() if k not in ("node", "size")} == \
        {k: v for k, v in new_parts[-1].items() if k not in ("node", "size")}
    last_part = new_parts[-1]
    assert last_part["start"] + last_part["size"] - 1 == grown["lastlba"]   # fills the disk
    # the other partitions are the source's bytes
    for part in old_parts[:-1]:
        span = (part["start"] * SECTOR, part["size"] * SECTOR)
        assert read(target, *span) == read(disk, *span)
    # the last file system fills its partition, clean, with its files
    check_partitions(tmp_path, target, contents)
    copy = extract(target, last_part, tmp_path / "last.part")
    size = fs_size(last, copy)
    assert size > old_parts[-1]["size"] * SECTOR * 1.9
    assert size > last_part["size"] * SECTOR - 4 * MiB
    # between the grown file system and the backup GPT: zeros (NTFS keeps its backup boot
    # sector in the partition's last sector)
    start, part_end = last_part["start"] * SECTOR, (grown["lastlba"] + 1) * SECTOR
    fs_end = start + size
    if last == "ntfs":
        boot = read(target, start, SECTOR)
        fs_end = start + struct.unpack_from("<Q", boot, 0x28)[0] * SECTOR
        assert read(target, part_end - SECTOR, SECTOR) == boot
        part_end -= SECTOR
    assert read(target, fs_end, part_end - fs_end).count(0) == part_end - fs_end
    assert gpt_signatures(target) == [1, 320 * MiB // SECTOR - 1]  # the old backup is gone
    assert result["grown"] == {
        "partition": 3, "node": last_part["node"], "start_bytes": last_part["start"] * SECTOR,
        "from_bytes": old_parts[-1]["size"] * SECTOR, "to_bytes": last_part["size"] * SECTOR,
        "filesystem": last, "tool": "resize2fs" if last == "ext4" else "ntfsresize",
        "filesystem_bytes": size,
        **({"note": "ntfsresize schedules chkdsk for Windows' next boot"}
           if last == "ntfs" else {})}
    assert result["target_bytes"] == 320 * MiB
    assert result["zeroed_past_image"] == 160 * MiB
    assert [e for e in events if e[1].get("phase") == "grow"] and events[-1][0] == 100.0
    # no old data of the target survives, even inside the grown file system: the same
    # deploy onto an all-zero disk differs only by a few bytes (the tools' timestamps)
    zeros = tmp_path / "zeros.img"
    run("truncate", "-s", "320M", zeros)
    deploy(store, "uefi", "capture", str(zeros), progress_log()[1], grow=True)
    differ = subprocess.run(f"cmp -l {target} {zeros} | wc -l", shell=True, capture_output=True,
                            text=True, check=True)
    assert int(differ.stdout) < 4096, differ.stdout


def test_larger_target_without_grow_moves_the_backup_gpt_and_zeroes_the_rest(tmp_path, store):
    disk, contents = gpt_disk(tmp_path, "ntfs")
    capture(str(disk), store, "uefi", "backup", progress_log()[1])
    target = random_file(tmp_path / "big.img", 256 * MiB)
    result = deploy(store, "uefi", "backup", str(target), progress_log()[1])
    verify(target)
    last_lba = 256 * MiB // SECTOR - 1
    assert dump(target) == dump(disk).replace("last-lba: 327646", f"last-lba: {last_lba - 33}")
    check_partitions(tmp_path, target, contents)
    end = max(p["start"] + p["size"] for p in table(disk)["partitions"]) * SECTOR
    assert read(target, SECTOR * 2, end - SECTOR * 2) == read(disk, SECTOR * 2, end - SECTOR * 2)
    rest = (last_lba - 32) * SECTOR - end      # up to the moved backup's partition array
    assert read(target, end, rest).count(0) == rest
    assert gpt_signatures(target) == [1, last_lba]
    assert result["gpt_backup_moved"]["backup_header_lba"] == last_lba
    assert result["gpt_backup_moved"]["protective_mbr_widened"] is True
    assert result["zeroed_past_image"] == 96 * MiB and result["grown"] is None


def test_a_smaller_target_is_refused_naming_both_sizes_and_left_alone(tmp_path, store):
    disk, _ = gpt_disk(tmp_path, "ext4")
    capture(str(disk), store, "uefi", "capture", progress_log()[1])
    small = random_file(tmp_path / "small.img", 100 * MiB)
    before = sha256_file(small)
    for grow in (False, True):
        with pytest.raises(ImageError) as refused:
            deploy(store, "uefi", "capture", str(small), progress_log()[1], grow=grow)
        message = str(refused.value)
        assert f"{100 * MiB} bytes (100 MiB)" in message, message
        assert f"{160 * MiB} bytes (160 MiB)" in message, message
        assert "smaller than the image's source" in message and "not supported" in message
    assert sha256_file(small) == before


def test_mbr_with_a_logical_last_partition_round_trips_and_grows(tmp_path, store):
    disk = tmp_path / "mbr.img"
    run("truncate", "-s", "96M", disk)
    layout = "label: dos\nsize=30M, type=83, bootable\ntype=5\nsize=30M, type=83\ntype=83\n"
    subprocess.run([tool("sfdisk"), "-q", str(disk)], input=layout, text=True, check=True,
                   capture_output=True)
    with open(disk, "r+b") as fh:               # boot code, which must come back too
        fh.write(os.urandom(440))
    parts = [p for p in table(disk)["partitions"] if p["type"] != "5"]
    contents = []
    for n, part in enumerate(parts):
        payload = {f"file{n}.bin": os.urandom(MiB)}
        place(disk, make_fs("ext4", tmp_path / f"mbr-p{n}.fs", part, payload), part)
        contents.append(("ext4", payload))
    capture(str(disk), store, "mbr", "capture", progress_log()[1])
    same = random_file(tmp_path / "same.img", 96 * MiB)
    deploy(store, "mbr", "capture", str(same), progress_log()[1])
    assert dump(same) == dump(disk) and sha256_file(same) == sha256_file(disk)
    big = random_file(tmp_path / "big.img", 192 * MiB)
    result = deploy(store, "mbr", "capture", str(big), progress_log()[1], grow=True)
    assert result["gpt_backup_moved"] is None
    assert read(big, 0, 512) == read(disk, 0, 512)[:446] + read(big, 446, 66)
    after = table(big)
    assert after["id"] == table(disk)["id"]
    extended = next(p for p in after["partitions"] if p["type"] == "5")
    logical = [p for p in after["partitions"] if p["type"] != "5"]
    assert extended["start"] + extended["size"] == 192 * MiB // SECTOR
    assert logical[-1]["start"] + logical[-1]["size"] == 192 * MiB // SECTOR
    assert logical[:-1] == [{**p, "node": p["node"].replace(str(disk), str(big))}
                            for p in parts[:-1]]
    assert result["grown"]["partition"] == 6 and result["grown"]["tool"] == "resize2fs"
    for n, (part, (kind, payload)) in enumerate(zip(logical, contents)):
        copy = extract(big, part, tmp_path / f"mbr-check{n}")
        check_fs(kind, copy)
        assert files_in(kind, copy, payload, tmp_path / f"mbr-out{n}") == payload
    assert fs_size("ext4", copy) > logical[-1]["size"] * SECTOR - 4 * MiB


def test_grow_refuses_a_fat_last_partition_and_grows_a_whole_disk_ext4(tmp_path, store):
    disk = tmp_path / "fatlast.img"
    run("truncate", "-s", "64M", disk)
    subprocess.run([tool("sfdisk"), "-q", str(disk)], input="label: gpt\ntype=uefi\n",
                   text=True, check=True, capture_output=True)
    part = table(disk)["partitions"][0]
    place(disk, make_fs("fat", tmp_path / "esp.fs", part, {"A.EFI": b"a" * 1000}), part)
    capture(str(disk), store, "fat", "capture", progress_log()[1])
    target = random_file(tmp_path / "t.img", 128 * MiB)
    untouched = sha256_file(target)
    # a capture that knew the partition holds FAT: refused before anything is written
    capture(str(disk), store, "fatknown", "capture", progress_log()[1])
    version = store.open_current("fatknown")
    meta_path, meta = version.dir / "meta.json", dict(version.meta)
    version.close()
    for fact in meta["source"]["filesystems"]:
        fact["type"] = "fat32"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ImageError, match=r"grow: the image's last partition .* is fat32; grow "
                                         "enlarges only ext4 and NTFS"):
        deploy(store, "fatknown", "capture", str(target), progress_log()[1], grow=True)
    assert sha256_file(target) == untouched
    # as captured: refused before writing (the capture knew FAT) or after (it did not);
    # either way the partition is not grown, and when written the table is valid
    with pytest.raises(ImageError, match=r"(?i)grow: .*fat.*grow enlarges only ext4 and NTFS"):
        deploy(store, "fat", "capture", str(target), progress_log()[1], grow=True)
    if sha256_file(target) != untouched:
        verify(target)
        assert table(target)["partitions"][0]["size"] == part["size"]
        check_fs("fat", extract(target, part, tmp_path / "esp.part"))
    # a disk without a table: its file system itself grows
    whole = make_ext4(tmp_path / "whole.img", 48, make_tree(tmp_path / "tree"))
    capture(str(whole), store, "whole", "backup", progress_log()[1])
    big = random_file(tmp_path / "whole-big.img", 96 * MiB)
    result = deploy(store, "whole", "backup", str(big), progress_log()[1], grow=True)
    assert result["grown"]["partition"] is None and result["grown"]["tool"] == "resize2fs"
    assert fs_size("ext4", big) == 96 * MiB
    check_fs("ext4", big)
    assert files_of(big, tmp_path / "o1") == files_of(whole, tmp_path / "o2")


def test_grow_parameter_through_the_handler(tmp_path):
    import logging

    from agent.common.task import Task
    from agent.plugin import BadParameters
    from agent.plugin.tasks import TaskContext
    from handlers.imaging import plugin

    for bad in ("yes", "True", "1"):
        with pytest.raises(BadParameters, match=re.escape("'grow' must match true|false")):
            plugin.GROW.check(bad)
    images = tmp_path / "images"
    images.mkdir()
    disk, contents = gpt_disk(tmp_path, "ext4")
    capture(str(disk), ImageStore(images), "uefi", "capture", progress_log()[1])
    target = random_file(tmp_path / "big.img", 200 * MiB)
    task = Task("t-grow", "DeployImage", {"image": "uefi", "target": str(target), "grow": "true"})
    ctx = TaskContext(task, {"image_store": str(images)}, lambda *a: None,
                      logging.LoggerAdapter(logging.getLogger("test"), {}))
    details = plugin.dsagent_run_task(task=task, ctx=ctx)
    assert details["grown"]["to_bytes"] > details["grown"]["from_bytes"]
    verify(target)
    check_partitions(tmp_path, target, contents)


def test_a_block_device_target_is_zeroed_moved_and_grown(tmp_path, store):
    """The same on a block device (a loop device here): BLKZEROOUT past the image, the
    device's sector size checked, the grow tools on a loop window over the device."""
    losetup = tool("losetup")
    disk, contents = gpt_disk(tmp_path, "ntfs")
    capture(str(disk), store, "uefi", "capture", progress_log()[1])
    backing = random_file(tmp_path / "blockdev.img", 224 * MiB)
    attach = subprocess.run([losetup, "--find", "--show", str(backing)], capture_output=True,
                            text=True)
    if attach.returncode != 0:
        pytest.fail(f"losetup cannot attach a loop device here: {attach.stderr.strip()}")
    device = attach.stdout.strip()
    try:
        result = deploy(store, "uefi", "capture", device, progress_log()[1], grow=True)
    finally:
        subprocess.run([losetup, "-d", device], check=True)
    verify(backing)
    check_partitions(tmp_path, backing, contents)
    last_part = table(backing)["partitions"][-1]
    assert last_part["start"] + last_part["size"] - 1 == table(backing)["lastlba"]
    assert result["grown"]["tool"] == "ntfsresize"
    assert result["zeroed_past_image"] == 64 * MiB
