"""VMs stored in a library: where each went.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stored_vms",
        sa.Column("vm_id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(99), nullable=False, index=True),
        sa.Column("library", sa.Text(), nullable=False),
        sa.Column("stored_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("stored_vms")
