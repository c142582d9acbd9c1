"""Every error dsagent raises on purpose, in one hierarchy.

    DsagentError
    ├── ConfigError          the config file is unreadable, has an unknown or
    │                        missing key, or a bad value (names key and file)
    ├── PluginError          a handler plugin failed to import or to register
    ├── TaskDocumentError    a task XML document is not a usable <ClientTasks>
    ├── TaskRejected         one task refused before it starts (unknown type,
    │   └── BadParameters    bad id/timeout) -- handlers raise BadParameters
    ├── TaskFailed           raised by a handler to fail its task with a message
    ├── TickleRefused        a tickle or wake-up line refused; .code is the ERR code
    ├── SBSParseError        an SBS file is not a §7 document (agent.pxe.sbsdoc)
    ├── InterfaceError       a scan of the SBS folder could not finish (agent.pxe.interface)
    ├── MqttError            the MQTT broker is unreachable, refused us or did not answer
    └── ServerError          the task server is unreachable or answered badly
        ├── AuthError        the server refused our token (401/403)
        └── ServerBusy       503/429: .retry_after (seconds) if it said when to come back

Lower-level errors (httpx, sqlite3, OSError, expat) are translated into these
at one boundary per module, so callers handle dsagent errors only.
"""

from __future__ import annotations


class DsagentError(Exception):
    """Base of every error dsagent raises on purpose."""


class ConfigError(DsagentError):
    """The configuration cannot be used; the message names the key and file."""


class PluginError(DsagentError):
    """A handler plugin failed to import or register; the message names it."""


class TaskDocumentError(DsagentError):
    """A task XML document is not a well-formed, acceptable <ClientTasks>."""


class TaskRejected(DsagentError):
    """A task is refused before it starts; it goes received -> failed."""


class BadParameters(TaskRejected):
    """A handler found the task's parameters unusable (raise from validate)."""


class TaskFailed(DsagentError):
    """Raised by a handler to fail its task with a clear message.

    ``details`` (a JSON-able dict) is reported with the failed event.
    """

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = dict(details or {})


class MqttError(DsagentError):
    """The MQTT wake-up's broker is unreachable, refused us, or did not answer in time.

    ``kind``: ``connect``, ``tls``, ``refused`` (CONNACK: credentials),
    ``subscribe`` (SUBACK: the broker's ACL) or ``timeout``.
    """

    def __init__(self, message: str, kind: str = "connect"):
        super().__init__(message)
        self.kind = kind


class TickleRefused(DsagentError):
    """A tickle (or wake-up) line was refused; ``code`` is the protocol ERR code."""

    def __init__(self, code: str, reason: str = ""):
        super().__init__(f"{code}: {reason}" if reason else code)
        self.code = code
        self.reason = reason


class ServerError(DsagentError):
    """The task server could not be reached, or answered something unusable."""


class AuthError(ServerError):
    """The task server refused our credentials (HTTP 401/403)."""


class ServerBusy(ServerError):
    """The task server shed the call (HTTP 503 or 429). ``retry_after``: the
    seconds its ``Retry-After`` asked us to wait before calling that endpoint
    again, or None (then back off exponentially, PROTOCOL.md §3)."""

    def __init__(self, message: str, retry_after: float | None):
        super().__init__(message)
        self.retry_after = retry_after
