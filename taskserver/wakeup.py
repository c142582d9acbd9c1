"""Wake-ups over MQTT for clients a TCP tickle cannot reach (behind NAT).

``taskserver.app.tickle_client`` tries TCP first; when the client has no
tickle address or cannot be reached, it publishes the same signed §2 line
here, to ``dsagent/<client_id>/wake`` (QoS 1, not retained, expiring after
300 s), and waits for the broker's PUBACK. The broker comes from one place,
the environment variable ``DSAGENT_SERVER_MQTT`` (``mqtt(s)://[user:password@]host[:port]``;
``DSAGENT_SERVER_MQTT_CA_FILE``: a private CA for mqtts), which ``--mqtt``
of ``serve`` and ``tickle`` set (so uvicorn's worker processes inherit it)
and which every other tickling command (``queue --tickle``, ``deploy``,
``capture``, the ``pxe`` commands) reads. One connection per process serves
every tickle, the 16 threads of a fan-out included (paho's publish is
thread-safe); it is opened at the first publish and kept (paho reconnects it).
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import threading
import time

from agent.common.errors import ConfigError, MqttError
from agent.common.mqtt import MqttUrl, connect_properties, new_client, parse_mqtt_url, \
    publish_properties, wake_topic

ENV = "DSAGENT_SERVER_MQTT"
CA_FILE_ENV = "DSAGENT_SERVER_MQTT_CA_FILE"
PUBLISHED = "published to "      # how a tickle's answer line starts when it went over MQTT
KEEPALIVE_S = 60
CONNECT_RETRY_S = 5.0            # after a failed connect, tickles fail at once for this long
RECONNECT_S = (0.5, 10)          # one client per server process: back quickly after an outage


class Publisher:
    """One broker connection, shared by every tickle of this process."""

    def __init__(self, url: MqttUrl, ca_file: str | None = None):
        self.url = url
        self.ca_file = ca_file
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._refused: str | None = None
        self._client = None
        self._failure: tuple[float, str] | None = None   # (monotonic time, why) of a failed connect

    def publish(self, client_id: str, line: bytes, timeout: float) -> str:
        """Publish ``line`` on ``client_id``'s wake topic; return the answer line
        (``published to mqtt://host:port``) or raise MqttError saying why not."""
        client = self._connect(timeout)
        try:
            info = client.publish(wake_topic(client_id), line, qos=1, retain=False,
                                  properties=publish_properties())
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as exc:
            raise MqttError(f"cannot publish to {self.url}: {exc}") from None
        if not info.is_published():
            raise MqttError(f"{self.url} did not acknowledge the wake-up within {timeout:g} s")
        return f"{PUBLISHED}{self.url}"

    def _connect(self, timeout: float):
        with self._lock:
            if self._client is None and self._failure is not None \
                    and time.monotonic() - self._failure[0] < CONNECT_RETRY_S:
                raise MqttError(self._failure[1])   # a fan-out does not wait N times on a dead broker
            if self._client is None:
                client = new_client(self.url, f"dsagent-server-{socket.gethostname()}-"
                                    f"{os.getpid()}-{secrets.token_hex(3)}", self.ca_file,
                                    connect_timeout=timeout)
                client.reconnect_delay_set(*RECONNECT_S)
                client.on_connect = self._on_connect
                client.on_disconnect = lambda *_: self._connected.clear()
                try:
                    client.connect(self.url.host, self.url.port, keepalive=KEEPALIVE_S,
                                   clean_start=True, properties=connect_properties())
                except (OSError, ValueError) as exc:
                    reason = (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc)
                    self._failure = (time.monotonic(), f"cannot connect to {self.url}: {reason}")
                    raise MqttError(self._failure[1]) from None
                self._failure = None
                client.loop_start()
                self._client = client
            client = self._client
        if not self._connected.wait(timeout):
            raise MqttError(self._refused or f"{self.url} is not connected (reconnecting); "
                            f"waited {timeout:g} s")
        return client

    def _on_connect(self, _client, _userdata, _flags, reason, _props) -> None:
        if reason.is_failure:
            self._refused = f"{self.url} refused the connection: {reason}"
            self._connected.clear()
        else:
            self._refused = None
            self._connected.set()

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()


_publisher: Publisher | None = None
_publisher_lock = threading.Lock()


def publisher() -> Publisher | None:
    """This process's publisher for ``$DSAGENT_SERVER_MQTT``; None when it is unset.

    A changed variable (tests) closes the old connection and opens the new one."""
    global _publisher
    value = os.environ.get(ENV)
    wanted = parse_mqtt_url(value, ENV) if value else None
    ca_file = os.environ.get(CA_FILE_ENV) or None
    with _publisher_lock:
        if _publisher is not None and (_publisher.url, _publisher.ca_file) != (wanted, ca_file):
            _publisher.close()
            _publisher = None
        if wanted is not None and _publisher is None:
            _publisher = Publisher(wanted, ca_file)
        return _publisher


def use_broker(url: str) -> None:
    """Make ``url`` (checked by :func:`check_url`) this process's and its
    children's broker: ``--mqtt``."""
    os.environ[ENV] = url


def close() -> None:
    """Close this process's broker connection (if any)."""
    global _publisher
    with _publisher_lock:
        if _publisher is not None:
            _publisher.close()
            _publisher = None


def check_url(value: str) -> str:
    """argparse ``type=`` for ``--mqtt``: a bad URL is a usage error."""
    try:
        parse_mqtt_url(value, "--mqtt")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--mqtt: ")) from None
    return value
