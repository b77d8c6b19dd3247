"""Rules (issue 8): the measurement ledger, alert episodes, and outbox updates.

* ``measurements``: the numbers accepted records carried (``MapResult.measurements``), one row per
  (record, code); no free text. Rules read this, never the EHR.
* ``alerts.episode_ended_at`` / ``trigger_at`` / ``ident_value``: an alert stays one episode until an
  evaluation finds its condition false; the identifier of its Flag/Task is derived from them.
* ``tenants.cds_client_*``: who may call our CDS Hooks service for that EHR (iss and its keys).
* (An acknowledgement's Flag/Task change is an outbox upsert: ``outbox.method``, migration 0006.)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "measurements",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("enrollment_id", sa.Uuid(), nullable=False),
        sa.Column("record_id", sa.Uuid(), nullable=False),
        sa.Column("code", sa.String(length=64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("utc_offset_min", sa.SmallInteger(), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_measurements_tenant_id_tenants")
        ),
        sa.ForeignKeyConstraint(
            ["enrollment_id"], ["enrollments.id"], name=op.f("fk_measurements_enrollment_id_enrollments")
        ),
        sa.ForeignKeyConstraint(
            ["record_id"], ["records.id"], name=op.f("fk_measurements_record_id_records")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_measurements")),
        sa.UniqueConstraint("record_id", "code", name=op.f("uq_measurements_record_id_code")),
    )
    op.create_index("ix_measurements_patient", "measurements", ["tenant_id", "patient_id", "at"])
    with op.batch_alter_table("alerts") as batch:
        batch.add_column(sa.Column("trigger_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("episode_ended_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("ident_value", sa.String(length=64), nullable=True))
    op.create_index("ix_alerts_episode", "alerts", ["tenant_id", "patient_id", "rule_id"])
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("cds_client_iss", sa.String(length=2048), nullable=True))
        batch.add_column(sa.Column("cds_client_jwks", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("cds_client_jwks_url", sa.String(length=2048), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("cds_client_jwks_url")
        batch.drop_column("cds_client_jwks")
        batch.drop_column("cds_client_iss")
    op.drop_index("ix_alerts_episode", table_name="alerts")
    with op.batch_alter_table("alerts") as batch:
        batch.drop_column("ident_value")
        batch.drop_column("episode_ended_at")
        batch.drop_column("trigger_at")
    op.drop_index("ix_measurements_patient", table_name="measurements")
    op.drop_table("measurements")
