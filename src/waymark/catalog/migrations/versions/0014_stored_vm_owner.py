"""A stored VM's owner, kept on the host that stored it: a deploy gives the VM back to its owner
from this trusted record, never from the share's manifest (which others may write).

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("stored_vms") as batch:
        batch.add_column(sa.Column("owner_id", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("stored_vms") as batch:
        batch.drop_column("owner_id")
