"""Leases on cases (stage, dispatch, lease_until, reconciles, wait_reason), judge attempts
on jobs, and the hosts table (circuit breaker, scheduler health).

Revision ID: 0003
Revises: 0002
"""
from alembic import op
import sqlalchemy as sa

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# Where an existing active case resumes: the reconciler re-dispatches it from here.
_STAGE_FROM_STEP = """
UPDATE cases SET stage = CASE
  WHEN status IN ('NEW', 'QUEUED') THEN 'upload'
  WHEN status = 'PROCESSING' AND step IN ('downloading', 'verifying') THEN 'collect'
  WHEN status = 'PROCESSING' AND step = 'running'
       AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.case_id = cases.case_id AND jobs.status = 'PENDING')
       THEN 'run'
  WHEN status = 'PROCESSING' AND step = 'running' THEN 'submit'
  WHEN status = 'PROCESSING' THEN 'upload'
  ELSE NULL END
"""
# Tasks of the old canvases are gone with the old code: active cases count as lost since
# their last change, so the reconciler resumes them (the poller has those in "run").
_LEASES_EXPIRED = """
UPDATE cases SET lease_until = updated_at
WHERE status IN ('NEW', 'QUEUED', 'PROCESSING') AND stage <> 'run'
"""


def upgrade() -> None:
    with op.batch_alter_table("cases") as batch_op:
        batch_op.add_column(sa.Column("stage", sa.String(16), nullable=True))
        batch_op.add_column(sa.Column("dispatch", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("lease_until", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("reconciles", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("wait_reason", sa.Text(), nullable=True))
        batch_op.create_index("ix_cases_lease_until", ["lease_until"])
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("judge_attempts", sa.Integer(), nullable=False, server_default="0"))
    op.execute(_STAGE_FROM_STEP)
    op.execute(_LEASES_EXPIRED)
    op.create_table(
        "hosts",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("opened_at", sa.DateTime(), nullable=True),
        sa.Column("probe_at", sa.DateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("poll_failing_since", sa.DateTime(), nullable=True),
        sa.Column("poll_error", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("hosts")
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("judge_attempts")
    with op.batch_alter_table("cases") as batch_op:
        batch_op.drop_index("ix_cases_lease_until")
        for column in ("wait_reason", "reconciles", "lease_until", "dispatch", "stage"):
            batch_op.drop_column(column)
