"""Figures for the PNG files the commands write: matplotlib's Agg canvas, never a display.

abfp draws only into files, so it takes matplotlib without the ``MPLBACKEND`` environment
variable, which is meant for interactive programs: an unknown or unusable backend there (a typo,
Jupyter's ``module://matplotlib_inline.backend_inline`` in a terminal opened from a notebook)
made ``import matplotlib`` raise, and ``abfp tune`` fail after all its work with its plan written
and its report not. Figures are ``matplotlib.figure.Figure`` objects on an Agg canvas (no pyplot,
no global backend set for the program that calls abfp), and every command that writes a plot
calls :func:`check_plotting` before its work, so a missing matplotlib is a one-line error first.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from .outputs import atomic_path

__all__ = ["check_plotting", "import_matplotlib", "new_figure", "save_figure"]


def import_matplotlib() -> ModuleType:
    """``matplotlib``, imported (when not already) with ``MPLBACKEND`` set aside for the import;
    an ``ImportError`` naming what to install when it is missing."""
    loaded = sys.modules.get("matplotlib")
    if loaded is not None:
        return loaded
    saved = os.environ.pop("MPLBACKEND", None)
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(f"abfp's plots need matplotlib ({e}): pip install matplotlib") from None
    finally:
        if saved is not None:
            os.environ["MPLBACKEND"] = saved
    return matplotlib


def check_plotting() -> None:
    """Raise before any work when the plots could not be drawn (matplotlib or its Agg canvas missing)."""
    import_matplotlib()
    from matplotlib.backends import backend_agg  # noqa: F401


def new_figure(width: float, height: float, **kwargs: Any) -> Any:
    """A ``matplotlib.figure.Figure`` of ``width`` x ``height`` inches on an Agg canvas."""
    import_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), **kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG to ``path`` atomically (a killed run leaves no half image)."""
    with atomic_path(path, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return Path(path)
