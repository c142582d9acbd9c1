"""Tickle and wake-up frames (agent/common/tickle.py; PROTOCOL.md §2)."""

from __future__ import annotations

import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.common.errors import TickleRefused
from agent.common.tickle import (MAX_LINE, MAX_SKEW_S, REPLAY_WINDOW_S, ReplayCache, check_tickle,
                          check_wake, load_hop_key, make_tickle, make_wake, sign)

KEY = bytes.fromhex("00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff")
OTHER_KEY = bytes(32)
CID = "pc-0042"
CODES = {"bad-frame", "unknown-client", "bad-signature", "stale", "replay"}
NOW = 1_750_000_000


def signed(body: str, key: bytes = KEY) -> bytes:
    raw = body.encode()
    return raw + b" " + sign(key, raw).encode() + b"\n"


def refused(line: bytes, *, cid=CID, key=KEY, cache=None, now=NOW) -> TickleRefused:
    with pytest.raises(TickleRefused) as info:
        check_tickle(line, cid, key, cache or ReplayCache(), now)
    return info.value


# -- round trip ----------------------------------------------------------------

def test_round_trip_returns_the_nonce():
    line = make_tickle(CID, KEY, now=NOW, nonce="ab" * 8)
    assert line == signed(f"DSTICKLE/1 {CID} {NOW} {'ab' * 8}")
    assert check_tickle(line, CID, KEY, ReplayCache(), NOW) == "ab" * 8


def test_make_tickle_defaults_are_fresh_and_valid():
    a, b = make_tickle(CID, KEY), make_tickle(CID, KEY)
    assert a != b and a.endswith(b"\n") and len(a) <= MAX_LINE
    cache = ReplayCache()
    assert check_tickle(a, CID, KEY, cache) != check_tickle(b, CID, KEY, cache)


def test_longest_valid_tickle_fits():
    cid = "c" * 64
    line = make_tickle(cid, KEY, now=-(10 ** 18), nonce="f" * 64)
    assert len(line) <= MAX_LINE
    with pytest.raises(TickleRefused) as info:   # valid frame, just very stale
        check_tickle(line, cid, KEY, ReplayCache(), NOW)
    assert info.value.code == "stale"


# -- each refusal code ---------------------------------------------------------

GOOD = make_tickle(CID, KEY, now=NOW, nonce="0123456789abcdef")


@pytest.mark.parametrize("line", [
    b"",
    b"\n",
    b"hello\n",
    b"GET / HTTP/1.1\r\n",
    GOOD[:-1],                                   # no newline
    GOOD[:-1] + b"\r\n",                         # CRLF
    GOOD + b"x",                                 # trailing bytes
    b" " + GOOD,                                 # leading space
    GOOD.replace(b"DSTICKLE/1", b"DSTICKLE/2"),
    GOOD.replace(b" ", b"  ", 1),                # double space
    GOOD[:-65] + GOOD[-65:].upper(),             # sig must be lowercase hex
    signed(f"DSTICKLE/1 {CID} {NOW} 0123456789abcde"),        # nonce of 15 digits
    signed(f"DSTICKLE/1 {CID} {NOW} {'a' * 65}"),             # nonce of 65 digits
    signed(f"DSTICKLE/1 {CID} {NOW} 0123456789abcdeg"),       # not hex
    signed(f"DSTICKLE/1 {'c' * 65} {NOW} 0123456789abcdef"),  # client id too long
    signed(f"DSTICKLE/1 pc/42 {NOW} 0123456789abcdef"),       # bad character
    signed(f"DSTICKLE/1 {CID} 12.5 0123456789abcdef"),        # ts not an integer
    signed(f"DSTICKLE/1 {CID} {NOW} 0123456789abcdef extra"),
    "DSTICKLE/1 pc-é 1 0123456789abcdef ".encode() + b"0" * 64 + b"\n",
    b"A" * 512 + b"\n",                          # 513 bytes
    b"A" * 511 + b"\n",                          # 512 bytes, still garbage
])
def test_bad_frame(line):
    assert refused(line).code == "bad-frame"


def test_over_512_bytes_is_refused_before_parsing():
    exc = refused(GOOD[:-1] + b" " * (MAX_LINE - len(GOOD) + 1) + b"\n")
    assert exc.code == "bad-frame" and "longer" in exc.reason


def test_unknown_client():
    assert refused(make_tickle("pc-other", KEY, now=NOW)).code == "unknown-client"
    assert refused(GOOD, cid=None, key=None).code == "unknown-client"   # not registered
    assert refused(GOOD, cid=CID, key=None).code == "unknown-client"


def test_bad_signature():
    assert refused(make_tickle(CID, OTHER_KEY, now=NOW)).code == "bad-signature"
    tampered = GOOD.replace(str(NOW).encode(), str(NOW + 1).encode())
    assert refused(tampered).code == "bad-signature"


@pytest.mark.parametrize("offset", [-(MAX_SKEW_S + 1), MAX_SKEW_S + 1, -10 ** 9, 10 ** 9])
def test_stale_past_and_future(offset):
    assert refused(make_tickle(CID, KEY, now=NOW + offset)).code == "stale"


@pytest.mark.parametrize("offset", [-MAX_SKEW_S, MAX_SKEW_S, 0])
def test_skew_up_to_300s_is_fine(offset):
    check_tickle(make_tickle(CID, KEY, now=NOW + offset), CID, KEY, ReplayCache(), NOW)


def test_replay_only_after_remember():
    cache = ReplayCache()
    nonce = check_tickle(GOOD, CID, KEY, cache, NOW)
    assert check_tickle(GOOD, CID, KEY, cache, NOW) == nonce   # checking alone remembers nothing
    cache.remember(nonce, NOW)
    assert refused(GOOD, cache=cache).code == "replay"
    upper = make_tickle(CID, KEY, now=NOW, nonce=nonce.upper())
    assert refused(upper, cache=cache).code == "replay"         # hex is case-insensitive
    # forgotten once the replay window has passed (the ts is then stale anyway)
    assert not cache.seen(nonce, NOW + REPLAY_WINDOW_S + 1)


def test_checks_run_in_protocol_order():
    cache = ReplayCache()
    cache.remember("0123456789abcdef", NOW)
    old = NOW - 1000
    # unknown client beats a bad signature
    assert refused(make_tickle("x", OTHER_KEY, now=old), cache=cache).code == "unknown-client"
    # bad signature beats stale
    assert refused(make_tickle(CID, OTHER_KEY, now=old), cache=cache).code == "bad-signature"
    # stale beats replay
    line = make_tickle(CID, KEY, now=old, nonce="0123456789abcdef")
    assert refused(line, cache=cache).code == "stale"


def test_replay_cache_hard_cap():
    cache = ReplayCache(max_entries=3)
    for i in range(5):
        cache.remember(f"{i:016x}", NOW)
    assert len(cache) == 3 and not cache.seen(f"{0:016x}", NOW) and cache.seen(f"{4:016x}", NOW)


# -- property: any bytes at all only ever give TickleRefused --------------------

def _frames():
    field = st.text(alphabet="0123456789abcdefABCDEF-._ xyz/\r\n\x00é", max_size=70)
    ts = st.one_of(st.integers(-10 ** 20, 10 ** 20).map(str), field)
    parts = st.tuples(st.sampled_from(["DSTICKLE/1", "DSTICKLE/2", "", "DSWAKE/1"]),
                      st.one_of(st.just(CID), field), ts, field)
    return parts.map(lambda p: signed(" ".join(p)) if p[0] else " ".join(p).encode())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(line=st.one_of(st.binary(max_size=700), _frames()),
       creds=st.sampled_from([(CID, KEY), (None, None), (CID, None)]),
       now=st.one_of(st.just(NOW), st.floats(allow_nan=False, allow_infinity=False,
                                              min_value=-1e12, max_value=1e12)))
def test_check_tickle_only_raises_tickle_refused(line, creds, now):
    cache = ReplayCache()
    try:
        nonce = check_tickle(line, creds[0], creds[1], cache, now)
    except TickleRefused as exc:
        assert exc.code in CODES
    else:
        assert isinstance(nonce, str) and len(line) <= MAX_LINE


# -- wake-up frames (objecthost -> CTA) ------------------------------------------

def test_wake_round_trip_and_replay():
    cache = ReplayCache()
    line = make_wake(KEY, now=NOW)
    assert line.startswith(b"DSWAKE/1 ") and line.endswith(b"\n")
    check_wake(line, KEY, cache, NOW)            # accepted (and remembered)
    with pytest.raises(TickleRefused) as info:
        check_wake(line, KEY, cache, NOW)
    assert info.value.code == "replay"
    check_wake(make_wake(KEY, now=NOW), KEY, cache, NOW)   # a fresh one is fine


@pytest.mark.parametrize("line,code", [
    (make_wake(OTHER_KEY, now=NOW), "bad-signature"),
    (make_wake(KEY, now=NOW - MAX_SKEW_S - 1), "stale"),
    (make_wake(KEY, now=NOW)[:-1], "bad-frame"),
    (GOOD, "bad-frame"),
    (b"DSWAKE/1\n", "bad-frame"),
])
def test_wake_refusals(line, code):
    with pytest.raises(TickleRefused) as info:
        check_wake(line, KEY, ReplayCache(), NOW)
    assert info.value.code == code


def test_hop_key_created_once_even_when_raced(tmp_path):
    for round_ in range(10):
        state = tmp_path / f"s{round_}"
        barrier = threading.Barrier(6)
        keys, errors = [], []

        def load():
            barrier.wait()
            try:
                keys.append(load_hop_key(state, create=True))
            except Exception as exc:  # noqa: BLE001 - the test reports it
                errors.append(exc)

        threads = [threading.Thread(target=load) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and len(set(keys)) == 1 and len(keys[0]) == 32
        assert load_hop_key(state) == keys[0]
        assert (state / "hop.key").stat().st_mode & 0o777 == 0o600
        assert [p.name for p in state.iterdir()] == ["hop.key"]   # no temp files left


def test_hop_key_missing_without_create(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_hop_key(tmp_path)
