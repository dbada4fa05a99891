"""cases.checked_at: when the case folder's content was last known to be what was validated
(its manifest), and cases.left_out: the files that were there but not part of the case.
A folder changed after it (another export dropped at the same path, or files changed under
a running case) is looked at again by the scanner.

Revision ID: 0007
Revises: 0006
"""
from alembic import op
import sqlalchemy as sa

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("cases", sa.Column("checked_at", sa.DateTime(), nullable=True))
    op.add_column("cases", sa.Column("left_out", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("cases") as batch:
        batch.drop_column("left_out")
        batch.drop_column("checked_at")
