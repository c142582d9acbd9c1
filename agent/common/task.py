"""One task of a <ClientTasks> document (PROTOCOL.md §3), as every process sees it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Task:
    """One task instance from a <ClientTasks> document."""

    id: str
    type: str
    parameters: dict[str, str] = field(default_factory=dict)
    timeout: int | None = None  # seconds; None -> the type's default

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "parameters": dict(self.parameters),
                "timeout": self.timeout}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Task":
        return cls(data["id"], data["type"], dict(data["parameters"]), data.get("timeout"))
