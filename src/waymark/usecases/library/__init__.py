"""The library: stored VMs, hardware profiles, templates."""
