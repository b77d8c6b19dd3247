"""The two-way relationship (issue 10): goals, care tasks, messages, webhook events; outbox upserts.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Instant = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column(
        "outbox", sa.Column("method", sa.String(length=16), server_default="create", nullable=False)
    )
    op.create_table(
        "goals",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("measure", sa.String(length=32), nullable=True),
        sa.Column("comparator", sa.String(length=2), nullable=True),
        sa.Column("target_value", sa.Float(), nullable=True),
        sa.Column("due_date", sa.Date(), nullable=True),
        sa.Column("lifecycle_status", sa.String(length=16), nullable=False),
        sa.Column("expressed_by", sa.String(length=255), nullable=True),
        sa.Column("created_by", sa.String(length=255), nullable=False),
        sa.Column("created_at", Instant, nullable=False),
        sa.Column("updated_at", Instant, nullable=False),
        sa.Column("latest_value", sa.Float(), nullable=True),
        sa.Column("latest_at", Instant, nullable=True),
        sa.Column("ident_value", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_goals_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_goals")),
        sa.UniqueConstraint("ident_value", name=op.f("uq_goals_ident_value")),
    )
    op.create_index("ix_goals_patient", "goals", ["tenant_id", "patient_id"])
    op.create_index(op.f("ix_goals_updated_at"), "goals", ["updated_at"])
    op.create_table(
        "care_tasks",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("measure", sa.String(length=64), nullable=True),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("due_date", sa.Date(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_by", sa.String(length=255), nullable=False),
        sa.Column("created_at", Instant, nullable=False),
        sa.Column("updated_at", Instant, nullable=False),
        sa.Column("completed_at", Instant, nullable=True),
        sa.Column("ident_value", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_care_tasks_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_care_tasks")),
        sa.UniqueConstraint("ident_value", name=op.f("uq_care_tasks_ident_value")),
    )
    op.create_index("ix_care_tasks_patient", "care_tasks", ["tenant_id", "patient_id", "status"])
    op.create_index(op.f("ix_care_tasks_updated_at"), "care_tasks", ["updated_at"])
    op.create_table(
        "messages",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("enrollment_id", sa.Uuid(), nullable=True),
        sa.Column("direction", sa.String(length=16), nullable=False),
        sa.Column("sender", sa.String(length=255), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("in_response_to", sa.Uuid(), nullable=True),
        sa.Column("sent_at", Instant, nullable=False),
        sa.Column("read_at", Instant, nullable=True),
        sa.Column("client_message_id", sa.String(length=128), nullable=True),
        sa.Column("ident_value", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["enrollment_id"], ["enrollments.id"], name=op.f("fk_messages_enrollment_id_enrollments")
        ),
        sa.ForeignKeyConstraint(
            ["in_response_to"], ["messages.id"], name=op.f("fk_messages_in_response_to_messages")
        ),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_messages_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_messages")),
        sa.UniqueConstraint("ident_value", name=op.f("uq_messages_ident_value")),
    )
    op.create_index("ix_messages_patient", "messages", ["tenant_id", "patient_id"])
    op.create_index(op.f("ix_messages_sent_at"), "messages", ["sent_at"])
    op.create_table(
        "webhook_events",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("vendor_id", BigId, nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", Instant, nullable=False),
        sa.Column("last_status", sa.SmallInteger(), nullable=True),
        sa.Column("created_at", Instant, nullable=False),
        sa.Column("delivered_at", Instant, nullable=True),
        sa.ForeignKeyConstraint(
            ["vendor_id"], ["vendor_clients.id"], name=op.f("fk_webhook_events_vendor_id_vendor_clients")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_events")),
        sa.UniqueConstraint("event_id", name=op.f("uq_webhook_events_event_id")),
    )
    op.create_index("ix_webhook_events_due", "webhook_events", ["status", "next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_webhook_events_due", table_name="webhook_events")
    op.drop_table("webhook_events")
    op.drop_index(op.f("ix_messages_sent_at"), table_name="messages")
    op.drop_index("ix_messages_patient", table_name="messages")
    op.drop_table("messages")
    op.drop_index(op.f("ix_care_tasks_updated_at"), table_name="care_tasks")
    op.drop_index("ix_care_tasks_patient", table_name="care_tasks")
    op.drop_table("care_tasks")
    op.drop_index(op.f("ix_goals_updated_at"), table_name="goals")
    op.drop_index("ix_goals_patient", table_name="goals")
    op.drop_table("goals")
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("method")
