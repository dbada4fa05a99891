"""Indexes for what people and periodic work ask at a clinic's scale (a year of cases):
recent cases by change time, new cases by registration time, jobs changed since.

Revision ID: 0006
Revises: 0005
"""
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_cases_updated_at", "cases", ["updated_at"])
    op.create_index("ix_cases_created_at", "cases", ["created_at"])
    op.create_index("ix_jobs_updated_at", "jobs", ["updated_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_updated_at", "jobs")
    op.drop_index("ix_cases_created_at", "cases")
    op.drop_index("ix_cases_updated_at", "cases")
