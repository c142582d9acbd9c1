"""Example third-party handler package for dsagent (see handler.py)."""
