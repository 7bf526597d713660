"""rate events: per-organization request counts for endpoints that create no row (graders validate/run)

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
        "rate_events",
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("organization_id", sa.String(64), nullable=False),
        sa.Column("scope", sa.String(32), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_rate_events_org_scope_time", "rate_events", ["organization_id", "scope", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_rate_events_org_scope_time", table_name="rate_events")
    op.drop_table("rate_events")
