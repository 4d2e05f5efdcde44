"""Benchmark results: one JSON shape, `{"setup": {...}, "rows": [{...}, ...]}`, and one way to print rows as a table.

A row is a flat dict of JSON values; its keys are the column names the docs quote (`method`, `flops_ratio`, …).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MISSING = "n/a"


@dataclass(frozen=True)
class Column:
    """A printed column: its title, the row key it shows (default: the title) or a function of the row, and the
    format spec of float values (other values print as they are; None as n/a)."""

    title: str
    spec: str = ".3f"
    key: str | None = None
    value: Callable[[Mapping[str, Any]], Any] | None = None

    def cell(self, row: Mapping[str, Any]) -> str:
        value = self.value(row) if self.value is not None else row.get(self.key or self.title)
        if value is None:
            return MISSING
        return format(value, self.spec) if isinstance(value, float) else str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str | Column], transpose: bool = False) -> str:
    """A Markdown table (one line per row), or with `transpose` one indented line per column (`infer.py sample`)."""
    columns = [c if isinstance(c, Column) else Column(c) for c in columns]
    if transpose:  # one line per column; each row's cells padded to that row's widest, so the rows line up
        width = max(len(c.title) for c in columns)
        cells = [[c.cell(row) for row in rows] for c in columns]
        widths = [max(len(line[j]) for line in cells) for j in range(len(rows))]
        return "\n".join(
            (f"  {c.title:<{width}}  " + "  ".join(f"{cell:<{w}}" for cell, w in zip(line, widths))).rstrip()
            for c, line in zip(columns, cells)
        )
    lines = ["| " + " | ".join(c.title for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(c.cell(row) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(path: Path, setup: object, rows: Sequence[Mapping[str, Any]], **extra: Any) -> Path:
    """Write `{"setup": ..., "rows": [...], **extra}`; `setup` is a dataclass or a mapping of what was run (paths as
    text); `extra` adds top-level keys (e.g. `bench/compare.py`'s `margins`)."""
    if dataclasses.is_dataclass(setup) and not isinstance(setup, type):
        setup = dataclasses.asdict(setup)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"setup": setup, "rows": list(rows), **extra}, indent=2, default=str) + "\n")
    return path
