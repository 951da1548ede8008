"""sources: a file's identity is its content and the format it is read as (key "<sha256>:<format>")

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

UNKNOWN_FORMAT = 'unknown'  # tasks/structures.py: the format tag of a file no reader recognises


def upgrade() -> None:
    sources = sa.table('sources', sa.column('kind', sa.String), sa.column('key', sa.String),
                       sa.column('format', sa.String))
    op.execute(
        sources.update()
        .where(sources.c.kind == 'file', ~sources.c.key.contains(':'))
        .values(key=sources.c.key + ':' + sa.func.coalesce(sources.c.format, UNKNOWN_FORMAT))
    )


def downgrade() -> None:
    # two sources of one content read as different formats would collide on (kind, key) when stripped
    sources = sa.table('sources', sa.column('id', sa.Integer), sa.column('kind', sa.String),
                       sa.column('key', sa.String))
    conn = op.get_bind()
    rows = conn.execute(sa.select(sources.c.id, sources.c.key).where(sources.c.kind == 'file')).all()
    seen: set[str] = set()
    for row_id, key in sorted(rows):
        content = key.split(':', 1)[0]
        if content in seen:
            raise RuntimeError(f"cannot downgrade: source {row_id} shares its content with another file source "
                               "read as another format")
        seen.add(content)
        conn.execute(sources.update().where(sources.c.id == row_id).values(key=content))
