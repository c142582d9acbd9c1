"""<ClientTasks> documents (PROTOCOL.md §3): parsed safely into Task objects
(the CTA, ``dsagent run-task``) and rendered (``render_client_tasks``: the
reference server, the ``dsagent_run`` fixture), so both sides agree.

Safety: agent/common/safexml.py (size and depth limits, no DTD). Bad input
never raises anything but TaskDocumentError.

Outcomes, as §3 says:
- the document is unusable -> TaskDocumentError (logged, the pull retried later);
- a Task whose id is readable but which is otherwise bad -> ``rejected``
  (it goes received -> failed with the message);
- a Task with no readable id -> ``skipped`` (logged only).

Paging (v1.1): ``more="true"`` on ``ClientTasks`` sets ``ParsedDocument.more``
(the agent pulls again at once); a ``<Task … oversize="BYTES"/>`` the server
left out of the page because it alone would pass the agent's ``max_bytes``
is ``rejected`` with its size and the limit, so it goes received -> failed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from agent.common.errors import TaskDocumentError
from agent.common.safexml import XMLRefused, parse_xml
from agent.common.task import Task

MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
MAX_DEPTH = 6            # ClientTasks/Task/Parameters/Parameter + slack
MAX_TIMEOUT_S = 30 * 24 * 3600
UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
TYPE_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,127}")
TASK_ATTRS = {"@id", "@type", "@timeout", "@oversize"}


@dataclass
class Rejected:
    task_id: str
    type: str
    message: str


@dataclass
class ParsedDocument:
    tasks: list[Task] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)    # log messages
    more: bool = False       # the server left tasks out of this page: pull again at once


class _Refuse(Exception):
    pass


def parse_client_tasks(data: bytes | str, client_id: str | None = None,
                       max_bytes: int = MAX_DOCUMENT_BYTES) -> ParsedDocument:
    """Parse and validate a <ClientTasks> document (see module docstring)."""
    try:
        doc = parse_xml(data, max_bytes=max_bytes, max_depth=MAX_DEPTH, strip_whitespace=False,
                        force_list=("Task", "Parameter", "Parameters"))
    except XMLRefused as exc:
        raise TaskDocumentError(str(exc)) from None
    if not isinstance(doc, dict) or list(doc) != ["ClientTasks"]:
        root = next(iter(doc), None) if isinstance(doc, dict) else None
        raise TaskDocumentError(f"root element is <{root}>, expected <ClientTasks>")
    root = doc["ClientTasks"] or {}
    if isinstance(root, str):
        if root.strip():
            raise TaskDocumentError("<ClientTasks> holds text instead of <Task> elements")
        root = {}
    addressed = root.get("@client")
    if client_id is not None and addressed is not None and addressed != client_id:
        raise TaskDocumentError(f"document is addressed to client '{addressed}', we are '{client_id}'")
    result = ParsedDocument()
    for key in root:
        if key not in ("Task", "@client", "@more", "#text"):
            result.skipped.append(f"ignored unexpected <ClientTasks> content '{key}'")
    more = root.get("@more")
    result.more = more == "true"
    if more not in (None, "true", "false"):
        result.skipped.append(f"<ClientTasks more={more!r}> is neither \"true\" nor \"false\"; "
                              "taken as false (the next poll or tickle pulls the rest)")
    seen: set[str] = set()
    for index, node in enumerate(root.get("Task") or [], start=1):
        _parse_task(node, index, seen, result, max_bytes)
    return result


def _parse_task(node, index: int, seen: set[str], result: ParsedDocument,
                max_bytes: int) -> None:
    if not isinstance(node, dict):
        node = {"#text": node or ""}
    task_id = node.get("@id")
    if not task_id or len(task_id) > 128 or not task_id.isprintable() or task_id.strip() != task_id:
        result.skipped.append(f"Task #{index} has no readable id; skipped")
        return
    if task_id in seen:
        result.skipped.append(f"Task {task_id} appears twice in the document; the repeat is skipped")
        return
    seen.add(task_id)
    type_name = node.get("@type") or ""
    try:
        if not UUID_RE.fullmatch(task_id):
            raise _Refuse(f"task id '{task_id}' is not a UUID")
        if not TYPE_RE.fullmatch(type_name):
            raise _Refuse(f"missing or malformed type attribute {type_name!r}")
        for key in node:
            if key.startswith("@") and key not in TASK_ATTRS:
                raise _Refuse(f"unknown attribute '{key[1:]}' on <Task>")
            if not key.startswith("@") and key not in ("Parameters", "#text"):
                raise _Refuse(f"unexpected element <{key}> in <Task>")
        if str(node.get("#text") or "").strip():
            raise _Refuse("<Task> holds text outside <Parameters>")
        if node.get("@oversize") is not None:
            raise _Refuse(_oversize(node["@oversize"], max_bytes))
        timeout = _parse_timeout(node.get("@timeout"))
        parameters = _parse_parameters(node.get("Parameters") or [])
    except _Refuse as exc:
        result.rejected.append(Rejected(task_id, type_name, str(exc)))
        return
    result.tasks.append(Task(task_id, type_name, parameters, timeout))


def _oversize(raw: str, max_bytes: int) -> str:
    """The failure message of a task the server left out for its size (§3 paging)."""
    size = raw.strip()
    if not (size.isascii() and size.isdigit()):
        return f"the server left this task out as oversize, with a size {raw!r:.40} that is no number"
    return (f"the task is {int(size):,} bytes, over the {max_bytes:,} bytes this agent takes "
            "in one pull; the server left it out (split its parameters, or pass the "
            "payload by reference)")


def _parse_timeout(raw: str | None) -> int | None:
    if raw is None:
        return None
    text = raw.strip()
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_TIMEOUT_S:
        raise _Refuse(f"timeout {raw!r} is not a whole number of seconds in 1..{MAX_TIMEOUT_S}")
    return int(text)


def _parse_parameters(blocks: list) -> dict[str, str]:
    if len(blocks) > 1:
        raise _Refuse("more than one <Parameters> element")
    params: dict[str, str] = {}
    block = blocks[0] if blocks else None
    if block is None or isinstance(block, str):
        if block and block.strip():
            raise _Refuse("<Parameters> holds text instead of <Parameter> elements")
        return params
    for key in block:
        if key not in ("Parameter", "#text"):
            raise _Refuse(f"unexpected {key!r} in <Parameters>")
    for item in block.get("Parameter") or []:
        if item is None or isinstance(item, str):
            raise _Refuse("a <Parameter> has no name attribute")
        name = item.get("@name")
        extra = [k for k in item if k not in ("@name", "#text")]
        if not name:
            raise _Refuse("a <Parameter> has no name attribute")
        if extra:
            raise _Refuse(f"parameter '{name}' has unexpected content {extra[0]!r}")
        if name in params:
            raise _Refuse(f"parameter '{name}' is given twice")
        params[name] = item.get("#text") or ""
    return params


_TEXT_ESCAPES = {ord("&"): "&amp;", ord("<"): "&lt;", ord(">"): "&gt;", ord('"'): "&quot;",
                 ord("'"): "&apos;", ord("\r"): "&#13;"}
_ATTR_ESCAPES = {**_TEXT_ESCAPES, ord("\n"): "&#10;", ord("\t"): "&#9;"}


def xml_text(value: str) -> str:
    """Escape character data so an XML parser gives back exactly ``value``.

    ``\\r`` becomes ``&#13;``: a literal CR would be normalised to LF.
    """
    return value.translate(_TEXT_ESCAPES)


def xml_attr(value: str) -> str:
    """Escape an attribute value (also tab and newline, which parsers turn into spaces)."""
    return value.translate(_ATTR_ESCAPES)


def render_task(task: dict) -> bytes:
    """One ``<Task>`` element (UTF-8) for a row of ``task_id``, ``type``,
    ``timeout`` (or None) and ``params``; with ``oversize`` (bytes) set, the
    §3 paging stand-in without its parameters."""
    out = [f'<Task id="{xml_attr(task["task_id"])}" type="{xml_attr(task["type"])}"']
    if task.get("oversize") is not None:
        out.append(f' oversize="{int(task["oversize"])}"/>')
        return "".join(out).encode("utf-8")
    if task.get("timeout") is not None:
        out.append(f' timeout="{int(task["timeout"])}"')
    out.append("><Parameters>")
    for name, value in task["params"].items():
        out.append(f'<Parameter name="{xml_attr(name)}">{xml_text(value)}</Parameter>')
    out.append("</Parameters></Task>")
    return "".join(out).encode("utf-8")


def document_head(client_id: str, more: bool = False) -> bytes:
    """What comes before the ``<Task>`` elements (``more="true"`` when the page is partial)."""
    flag = ' more="true"' if more else ""
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<ClientTasks client="{xml_attr(client_id)}"'
            f'{flag}>').encode("utf-8")


DOCUMENT_TAIL = b"</ClientTasks>\n"


def render_client_tasks(client_id: str, tasks: Iterable[dict], more: bool = False) -> bytes:
    """The §3 ``<ClientTasks>`` document (UTF-8) of ``tasks`` (rows as ``render_task``
    takes them: the task server's pending tasks).

    Compact, with no whitespace between elements, so a parser that keeps
    whitespace (xmltodict ``strip_whitespace=False``) sees only parameter text.
    """
    return b"".join([document_head(client_id, more), *map(render_task, tasks), DOCUMENT_TAIL])
