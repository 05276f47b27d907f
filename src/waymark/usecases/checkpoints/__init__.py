"""Checkpoints: create, apply, rename, delete, automatic checkpoints."""
