"""What the reference task server accepts: its error classes and the checks of
every request field (client ids, status events, task documents and fields),
shared by the store, the PXE and automation sides and the CLI.

Every check raises InvalidRequest (or returns the reason) with words that
name the field and what is wrong, for the 400 answer or the CLI's error line.
"""

from __future__ import annotations

import math
import re
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from agent.common.config import parse_hostport as agent_parse_hostport
from agent.common.errors import ConfigError, DsagentError

STATES = ("received", "running", "progress", "succeeded", "failed", "cancelled", "timed_out")
TERMINAL_STATES = ("succeeded", "failed", "cancelled", "timed_out")
EVENT_FIELDS = ("event_id", "task_id", "seq", "state", "progress", "message", "details", "at")

CLIENT_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
UUID_RE = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
RFC3339_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})"
)
# Characters XML 1.0 cannot carry at all, not even as character references.
XML_INVALID_RE = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

class StoreError(DsagentError):
    """Base of the task store's errors."""


class UnknownClient(StoreError, LookupError):
    """No client with that id is enrolled."""


class InvalidRequest(StoreError, ValueError):
    """Bad input (a bad task, parameter, document or registration request)."""


class RegistrationRefused(StoreError):
    """Registration refused: wrong enrollment key, or registration disabled."""


def utc_now() -> str:
    """Current time, RFC 3339 UTC with milliseconds."""
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def valid_client_id(client_id: Any) -> bool:
    return (isinstance(client_id, str) and CLIENT_ID_RE.fullmatch(client_id) is not None
            and client_id.strip(".") != "")   # "." and ".." cannot appear in a URL path


def parse_hostport(value: str) -> tuple[str, int]:
    """``host:port`` (IPv6 as ``[::1]:port``) -> (host, port), port not 0;
    InvalidRequest if bad. The agent's own parser, so both read addresses alike."""
    try:
        host, port = agent_parse_hostport(str(value), "address")
    except ConfigError:
        port = 0
    if not port:
        raise InvalidRequest(f"expected HOST:PORT, got {value!r}")
    return host, port


def sanitize_client_id(name: Any) -> str:
    """A client id ``[A-Za-z0-9._-]{1,64}`` derived from a machine name."""
    text = name if isinstance(name, str) else ""
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", text.strip())
    text = re.sub(r"-{2,}", "-", text).strip("-")[:64].strip("-")
    return text if valid_client_id(text) else "client"


def check_xml_text(value: str, what: str) -> None:
    if bad := XML_INVALID_RE.search(value):
        raise InvalidRequest(
            f"{what} holds character U+{ord(bad.group()):04X} at offset {bad.start()}, "
            "which XML 1.0 cannot carry")


def check_rfc3339(value: str) -> bool:
    if not RFC3339_RE.fullmatch(value):
        return False
    try:
        parse_rfc3339(value)
    except ValueError:
        return False
    return True


def parse_rfc3339(value: str) -> datetime:
    """An RFC 3339 timestamp (checked by check_rfc3339) as an aware datetime."""
    return datetime.fromisoformat(value.replace("z", "Z").replace("t", "T"))


def event_problem(event: Any) -> str | None:
    """Why a status event is malformed, or None if it is well formed."""
    if not isinstance(event, dict):
        return f"an event must be a JSON object, got {type(event).__name__}"
    if missing := [name for name in EVENT_FIELDS if name not in event]:
        return "missing field(s) " + ", ".join(missing)
    event_id, task_id, seq, state = (event[k] for k in ("event_id", "task_id", "seq", "state"))
    if not isinstance(event_id, str) or not UUID_RE.fullmatch(event_id):
        return f"event_id must be a UUID string, got {event_id!r:.80}"
    if not isinstance(task_id, str) or not task_id:
        return f"task_id must be a non-empty string, got {task_id!r:.80}"
    if isinstance(seq, bool) or not isinstance(seq, int) or not 1 <= seq < 2**53:
        return f"seq must be an integer from 1 to 2**53, got {seq!r:.40}"
    if state not in STATES:
        return f"state must be one of {', '.join(STATES)}; got {state!r:.40}"
    progress = event["progress"]
    if progress is not None:
        if isinstance(progress, bool) or not isinstance(progress, (int, float)):
            return f"progress must be a number 0-100 or null, got {progress!r:.40}"
        if not (math.isfinite(progress) and 0 <= progress <= 100):
            return f"progress must be within 0-100, got {progress!r}"
    if event["message"] is not None and not isinstance(event["message"], str):
        return f"message must be a string, got {type(event['message']).__name__}"
    if event["details"] is not None and not isinstance(event["details"], dict):
        return f"details must be an object, got {type(event['details']).__name__}"
    at = event["at"]
    if not isinstance(at, str) or not check_rfc3339(at):
        return f"at must be an RFC 3339 timestamp, got {at!r:.60}"
    return None


def check_task_fields(type_: Any, params: Any, timeout: Any, task_id: Any) -> tuple:
    if not isinstance(type_, str) or not type_.strip():
        raise InvalidRequest(f"task type must be a non-empty string, got {type_!r}")
    check_xml_text(type_, "task type")
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise InvalidRequest("task parameters must be a mapping of name -> string")
    checked: dict[str, str] = {}
    for name, value in params.items():
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"parameter names must be non-empty strings, got {name!r}")
        if not isinstance(value, str):
            raise InvalidRequest(
                f"parameter {name!r} must be a string, got {type(value).__name__}")
        check_xml_text(name, "parameter name")
        check_xml_text(value, f"parameter {name!r}")
        checked[name] = value
    if timeout is not None:
        if isinstance(timeout, str) and timeout.strip().isdigit():
            timeout = int(timeout)
        if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 1:
            raise InvalidRequest(f"timeout must be a whole number of seconds >= 1, got {timeout!r}")
    if task_id is None:
        task_id = str(uuid.uuid4())
    elif not isinstance(task_id, str) or not UUID_RE.fullmatch(task_id):
        raise InvalidRequest(f"task id must be a UUID, got {task_id!r}")
    return type_, checked, timeout, task_id


def parse_task_document(xml_text: str | bytes) -> list[tuple]:
    """``<ClientTasks>`` (or one or more bare ``<Task>`` elements) -> task tuples."""
    def parse(text):
        try:
            return ET.fromstring(text)
        except ET.ParseError as exc:
            return exc
    root = parse(xml_text)
    if isinstance(root, ET.ParseError) and "junk after document element" in str(root):
        text = xml_text.decode("utf-8") if isinstance(xml_text, bytes) else xml_text
        text = re.sub(r"^\ufeff?\s*<\?xml[^>]*\?>", "", text)
        wrapped = parse(f"<ClientTasks>{text}</ClientTasks>")
        if not isinstance(wrapped, ET.ParseError):
            root = wrapped
    if isinstance(root, ET.ParseError):
        raise InvalidRequest(f"task document is not well-formed XML: {root}")
    if root.tag == "Task":
        elements = [root]
    elif root.tag == "ClientTasks":
        elements = []
        for child in root:
            if child.tag != "Task":
                raise InvalidRequest(f"unexpected element <{child.tag}> in <ClientTasks>")
            elements.append(child)
    else:
        raise InvalidRequest(f"expected <ClientTasks> or <Task>, found <{root.tag}>")
    tasks = []
    for number, element in enumerate(elements, 1):
        where = f"Task #{number}"
        if element.get("id") is not None:
            where += f" (id {element.get('id')!r})"
        params: dict[str, str] = {}
        for child in element:
            if child.tag != "Parameters":
                raise InvalidRequest(f"{where}: unexpected element <{child.tag}>")
            for param in child:
                if param.tag != "Parameter":
                    raise InvalidRequest(f"{where}: unexpected element <{param.tag}> in <Parameters>")
                name = param.get("name")
                if not name:
                    raise InvalidRequest(f"{where}: a <Parameter> has no name")
                if len(param):
                    raise InvalidRequest(
                        f"{where}: parameter {name!r} contains element <{param[0].tag}>; "
                        "wrap XML payloads in <![CDATA[...]]> or escape them")
                if name in params:
                    raise InvalidRequest(f"{where}: parameter {name!r} given twice")
                params[name] = param.text or ""
        try:
            tasks.append(check_task_fields(element.get("type"), params,
                                            element.get("timeout"), element.get("id")))
        except InvalidRequest as exc:
            raise InvalidRequest(f"{where}: {exc}") from None
    return tasks
