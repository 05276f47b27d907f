"""What the two HTTP faces (the API and the portal) share: who is calling (tokens, sessions,
CSRF), sign-in limits, scope checks and redaction, and the server's request limits."""
