"""The checkpoint tree and the image-graph planner: pure code, no I/O."""
