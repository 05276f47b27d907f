"""Adapters for folders on shared or external storage: backup repositories, library shares."""
