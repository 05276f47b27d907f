"""The REST API (FastAPI): ``waymark serve`` (:mod:`waymark.api.app`)."""
