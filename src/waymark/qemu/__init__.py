"""QEMU processes: command lines, the accelerator probe, and the QMP facade."""
