"""What a process's own doctor check found (agent/pxe/checks.py,
agent/packages/checks.py); ``dsagent doctor`` turns it into its table row."""

from __future__ import annotations

from typing import NamedTuple


class Finding(NamedTuple):
    status: str        # ok | warn | fail | skip
    finding: str
    action: str = ""
