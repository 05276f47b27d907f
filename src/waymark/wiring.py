"""Every module that registers journal commit handlers, so recovery knows all intent kinds."""


def load() -> None:
    from waymark.engine import compaction as compact
    from waymark.engine.running import live_checkpoint as live
    from waymark.engine.running import live_merge as merges
    from waymark.usecases.checkpoints import automatic
    from waymark.usecases.checkpoints import lifecycle as checkpoints
    from waymark.usecases.library import store_deploy as library
    from waymark.usecases.vms import definitions as vms

    del automatic, checkpoints, compact, library, live, merges, vms
