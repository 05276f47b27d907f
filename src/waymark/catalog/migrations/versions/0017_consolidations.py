"""Consolidation (docs/engine.md, "Consolidation"): per disk, a self-contained qcow2 holding the
view of one frozen image on Now's path, the active image's backing file while ``linked``, so
reads of Now stop after two hops whatever the number of checkpoints; and the per-VM switch.

Revision ID: 0017
Revises: 0016
"""

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "consolidations",
        sa.Column("disk_id", sa.String(32), primary_key=True),
        sa.Column("vm_id", sa.String(32), nullable=False, index=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("image_id", sa.String(32), nullable=False),
        sa.Column("linked", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("bytes", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    # (add, not a batch: SQLite would rebuild ``vms``, which other tables reference)
    op.add_column("vms", sa.Column("consolidation", sa.Boolean(), nullable=False,
                                   server_default=sa.true()))


def downgrade() -> None:
    op.execute("ALTER TABLE vms DROP COLUMN consolidation")
    op.drop_table("consolidations")
