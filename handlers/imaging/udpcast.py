"""The udpcast tools as multicast.py uses them: where they are, the network
interface they use (checked before they start: udpcast itself waits silently
for ever on an interface without a broadcast address), the datagram size for
its MTU, what they print (progress lines end in \\r), and the disconnect a
receiver sends when it leaves.

Learnt on this machine (udpcast 20120424, Debian 12): udp-receiver killed by a
signal never tells the sender, which then waits for it to stop answering
(about 3 minutes, udpcast's default --retries-until-drop) while every other
receiver stalls; udp-receiver exiting by itself (EPIPE on its stdout, with
SIGPIPE ignored) sends CMD_DISCONNECT, 4 bytes from its port to the sender's
(portbase + 1), and the session goes on at once; the same 4 bytes sent in its
name after a kill do the same. udp-sender blocks SIGTERM during a transfer.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import struct
import threading
import time
from collections import deque
from pathlib import Path

from handlers.imaging.store import ImageError

MAX_BLOCK = 8192           # largest datagram payload used on a jumbo-frame link
UDPCAST_OVERHEAD = 44      # IP 20 + UDP 8 + udpcast's header 16 (1500 - 44 = its default 1456)
DISCONNECT = b"\x00\x04\x00\x00"   # CMD_DISCONNECT, what udp-receiver sends on exit
SIOCGIFADDR, SIOCGIFBRDADDR = 0x8915, 0x8919


def tool(name: str) -> str:
    for folder in ("/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"):
        path = os.path.join(folder, name)
        if os.access(path, os.X_OK):
            return path
    raise ImageError(f"{name} not found: install the Debian package udpcast "
                     "(apt-get install udpcast)")


def _ifreq(name: str, request: int) -> str | None:
    """An IPv4 address of interface ``name`` (SIOCGIFADDR / SIOCGIFBRDADDR), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            raw = fcntl.ioctl(sock.fileno(), request, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(raw[20:24])


def interface(wanted: str | None) -> tuple[str, str]:
    """The interface udpcast uses and its IPv4 address. None: udpcast's own choice
    (eth0, then eth0:*, then eth*, then any other with an address, then lo), made
    here too so both sides agree and it can be checked. ImageError if it cannot
    work: no such interface, no IPv4 address, or no broadcast address (udpcast's
    sender and receivers find each other by broadcast)."""
    if wanted is not None and re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}", wanted):   # by address
        owner = [n for _, n in socket.if_nameindex() if _ifreq(n, SIOCGIFADDR) == wanted]
        if not owner:
            raise ImageError(f"no network interface here has the address {wanted} "
                             "(multicast_interface)")
        wanted = owner[0]
    if wanted is None:
        named = [n for _, n in socket.if_nameindex() if _ifreq(n, SIOCGIFADDR)]

        def rank(n: str) -> int:
            return (0 if n == "eth0" else 1 if n.startswith("eth0:") else
                    2 if n.startswith("eth") else 4 if n == "lo" else 3)
        if not named:
            raise ImageError("no network interface with an IPv4 address here: udpcast "
                             "needs one (or give multicast_interface)")
        wanted = min(named, key=rank)
    address = _ifreq(wanted, SIOCGIFADDR)
    if address is None:
        raise ImageError(f"network interface {wanted!r} does not exist or has no IPv4 address "
                         "(multicast_interface)")
    if _ifreq(wanted, SIOCGIFBRDADDR) in (None, "0.0.0.0"):
        raise ImageError(f"network interface {wanted} ({address}) has no broadcast address, "
                         "and udpcast's sender and receivers find each other by broadcast: "
                         f"give it one (ip addr add {address}/PREFIX brd + dev {wanted})")
    return wanted, address


def block_size(name: str) -> int | None:
    """udpcast's datagram payload for the interface's MTU: its default (1456) up to
    MTU 1500, larger on a jumbo-frame link (at most MAX_BLOCK)."""
    try:
        mtu = int(Path(f"/sys/class/net/{name}/mtu").read_text())
    except (OSError, ValueError):
        return None
    return min(MAX_BLOCK, (mtu - UDPCAST_OVERHEAD) // 16 * 16) if mtu > 1500 else None


class UdpcastOutput:
    """Reads a udpcast process's output (progress lines end in \\r) in a thread of
    its own; keeps the lines that are not progress, the last progress numbers,
    and what the sender says about each receiver."""

    NEW = re.compile(r"New connection from (\S+)\s+\(#(\d+)\)")
    STATS = re.compile(r"bytes=\s*([\d ]+?)\s+(?:re-xmits=(\d+)|\()")
    DROP = re.compile(r"Dropping client #(\d+)")
    GONE = re.compile(r"Disconnecting #(\d+) \((\S+)\)")
    CONNECTED = re.compile(r"Connected as #\d+ to (\S+)")

    def __init__(self, stream):
        self.stream = stream
        self.lines: deque[str] = deque(maxlen=40)
        self.bytes = self.rexmits = 0
        self.started = self.complete = False
        self.started_at: float | None = None
        self.first_connection: float | None = None
        self.sender: str | None = None
        self.receivers: list[dict] = []
        self._by_number: dict[str, dict] = {}
        self._thread = threading.Thread(target=self._read, name="udpcast-output", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        pending = b""
        while chunk := os.read(self.stream.fileno(), 65536):
            pending += chunk
            *done, pending = re.split(rb"[\r\n]", pending)
            for raw in done:
                self._line(raw.decode("utf-8", "replace").strip())
        self._line(pending.decode("utf-8", "replace").strip())

    def _line(self, line: str) -> None:
        if not line:
            return
        if m := self.STATS.match(line):
            self.bytes = int(m.group(1).replace(" ", ""))
            self.rexmits = int(m.group(2) or self.rexmits)
            return
        self.lines.append(line)
        if m := self.NEW.search(line):
            entry = {"address": m.group(1), "result": "connected"}
            self.receivers.append(entry)
            self._by_number[m.group(2)] = entry
            self.first_connection = self.first_connection or time.monotonic()
        elif line.startswith("Starting transfer"):
            self.started, self.started_at = True, time.monotonic()
        elif line.startswith("Transfer complete"):
            self.complete = True
        elif m := self.DROP.search(line):
            if m.group(1) in self._by_number:
                self._by_number[m.group(1)]["result"] = "dropped: stopped answering"
        elif m := self.GONE.search(line):
            entry = self._by_number.pop(m.group(1), None)
            if entry is not None and entry["result"] == "connected":
                entry["result"] = ("completed" if self.complete else
                                   "left during the transfer" if self.started else
                                   "left before the start")
        elif m := self.CONNECTED.search(line):
            self.sender = m.group(1)

    def last_words(self, n: int = 3) -> str:
        return " | ".join(list(self.lines)[-n:]) or "(nothing)"

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)


def leave(address: str, port: int, sender: str) -> None:
    """Tell ``sender`` that the receiver at ``address`` (udp-receiver's port ``port``,
    killed) left, as udp-receiver says itself when it exits: the session goes on
    without waiting minutes for it to stop answering."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
            for _ in range(3):
                sock.sendto(DISCONNECT, (sender, port + 1))
    except OSError:
        pass
