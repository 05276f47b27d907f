"""Users, roles and permissions: the pure policy (:mod:`waymark.model.policy`) and secrets
(:mod:`waymark.auth.secrets`); the use cases that store them are
:mod:`waymark.usecases.access.users`."""
