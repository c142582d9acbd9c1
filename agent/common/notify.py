"""Wake the ctdataloader the moment an event is in the outbox.

A datagram on a Linux abstract Unix socket named after the state dir: no file
to clean up, no path-length limit, nothing carried but "look now" (or "the
server is back", which ends the uploader's backoff at once). A lost datagram
costs at most the uploader's safety-net wait or backoff, never an event.
"""

from __future__ import annotations

import hashlib
import os
import select
import socket


def _address(state_dir: str | os.PathLike) -> bytes:
    digest = hashlib.sha256(os.path.abspath(state_dir).encode()).hexdigest()[:24]
    return b"\0dsagent-outbox-" + digest.encode()


NEW_EVENTS = b"!"        # an event is in the outbox
SERVER_BACK = b"up"      # a pull succeeded after failures: end any upload backoff


class Notifier:
    """Sender side (the CTA): ``notify()`` never blocks and never raises."""

    def __init__(self, state_dir: str | os.PathLike):
        self._addr = _address(state_dir)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)

    def notify(self, what: bytes = NEW_EVENTS) -> None:
        try:
            self._sock.sendto(what, self._addr)
        except OSError:
            pass  # uploader not running or its queue is full: it will look anyway

    def close(self) -> None:
        self._sock.close()


class NotifyListener:
    """Receiver side (the ctdataloader)."""

    def __init__(self, state_dir: str | os.PathLike):
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(_address(state_dir))
        self._sock.setblocking(False)

    def wait(self, timeout: float) -> set[bytes]:
        """Wait up to ``timeout`` s for notifications; drain and return them."""
        ready, _, _ = select.select([self._sock], [], [], max(0.0, timeout))
        got: set[bytes] = set()
        if not ready:
            return got
        while True:
            try:
                got.add(self._sock.recv(64))
            except (BlockingIOError, InterruptedError):
                return got

    def close(self) -> None:
        self._sock.close()
