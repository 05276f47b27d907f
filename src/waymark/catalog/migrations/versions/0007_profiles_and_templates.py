"""Hardware profiles, templates, and where a VM's settings came from.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "profiles",
        sa.Column("name", sa.String(99), primary_key=True),
        sa.Column("cpus", sa.Integer(), nullable=True),
        sa.Column("memory_mib", sa.Integer(), nullable=True),
        sa.Column("checkpoint_type", sa.String(16), nullable=True),
        sa.Column("max_checkpoints", sa.Integer(), nullable=True),
        sa.Column("automatic_checkpoints", sa.Boolean(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "templates",
        sa.Column("name", sa.String(99), primary_key=True),
        sa.Column("profile_name", sa.String(99), sa.ForeignKey("profiles.name"), nullable=True),
        sa.Column("checkpoint_type", sa.String(16), nullable=True),
        sa.Column("kernel", sa.Text(), nullable=True),
        sa.Column("initrd", sa.Text(), nullable=True),
        sa.Column("append", sa.Text(), nullable=True),
        sa.Column("folder", sa.Text(), nullable=False),
        sa.Column("disks", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.add_column("vms", sa.Column("origin", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("vms", "origin")
    op.drop_table("templates")
    op.drop_table("profiles")
