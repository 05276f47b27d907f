"""Access: users, grants, quotas, audit, registered locations."""
