"""Capture a disk into the image store (CreateImage / CreateBackupImage).

Pipeline: the calling thread reads runs of the source (see source.py for
which), packs them into frames of up to 4 MiB, and two worker threads each
hash (sha256 per run) and compress (zstd level 1, one compressor per thread)
a frame while the next is read; frames are written in order. Measured here: a
pool of 2 single-threaded level-1 compressors on 4 MiB frames runs ~1.9x one
thread, where zstd's own threads=2 per frame gives ~1.3x.

The version's metadata is written last and only then does the image's
``current`` switch to it (store.py; over HTTP the same order of PUTs,
httpstore.py): a capture killed at any point leaves nothing that looks usable.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Callable, Iterator

import zstandard

from agent import __version__
from agent.plugin import Progress
from handlers.imaging.buffers import reusing_buffers
from handlers.imaging.source import Plan, check_disk_path, in_use, plan_source
from handlers.imaging.store import FORMAT, Chunk, ImageError, IndexWriter

FRAME_BYTES = 4 * 1024 * 1024     # raw bytes per compressed frame
IN_FLIGHT = 4                     # frames being compressed at once (bounds memory)
THREADS = 2
ZERO = bytes(FRAME_BYTES)

_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    comp = getattr(_local, "comp", None)
    if comp is None:
        comp = _local.comp = zstandard.ZstdCompressor(level=1, write_checksum=True)
    return comp


def _pack(runs: list[tuple[int, bytes]]) -> tuple[bytes, bytes]:
    """In a worker thread: one compressed frame and its sha256.

    The frame is hashed as stored (compressed: fewer bytes to hash); zstd's
    own content checksum covers the decompressed bytes.
    """
    frame = _compressor().compress(b"".join(buf for _, buf in runs))
    return hashlib.sha256(frame).digest(), frame


def _segments(fd: int, offset: int, length: int, sparse: bool
              ) -> Iterator[tuple[int, int, bool]]:
    """Split [offset, offset+length) into (offset, length, holds_data), so file
    holes are skipped without reading them."""
    end = offset + length
    if not sparse:
        yield offset, length, True
        return
    pos = offset
    while pos < end:
        try:
            data = min(os.lseek(fd, pos, os.SEEK_DATA), end)
        except OSError:  # ENXIO: only a hole until the end of the file
            data = end
        if data > pos:
            yield pos, data - pos, False
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole - data, True
        pos = hole


def _runs(fd: int, plan: Plan, sparse: bool, cancelled: Callable[[], bool]
          ) -> Iterator[tuple[int, bytes, int]]:
    """Yield (offset, bytes to store or b"", bytes covered) in disk order."""
    for offset, length, mode in plan.regions():
        if mode == "used":
            yield from _read_used(fd, offset, length)
            continue
        for seg_off, seg_len, has_data in _segments(fd, offset, length, sparse):
            if not has_data:
                yield seg_off, b"", seg_len
                continue
            pos, end = seg_off, seg_off + seg_len
            while pos < end:
                if cancelled():
                    raise ImageError("capture cancelled")
                n = min(FRAME_BYTES - pos % FRAME_BYTES, end - pos)  # aligned reads
                buf = _pread(fd, n, pos)
                keep = buf != (ZERO if n == FRAME_BYTES else bytes(n))
                yield pos, (buf if keep else b""), n
                pos += n


def _read_used(fd: int, offset: int, length: int) -> Iterator[tuple[int, bytes, int]]:
    pos, end = offset, offset + length
    while pos < end:
        n = min(FRAME_BYTES - pos % FRAME_BYTES, end - pos)
        yield pos, _pread(fd, n, pos), n
        pos += n


def _pread(fd: int, n: int, pos: int) -> bytes:
    try:
        buf = os.pread(fd, n, pos)
    except OSError as exc:
        raise ImageError(f"cannot read the source at byte {pos}: {exc.strerror}") from None
    if len(buf) != n:
        raise ImageError(f"short read from the source at byte {pos} ({len(buf)} of {n} bytes)")
    return buf


@reusing_buffers
def capture(source: str, store, name: str, kind: str,
            report: Callable[..., None], cancelled: Callable[[], bool] = lambda: False
            ) -> dict:
    """Capture ``source`` as image ``name`` of ``kind`` into ``store`` (a local
    ImageStore or an HttpImageStore); return the task details."""
    started = time.monotonic()
    check_disk_path(source, "source")
    why = in_use(source)
    if why:
        raise ImageError(f"refusing to capture a disk in use: {why}")
    writer = store.begin_capture(name)
    try:
        fd = os.open(source, os.O_RDONLY)
    except OSError:
        writer.close()
        raise
    try:
        plan = plan_source(source, fd)
        sparse = os.path.isfile(source)
        index = writer.index(FRAME_BYTES)
        compressed = _write_frames(fd, plan, sparse, writer.data(), index, report, cancelled)
        image_sha256 = index.finish()
        stored, runs = index.stored, index.count
        meta = {
            "format": FORMAT, "name": name, "kind": kind, "version": writer.version,
            "source": {"path": source, "size": plan.size, **plan.facts},
            "frame_bytes": FRAME_BYTES, "runs": runs,
            "bytes_stored": stored, "compressed_size": compressed,
            "image_sha256": image_sha256,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "tool": f"dsagent {__version__}", "compression": "zstd-1",
        }
        published = writer.commit(meta)
    except BaseException:
        writer.abort()
        raise
    finally:
        os.close(fd)
        writer.close()
    elapsed = time.monotonic() - started
    return {
        "image": name, "version": writer.version, "kind": kind, "source": source,
        "source_size": plan.size, "bytes_stored": stored, "compressed_size": compressed,
        "image_sha256": image_sha256, "runs": runs,
        "strategy": [f"{f['where']}: {f['strategy']}" for f in plan.facts.get("filesystems", [])],
        **published, "duration_s": round(elapsed, 3),
        "read_mb_per_s": round(plan.read_bytes / 2**20 / max(elapsed, 1e-6), 1),
    }


def _write_frames(fd: int, plan: Plan, sparse: bool, out, index: IndexWriter,
                  report, cancelled) -> int:
    """Read, pack, compress and write every frame to ``out`` (a sink: local
    file or HTTP upload); return the compressed size."""
    progress = Progress(plan.read_bytes, report, "captured")
    done = 0
    try:
        with ThreadPoolExecutor(THREADS) as pool:
            inflight: deque = deque()
            frame: list[tuple[int, bytes]] = []
            frame_bytes = 0

            def flush() -> None:
                nonlocal frame, frame_bytes
                if frame:
                    inflight.append((frame, pool.submit(_pack, frame)))
                    frame, frame_bytes = [], 0
                while len(inflight) >= IN_FLIGHT:
                    _write_one(out, inflight.popleft(), index)

            for offset, buf, n_read in _runs(fd, plan, sparse, cancelled):
                done += n_read
                if buf:
                    if frame_bytes + len(buf) > FRAME_BYTES:
                        flush()
                    frame.append((offset, buf))
                    frame_bytes += len(buf)
                progress.update(done)
                if cancelled():
                    raise ImageError("capture cancelled")
            flush()
            while inflight:
                _write_one(out, inflight.popleft(), index)
        size = out.finish()
    except BaseException:
        out.abort()
        raise
    progress.update(done, force=True)
    return size


def _write_one(out, item, index: IndexWriter) -> None:
    runs, future = item
    digest, frame = future.result()
    data_offset = out.write(frame)
    for offset, buf in runs:
        index.add(Chunk(offset, len(buf), data_offset, len(frame), digest))
