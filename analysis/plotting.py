"""Shared figure helpers for the analysis scripts: headless backend, one house style, atomic saving.

Usage::

    with style():
        fig, ax = plt.subplots()
        ax.plot(x, y, label="...")
        save_figure(fig, out_dir / "curve.png")

Importing this module selects matplotlib's non-interactive Agg backend, so scripts run without a display.
Figures are written with ``trainlib.files.atomic_path`` (a temporary sibling, fsynced, then renamed), so a crash
never leaves a half-written file under the final name.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib import cycler
from matplotlib import pyplot as plt
from matplotlib.figure import Figure

from trainlib.files import atomic_path

# Okabe–Ito colours: distinguishable with the common forms of colour blindness.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")

STYLE = {
    "figure.figsize": (7.0, 4.5),
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": cycler(color=PALETTE),
    "legend.fontsize": 9,
    "legend.frameon": False,
    "lines.linewidth": 1.8,
}


@contextmanager
def style() -> Iterator[None]:
    """Apply the house style (``STYLE``) to figures created and saved inside the block."""
    with plt.rc_context(STYLE):
        yield


def save_figure(fig: Figure, path: str | os.PathLike, dpi: float | None = None) -> Path:
    """Save ``fig`` atomically as PNG at ``path`` (resolution ``dpi``, default ``savefig.dpi``), then close it."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"figures are saved as PNG; expected a path ending in .png, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return path
