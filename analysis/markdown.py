"""Markdown output shared by the analysis commands (no plotting or torch imports)."""

from __future__ import annotations

from collections.abc import Sequence


def markdown_table(header: Sequence[object], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table: header row, rule, one line per row; cells are str()-ed with "|" escaped."""
    line = lambda cells: "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(header), "|" + "---|" * len(header), *(line(row) for row in rows)])
