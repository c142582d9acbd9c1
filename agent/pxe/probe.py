"""Ask the PXE servers on a link what they answer a computer: a PXE DHCPDISCOVER
sent for a given MAC, and the DHCPOFFERs collected for its xid.

Used by the PXE process's doctor check (another PXE server answering on the
interface) and by the bench (every PXE server answers with the new decision).

Why an ``AF_PACKET`` socket, not a UDP one: the offers come back from the
machine's own address when the server runs here, and Linux drops a UDP packet
arriving on an interface whose source is one of its own addresses (martian
source), so a UDP socket never sees them. A packet socket sees every frame on
the interface, and it can broadcast from an interface without an address.
Frames sent on an interface reach the link, not this machine's own stack: a
dnsmasq bound to the same interface does not see them (send from the other end
of a veth on its bridge to ask it). Linux only; needs CAP_NET_RAW.

``build_discover`` and ``parse_offer`` are pure (bytes in, bytes/Offer out);
``parse_offer`` never raises on any input.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from dataclasses import dataclass

PXE_VENDOR_CLASS = "PXEClient:Arch:{arch:05d}:UNDI:{undi}"  # 002001 BIOS ROMs, 003016 UEFI
ARCH_BIOS = 0
ARCH_X86_64_EFI = 7
MAGIC = b"\x63\x82\x53\x63"
ETH_P_IP = 0x0800
PACKET_OUTGOING = 4
BOOTREQUEST, BOOTREPLY = 1, 2
DISCOVER, OFFER = 1, 2
# options asked for (55): subnet, router, DNS, hostname, vendor class, server id,
# vendor-specific (43), TFTP server name, boot file, client arch, UUID, iPXE's 175
PARAMETERS = bytes([1, 3, 6, 12, 43, 54, 60, 66, 67, 93, 97, 128, 175])


@dataclass(frozen=True)
class Offer:
    server: str             # option 54 (server identifier), else siaddr, else the IP source
    yiaddr: str             # 0.0.0.0 from a proxy DHCP server
    boot_file: str          # BOOTP file field, else option 67
    next_server: str        # siaddr
    vendor_class: str       # option 60 ("PXEClient" from a PXE server)
    has_pxe_options: bool   # option 43 present (PXE menu / discovery control)


def mac_bytes(mac: str | bytes) -> bytes:
    """``52:54:00:12:34:56`` (or ``-`` separated, or 6 bytes) as 6 bytes; ValueError otherwise."""
    if isinstance(mac, bytes):
        raw = mac
    else:
        parts = mac.replace("-", ":").split(":")
        if len(parts) != 6 or not all(1 <= len(p) <= 2 for p in parts):
            raise ValueError(f"not a MAC address: {mac!r}")
        raw = bytes(int(p, 16) for p in parts)
    if len(raw) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return raw


def _option(code: int, value: bytes) -> bytes:
    return bytes([code, len(value)]) + value


def build_discover(mac: str | bytes, xid: int, arch: int = ARCH_BIOS, uuid: bytes | None = None,
                   ipxe: bool = False) -> bytes:
    """The BOOTP/DHCP payload of a PXE DHCPDISCOVER from ``mac`` (broadcast flag
    set), for client ``arch`` (option 93, and in option 60 as PXE ROMs do:
    ``PXEClient:Arch:00000:UNDI:002001`` for BIOS). ``uuid``: 16 bytes (option
    97), zeros if None; ``ipxe``: add option 175, as iPXE does."""
    chaddr = mac_bytes(mac)
    vendor_class = PXE_VENDOR_CLASS.format(arch=arch, undi="002001" if arch == 0 else "003016")
    vendor_class = vendor_class.encode()
    uuid = bytes(16) if uuid is None else uuid
    if len(uuid) != 16:
        raise ValueError("uuid: 16 bytes")
    head = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", BOOTREQUEST, 1, 6, 0, xid & 0xFFFFFFFF, 4,
                       0x8000, bytes(4), bytes(4), bytes(4), bytes(4), chaddr, b"", b"")
    options = (_option(53, bytes([DISCOVER])) + _option(57, struct.pack("!H", 1472))
               + _option(55, PARAMETERS) + _option(60, vendor_class)
               + _option(93, struct.pack("!H", arch)) + _option(94, b"\x01\x02\x01")
               + _option(97, b"\x00" + uuid))
    if ipxe:
        options += _option(175, b"\xb1\x05\x01\x10\xec\x10\x00")  # servers match its presence
    return head + MAGIC + options + b"\xff"


def _options(data: bytes, into: dict[int, bytes]) -> None:
    """Options from ``data`` into ``into`` (a repeated code is concatenated,
    RFC 3396); stops at the end option or at a truncated one."""
    i = 0
    while i < len(data):
        code = data[i]
        if code == 255:
            return
        if code == 0:
            i += 1
            continue
        if i + 1 >= len(data) or i + 2 + data[i + 1] > len(data):
            return
        value = data[i + 2:i + 2 + data[i + 1]]
        into[code] = into.get(code, b"") + value
        i += 2 + data[i + 1]


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", errors="replace")


def _ip(raw: bytes) -> str:
    return socket.inet_ntoa(raw) if len(raw) == 4 else ""


def parse_offer(payload: bytes, xid: int | None = None, source: str = "") -> Offer | None:
    """The Offer in a BOOTP/DHCP payload, or None if it is not a DHCPOFFER
    (for ``xid``, when given) or is malformed. Never raises."""
    try:
        if len(payload) < 240 or payload[0] != BOOTREPLY or payload[236:240] != MAGIC:
            return None
        if xid is not None and struct.unpack("!I", payload[4:8])[0] != xid:
            return None
        opts: dict[int, bytes] = {}
        _options(payload[240:], opts)
        overload = opts.get(52, b"\0")[:1]
        file_field, sname = payload[108:236], payload[44:108]
        if overload and overload[0] & 1:
            _options(file_field, opts)
            file_field = b""
        if overload and overload[0] & 2:
            _options(sname, opts)
        if opts.get(53) != bytes([OFFER]):
            return None
        siaddr = _ip(payload[20:24])
        server = _ip(opts.get(54, b"")) or (siaddr if siaddr != "0.0.0.0" else "") or source
        return Offer(server=server, yiaddr=_ip(payload[16:20]),
                     boot_file=_text(file_field) or _text(opts.get(67, b"")),
                     next_server=siaddr, vendor_class=_text(opts.get(60, b"")),
                     has_pxe_options=43 in opts)
    except Exception:  # defensive by contract: whatever the bytes, no exception
        return None


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def build_frame(payload: bytes, src_mac: bytes) -> bytes:
    """Ethernet broadcast of ``payload`` as UDP 0.0.0.0:68 -> 255.255.255.255:67."""
    udp = struct.pack("!HHHH", 68, 67, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, socket.IPPROTO_UDP, 0,
                     bytes(4), b"\xff" * 4)
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return b"\xff" * 6 + src_mac + struct.pack("!H", ETH_P_IP) + ip + udp


def parse_frame(frame: bytes, xid: int | None = None) -> Offer | None:
    """The Offer in an Ethernet frame (IPv4, UDP to port 68), or None. Never raises."""
    try:
        if len(frame) < 42 or frame[12:14] != b"\x08\x00":
            return None
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[0] >> 4 != 4 or ihl < 20 or ip[9] != socket.IPPROTO_UDP or len(ip) < ihl + 8:
            return None
        sport, dport, length = struct.unpack("!HHH", ip[ihl:ihl + 6])
        if sport != 67 or dport != 68:
            return None
        payload = ip[ihl + 8:ihl + max(length, 8)]
        return parse_offer(payload, xid, source=_ip(ip[12:16]))
    except Exception:
        return None


def discover(interface: str, mac: str | bytes, timeout: float = 2.0, arch: int = ARCH_BIOS,
             uuid: bytes | None = None, ipxe: bool = False, xid: int | None = None,
             stop_after: int | None = None) -> list[Offer]:
    """Broadcast a PXE DHCPDISCOVER for ``mac`` on ``interface`` and return the
    offers for its xid seen within ``timeout`` s (in arrival order; several
    servers, several offers), or as soon as ``stop_after`` offers came.
    OSError if the interface cannot be used."""
    xid = int.from_bytes(os.urandom(4), "big") if xid is None else xid
    offers: list[Offer] = []
    # protocol 0 at creation, ETH_P_IP at bind: a socket created with a protocol
    # is hooked into the stack at once, and the bind then waits for the kernel's
    # synchronize_net() (8-24 ms a probe, bench/pxe.py); this way it takes ~10 us
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as sock:
        sock.bind((interface, ETH_P_IP))
        own_mac = sock.getsockname()[4]
        sock.send(build_frame(build_discover(mac, xid, arch, uuid, ipxe), own_mac[:6]))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([sock], [], [], left)[0]:
                break
            frame, address = sock.recvfrom(65535)
            if address[2] == PACKET_OUTGOING:
                continue
            offer = parse_frame(frame, xid)
            if offer is not None:
                offers.append(offer)
                if stop_after is not None and len(offers) >= stop_after:
                    break
    return offers


def main(argv: list[str] | None = None) -> int:
    """``python -m agent.pxe.probe INTERFACE MAC [--efi] [--ipxe] [--timeout S]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m agent.pxe.probe", description=__doc__.split("\n")[0])
    parser.add_argument("interface")
    parser.add_argument("mac")
    parser.add_argument("--efi", action="store_true", help="client arch 7 (x86-64 UEFI), not 0 (BIOS)")
    parser.add_argument("--ipxe", action="store_true", help="add option 175, as iPXE does")
    parser.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args(argv)
    offers = discover(args.interface, args.mac, args.timeout,
                      ARCH_X86_64_EFI if args.efi else ARCH_BIOS, ipxe=args.ipxe)
    for offer in offers:
        print(offer)
    return 0 if offers else 1


if __name__ == "__main__":
    raise SystemExit(main())
