"""Every module that registers journal commit handlers, so recovery knows all intent kinds."""


def load() -> None:
    from waymark.ops import automatic, checkpoints, compact, library, live, merges, vms

    del automatic, checkpoints, compact, library, live, merges, vms
