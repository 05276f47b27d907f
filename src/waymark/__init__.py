"""Waymark: Hyper-V style checkpoints and backups for QEMU/KVM virtual machines."""

__version__ = "0.1.0"
