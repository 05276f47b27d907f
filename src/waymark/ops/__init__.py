"""Use cases: what the faces (CLI, API, portal) call. Locks, journal and recovery live here."""
