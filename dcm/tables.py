"""Markdown tables of result rows: the one table writer (reports, ablations, the demo, benchmarks).

Ground floor of DCM (imports nothing). A cell that is a float (numpy floats too) is written with ``digits``
decimals; any other cell with ``str``, so pre-formatted strings pass through unchanged.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

__all__ = ["markdown_table"]


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 4) -> str:
    """A markdown table: a header of ``columns``, its rule, then one line per row (cells in column order).

    No trailing newline.
    """
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{cell:.{digits}f}" if isinstance(cell, float) else str(cell) for cell in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
