"""Rendering for the command line: rich tables for people, JSON for programs.

Data (file names, formulas, error messages) is never read as rich markup: cells and data lines are `Text`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

console = Console()
err_console = Console(stderr=True)


def emit_json(data: Any) -> None:
    """Print JSON on stdout (no rich markup, so it pipes cleanly)."""
    print(json.dumps(data, indent=2, default=str))


def table(title: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> None:
    """Print rows as a rich table with the given (or all) columns."""
    columns = list(columns or (rows[0].keys() if rows else []))
    out = Table(title=Text(title))
    for column in columns:
        out.add_column(Text(column))
    for row in rows:
        out.add_row(*(Text("" if row.get(c) is None else _fmt(row.get(c))) for c in columns))
    console.print(out)


def print_line(message: str, *, label: str | None = None, style: str = "red", stderr: bool = False) -> None:
    """Print one line of data (never read as markup), after an optional styled label such as "error"."""
    text = Text.assemble((label, style), " ", message) if label else Text(message)
    (err_console if stderr else console).print(text, soft_wrap=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return " ".join(f"{k}{v:+g}" if isinstance(v, (int, float)) else f"{k}:{v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)
