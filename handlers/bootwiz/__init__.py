"""BootWizRebuild (PROTOCOL.md §4): rebuild a Linux preboot configuration.

``cpio`` reads and writes newc archives, ``build`` checks driver packages and
builds a new version of a configuration, ``plugin`` is the handler plugin.
See docs/bootwiz.md.
"""
