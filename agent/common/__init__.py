"""Plumbing every dsagent process shares: config, errors, logging setup,
tickle frames, status files, the CTA's notify socket, the task server's API.

Nothing here imports the CTA, the tools or a handler; the objecthost uses
only the standard-library modules of this package (not ``serverapi``).
"""
