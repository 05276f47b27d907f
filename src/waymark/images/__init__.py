"""Disk images: the only package that runs qemu-img."""
