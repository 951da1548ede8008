"""archives: imported provenance archives, and on runs the archive a run came from and its origin

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'archives',
        sa.Column('name', sa.String(length=255), nullable=False),
        sa.Column('sha256', sa.String(length=64), nullable=False),
        sa.Column('format_version', sa.Integer(), nullable=False),
        sa.Column('schema_revision', sa.String(length=32), nullable=False),
        sa.Column('hopflow_version', sa.String(length=64), nullable=True),
        sa.Column('exported_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('imported_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('manifest', sa.JSON(), nullable=False),
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'),
                  nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_archives')),
    )
    with op.batch_alter_table('archives') as batch_op:
        batch_op.create_index(batch_op.f('ix_archives_sha256'), ['sha256'], unique=False)
    # plain columns (no foreign key constraint): SQLite adds them with ALTER TABLE, without copying the run table
    with op.batch_alter_table('runs') as batch_op:
        batch_op.add_column(sa.Column('archive_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('origin', sa.JSON(), nullable=True))
        batch_op.create_index(batch_op.f('ix_runs_archive_id'), ['archive_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_runs_archive_id'), table_name='runs')
    # ALTER TABLE ... DROP COLUMN (SQLite >= 3.35): batch mode would copy the run table, which the foreign keys of
    # every result table pointing at it forbid
    op.execute(sa.text('ALTER TABLE runs DROP COLUMN origin'))
    op.execute(sa.text('ALTER TABLE runs DROP COLUMN archive_id'))
    op.drop_table('archives')
