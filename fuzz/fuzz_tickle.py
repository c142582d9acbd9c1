"""Fuzz agent.common.tickle.check_tickle and check_wake (PROTOCOL.md §2, the CTA hop).

    python fuzz/fuzz_tickle.py fuzz/corpus/tickle -max_total_time=600

Every input is checked twice: as received, and re-signed with the right key
(so the fuzzer also reaches the timestamp and replay checks behind the HMAC).
Only TickleRefused may escape; an accepted line must really be a valid,
fresh, correctly signed line for our client, and the same line again must
be refused as a replay.
"""

from __future__ import annotations

import hmac

from _harness import fuzz, instrumented

with instrumented(__name__ == "__main__"):
    from agent.common.errors import TickleRefused
    from agent.common.tickle import (MAX_LINE, MAX_SKEW_S, TICKLE_RE, WAKE_RE, ReplayCache,
                              check_tickle, check_wake, sign)

CID = "pc-0042"
KEY = bytes.fromhex("00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff")
HOP_KEY = bytes.fromhex("ff" * 32)
NOW = 1_700_000_000  # corpus lines are signed for this moment
CODES = {"bad-frame", "unknown-client", "bad-signature", "stale", "replay"}


def _tickle(line: bytes) -> None:
    cache = ReplayCache()
    try:
        nonce = check_tickle(line, CID, KEY, cache, now=NOW)
    except TickleRefused as exc:
        assert exc.code in CODES, exc.code
        return
    match = TICKLE_RE.fullmatch(line)
    assert len(line) <= MAX_LINE and match, f"accepted a malformed line {line!r}"
    assert match.group(1).decode() == CID, "accepted another client's tickle"
    assert hmac.compare_digest(sign(KEY, line[: line.rindex(b" ")]), match.group(4).decode())
    assert abs(int(match.group(2)) - NOW) <= MAX_SKEW_S, "accepted a stale tickle"
    assert nonce == match.group(3).decode()
    cache.remember(nonce, NOW)
    try:
        check_tickle(line, CID, KEY, cache, now=NOW)
    except TickleRefused as exc:
        assert exc.code == "replay", exc.code
    else:
        raise AssertionError(f"replay of {line!r} accepted")


def _wake(line: bytes) -> None:
    cache = ReplayCache()
    try:
        check_wake(line, HOP_KEY, cache, now=NOW)
    except TickleRefused as exc:
        assert exc.code in CODES, exc.code
        return
    match = WAKE_RE.fullmatch(line)
    assert match and len(line) <= MAX_LINE, f"accepted a malformed wake-up {line!r}"
    assert abs(int(match.group(1)) - NOW) <= MAX_SKEW_S
    try:
        check_wake(line, HOP_KEY, cache, now=NOW)
    except TickleRefused as exc:
        assert exc.code == "replay", exc.code
    else:
        raise AssertionError(f"replayed wake-up {line!r} accepted")


def TestOneInput(data: bytes) -> None:
    for line in (data, *_resigned(data)):
        _tickle(line)
        _wake(line)


def _resigned(data: bytes) -> list[bytes]:
    """The input with its last field replaced by the right signature (tickle and hop key)."""
    body, sep, _ = data.rstrip(b"\n").rpartition(b" ")
    if not sep:
        return []
    return [body + b" " + sign(key, body).encode() + b"\n" for key in (KEY, HOP_KEY)]


if __name__ == "__main__":
    fuzz(TestOneInput)
