"""A checkpoint's TPM state: a whole copy of the VM's TPM state at the checkpoint's instant
(base64; a few KiB), kept with the checkpoint's row so neither exists without the other.

Revision ID: 0015
Revises: 0014
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("checkpoints") as batch:
        batch.add_column(sa.Column("tpm_state", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_column("tpm_state")
