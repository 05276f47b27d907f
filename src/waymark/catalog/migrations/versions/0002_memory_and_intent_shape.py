"""Memory states in checkpoints carry their sha256; intents say their shape.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # plain ADD COLUMN: a batch (copy-and-move) table rebuild would drop tables other rows
    # point at, which SQLite refuses with foreign keys on
    op.add_column("checkpoints", sa.Column("memory_sha256", sa.String(64), nullable=True))
    # prepare: undone if it did not commit; finish: always driven to its end
    op.add_column("intents", sa.Column("shape", sa.String(8), nullable=False,
                                       server_default="prepare"))


def downgrade() -> None:
    with op.batch_alter_table("intents") as batch:
        batch.drop_column("shape")
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_column("memory_sha256")
