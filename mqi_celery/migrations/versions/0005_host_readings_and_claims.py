"""The System Curator's latest reading per host, and the claims table (GPUs and job slots
held by beam jobs).

Revision ID: 0005
Revises: 0004
"""
from alembic import op
import sqlalchemy as sa

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("hosts", sa.Column("reading", sa.JSON(), nullable=True))
    op.add_column("hosts", sa.Column("read_at", sa.DateTime(), nullable=True))
    op.create_table(
        "claims",
        sa.Column("host", sa.String(255), primary_key=True),
        sa.Column("resource", sa.String(32), primary_key=True),
        sa.Column("case_id", sa.String(128), nullable=False),
        sa.Column("beam", sa.Integer(), nullable=False),
        sa.Column("claimed_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_claims_job", "claims", ["case_id", "beam"])


def downgrade() -> None:
    op.drop_index("ix_claims_job", "claims")
    op.drop_table("claims")
    with op.batch_alter_table("hosts") as batch:
        batch.drop_column("read_at")
        batch.drop_column("reading")
