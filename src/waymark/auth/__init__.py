"""Users, roles and permissions: the pure policy (:mod:`waymark.auth.policy`) and secrets
(:mod:`waymark.auth.secrets`); the use cases that store them are :mod:`waymark.ops.users`."""
