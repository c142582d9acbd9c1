"""Libraries the built-in handlers share (no hooks here): durable file
writes (``durable``), the SBS folder drop (``sbsdrop``: write an .sbs file,
wake the PXE Interface), what their doctor checks share (``checks``) and the
rule for a relative path from a manifest (``relpath``).
Handler packages import these, never each other."""
