"""Wake the ctdataloader the moment an event is in the outbox.

A datagram on a Linux abstract Unix socket named after the state dir: no file
to clean up, no path-length limit, nothing carried but "look now". A lost
datagram costs at most the uploader's safety-net wait, never an event.
"""

from __future__ import annotations

import hashlib
import os
import select
import socket


def _address(state_dir: str | os.PathLike) -> bytes:
    digest = hashlib.sha256(os.path.abspath(state_dir).encode()).hexdigest()[:24]
    return b"\0dsagent-outbox-" + digest.encode()


class Notifier:
    """Sender side (the CTA): ``notify()`` never blocks and never raises."""

    def __init__(self, state_dir: str | os.PathLike):
        self._addr = _address(state_dir)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)

    def notify(self) -> None:
        try:
            self._sock.sendto(b"!", self._addr)
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

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for a notification; drain all pending ones."""
        ready, _, _ = select.select([self._sock], [], [], max(0.0, timeout))
        woke = bool(ready)
        while True:
            try:
                self._sock.recv(64)
                woke = True
            except (BlockingIOError, InterruptedError):
                return woke

    def close(self) -> None:
        self._sock.close()
