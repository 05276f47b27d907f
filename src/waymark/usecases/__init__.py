"""Use cases, by capability: VMs, checkpoints, backups, library, access."""
