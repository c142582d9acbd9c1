"""The page of pending tasks one pull gets (PROTOCOL.md §3 paging, v1.1).

``GET …/tasks?limit=N&max_bytes=B``: at most N tasks, oldest first, in a
document of at most B bytes; ``more="true"`` when tasks were left out, so the
agent pulls again at once. A task that alone would not fit in B is listed as
``<Task id type oversize="BYTES"/>`` (BYTES: the document that task alone
would make, counting ``more="true"``), and the agent fails it naming its size: one big task never
stops the others. A pull without the parameters (a v1.0 agent) gets the
defaults, which are what such an agent takes (16 MiB, the v1.0 document
limit); values above the server's caps are lowered to them, so a page may
hold fewer tasks than asked (``more`` says so).
"""

from __future__ import annotations

from typing import Callable, Mapping

from agent.common.taskxml import DOCUMENT_TAIL, MAX_DOCUMENT_BYTES, document_head, render_task

from taskserver.checks import InvalidRequest

DEFAULT_LIMIT = 100              # [cta] pull_batch's default (§6)
MAX_LIMIT = 1000
DEFAULT_MAX_BYTES = MAX_DOCUMENT_BYTES
MIN_MAX_BYTES = 1024             # room for the envelope and a stand-in or two
MAX_MAX_BYTES = 64 * 1024 * 1024


def page_parameters(query: Mapping[str, list[str]]) -> tuple[int, int]:
    """``(limit, max_bytes)`` from a parsed query string (``urllib.parse.parse_qs``
    shape); InvalidRequest naming the parameter when one is not a whole number
    in its range."""
    def one(name: str, default: int, low: int, cap: int) -> int:
        values = query.get(name)
        if not values:
            return default
        text = values[-1].strip()
        if not (text.isascii() and text.isdigit()) or int(text) < low:
            raise InvalidRequest(f"{name} must be a whole number >= {low}, got {values[-1]!r:.40}")
        return min(int(text), cap)
    return (one("limit", DEFAULT_LIMIT, 1, MAX_LIMIT),
            one("max_bytes", DEFAULT_MAX_BYTES, MIN_MAX_BYTES, MAX_MAX_BYTES))


def render_page(client_id: str, fetch: Callable[[int], list[dict]], limit: int,
                max_bytes: int) -> tuple[bytes, dict]:
    """The document for one pull, and what it holds (``task_ids`` listed, how many
    of them ``oversize``, ``more``). ``fetch(n)`` returns up to ``n`` tasks to
    deliver, oldest first."""
    rows = fetch(limit + 1)
    head, flagged = document_head(client_id), document_head(client_id, more=True)
    envelope = len(flagged) + len(DOCUMENT_TAIL)      # room for more="true" kept throughout
    parts: list[bytes] = []
    used, oversize, more = envelope, 0, len(rows) > limit
    for row in rows[:limit]:
        element = render_task(row)
        if envelope + len(element) > max_bytes:      # alone it would not fit either
            element = render_task({**row, "oversize": envelope + len(element)})
            oversize += 1
        if used + len(element) > max_bytes:
            more = True
            break
        parts.append(element)
        used += len(element)
    body = b"".join([flagged if more else head, *parts, DOCUMENT_TAIL])
    return body, {"task_ids": [row["task_id"] for row in rows[:len(parts)]],
                  "oversize": oversize, "more": more}
