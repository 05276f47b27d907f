"""Backups to external storage: the repository format and its points."""
