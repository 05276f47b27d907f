"""Live checkpoints record how long the guest was paused (standard) or frozen (production).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("checkpoints", sa.Column("pause_seconds", sa.Float, nullable=True))
    op.add_column("checkpoints", sa.Column("freeze_seconds", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_column("freeze_seconds")
        batch.drop_column("pause_seconds")
