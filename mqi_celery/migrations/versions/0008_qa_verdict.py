"""cases.verdict and cases.qa: the QA evaluation of a case (gamma of each beam's recomputed
dose against the planned dose): its verdict (PASS, REVIEW, FAIL, NO REFERENCE DOSE, NOT
JUDGED), and the criteria, per-beam results and assumptions it was reached with.

Revision ID: 0008
Revises: 0007
"""
from alembic import op
import sqlalchemy as sa

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("cases", sa.Column("verdict", sa.String(24), nullable=True))
    op.add_column("cases", sa.Column("qa", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("cases") as batch:
        batch.drop_column("qa")
        batch.drop_column("verdict")
