"""Commands about pathways and their features: listing, and a pathway's images as one CIF for a viewer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from sqlalchemy import select

from hopflow.cli.render import emit_json, print_line, table
from hopflow.db import init_db, session_scope
from hopflow.models import Features, Pathway, Structure
from hopflow.stages import FEATURE_COLUMNS, PATHWAY_FIELDS, pathway_fields
from hopflow.validation import bounded_int, row_id

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def pathways(
    structure_id: Annotated[
        int | None, typer.Argument(callback=row_id(), help="Only this structure's pathways.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """List stored pathways (hops of the migrating ion), shortest first per structure."""
    init_db()
    with session_scope() as session:
        query = (
            select(Pathway, Structure.formula)
            .join(Structure, Structure.id == Pathway.structure_id)
            .order_by(Pathway.structure_id, Pathway.run_id, Pathway.rank)
        )
        if structure_id is not None:
            query = query.where(Pathway.structure_id == structure_id)
        rows = [
            {
                "id": p.id,
                "run_id": p.run_id,
                "structure_id": p.structure_id,
                "formula": formula,
                **{name: getattr(p, name) for name in PATHWAY_FIELDS},
            }
            for p, formula in session.execute(query)
        ]
    if as_json:
        emit_json(rows)
    else:
        table(
            f"{len(rows)} pathways",
            rows,
            [
                "id",
                "structure_id",
                "formula",
                "ion",
                "rank",
                "length",
                "start_label",
                "end_label",
                "multiplicity",
                "dimensionality",
                "dimensionality_cumlengths",
                "max_hop",
            ],
        )


def features(as_json: JsonOption = False) -> None:
    """List stored pathway features (definitions and units: docs/features.md)."""
    init_db()
    with session_scope() as session:
        query = (
            select(Features, Pathway.structure_id, Pathway.rank, Structure.formula)
            .join(Pathway, Pathway.id == Features.pathway_id)
            .join(Structure, Structure.id == Pathway.structure_id)
            .order_by(Features.pathway_id, Features.id)
        )
        rows = [
            {
                "id": f.id,
                "run_id": f.run_id,
                "pathway_id": f.pathway_id,
                "structure_id": sid,
                "formula": formula,
                "rank": rank,
                **{name: getattr(f, name) for name in FEATURE_COLUMNS},
            }
            for f, sid, rank, formula in session.execute(query)
        ]
    if as_json:
        emit_json(rows)
    else:
        table(
            f"{len(rows)} feature rows",
            rows,
            [
                "pathway_id",
                "formula",
                "rank",
                "length",
                "length_vs_dmin",
                "overlap_cation_max_change",
                "overlap_anion_max_change",
                "ewald_energy_change",
                "nsites_supercell",
            ],
        )


def show_path(
    pathway_id: Annotated[int, typer.Argument(callback=row_id(), help="Pathway id (hopflow pathways lists them).")],
    cif: Annotated[Path, typer.Option("--cif", help="CIF file to write (one data block per image).")],
    nimages: Annotated[
        int | None, typer.Option(callback=bounded_int(ge=1), help="Intermediate images (default: setting).")
    ] = None,
) -> None:
    """Write a pathway's IDPP images (vacancy supercell, start to end) into one CIF for a structure viewer."""
    from pymatgen.core import Structure as PmgStructure

    from hopflow.flows.features import pathway_record
    from hopflow.tasks.images import hop_images

    if not cif.parent.is_dir():
        raise typer.BadParameter(f"folder {cif.parent} does not exist", param_hint="'--cif'")
    init_db()
    with session_scope() as session:
        pathway = session.get(Pathway, pathway_id)
        if pathway is None:
            raise typer.BadParameter(f"no pathway {pathway_id}")
        structure = PmgStructure.from_dict(session.get_one(Structure, pathway.structure_id).structure)
        record = pathway_record(pathway_fields(pathway))
    images = hop_images(structure, record, nimages=nimages)
    cif.write_text(images_cif(images.images, f"pathway{pathway_id}"))
    print_line(f"pathway {pathway_id}: {len(images.images)} images ({images.nsites} atoms each) written to {cif}")


def images_cif(images: list[Any], name: str) -> str:
    """Several structures as one CIF, one data block per image (data_<name>_image<i>)."""
    from pymatgen.io.cif import CifWriter

    blocks = []
    for i, image in enumerate(images):
        text = str(CifWriter(image))
        lines = [f"data_{name}_image{i}" if line.startswith("data_") else line for line in text.splitlines()]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def register(app: typer.Typer) -> None:
    app.command()(pathways)
    app.command()(features)
    app.command(name="show-path")(show_path)
