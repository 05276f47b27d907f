"""A checkpoint's TPM state: a whole copy of the VM's TPM state at the checkpoint's instant
(base64; a few KiB), kept with the checkpoint's row so neither exists without the other. A
template's platform: the firmware and whether VMs made from it get a TPM.

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
    with op.batch_alter_table("templates") as batch:
        batch.add_column(sa.Column("firmware", sa.String(16), nullable=True))
        batch.add_column(sa.Column("tpm", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("templates") as batch:
        batch.drop_column("tpm")
        batch.drop_column("firmware")
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_column("tpm_state")
