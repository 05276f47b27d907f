"""A running VM's QEMU: presence, power, live checkpoints and live merges."""
