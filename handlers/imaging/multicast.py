"""One stream to many: DeployImage over multicast, with udpcast (PROTOCOL.md §4, v1.1).

Two kinds of DeployImage task, each on its own computer, each with its own status:

- **receiver** (every computer imaged): ``image``, ``target`` and
  ``multicast=true``. The image is opened from ``[handlers] image_store`` as
  for any deploy (meta.json and index.bin, the index checked against
  ``image_sha256``), but data.zst's bytes come from ``udp-receiver``'s stdout
  instead of the store (``MulticastStore``). deploy.py runs unchanged: it reads
  the frames in increasing order, which a stream serves; every frame is checked
  as always (sha256 as stored, zstd's checksum), so a receiver that got other
  or damaged data fails alone, naming the frame, and leaves the session so the
  others go on.
- **sender** (the site server holding the image): ``image`` and ``targets``
  (the receivers' names, comma-separated: udpcast needs only their count,
  ``--min-receivers``). It runs ``udp-sender`` on data.zst (a folder store's
  file itself; an http store's bytes piped in on stdin) and succeeds when the
  stream went out to at least one receiver; each receiver reports its own
  verification.

udpcast's ports: ``multicast_port`` (even, default 9000) on the receivers and
the next one on the sender; receivers and sender find each other by broadcast
on the interface's broadcast address, the data goes to a multicast group.
docs/multicast.md has the rest (how to queue, timeouts, what each side says).
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import subprocess
import threading
import time
from itertools import groupby
from pathlib import Path
from typing import Callable

from agent.plugin import BadParameters, Param, Progress

from handlers.imaging import udpcast
from handlers.imaging.store import ImageError
from handlers.imaging.udpcast import UdpcastOutput, block_size, interface, tool

DEFAULT_PORT = 9000
DEFAULT_WAIT_S = 600
STALL_S = 300              # receiver: once data flowed, silence this long fails it
LEAVE_GRACE_S = 5.0        # receiver: time for udp-receiver to leave by itself (EPIPE)
FINISH_S = 30.0            # receiver: its stream's end, once every frame is in
HELLO_MS = 200             # sender: re-send HELLO (and re-check the start) this often
RCVBUF = 8 << 20           # receiver socket buffer asked (the kernel caps it at rmem_max)
PIPE_BYTES = 1 << 20       # udp-receiver -> us
CLIENT_ID = r"[A-Za-z0-9._-]{1,64}"

PARAMS = (
    Param("targets", pattern=rf"\s*{CLIENT_ID}(\s*,\s*{CLIENT_ID})*\s*",
          description="multicast sender: the receivers' names, comma-separated (their count "
                      "starts the stream); no 'target'"),
    Param("multicast", pattern=r"(?i)true|false",
          description="true: this computer receives the image from a multicast sender"),
    Param("multicast_port", type="int",
          description=f"udpcast's port base, even (default {DEFAULT_PORT}; it and the next)"),
    Param("multicast_interface", pattern=r"[A-Za-z0-9._:@-]{1,15}",
          description="the network interface (or its IPv4 address) udpcast uses (default: "
                      "udpcast's choice, eth0 first)"),
    Param("multicast_wait_s", type="int",
          description=f"seconds to wait for the other side (default {DEFAULT_WAIT_S})"),
)
MULTICAST_ONLY = ("multicast_port", "multicast_interface", "multicast_wait_s")


# ---- parameters -------------------------------------------------------------------

def role(params: dict) -> str | None:
    """'sender', 'receiver', or None (an ordinary deploy)."""
    if params.get("targets") is not None:
        return "sender"
    if (params.get("multicast") or "").strip().lower() == "true":
        return "receiver"
    return None


def targets_of(params: dict) -> list[str]:
    return [t.strip() for t in params["targets"].split(",")]


def validate(params: dict) -> None:
    """DeployImage's multicast parameters together (BadParameters names the clash)."""
    multicast = params.get("multicast")
    if params.get("targets") is not None:
        if params.get("target") is not None:
            raise BadParameters("DeployImage takes 'target' (this computer's disk) or 'targets' "
                                "(the receivers a multicast sender serves), not both")
        if multicast is not None and multicast.strip().lower() != "true":
            raise BadParameters("'targets' makes this task a multicast sender; multicast=false "
                                "contradicts it")
        names = targets_of(params)
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise BadParameters(f"'targets' names {', '.join(twice)} more than once")
    elif params.get("target") is None:
        raise BadParameters("parameter 'target' is missing" + (
            " (multicast=true is a receiver: it writes 'target', this computer's disk; the "
            "multicast sender takes 'targets' instead)" if role(params) else ""))
    if role(params) is None:
        given = [p for p in MULTICAST_ONLY if params.get(p) is not None]
        if given:
            raise BadParameters(f"{', '.join(given)}: only for a multicast DeployImage "
                                "(multicast=true on a receiver, targets on the sender)")
        return
    port = int(params.get("multicast_port") or DEFAULT_PORT)
    if not 1024 <= port <= 65534 or port % 2:
        raise BadParameters(f"multicast_port must be even, 1024-65534 (udpcast uses it and the "
                            f"next), got {port}")
    if int(params.get("multicast_wait_s") or DEFAULT_WAIT_S) < 1:
        raise BadParameters("multicast_wait_s must be at least 1")


def settings(params: dict) -> tuple[int, str | None, int]:
    return (int(params.get("multicast_port") or DEFAULT_PORT),
            params.get("multicast_interface") or None,
            int(params.get("multicast_wait_s") or DEFAULT_WAIT_S))


# ---- the receiver ---------------------------------------------------------------------

class MulticastStore:
    """``store`` whose versions take data.zst from udp-receiver instead of the store."""

    def __init__(self, store, port: int, wanted_interface: str | None, wait_s: int,
                 cancelled: Callable[[], bool], report: Callable[..., None]):
        self.store, self.port, self.wanted, self.wait_s = store, port, wanted_interface, wait_s
        self.cancelled, self.report = cancelled, report
        self.stream: ReceiverStream | None = None
        self.image = self.version = ""

    def open_current(self, name: str) -> "MulticastVersion":
        version = self.store.open_current(name)
        self.image, self.version = name, version.version
        return MulticastVersion(version, self)

    def explain(self, message: str) -> str:
        """deploy.py's words for a frame that fails its checks, said for a stream."""
        if self.stream is None or not self.stream.frames:
            return message
        why = (f"what arrived is not that frame of image '{self.image}' version {self.version} "
               f"(the sender sends another image or version, or the data was damaged on the "
               f"way); this receiver left the session, the others go on"
               + (f" (sender {self.stream.out.sender})" if self.stream.out.sender else ""))
        if ": the image is corrupt" in message:
            return message.replace(": the image is corrupt", ": " + why)
        if re.search(r"frame \d+ .*(is corrupt|holds \d+ bytes)", message):
            return f"{message}; {why}"
        return message


class MulticastVersion:
    """A version opened from the real store; only its data comes from the network."""

    def __init__(self, inner, store: MulticastStore):
        self.inner, self.store = inner, store
        self.meta, self.version = inner.meta, inner.version

    @property
    def kind(self) -> str:
        return self.inner.kind

    def chunks(self):
        return self.inner.chunks()

    def open_data(self) -> "ReceiverStream":
        s = self.store
        name, address = interface(s.wanted)
        size = self.meta.get("compressed_size")
        if not isinstance(size, int) or size < 0:
            raise ImageError(f"image '{s.image}': meta.json's compressed_size is {size!r}")
        argv = [tool("udp-receiver"), "--nokbd", "--portbase", str(s.port), "--interface", name,
                "--rcvbuf", str(RCVBUF)]
        s.stream = ReceiverStream(argv, size, s.port, name, address, s.wait_s, s.cancelled,
                                  s.report)
        return s.stream

    def close(self) -> None:
        self.inner.close()


class ReceiverStream:
    """data.zst as udp-receiver writes it to its stdout: ``read(offset, length)``
    in increasing order (a gap is read and dropped), with timeouts: none of it
    within ``wait_s`` (no sender), or silence for STALL_S once it flows. Closing
    early makes udp-receiver leave the session (it exits on EPIPE, telling the
    sender); one that must be killed is taken out of the session by a
    disconnect sent in its name."""

    def __init__(self, argv: list[str], size: int, port: int, name: str, address: str,
                 wait_s: int, cancelled: Callable[[], bool], report: Callable[..., None]):
        self.size, self.port, self.interface, self.address = size, port, name, address
        self.wait_s, self.cancelled, self.report = wait_s, cancelled, report
        self.where = f"multicast stream: udp-receiver on {name} ({address}), port {port}"
        self.pos = self.frames = 0
        self.begun = time.monotonic()
        self.first_at: float | None = None
        self.last_at = self.begun
        self._announced = False
        self.complete = False                           # every frame read: stats() was asked
        # SIGPIPE ignored (inherited through exec): closing our end makes udp-receiver's
        # next write fail with EPIPE, and it exits telling the sender it left
        self.proc = subprocess.Popen(["/bin/sh", "-c", 'trap "" PIPE; exec "$0" "$@"', *argv],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, bufsize=0)
        self.fd = self.proc.stdout.fileno()
        try:
            fcntl.fcntl(self.fd, 1031, PIPE_BYTES)       # F_SETPIPE_SZ
        except OSError:
            pass
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLIN)
        self.out = UdpcastOutput(self.proc.stderr)
        report(0.0, f"waiting for the multicast sender (udp-receiver on {name}, port {port}, "
                    f"up to {wait_s} s)", multicast="receiver")

    def read(self, offset: int, length: int) -> bytearray:
        if offset < self.pos:
            raise ImageError(f"{self.where}: data.zst byte {offset} wanted after byte "
                             f"{self.pos}: a stream is read once, in order")
        what = f"frame {self.frames} (data.zst bytes {offset}+{length})"
        while self.pos < offset:                        # not expected: frames are back to back
            skip = bytearray(min(offset - self.pos, 1 << 20))
            self._fill(memoryview(skip), what)
        buf = bytearray(length)
        self._fill(memoryview(buf), what)
        self.frames += 1
        return buf

    def _fill(self, view: memoryview, what: str) -> None:
        got = 0
        while got < len(view):
            self._wait(what)
            n = os.readv(self.fd, [view[got:]])
            if n == 0:
                self._ended(what)
            if self.first_at is None:
                self.first_at = time.monotonic()
            got += n
            self.pos += n
            self.last_at = time.monotonic()

    def _wait(self, what: str) -> None:
        since = time.monotonic()
        while not self._poll.poll(250):
            if self.cancelled():
                raise ImageError("deploy cancelled")
            now = time.monotonic()
            if self.out.sender and not self._announced:
                self._announced = True
                self.report(0.0, f"connected to the multicast sender {self.out.sender}; "
                                 "waiting for the transfer to start", multicast="receiver")
            if self.first_at is None and now - self.begun > self.wait_s:
                raise ImageError(
                    f"no multicast stream within {self.wait_s} s (multicast_wait_s) on port "
                    f"{self.port}, {self.interface}: "
                    + (f"connected to the sender {self.out.sender}, but it did not start (it "
                       "waits for its other targets)" if self.out.sender else
                       "no sender answered (queue the sender's DeployImage with targets on "
                       "the computer holding the image, on this network)")
                    + f"; udp-receiver said: {self.out.last_words()}")
            if self.first_at is not None and now - max(self.last_at, since) > STALL_S:
                raise ImageError(
                    f"the multicast stream stalled: nothing from the sender "
                    f"{self.out.sender or '?'} for {STALL_S} s, after {self.pos} of {self.size} "
                    f"bytes, in {what}; udp-receiver said: {self.out.last_words()}")

    def _ended(self, what: str) -> None:
        try:
            code = self.proc.wait(LEAVE_GRACE_S)
        except subprocess.TimeoutExpired:
            code = None
        self.out.join()
        shorter = (" (the sender's stream is shorter than this image's data: another image "
                   "or version?)" if code == 0 else "")
        how = f"was killed (signal {-code})" if code is not None and code < 0 else \
            f"ended (exit status {code})"
        raise ImageError(f"udp-receiver {how} after {self.pos} of "
                         f"{self.size} bytes of data.zst, in {what}{shorter}; it said: "
                         f"{self.out.last_words()}")

    def stats(self) -> dict:
        """What the task details add. deploy.py asks once every frame is written;
        the stream's end is awaited by ``finish()``, while deploy syncs the target."""
        self.complete = True
        first = self.first_at or self.last_at
        return {"multicast": "receiver", "multicast_sender": self.out.sender,
                "multicast_port": self.port, "multicast_interface": self.interface,
                "multicast_waited_s": round(first - self.begun, 3),
                "multicast_receive_s": round(self.last_at - first, 3),
                "stream_bytes": self.pos}

    def finish(self) -> dict:
        """After the deploy: the stream read to its end (udp-receiver acknowledges the
        last slice, lingers --exit-wait, exits). Every frame is verified by now, so
        what happens here is reported, never a failure."""
        extra, junk = 0, bytearray(1 << 20)
        deadline = time.monotonic() + FINISH_S
        while time.monotonic() < deadline:
            if not self._poll.poll(250):
                continue
            n = os.readv(self.fd, [junk])
            if n == 0:
                break
            extra += n
        self.complete = False
        try:
            code: int | str | None = self.proc.wait(LEAVE_GRACE_S)
        except subprocess.TimeoutExpired:
            code = f"killed: the stream did not end within {FINISH_S} s of its last frame"
            self.close()
        return {"udp_receiver_exit": code, **({"stream_extra_bytes": extra} if extra else {})}

    def close(self) -> None:
        if self.complete:
            return                                      # finish() reads it to its end
        if self.proc.poll() is None:
            self.proc.stdout.close()                    # EPIPE on its next write: it leaves
            if self.first_at is not None:               # (it writes only once data flows)
                try:
                    self.proc.wait(LEAVE_GRACE_S)
                except subprocess.TimeoutExpired:
                    pass
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        if self.proc.returncode < 0:                    # a signal: it could not say it left
            self._leave()
        self.out.join()
        for stream in (self.proc.stdout, self.proc.stderr):
            if not stream.closed:
                stream.close()

    def _leave(self) -> None:
        if self.out.sender:
            udpcast.leave(self.address, self.port, self.out.sender)


def run_receiver(store, params: dict, report, cancelled) -> dict:
    from handlers.imaging.deploy import deploy

    port, wanted, wait_s = settings(params)
    mstore = MulticastStore(store, port, wanted, wait_s, cancelled, report)
    try:
        details = deploy(mstore, params["image"], "capture", params["target"], report,
                         cancelled, grow=params.get("grow") == "true")
        if mstore.stream is not None:
            details.update(mstore.stream.finish())
        return details
    except ImageError as exc:
        raise ImageError(mstore.explain(str(exc))) from None
    finally:
        if mstore.stream is not None:
            mstore.stream.complete = False
            mstore.stream.close()


# ---- the sender -----------------------------------------------------------------------

def run_sender(store, params: dict, report, cancelled) -> dict:
    began = time.monotonic()
    port, wanted, wait_s = settings(params)
    targets = targets_of(params)
    name = params["image"]
    exe = tool("udp-sender")
    nic, address = interface(wanted)
    version = store.open_current(name)
    feeder = None
    try:
        if version.kind != "capture":
            raise ImageError(f"image '{name}' is a {version.kind} image; DeployImage takes only "
                             "capture images (use RestoreBackupImage)")
        size = version.meta.get("compressed_size")
        if not isinstance(size, int) or size < 0:
            raise ImageError(f"image '{name}': meta.json's compressed_size is {size!r}")
        local = getattr(version, "dir", None)
        block = block_size(nic)
        argv = [exe, "--nokbd", "--portbase", str(port), "--interface", nic,
                "--min-receivers", str(len(targets)), "--max-wait", str(wait_s),
                "--rexmit-hello-interval", str(HELLO_MS)]
        argv += ["--blocksize", str(block)] if block else []
        if local is not None:
            data_path = Path(local) / "data.zst"
            if data_path.stat().st_size != size:
                raise ImageError(f"{data_path} is {data_path.stat().st_size} bytes, its "
                                 f"metadata says {size}: the image is damaged")
            argv += ["--file", str(data_path)]
        else:
            feeder = _Feeder(version)               # the index checked, the frames known
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL if local is not None
                                else subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, bufsize=0)
        out = UdpcastOutput(proc.stdout)
        report(0.0, f"waiting for {len(targets)} receiver(s) on {nic} ({address}), port {port}",
               multicast="sender")
        try:
            if feeder is not None:
                feeder.feed(proc.stdin)
            _watch(proc, out, size, len(targets), wait_s, report, cancelled)
        except BaseException:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise
    finally:
        if feeder is not None:
            feeder.stop()
        version.close()
    ended = time.monotonic()
    done = [r for r in out.receivers if r["result"] == "completed"]
    if feeder is not None and feeder.error is not None:
        raise ImageError(f"image '{name}': reading the store failed, so the stream was cut "
                         f"short: {feeder.error}")
    if proc.returncode != 0 or not out.complete or not done:
        raise ImageError(
            f"udp-sender (port {port}, {nic}) "
            + (f"exited with status {proc.returncode}" if proc.returncode else
               "sent to no receiver to the end" if out.complete else "did not finish")
            + f"; receivers: {_receivers(out.receivers)}; it said: {out.last_words()}")
    transfer = ended - (out.started_at or ended)
    return {"image": name, "version": version.version, "kind": "capture",
            "multicast": "sender", "targets": targets, "receivers_expected": len(targets),
            "receivers_completed": len(done), "receivers": out.receivers,
            "bytes_sent": size, "retransmitted_blocks": out.rexmits,
            "multicast_port": port, "multicast_interface": nic, "block_size": block or 1456,
            "waited_s": round((out.started_at or ended) - began, 3),
            "transfer_s": round(transfer, 3), "duration_s": round(ended - began, 3),
            "mb_per_s": round(size / 2**20 / max(transfer, 1e-6), 1)}


def _receivers(receivers: list[dict]) -> str:
    return ", ".join(f"{r['address']} {r['result']}" for r in receivers) or "none connected"


def _watch(proc, out: UdpcastOutput, size: int, expected: int, wait_s: int,
           report, cancelled) -> None:
    """Until udp-sender ends: progress, cancel, and the wait for receivers."""
    progress = Progress(size, report, f"sent to {expected} receiver(s)")
    began = time.monotonic()
    while True:
        try:
            proc.wait(0.25)
            break
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        reason = None
        if cancelled():
            reason = "deploy cancelled"
        elif not out.started:               # udp-sender starts --max-wait s after the first
            first = out.first_connection    # receiver connected: a few s of grace for it
            if now > (began + wait_s if first is None else first + wait_s + 5):
                reason = (f"no receiver connected within {wait_s} s (multicast_wait_s): start "
                          "the receivers' DeployImage (multicast=true) on this network, same "
                          "multicast_port" if out.first_connection is None else
                          f"the transfer did not start {wait_s} s after the first receiver "
                          f"connected; receivers: {_receivers(out.receivers)}")
        if reason:
            proc.kill()           # SIGTERM is blocked by udp-sender during a transfer
            proc.wait()
            out.join()
            raise ImageError(f"{reason}; udp-sender said: {out.last_words()}")
        if out.started:
            progress.update(out.bytes)
    out.join()
    if out.complete:
        progress.update(size, force=True)


class _Feeder(threading.Thread):
    """An http store's data.zst, frame by frame, into udp-sender's stdin."""

    def __init__(self, version):
        super().__init__(name="multicast-feed", daemon=True)
        self.chunks = version.chunks()              # checks the index; the frames are known
        self.data = version.open_data()
        self.error: BaseException | None = None

    def feed(self, sink) -> None:
        self.sink = sink
        self.start()

    def run(self) -> None:
        try:                                        # every receiver checks the frames
            for data_offset, runs in groupby(self.chunks, key=lambda c: c.data_offset):
                view = memoryview(self.data.read(data_offset, next(runs).comp_length))
                while view:
                    view = view[self.sink.write(view):]
        except BrokenPipeError:
            pass                                    # udp-sender ended: its status says why
        except (ImageError, OSError) as exc:
            self.error = exc
        finally:
            try:
                self.sink.close()                   # the stream ends here
            except OSError:
                pass

    def stop(self) -> None:
        self.data.close()
        if self.is_alive():
            self.join(10)


def run(store, params: dict, report, cancelled) -> dict:
    """A multicast DeployImage (``role(params)`` is not None): its details."""
    if role(params) == "sender":
        return run_sender(store, params, report, cancelled)
    return run_receiver(store, params, report, cancelled)
