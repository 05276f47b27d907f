"""The library share (:mod:`waymark.library.share`)."""
