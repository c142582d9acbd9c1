"""Libraries the built-in handlers share (no hooks here): durable file
writes and the SBS folder drop. Handler packages import these, never each
other."""
