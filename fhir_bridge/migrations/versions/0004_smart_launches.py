"""SMART app: pending authorization flows and completed launches (tokens encrypted at rest).

Revision ID: 0004
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "smart_flows",
        sa.Column("state_hash", sa.String(length=64), nullable=False),
        sa.Column("browser_hash", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("launch_param", sa.String(length=2048), nullable=True),
        sa.Column("redirect_uri", sa.String(length=2048), nullable=False),
        sa.Column("authorize_url", sa.String(length=2048), nullable=False),
        sa.Column("token_url", sa.String(length=2048), nullable=False),
        sa.Column("issuer", sa.String(length=2048), nullable=True),
        sa.Column("jwks_uri", sa.String(length=2048), nullable=True),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("verifier_enc", sa.LargeBinary(), nullable=False),
        sa.Column("nonce", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_smart_flows_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("state_hash", name=op.f("pk_smart_flows")),
    )
    op.create_index(op.f("ix_smart_flows_browser_hash"), "smart_flows", ["browser_hash"])
    op.create_index(op.f("ix_smart_flows_expires_at"), "smart_flows", ["expires_at"])

    op.create_table(
        "smart_launches",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("browser_hash", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("encounter_id", sa.String(length=64), nullable=True),
        sa.Column("user_key", sa.String(length=512), nullable=True),
        sa.Column("fhir_user", sa.String(length=255), nullable=True),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("token_url", sa.String(length=2048), nullable=False),
        sa.Column("access_token_enc", sa.LargeBinary(), nullable=False),
        sa.Column("refresh_token_enc", sa.LargeBinary(), nullable=True),
        sa.Column("access_expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("need_patient_banner", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("token_version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_smart_launches_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_smart_launches")),
    )
    op.create_index(op.f("ix_smart_launches_browser_hash"), "smart_launches", ["browser_hash"])
    op.create_index(op.f("ix_smart_launches_expires_at"), "smart_launches", ["expires_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_smart_launches_expires_at"), table_name="smart_launches")
    op.drop_index(op.f("ix_smart_launches_browser_hash"), table_name="smart_launches")
    op.drop_table("smart_launches")
    op.drop_index(op.f("ix_smart_flows_expires_at"), table_name="smart_flows")
    op.drop_index(op.f("ix_smart_flows_browser_hash"), table_name="smart_flows")
    op.drop_table("smart_flows")
