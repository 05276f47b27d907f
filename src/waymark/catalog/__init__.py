"""The catalog: SQLAlchemy models, sessions and Alembic migrations."""
