"""dsagent: tickle -> CTA -> handler plugins -> durable status upload.

The agent's code, by role (docs/architecture.md draws the whole house):

- ``agent.plugin``: the one public API, for handler authors: hooks, the
  ``hookimpl`` marker, task types and their parameters, errors, progress,
  the ``dsagent_run`` pytest fixture.
- ``agent.common``: plumbing every process shares: config, errors, logging
  setup, tickle frames, status files, the CTA's notify socket, the server API.
- ``agent.cta``: the Client Task Agent, its task state and its workers.
- ``agent.supervisor``: ``dsagent run``, which starts and watches the
  objecthost, the CTA and the ctdataloader.
- ``agent.tools``: what operators run: the CLI and its commands (doctor,
  status, logs, trace, enroll, new-handler, run-task).

This module imports nothing when it is imported, so the objecthost stays on
the standard library. ``agent.hookimpl``, ``agent.errors`` and ``agent.tasks``
are deprecated aliases for handlers written for 0.1 (use ``agent.plugin``).
"""

__version__ = "0.1.0"
__all__ = ["__version__"]


def __getattr__(name: str):
    """``from agent import hookimpl`` (0.1): still works, with a warning."""
    if name != "hookimpl":
        raise AttributeError(f"module 'agent' has no attribute {name!r}")
    import warnings

    from agent.plugin import hookimpl

    warnings.warn("'from agent import hookimpl' is deprecated: use 'from agent.plugin import "
                  "hookimpl'", DeprecationWarning, stacklevel=2)
    globals()["hookimpl"] = hookimpl   # warned once
    return hookimpl
