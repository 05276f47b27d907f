"""The command-line face: parses, calls ops, prints. Nothing below ops."""
