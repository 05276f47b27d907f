"""Backups: points in a repository, schedules."""
