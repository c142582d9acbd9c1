"""The optional MQTT wake-up: tickle lines that come from a broker instead of TCP 50122.

For an agent the task server cannot reach (behind NAT), the objecthost
subscribes to ``dsagent/<client_id>/wake`` on the broker of ``[wakeup] mqtt``.
A message is exactly a §2 tickle line and is checked by the very
:class:`objecthost.frames.TickleGate` that answers TCP tickles (same checks,
order, replay cache, rate limit, refusal log, wake-up of the CTA), so a line
accepted over one path is a ``replay`` over the other. Its answer goes
nowhere: there is nobody to answer.

Started only when ``[wakeup] mqtt`` is set; paho-mqtt is imported only then
(through agent/common/mqtt.py), so an objecthost without it stays standard
library only. paho runs its own network thread (``loop_start``) and reconnects
by itself with a doubling delay, which has no jitter: the bounds are drawn per
process (±25 % around 1 s and 60 s), so agents cut off by one broker outage
do not come back in step (PROTOCOL.md §3). Each message is handed to the event
loop and the network thread waits for the gate's decision, so a flood from the
broker is paced by the objecthost, not queued in memory. The session is
persistent (clean start off, expiring 10 min after a disconnect): a wake-up
published while the link was briefly down is delivered on reconnect (one
that waited over 300 s is refused as ``stale``, and the server's messages
expire after 300 s anyway).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from typing import Callable

from agent.common.mqtt import MqttUrl, connect_properties, new_client, wake_topic
from agent.common.statusfile import StatusFile
from objecthost.frames import TickleGate

log = logging.getLogger("objecthost")

KEEPALIVE_S = 60
RECONNECT_MIN_S = 1.0
RECONNECT_MAX_S = 60.0
RECONNECT_JITTER = 0.25          # each bound drawn in [1 - j, 1 + j] x itself, once per process
SESSION_EXPIRY_S = 600           # the broker keeps our subscription and queued wake-ups this long
IDENTITY_RETRY_S = 5.0           # not registered yet: look for the client id this often
HANDOFF_TIMEOUT_S = 5.0          # the network thread waits this long for the gate's decision

Identity = Callable[[], "str | None"]


class MqttWakeup:
    """One persistent subscription to this agent's wake topic, fed to ``gate``.

    ``identity()`` gives the client id (None while not registered: retried
    every IDENTITY_RETRY_S). The link's state goes to ``status`` as ``mqtt``:
    ``{"state": "connected" | "reconnecting" | "waiting-for-identity", ...}``.
    """

    def __init__(self, broker: MqttUrl, ca_file: str | None, gate: TickleGate,
                 identity: Identity, status: StatusFile | None = None):
        self.broker = broker
        self.ca_file = ca_file
        self.gate = gate
        self.identity = identity
        self.status = status
        self.peer = str(broker)        # how refusals and acceptances name the sender
        self.topic: str | None = None
        self._client = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Task | None = None
        self._last_problem: str | None = None
        self._up = False                 # subscribed; a refused attempt's disconnect is no news

    # -- lifecycle (event loop thread) -----------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Subscribe now if the client id is known, else as soon as it is."""
        self._loop = loop
        client_id = self.identity()
        if client_id:
            self._connect(client_id)
            return
        self._report("waiting-for-identity", reason="not registered yet")
        log.info("MQTT wake-up: not registered yet; subscribing once a client id is known")
        self._waiter = loop.create_task(self._wait_for_identity())

    async def _wait_for_identity(self) -> None:
        while True:
            await asyncio.sleep(IDENTITY_RETRY_S)
            client_id = self.identity()
            if client_id:
                self._connect(client_id)
                return

    def stop(self) -> None:
        """Disconnect and end the network thread (blocks: call it off the event loop)."""
        if self._waiter is not None:
            self._waiter.cancel()
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()

    def _connect(self, client_id: str) -> None:
        self.topic = wake_topic(client_id)
        client = new_client(self.broker, f"dsagent-{client_id}", self.ca_file)
        client.reconnect_delay_set(_jittered(RECONNECT_MIN_S), _jittered(RECONNECT_MAX_S))
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.connect_async(self.broker.host, self.broker.port, keepalive=KEEPALIVE_S,
                             clean_start=False,
                             properties=connect_properties(SESSION_EXPIRY_S))
        self._client = client
        self._report("reconnecting", reason="connecting")
        log.info("MQTT wake-up: connecting to %s for %s", self.broker, self.topic)
        client.loop_start()

    # -- paho's network thread ---------------------------------------------------

    def _on_connect(self, client, _userdata, flags, reason, _props) -> None:
        if reason.is_failure:
            self._problem(f"the broker refused the connection: {reason}")
            return
        # a resumed session keeps the subscription; subscribing again is harmless
        client.subscribe(self.topic, qos=1)
        log.debug("MQTT wake-up: connected to %s (session %s)", self.broker,
                  "resumed" if flags.session_present else "new")

    def _on_subscribe(self, _client, _userdata, _mid, reasons, _props) -> None:
        refused = [r for r in reasons if r.is_failure]
        if refused:
            self._problem(f"the broker refused the subscription to {self.topic}: {refused[0]}")
            return
        self._last_problem = None
        self._up = True
        self._report("connected", since=time.time())
        log.info("MQTT wake-up: subscribed to %s on %s", self.topic, self.broker)

    def _on_connect_fail(self, _client, _userdata) -> None:
        self._problem("cannot connect (broker down or unreachable, or TLS failed)")

    def _on_disconnect(self, _client, _userdata, _flags, reason, _props) -> None:
        if self._client is None or not self._up:   # stop() asked for it; or already reported
            return
        self._problem(f"disconnected: {reason}")

    def _on_message(self, _client, _userdata, message) -> None:
        """Hand the payload to the gate on the event loop; wait for its decision."""
        payload = bytes(message.payload)
        decided = threading.Event()

        def decide() -> None:
            try:
                self.gate.answer(payload, self.peer)
            finally:
                decided.set()
        try:
            self._loop.call_soon_threadsafe(decide)
        except RuntimeError:          # the loop is closed: we are shutting down
            return
        decided.wait(HANDOFF_TIMEOUT_S)

    # -- reporting -----------------------------------------------------------------

    def _problem(self, reason: str) -> None:
        """The link is down: say so in the status file; log it when the reason changes."""
        self._up = False
        self._report("reconnecting", reason=reason)
        if reason != self._last_problem:
            log.warning("MQTT wake-up: %s: %s; retrying (TCP tickles and the poll still work)",
                        self.broker, reason)
            self._last_problem = reason

    def _report(self, state: str, **facts) -> None:
        if self.status is not None:
            self.status.update(mqtt={"state": state, "broker": str(self.broker),
                                     "topic": self.topic, "at": time.time(), **facts})


def _jittered(seconds: float) -> float:
    return seconds * random.uniform(1 - RECONNECT_JITTER, 1 + RECONNECT_JITTER)
