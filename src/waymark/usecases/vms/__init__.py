"""VMs: definitions, bundles (export and import)."""
