"""vacancies stage (vacancy_sites, vacancies), barrier flags and forward/reverse barriers, pathway fingerprints

Revision ID: 0005
Revises: 0004
"""

import json

import sqlalchemy as sa
from alembic import op

from hopflow.db import allow_result_rewrite
from hopflow.fingerprints import pathway_fingerprint

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

BARRIER_TABLES = ("estimates", "neb")


def upgrade() -> None:
    op.create_table(
        'vacancy_sites',
        sa.Column('structure_id', sa.Integer(), nullable=False),
        sa.Column('supercell', sa.String(length=128), nullable=False),
        sa.Column('site_index', sa.Integer(), nullable=False),
        sa.Column('site_label', sa.String(length=32), nullable=False),
        sa.Column('orbit_size', sa.Integer(), nullable=False),
        sa.Column('nsites', sa.Integer(), nullable=False),
        sa.Column('fingerprint', sa.String(length=64), nullable=False),
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'),
                  nullable=False),
        sa.ForeignKeyConstraint(['structure_id'], ['structures.id'],
                                name=op.f('fk_vacancy_sites_structure_id_structures')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_vacancy_sites')),
        sa.UniqueConstraint('structure_id', 'supercell', 'site_index',
                            name=op.f('uq_vacancy_sites_structure_id_supercell_site_index')),
    )
    with op.batch_alter_table('vacancy_sites') as batch_op:
        batch_op.create_index(batch_op.f('ix_vacancy_sites_structure_id'), ['structure_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_vacancy_sites_fingerprint'), ['fingerprint'], unique=False)

    op.create_table(
        'vacancies',
        sa.Column('run_id', sa.Integer(), nullable=False),
        sa.Column('site_id', sa.Integer(), nullable=False),
        sa.Column('structure_id', sa.Integer(), nullable=False),
        sa.Column('model', sa.String(length=64), nullable=False),
        sa.Column('energy', sa.Float(), nullable=False),
        sa.Column('max_force', sa.Float(), nullable=False),
        sa.Column('converged', sa.Boolean(), nullable=False),
        sa.Column('steps', sa.Integer(), nullable=False),
        sa.Column('structure', sa.JSON(), nullable=False),
        sa.Column('bulk_structure', sa.JSON(), nullable=False),
        sa.Column('bulk_energy', sa.Float(), nullable=False),
        sa.Column('bulk_converged', sa.Boolean(), nullable=False),
        sa.Column('max_displacement', sa.Float(), nullable=False),
        sa.Column('fill_distance', sa.Float(), nullable=False),
        sa.Column('flag', sa.String(length=32), nullable=False),
        sa.Column('flag_reason', sa.Text(), nullable=True),
        sa.Column('settings', sa.JSON(), nullable=False),
        sa.Column('versions', sa.JSON(), nullable=False),
        sa.Column('relax_s', sa.Float(), nullable=False),
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'),
                  nullable=False),
        sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_vacancies_run_id_runs')),
        sa.ForeignKeyConstraint(['site_id'], ['vacancy_sites.id'], name=op.f('fk_vacancies_site_id_vacancy_sites')),
        sa.ForeignKeyConstraint(['structure_id'], ['structures.id'],
                                name=op.f('fk_vacancies_structure_id_structures')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_vacancies')),
    )
    with op.batch_alter_table('vacancies') as batch_op:
        batch_op.create_index(batch_op.f('ix_vacancies_run_id'), ['run_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_vacancies_site_id'), ['site_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_vacancies_structure_id'), ['structure_id'], unique=False)

    for table in BARRIER_TABLES:
        with op.batch_alter_table(table) as batch_op:
            batch_op.add_column(sa.Column('forward_barrier', sa.Float(), nullable=True))
            batch_op.add_column(sa.Column('reverse_barrier', sa.Float(), nullable=True))
            batch_op.add_column(sa.Column('flag', sa.String(length=32), server_default='unchecked', nullable=False))
            batch_op.add_column(sa.Column('flag_reason', sa.Text(), nullable=True))
            batch_op.add_column(sa.Column('model', sa.String(length=64), nullable=True))
            batch_op.add_column(sa.Column('start_vacancy_id', sa.Integer(), nullable=True))
            batch_op.add_column(sa.Column('end_vacancy_id', sa.Integer(), nullable=True))
            batch_op.create_index(batch_op.f(f'ix_{table}_flag'), ['flag'], unique=False)
            batch_op.create_foreign_key(batch_op.f(f'fk_{table}_start_vacancy_id_vacancies'), 'vacancies',
                                        ['start_vacancy_id'], ['id'])
            batch_op.create_foreign_key(batch_op.f(f'fk_{table}_end_vacancy_id_vacancies'), 'vacancies',
                                        ['end_vacancy_id'], ['id'])
        # Rows made before the path checks: their barriers are kept as stored, but never ranked again.
        allow_result_rewrite(op.get_bind())  # the guard triggers of a database downgraded and upgraded again
        op.execute(sa.text(f"UPDATE {table} SET flag_reason = 'stored before the path checks of migration 0005'"))

    with op.batch_alter_table('pathways') as batch_op:
        batch_op.add_column(sa.Column('hops_found', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('fingerprint', sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_pathways_fingerprint'), ['fingerprint'], unique=False)
    _backfill_pathway_fingerprints()


def _backfill_pathway_fingerprints() -> None:
    from pymatgen.core import Structure

    bind = op.get_bind()
    rows = bind.execute(sa.text(
        "SELECT p.id, p.ion, p.start_frac, p.end_frac, s.fingerprint, s.structure FROM pathways p "
        "JOIN structures s ON s.id = p.structure_id")).all()
    lattices: dict[str, tuple[float, ...]] = {}
    for pid, ion, start, end, sfp, structure in rows:
        data = json.loads(structure) if isinstance(structure, str) else structure
        key = json.dumps(data["lattice"]["matrix"])
        if key not in lattices:
            lattice = Structure.from_dict(data).lattice
            lattices[key] = (*lattice.abc, *lattice.angles)
        start = json.loads(start) if isinstance(start, str) else start
        end = json.loads(end) if isinstance(end, str) else end
        fp = pathway_fingerprint(sfp, lattices[key], ion, start, end)
        bind.execute(sa.text("UPDATE pathways SET fingerprint = :fp WHERE id = :id"), {"fp": fp, "id": pid})


def downgrade() -> None:
    with op.batch_alter_table('pathways') as batch_op:
        batch_op.drop_index(batch_op.f('ix_pathways_fingerprint'))
        batch_op.drop_column('fingerprint')
        batch_op.drop_column('hops_found')
    for table in BARRIER_TABLES:
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_constraint(batch_op.f(f'fk_{table}_end_vacancy_id_vacancies'), type_='foreignkey')
            batch_op.drop_constraint(batch_op.f(f'fk_{table}_start_vacancy_id_vacancies'), type_='foreignkey')
            batch_op.drop_index(batch_op.f(f'ix_{table}_flag'))
            for column in ('end_vacancy_id', 'start_vacancy_id', 'model', 'flag_reason', 'flag', 'reverse_barrier',
                           'forward_barrier'):
                batch_op.drop_column(column)
    op.drop_table('vacancies')
    op.drop_table('vacancy_sites')
