"""Backup schedules, claimed in the catalog so two runners never run one slot twice.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("name", sa.String(99), primary_key=True),
        sa.Column("vms", sa.JSON(), nullable=False),
        sa.Column("repo", sa.Text(), nullable=False),
        sa.Column("every", sa.String(8), nullable=False),
        sa.Column("at", sa.String(5), nullable=False),
        sa.Column("day", sa.Integer(), nullable=True),
        sa.Column("full_every", sa.Integer(), nullable=True),
        sa.Column("keep", sa.JSON(), nullable=False),
        sa.Column("next_due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_run_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_result", sa.JSON(), nullable=True),
        sa.Column("claimed_pid", sa.Integer(), nullable=True),
        sa.Column("claimed_start", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("schedules")
