"""BootWizRebuild (PROTOCOL.md §4): rebuild a Linux preboot configuration.

``plugin`` is the handler plugin; ``rebuild`` checks and builds a new version
and tells the PXE server (through handlers.shared.sbsdrop); ``packages`` is
the replication check of driver packages; ``versions`` keeps a
configuration's versions and its ``current`` link; ``cpio`` reads and writes
newc archives; ``errors`` is what they raise.
See docs/bootwiz.md.
"""
