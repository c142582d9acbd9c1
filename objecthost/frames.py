"""What the objecthost decides about one tickle line (PROTOCOL.md §2).

No sockets here: :mod:`objecthost.connections` hands in each complete line
(or a frame that never became one) and writes back the answer this module
gives. The line checks themselves are :func:`agent.common.tickle.check_tickle`;
this adds what only the listener has: the credentials (re-read while
missing or failing), the replay cache, the rate limit, the counters and the
rationed refusal log.

There is no per-peer state: the rate limit is one global token bucket and
the replay cache holds accepted nonces only, which the token bucket bounds.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from typing import Callable

from agent.common.errors import ConfigError, TickleRefused
from agent.common.statusfile import StatusFile
from agent.common.tickle import ReplayCache, check_tickle
from objecthost.logbudget import LogBudget, Peer, format_peer

log = logging.getLogger("objecthost")

CREDENTIALS_RELOAD_S = 1.0   # re-read the credentials at most this often
REFUSAL_LOG_LINES = 10       # refused tickles logged per second; the rest are counted

CredentialsLoader = Callable[[], "tuple[str, bytes] | None"]

_RELOAD_ON = ("unknown-client", "bad-signature")


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; one global bucket."""

    def __init__(self, rate: float, burst: int):
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class TickleGate:
    """Answers tickle lines: §2's checks in order, then the rate limit.

    ``client_id``/``tickle_key`` may be None (not registered yet): tickles are
    then answered ``ERR unknown-client``. With a ``credentials`` loader
    (returning ``(client_id, tickle_key)`` or None), the credentials are
    re-read, at most once a second and only when a tickle arrives, while they
    are missing or when a tickle fails as unknown-client/bad-signature, so a
    registration (or re-registration) is picked up without a restart.
    ``on_accept(nonce)`` is called for each accepted tickle.
    """

    def __init__(self, client_id: str | None, tickle_key: bytes | None,
                 rate: float, burst: int, stats: Counter[str],
                 on_accept: Callable[[str], None],
                 credentials: CredentialsLoader | None = None,
                 refusal_log_lines: int = REFUSAL_LOG_LINES,
                 status: StatusFile | None = None):
        self.credentials = (client_id, tickle_key) if client_id and tickle_key else None
        self.rate = rate
        self.burst = burst
        self.stats = stats
        self.status = status
        self.replay = ReplayCache()
        self._on_accept = on_accept
        self._loader = credentials
        self._last_reload = -math.inf
        self._bucket = TokenBucket(rate, burst)
        self._refusal_log = LogBudget(refusal_log_lines, 1.0,
                                      "%d more refused tickles not logged in the last second")

    def answer(self, line: bytes, addr) -> bytes:
        """Check one complete line (§2 order, then the rate limit); return the answer."""
        now = time.time()
        try:
            nonce = self._check(line, now)
            if not self._bucket.take():
                raise TickleRefused("busy", f"rate limit ({self.rate:g}/s, burst {self.burst})")
        except TickleRefused as exc:
            self.refuse(addr, exc, line[:40] if exc.code == "bad-frame" else None)
            return f"ERR {exc.code}\n".encode("ascii")
        self.replay.remember(nonce, now)
        self.stats["accepted"] += 1
        log.info("tickle from %s accepted", Peer(addr), extra={"tickle": nonce.lower()})
        if self.status is not None:
            self.status.update(accepted=self.stats["accepted"],
                               last_accepted={"at": now, "peer": format_peer(addr),
                                              "tickle": nonce.lower()})
        self._on_accept(nonce)
        return b"OK\n"

    def refuse(self, addr, exc: TickleRefused, preview: bytes | None = None) -> None:
        """Count a refused tickle and log it (within the budget); ``preview``: its first bytes."""
        self.stats[f"refused-{exc.code}"] += 1
        if self.status is not None:
            self.status.count("refused",
                              last_refused={"at": time.time(), "peer": addr, "code": exc.code})
        if not self._refusal_log.allow():
            return
        reason = exc.reason or exc.code
        if preview:
            reason = f"{reason} (starts {preview!r})"
        log.info("tickle from %s refused %s: %s", Peer(addr), exc.code, reason)

    def close(self) -> None:
        self._refusal_log.close()

    def _check(self, line: bytes, now: float) -> str:
        creds = self.credentials
        reloaded = False
        if creds is None and self._loader is not None:
            creds = self._reload_credentials()
            reloaded = True
        try:
            return self._check_with(line, creds, now)
        except TickleRefused as exc:
            if reloaded or self._loader is None or exc.code not in _RELOAD_ON:
                raise
            fresh = self._reload_credentials()
            if fresh == creds:
                raise
            return self._check_with(line, fresh, now)

    def _check_with(self, line: bytes, creds, now: float) -> str:
        client_id, key = creds if creds else (None, None)
        return check_tickle(line, client_id, key, self.replay, now)

    def _reload_credentials(self):
        """Re-read the credentials (at most once per CREDENTIALS_RELOAD_S)."""
        mono = time.monotonic()
        if mono - self._last_reload < CREDENTIALS_RELOAD_S:
            return self.credentials
        self._last_reload = mono
        try:
            fresh = self._loader()
        except (ConfigError, OSError, ValueError) as exc:
            log.warning("cannot read the credentials: %s", exc)
            return self.credentials
        fresh = (fresh[0], fresh[1]) if fresh and fresh[0] and fresh[1] else None
        if fresh != self.credentials:
            if fresh is None:
                log.warning("credentials are gone: tickles get ERR unknown-client")
            else:
                log.info("credentials loaded for client %s", fresh[0])
            self.credentials = fresh
        return self.credentials
