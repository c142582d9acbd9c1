"""A Reboot task's request to ``dsagent run`` (PROTOCOL.md §4, §8; docs/automation.md).

The Reboot handler (handlers/reboot.py) runs in a worker: it checks ``to`` and
succeeds, but it cannot restart the machine itself, since its own statuses
are still on their way to the server. Once the CTA has committed the Reboot
task's ``succeeded`` event (it is in the outbox then), it writes
``<state_dir>/reboot-request.json`` here and starts no new task. The
supervisor (agent/supervisor.py) sees the file, stops the objecthost and the
CTA, waits until the outbox is empty -- every status accepted by the server,
the Reboot's ``succeeded`` included -- and only then removes the file and runs
``[agent] reboot_command``.

The request carries the machine's boot id: a request left by a machine that
restarted anyway (power cut, a reboot by hand) is done, never acted on again.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

REQUEST_FILE = "reboot-request.json"   # agent/supervisor.py reads it (REBOOT_REQUEST)
TASK_TYPE = "Reboot"
TARGETS = ("production", "automation")
BOOT_ID = "/proc/sys/kernel/random/boot_id"


def boot_id() -> str:
    try:
        return Path(BOOT_ID).read_text().strip()
    except OSError:
        return ""


def write_request(state_dir: str | os.PathLike, task_id: str, to: str) -> Path:
    """Write the request atomically and durably; return its path."""
    if to not in TARGETS:
        raise ValueError(f"reboot target {to!r} is not one of {', '.join(TARGETS)}")
    target = Path(state_dir) / REQUEST_FILE
    tmp = target.with_name(f".{REQUEST_FILE}.tmp")
    body = {"task_id": task_id, "to": to, "requested_at": time.time(), "boot_id": boot_id()}
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(body, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    dfd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return target
