"""A checkpoint's notes (Hyper-V's Notes, SCVMM's -Description, Proxmox's description: free
text an administrator writes about it). The user who started a job, for the task history.

Revision ID: 0016
Revises: 0015
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("checkpoints") as batch:
        batch.add_column(sa.Column("notes", sa.Text(), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("user", sa.String(99), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("user")
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_column("notes")
