"""Pure model code: no I/O, no catalog, no QEMU (tree, planner, hardware, policy, ...)."""
