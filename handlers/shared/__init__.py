"""Libraries the built-in handlers share (no hooks here): durable file
writes (``durable``), the SBS folder drop (``sbsdrop``: write an .sbs file,
wake the PXE Interface) and what their doctor checks share (``checks``).
Handler packages import these, never each other."""
