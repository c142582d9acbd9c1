"""The optional MQTT wake-up's shared parts: broker URL, topic, client, probe.

Used by the objecthost (objecthost/mqttwake.py), ``dsagent doctor`` and the
reference server's publisher (taskserver/wakeup.py), so the three agree on
the URL rules, the topic and how a client connects (docs/protocol-notes.md,
"MQTT wake-up"). paho-mqtt is imported only inside :func:`new_client`: the
config check and an objecthost without ``[wakeup] mqtt`` never load it.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from agent.common.errors import ConfigError, MqttError

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
TOPIC_PREFIX = "dsagent"
MAX_PACKET_BYTES = 2048      # asked of the broker (MQTT 5): a tickle line is at most 512
WAKE_EXPIRY_S = 300          # a queued wake-up older than this would be refused as stale


@dataclass(frozen=True)
class MqttUrl:
    """A broker: ``mqtt://[user:password@]host[:port]`` or ``mqtts://…`` (TLS)."""

    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @property
    def tls(self) -> bool:
        return self.scheme == "mqtts"

    def __str__(self) -> str:
        """The URL without its credentials (for logs, status and answers)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_mqtt_url(value: str, what: str) -> MqttUrl:
    """Check a broker URL strictly; ``what`` names the key (and file) in the error."""
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:      # a port that is no number or out of range
        raise ConfigError(f"{what}: bad broker URL {_redacted(value)!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ConfigError(f"{what}: a broker URL starts with mqtt:// or mqtts://, got "
                          f"{_redacted(value)!r}")
    if not parts.hostname:
        raise ConfigError(f"{what}: the broker URL {_redacted(value)!r} names no host")
    if port == 0 or (parts.path not in ("", "/")) or parts.query or parts.fragment:
        raise ConfigError(f"{what}: a broker URL is mqtt(s)://[user:password@]host[:port], "
                          f"got {_redacted(value)!r}")
    return MqttUrl(scheme, parts.hostname, port or DEFAULT_PORTS[scheme],
                   unquote(parts.username) if parts.username is not None else None,
                   unquote(parts.password) if parts.password is not None else None)


def _redacted(value: str) -> str:
    """``value`` with a password replaced by ``***`` (errors must not print it)."""
    scheme, sep, rest = value.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not (sep and at and ":" in userinfo):
        return value
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}"


def wake_topic(client_id: str) -> str:
    """Where a client's wake-ups are published: ``dsagent/<client_id>/wake``."""
    return f"{TOPIC_PREFIX}/{client_id}/wake"


def require_paho() -> None:
    """Raise MqttError if paho-mqtt is not installed (a dependency of dsagent,
    but one only the MQTT wake-up needs, so a broken install shows only here)."""
    if importlib.util.find_spec("paho") is None:
        raise MqttError("the MQTT wake-up needs paho-mqtt, which is not installed: "
                        "pip install 'paho-mqtt>=2.0'")


def new_client(url: MqttUrl, client_id: str, ca_file: str | None = None,
               connect_timeout: float = 5.0):
    """A paho-mqtt client (MQTT 5) set up for ``url``: credentials, TLS verified
    against the system CA store or ``ca_file``. Not connected yet."""
    import paho.mqtt.client as paho

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=paho.MQTTv5)
    client.connect_timeout = connect_timeout
    if url.username is not None:
        client.username_pw_set(url.username, url.password)
    if url.tls:
        client.tls_set(ca_certs=ca_file)   # None: the system's CA store; host name checked
    return client


def connect_properties(session_expiry_s: int = 0):
    """CONNECT properties: at most MAX_PACKET_BYTES a message (a bigger one is
    dropped by the broker, never sent to us) and how long the broker keeps
    our session (and the wake-ups queued for it) while we are away."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.MaximumPacketSize = MAX_PACKET_BYTES
    if session_expiry_s:
        props.SessionExpiryInterval = session_expiry_s
    return props


def publish_properties():
    """PUBLISH properties: the broker drops a wake-up it could not deliver
    within WAKE_EXPIRY_S (the agent would refuse it as stale anyway)."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = WAKE_EXPIRY_S
    return props


def probe(url: MqttUrl, topic: str, ca_file: str | None = None, timeout: float = 5.0) -> None:
    """Connect (a throw-away session), subscribe to ``topic`` with QoS 1 and
    disconnect; raise MqttError saying which step failed (``dsagent doctor``)."""
    import ssl

    client = new_client(url, f"dsagent-probe-{os.getpid()}-{threading.get_ident() % 10**6}",
                        ca_file, connect_timeout=timeout)
    answers: dict[str, object] = {}
    got = threading.Event()

    def on_connect(_client, _userdata, _flags, reason, _props):
        answers["connack"] = reason
        if reason.is_failure:
            got.set()
        else:
            client.subscribe(topic, qos=1)

    def on_subscribe(_client, _userdata, _mid, reasons, _props):
        answers["suback"] = reasons[0] if reasons else None
        got.set()

    client.on_connect, client.on_subscribe = on_connect, on_subscribe
    try:
        client.connect(url.host, url.port, keepalive=max(5, int(timeout) * 2),
                       clean_start=True, properties=connect_properties())
    except ssl.SSLError as exc:
        raise MqttError(f"TLS with {url} failed: {exc.reason or exc}", "tls") from None
    except (OSError, ValueError) as exc:
        reason = (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc)
        raise MqttError(f"cannot connect to {url}: {reason}") from None
    client.loop_start()
    try:
        if not got.wait(timeout):
            step = "SUBACK" if "connack" in answers else "CONNACK"
            raise MqttError(f"{url} did not answer ({step}) within {timeout:g} s", "timeout")
        connack = answers["connack"]
        if connack.is_failure:
            raise MqttError(f"{url} refused the connection: {connack}", "refused")
        suback = answers.get("suback")
        if suback is None or suback.is_failure:
            raise MqttError(f"{url} refused the subscription to {topic}: {suback}", "subscribe")
    finally:
        client.disconnect()
        client.loop_stop()
