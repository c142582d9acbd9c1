"""Disk imaging: Create/Deploy Image, Create Backup/Restore Backup Image (PROTOCOL.md §4)."""
