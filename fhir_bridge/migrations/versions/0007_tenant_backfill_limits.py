"""Backfill: per-tenant rate limit for history pushed with ``mode=backfill`` (issue 9).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("backfill_requests_per_second", sa.Float(), nullable=True))
        batch.add_column(sa.Column("backfill_max_concurrent", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("backfill_max_concurrent")
        batch.drop_column("backfill_requests_per_second")
