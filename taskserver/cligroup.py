"""A ``dsagent-server`` command with sub-commands (``pxe …``, ``packages …``):
each takes ``--db``, and those that change something ``--no-tickle``."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def command_group(sub: argparse._SubParsersAction, name: str, help_: str, description: str,
                  no_tickle_help: str) -> Callable[..., argparse.ArgumentParser]:
    """Add ``name`` to dsagent-server's sub-parsers; return its sub-command maker
    ``command(name, help, func, change=True)``."""
    group = sub.add_parser(name, help=help_, description=description)
    commands = group.add_subparsers(dest=f"{name}_command", required=True,
                                    metavar=f"{name.upper()}_COMMAND")

    def command(name: str, help_: str, func, change: bool = True) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help_, description=help_)
        p.add_argument("--db", required=True, metavar="FILE|URL",
                       help="the server's database: an SQLite file, or postgresql://…")
        if change:
            p.add_argument("--no-tickle", action="store_true", help=no_tickle_help)
        p.set_defaults(func=func, parser=p)
        return p

    return command
