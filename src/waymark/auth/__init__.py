"""Secrets: password and API token hashing (:mod:`waymark.auth.secrets`). Roles and permissions
are pure model code (:mod:`waymark.model.policy`); the use cases that store users are
:mod:`waymark.usecases.access.users`."""
