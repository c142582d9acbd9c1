"""The PXE site server (PROTOCOL.md v1.1 §7, issue #12): the process that
``dsagent run`` starts when the config has ``[pxe]``. See docs/pxe.md."""
