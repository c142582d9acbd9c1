"""The objecthost process: accepts tickles (PROTOCOL.md §2), wakes the CTA.

Run it as ``python -m objecthost --config FILE`` (standard library and
``agent.common`` only): :mod:`objecthost.server` is the process and the
wake-up hop, :mod:`objecthost.connections` the sockets,
:mod:`objecthost.frames` what a line is answered; with ``[wakeup] mqtt``,
:mod:`objecthost.mqttwake` takes the same lines from an MQTT broker (and
loads paho-mqtt). What it does where §2 leaves room:

- A connection carries one line and gets one answer line, then the objecthost
  closes it. Bytes after the first ``\\n`` are ignored (and drained, so the
  peer reads the answer rather than a reset).
- ``bad-frame`` covers everything that is not exactly one §2 line: garbage, a
  line over 512 bytes (answered as soon as byte 513 arrives, nothing more is
  read), ``\\r\\n`` endings, an uppercase ``sig`` (§2 says lowercase), EOF or
  the 5 s read timeout before the ``\\n`` (answered best effort).
- ``busy`` is one global token bucket (50/s, burst 50), charged only by
  tickles that passed every other check, so forged or broken tickles can
  never make a valid one ``busy``. A ``busy`` tickle's nonce is not
  remembered: the sender may retry the same line.
- Not registered yet (no credentials): tickles get ``ERR unknown-client``.
  Credentials are re-read at most once a second, when a tickle arrives while
  they are missing or fails as unknown-client/bad-signature, so registering
  (or re-registering) needs no restart.
- An accepted tickle is answered ``OK`` at once; a signed wake-up then goes to
  the CTA (``[cta] listen``; ``0.0.0.0``/``::`` mean the loopback). While one
  is in flight, further tickles fold into exactly one more. A CTA that is
  down is logged as a warning; it polls anyway.
- Over ``max_connections`` (1024) connections waiting for their line, the
  oldest one is reset to make room (a line sent at once is always
  answered). Refused tickles are logged at most 10 a second, then counted
  in one summary line. There is no per-peer state, so memory stays flat
  under floods.
- Exit status: 0 after SIGTERM/SIGINT (a second signal drops open
  connections at once), 2 for a config error (one line naming the key and
  the file), 1 when it cannot start (port in use, unreadable hop key).
"""
