"""The seed's Signal service (PXEStartupInfo): the initial SBS files.

At start, and whenever dnsmasq had to be restarted, the PXE process asks the
task server for the whole picture (``GET …/pxe/startup``, PROTOCOL.md §7),
which also registers it as a PXE server there, and writes the answers into
the SBS folder under their §4 names, so that they travel the same path as
every other SBS file: the Interface parses and applies them, and they end in
SBSStore where support can read them. dnsmasq starts only once they are
applied (the seed's Server bound its ports only then).

A file appears atomically (a hidden temporary file, fsync'ed, then linked
under its final name, never over another file). A fixed name
(``initialPXEConfigPath.sbs``, ``PredefinedComputers.sbs``) still waiting in
the folder was written before this startup answer; the caller scans it in
first (StartupError.waiting), then writes again.
"""

from __future__ import annotations

import os
from pathlib import Path

from agent.common.errors import DsagentError

FILE_NAMES = {"initial-config": "initialPXEConfigPath.sbs", "clients": "{digits}-client.sbs",
              "images": "{digits}-image.sbs", "predefined": "PredefinedComputers.sbs"}


class StartupError(DsagentError):
    """The startup answer could not be written into the SBS folder."""

    def __init__(self, message: str, waiting: bool = False):
        super().__init__(message)
        self.waiting = waiting   # a fixed name is taken by a file not yet applied


def file_name(kind: str) -> str:
    digits = 10**9 + int.from_bytes(os.urandom(8), "big") % (9 * 10**9)
    return FILE_NAMES[kind].format(digits=digits)


def write_startup_files(sbs_dir: Path, answer: dict[str, str | None]) -> list[str]:
    """Write each document of the startup answer (None: nothing to write) and
    return the names written, in §7's order."""
    written = []
    for kind in FILE_NAMES:
        text = answer.get(kind)
        if text is None:
            continue
        name = _write_exclusive(Path(sbs_dir), kind, text.encode("utf-8"))
        written.append(name)
    if written:
        fd = os.open(sbs_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return written


def _write_exclusive(sbs_dir: Path, kind: str, data: bytes) -> str:
    # the name UpdateSBSInfo uses: its scan removes it if we die before unlinking it
    tmp = sbs_dir / f".dsagent.{os.getpid()}.{os.urandom(8).hex()}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        for _ in range(10):
            name = file_name(kind)
            try:
                os.link(tmp, sbs_dir / name)
                return name
            except FileExistsError:
                if "{digits}" not in FILE_NAMES[kind]:
                    raise StartupError(f"{name} is still waiting in {sbs_dir}; applied first",
                                       waiting=True) from None
        raise StartupError(f"no free name for a {kind} file in {sbs_dir}")
    except OSError as exc:
        raise StartupError(f"cannot write the {kind} startup file in {sbs_dir}: "
                           f"{exc.strerror or exc}") from None
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
