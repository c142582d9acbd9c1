"""dsagent: tickle -> CTA -> handler plugins -> durable status upload.

Handler authors need only ``from agent import hookimpl`` (and the errors in
``agent.errors``). The pluggy import is lazy so that the objecthost, which
imports ``agent.config`` and ``agent.tickle``, stays on the standard library.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]


def __getattr__(name: str):
    if name == "hookimpl":
        from .hookspecs import hookimpl

        return hookimpl
    raise AttributeError(f"module 'agent' has no attribute {name!r}")
