"""agent.pxe.probe: the offer parser never raises whatever the bytes, and the
probe reads a real proxy dnsmasq's answers (tests/pxelab.py: a network
namespace, the proxy command line validated by hand; no VM). Fails, never
skips, where dnsmasq or iproute2 is missing."""

from __future__ import annotations

import signal
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pxelab
from agent.pxe import probe

KNOWN, OTHER = "52:54:00:00:00:0a", "52:54:00:00:00:0b"


def offer_payload(xid: int = 0x1234, boot_file: bytes = b"dsagent-pxe/boot.ipxe") -> bytes:
    """A proxy DHCP offer as dnsmasq sends it to iPXE (see the findings)."""
    payload = bytearray(probe.build_discover(KNOWN, xid))
    payload[0] = probe.BOOTREPLY
    payload[20:24] = socket.inet_aton("198.18.0.1")          # siaddr
    payload[108:108 + len(boot_file)] = boot_file
    options = (b"\x35\x01\x02" + b"\x36\x04" + socket.inet_aton("198.18.0.1")
               + b"\x3c\x09PXEClient" + b"\x61\x11" + bytes(17)
               + b"\x2b\x0a\x06\x01\x08\x0a\x04\x00PXE\xff" + b"\xff")
    return bytes(payload[:240]) + options


def test_a_real_looking_offer_is_read():
    assert probe.parse_offer(offer_payload(), xid=0x1234) == probe.Offer(
        server="198.18.0.1", yiaddr="0.0.0.0", boot_file="dsagent-pxe/boot.ipxe",
        next_server="198.18.0.1", vendor_class="PXEClient", has_pxe_options=True)
    assert probe.parse_offer(offer_payload(), xid=0x1235) is None      # another client's
    assert probe.parse_offer(probe.build_discover(KNOWN, 0x1234)) is None  # a request
    frame = probe.build_frame(offer_payload(), bytes(6))
    frame = frame[:34] + struct.pack("!HH", 67, 68) + frame[38:]        # server -> client
    assert probe.parse_frame(frame, 0x1234).boot_file == "dsagent-pxe/boot.ipxe"


def test_the_discover_is_a_pxe_one():
    payload = probe.build_discover("52-54-00-00-00-0A", 7, arch=probe.ARCH_X86_64_EFI, ipxe=True)
    opts: dict[int, bytes] = {}
    probe._options(payload[240:], opts)
    assert payload[28:34] == bytes.fromhex("52540000000a") and payload[10:12] == b"\x80\x00"
    assert opts[53] == b"\x01" and opts[93] == b"\x00\x07" and 175 in opts
    assert opts[60] == b"PXEClient:Arch:00007:UNDI:003016"
    assert probe.build_discover(KNOWN, 7)[240:].find(b"PXEClient:Arch:00000:UNDI:002001") > 0
    with pytest.raises(ValueError):
        probe.build_discover("52:54:00:00:00", 1)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=1600))
def test_random_bytes_never_raise(data):
    for candidate in (data, probe.MAGIC.join([data[:236].ljust(236, b"\0"), data[236:]])):
        result = probe.parse_offer(candidate)
        assert result is None or isinstance(result, probe.Offer)
        probe.parse_frame(candidate)


@settings(max_examples=600)
@given(st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=12),
       st.integers(0, 420), st.binary(max_size=40), st.integers(0, 420))
def test_mutated_offers_never_raise(changes, cut, inserted, at):
    data = bytearray(offer_payload())
    for index, value in changes:
        if index < len(data):
            data[index] = value
    data = bytes(data[:at]) + inserted + bytes(data[at:])
    for candidate in (data, data[:cut]):
        result = probe.parse_offer(candidate)
        assert result is None or isinstance(result, probe.Offer)
        frame = probe.build_frame(candidate, bytes(6))
        frame = frame[:34] + struct.pack("!HH", 67, 68) + frame[38:]
        assert probe.parse_frame(frame) == result
        probe.parse_frame(frame[:cut])


@pytest.fixture
def lab(tmp_path):
    pxelab.need("dnsmasq")
    with pxelab.Lab(tmp_path) as lab:
        yield lab


def proxy_offers(lab, port, mac, **kw):
    with lab.inside():
        offers = probe.discover(port, mac, timeout=0.6, stop_after=1, **kw)
    return [o for o in offers if o.server == lab.address]


def test_the_probe_reads_the_proxy_and_follows_a_sighup(lab):
    root, run = lab.public_dir("root"), lab.public_dir("run")
    (root / "dsagent-pxe").mkdir(mode=0o755)
    (run / "hosts").write_text(KNOWN + "\n")
    (run / "opts").write_text("")
    proxy = lab.proxy(root, run)
    port = lab.port()

    ipxe = proxy_offers(lab, port, KNOWN, ipxe=True)
    assert [(o.boot_file, o.next_server, o.yiaddr, o.vendor_class) for o in ipxe] == [
        ("dsagent-pxe/boot.ipxe", lab.address, "0.0.0.0", "PXEClient")], proxy.output()
    rom = proxy_offers(lab, port, KNOWN)             # a PXE ROM: the menu (option 43)
    assert len(rom) == 1 and rom[0].has_pxe_options and rom[0].boot_file == ""
    assert proxy_offers(lab, port, OTHER, ipxe=True) == []

    pid, seen = proxy.pid, len(proxy.lines)
    (run / "hosts").write_text(f"{KNOWN}\n{OTHER}\n")
    proxy.signal(signal.SIGHUP)
    proxy.wait_for(r"read .*/hosts", 5, start=seen)
    assert [o.boot_file for o in proxy_offers(lab, port, OTHER, ipxe=True)] == [
        "dsagent-pxe/boot.ipxe"]
    assert proxy.alive() and proxy.pid == pid
