"""job placement: queue, worker, resources and the memory estimate

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("resources", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("queue", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("worker", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("estimated_memory_bytes", sa.BigInteger(), nullable=True))
        batch.create_index("ix_jobs_worker", ["worker"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_worker")
        batch.drop_column("estimated_memory_bytes")
        batch.drop_column("worker")
        batch.drop_column("queue")
        batch.drop_column("resources")
