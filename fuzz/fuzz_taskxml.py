"""Fuzz agent.common.taskxml.parse_client_tasks (PROTOCOL.md §3 task documents).

    python fuzz/fuzz_taskxml.py fuzz/corpus/taskxml -max_total_time=600

Only TaskDocumentError may escape. A parsed document must hold what the CTA
relies on: task ids unique UUIDs, never both run and rejected, types and
timeouts valid, parameters str -> str, everything JSON-serialisable (the
outbox stores it).
"""

from __future__ import annotations

import json

from _harness import fuzz, instrumented, known_bug

with instrumented(__name__ == "__main__"):
    from agent.common.errors import TaskDocumentError
    from agent.common.taskxml import MAX_TIMEOUT_S, TYPE_RE, UUID_RE, parse_client_tasks
    from agent.common.task import Task

CID = "pc-0042"
# Reported, reproducers in fuzz/known-crashes/taskxml (skipped with FUZZ_SKIP_KNOWN=1)
KNOWN = [(LookupError, ""),                       # <?xml encoding="x-evil"?>
         (ValueError, "invalid literal for int()")]  # timeout="²"


def _check(data: bytes, client_id: str | None) -> None:
    try:
        doc = parse_client_tasks(data, client_id)
    except TaskDocumentError as exc:
        assert str(exc), "a refusal without a reason"
        return
    except Exception as exc:
        if known_bug(exc, KNOWN):
            return
        raise
    ids = [t.id for t in doc.tasks] + [r.task_id for r in doc.rejected]
    assert len(ids) == len(set(ids)), f"a task id twice: {ids}"
    for task in doc.tasks:
        assert UUID_RE.fullmatch(task.id), task.id
        assert TYPE_RE.fullmatch(task.type), task.type
        assert task.timeout is None or (type(task.timeout) is int
                                        and 1 <= task.timeout <= MAX_TIMEOUT_S), task.timeout
        assert all(type(k) is str and type(v) is str for k, v in task.parameters.items())
        assert Task.from_json(json.loads(json.dumps(task.to_json()))) == task
    for bad in doc.rejected:
        assert bad.task_id and bad.task_id.isprintable() and len(bad.task_id) <= 128
        assert bad.message
    json.dumps([r.__dict__ for r in doc.rejected] + doc.skipped)


def TestOneInput(data: bytes) -> None:
    _check(data, CID)
    _check(data, None)
    if data:  # the size cap holds for every input
        try:
            parse_client_tasks(data, CID, max_bytes=len(data) - 1)
        except TaskDocumentError:
            pass
        except Exception as exc:
            if not known_bug(exc, KNOWN):
                raise
            return
        else:
            raise AssertionError("a document over max_bytes was parsed")


if __name__ == "__main__":
    fuzz(TestOneInput)
