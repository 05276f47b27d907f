"""The transaction engine: context, journal, steps, locks, compaction, jobs, settling.

It never imports a use case (see docs/architecture.md)."""
