"""Write an image onto a target disk (DeployImage / RestoreBackupImage).

Every run is verified (sha256) before it is written; every byte of the target
the image does not store, up to the source's size and past it to the
target's end, is made zero (hole punched in a file, BLKZEROOUT on a block
device, zeros written where neither works), so no old data of the target
survives. A target smaller than the source is refused before anything is
written. On a larger target the GPT's backup moves to the new end
(disklabel.py), and with ``grow`` the last partition and its file system fill
the disk (grow.py). The target is fsync'd, and its checksum over the image's
span is computed as the image is written, in a thread of its own.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import queue
import stat
import struct
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import groupby
from typing import Callable, Iterator

import zstandard

from agent.plugin import Progress
from agent.plugin.progress import human_bytes
from handlers.imaging import grow as growing
from handlers.imaging.disklabel import (check_sector_size, move_gpt_backup, reread_partitions,
                                        table_sector_size)
from handlers.imaging.buffers import reusing_buffers
from handlers.imaging.source import check_disk_path, disk_size, in_use
from handlers.imaging.store import Chunk, ImageError, start_writeback

THREADS = 2
IN_FLIGHT = 4
ZERO_BLOCK = bytes(4 * 1024 * 1024)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
BLKZEROOUT = 0x127F
ZERO_PIECE = 1 << 30      # past the image, zeroed a GiB at a time (progress, cancel)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_local = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    dec = getattr(_local, "dec", None)
    if dec is None:
        dec = _local.dec = zstandard.ZstdDecompressor()
    return dec


def _unpack(frame_no: int, first_run: int, compressed: bytes, runs: list[Chunk],
            where: str) -> bytes:
    """In a worker thread: verify one frame (sha256 as stored, then zstd's
    content checksum while decompressing) and return its bytes. ``where``
    names the image and its data file for the messages."""
    expected = sum(r.length for r in runs)
    what = (f"{where}: frame {frame_no} (run{'s' if len(runs) > 1 else ''} {first_run}"
            f"{f'-{first_run + len(runs) - 1}' if len(runs) > 1 else ''}, source bytes "
            f"{runs[0].src_offset}..{runs[-1].src_offset + runs[-1].length}, data.zst bytes "
            f"{runs[0].data_offset}+{len(compressed)})")
    if hashlib.sha256(compressed).digest() != runs[0].sha256:
        raise ImageError(f"{what} fails its sha256 check: the image is corrupt")
    try:
        payload = _decompressor().decompress(compressed, max_output_size=expected)
    except zstandard.ZstdError as exc:
        raise ImageError(f"{what} is corrupt: {exc}") from None
    if len(payload) != expected:
        raise ImageError(f"{what} holds {len(payload)} bytes, the index says {expected}")
    return payload


class _Zeroer:
    """Make a byte range of the target read as zeros, as cheaply as the target allows."""

    def __init__(self, fd: int):
        self.fd = fd
        mode = os.fstat(fd).st_mode
        self.can_punch = stat.S_ISREG(mode)
        self.can_zeroout = stat.S_ISBLK(mode)

    def zero(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        if self.can_punch:
            if _libc.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                               offset, length) == 0:
                return
            if ctypes.get_errno() not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            self.can_punch = False
        if self.can_zeroout:
            try:
                fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
                return
            except OSError:
                self.can_zeroout = False
        end = offset + length
        while offset < end:
            n = min(len(ZERO_BLOCK), end - offset)
            os.pwrite(self.fd, memoryview(ZERO_BLOCK)[:n], offset)
            offset += n


class _Hasher(threading.Thread):
    """sha256 of the target's span as written, off the writing thread."""

    def __init__(self):
        super().__init__(daemon=True)
        self.sha = hashlib.sha256()
        self.q: queue.Queue = queue.Queue(maxsize=8)

    def feed_zeros(self, length: int) -> None:
        while length > 0:
            n = min(len(ZERO_BLOCK), length)
            self.q.put(memoryview(ZERO_BLOCK)[:n])
            length -= n

    def run(self) -> None:
        while (buf := self.q.get()) is not None:
            self.sha.update(buf)


@reusing_buffers
def deploy(store, name: str, kind: str, target: str,
           report: Callable[..., None], cancelled: Callable[[], bool] = lambda: False,
           grow: bool = False) -> dict:
    """Write image ``name`` (which must be of ``kind``) from ``store`` (a local
    ImageStore or an HttpImageStore) onto ``target``; with ``grow``, then fill
    a larger target with the last partition and its file system; return details."""
    started = time.monotonic()
    check_disk_path(target, "target")
    version = store.open_current(name)
    try:
        if version.kind != kind:
            task = "DeployImage" if kind == "capture" else "RestoreBackupImage"
            other = "RestoreBackupImage" if kind == "capture" else "DeployImage"
            raise ImageError(f"image '{name}' is a {version.kind} image; {task} takes only "
                             f"{kind} images (use {other})")
        chunks = version.chunks()
        source = version.meta["source"]
        size = int(source["size"])
        table = source.get("partition_table")
        why = in_use(target)
        if why:
            raise ImageError(f"refusing to write a disk in use: {why}")
        fd = os.open(target, os.O_RDWR)
        try:
            target_size = disk_size(fd)
            if target_size < size:
                raise ImageError(
                    f"target {target} is {target_size} bytes ({human_bytes(target_size)}), "
                    f"smaller than the image's source: {size} bytes ({human_bytes(size)}); "
                    "nothing was written (deploying onto a smaller disk is not supported)")
            check_sector_size(fd, table, target)
            if grow:
                growing.precheck(source)   # refuses before anything is written
            image_high = 90.0 if grow or target_size > size else 100.0
            zero_high = 95.0 if grow else 100.0
            data = version.open_data()
            try:
                written, zeroed, digest = _write_image(fd, data, chunks, size,
                                                       _phase(report, "image"), cancelled,
                                                       f"image '{name}'", image_high)
                transfer = data.stats()
            finally:
                data.close()
            past = _zero_past_image(fd, size, target_size, _phase(report, "zero"), cancelled,
                                    image_high, zero_high)
            moved = move_gpt_backup(fd, size, target_size, table_sector_size(table))
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        version.close()
    grown = None
    if grow:
        if cancelled():
            raise ImageError("deploy cancelled (the image is written; grow was not done)")
        grown = growing.grow_target(target, size, target_size, report, zero_high, 100.0)
    _settle(target)
    elapsed = time.monotonic() - started
    return {"image": name, "version": version.version, "kind": kind, "target": target,
            "bytes_written": written, "bytes_zeroed": zeroed, "span_bytes": size,
            "target_bytes": target_size, "zeroed_past_image": past,
            "gpt_backup_moved": moved, "grow": grow, "grown": grown,
            "target_sha256": digest, **transfer, "duration_s": round(elapsed, 3),
            "mb_per_s": round(size / 2**20 / max(elapsed, 1e-6), 1)}


def _phase(report: Callable[..., None], phase: str) -> Callable[..., None]:
    return lambda pct, msg, **details: report(pct, msg, phase=phase, **details)


def _zero_past_image(fd: int, size: int, target_size: int, report, cancelled,
                     low: float, high: float) -> int:
    """Make [size, target_size) zero: no old data of a larger target survives."""
    total = target_size - size
    if total <= 0:
        return 0
    progress = Progress(total, report, "zeroed past the image", low=low, high=high)
    zeroer = _Zeroer(fd)
    done = 0
    while done < total:
        if cancelled():
            raise ImageError("deploy cancelled")
        n = min(ZERO_PIECE, total - done)
        zeroer.zero(size + done, n)
        done += n
        progress.update(done)
    progress.update(total, force=True)
    return total


def _settle(target: str) -> None:
    """fsync what the grow tools wrote, and let the kernel see a block device's table."""
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
        reread_partitions(fd)
    finally:
        os.close(fd)


def _write_image(fd: int, data, chunks: Iterator[Chunk], size: int, report, cancelled,
                 image: str, high: float = 100.0):
    progress = Progress(size, report, "deployed", high=high)
    zeroer = _Zeroer(fd)
    hasher = _Hasher()
    hasher.start()
    written = zeroed = 0
    cursor = 0

    def write_frame(runs: list[Chunk], payload: bytes) -> None:
        nonlocal cursor, written, zeroed
        pos = 0
        view = memoryview(payload)
        for run in runs:
            if run.src_offset < cursor or run.src_offset + run.length > size:
                raise ImageError(f"index run at {run.src_offset} is out of order or outside "
                                 "the image's span: the image is corrupt")
            gap = run.src_offset - cursor
            zeroer.zero(cursor, gap)
            hasher.feed_zeros(gap)
            zeroed += gap
            piece = view[pos:pos + run.length]
            os.pwrite(fd, piece, run.src_offset)
            hasher.q.put(piece)
            written += run.length
            cursor = run.src_offset + run.length
            pos += run.length
        start_writeback(fd, runs[0].src_offset, cursor - runs[0].src_offset)  # fsync: less left
        progress.update(cursor)

    where = f"{image} ({data.where})"
    run_no = 0
    try:
        with ThreadPoolExecutor(THREADS) as pool:
            inflight: deque = deque()
            frames = groupby(chunks, key=lambda c: c.data_offset)
            for frame_no, (data_offset, group) in enumerate(frames):
                if cancelled():
                    raise ImageError("deploy cancelled")
                runs = list(group)
                compressed = data.read(data_offset, runs[0].comp_length)
                inflight.append((runs, pool.submit(_unpack, frame_no, run_no, compressed, runs,
                                                   where)))
                run_no += len(runs)
                while len(inflight) >= IN_FLIGHT:
                    runs_done, future = inflight.popleft()
                    write_frame(runs_done, future.result())
            while inflight:
                runs_done, future = inflight.popleft()
                write_frame(runs_done, future.result())
        zeroer.zero(cursor, size - cursor)
        hasher.feed_zeros(size - cursor)
        zeroed += size - cursor
    finally:
        hasher.q.put(None)
        hasher.join()
    progress.update(size, force=True)
    return written, zeroed, hasher.sha.hexdigest()
