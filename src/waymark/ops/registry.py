"""Every module that registers journal commit handlers, so recovery knows all intent kinds."""


def load() -> None:
    from waymark.ops import checkpoints, compact, vms

    del checkpoints, compact, vms
