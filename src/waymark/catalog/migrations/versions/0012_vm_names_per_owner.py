"""VM names are unique per owner, no longer host-wide (a self-service user's new name must not
tell them about a VM they may not see).

The column ``name`` (host-wide UNIQUE) is renamed ``name_key`` and becomes
``<owner id>/<name>`` (``/<name>`` for VMs no user owns), keeping its UNIQUE constraint; a new,
indexed ``name`` holds the name. (Renaming keeps SQLite from rebuilding ``vms``, which other
tables reference.)

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE vms RENAME COLUMN name TO name_key")
    op.add_column("vms", sa.Column("name", sa.String(99), nullable=False, server_default=""))
    op.execute("UPDATE vms SET name = name_key, "
               "name_key = coalesce(owner_id, '') || '/' || name_key")
    op.create_index("ix_vms_name", "vms", ["name"])


def downgrade() -> None:
    # fails (UNIQUE) while two owners' VMs share a name: rename one first
    op.drop_index("ix_vms_name", "vms")
    op.execute("UPDATE vms SET name_key = name")
    op.execute("ALTER TABLE vms DROP COLUMN name")
    op.execute("ALTER TABLE vms RENAME COLUMN name_key TO name")
