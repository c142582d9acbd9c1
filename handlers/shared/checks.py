"""What the built-in handlers' ``dsagent doctor`` checks share."""

from __future__ import annotations

import os
from typing import Any

from agent.plugin import CheckResult


def configured_folder(config: dict[str, Any], key: str, what: str,
                      unset: tuple[str, str]) -> tuple[str, CheckResult | None]:
    """The folder ``[handlers] key`` names, and the result to report instead
    when it is unset (skip; ``unset`` says why that is fine and where to set
    it) or not a folder (fail)."""
    folder = config.get(key)
    if not folder:
        return "", CheckResult("skip", f"[handlers] {key} is not set ({unset[0]})",
                               f"set it in the agent's config {unset[1]}")
    if not os.path.isdir(folder):
        return folder, CheckResult("fail", f"{what} {folder} ([handlers] {key}) is not a "
                                   "folder", f"create it or fix [handlers] {key} in the "
                                   "agent's config")
    return folder, None
