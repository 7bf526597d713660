"""job attempts and preemption: which claim owns a running job, and a worker's hand-back request

``attempt`` grows with every claim (and whenever the reconciler takes a job away from a silent
worker); every write of a running job is conditional on it, so a worker that was cut off or frozen
cannot write over the attempt that replaced it. ``preempt_requested`` is set by a worker that is
shutting down (SIGTERM): its job checkpoints at the next step and goes back to ``queued``.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("attempt", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("preempt_requested", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("preempt_requested")
        batch.drop_column("attempt")
