"""Evaluation of models on the device: sweeps, cache, auto gain, reports, micro-benchmark."""

from .autogain import choose_gains, gain_overrides
from .grid import Point, build_grid, paper_grid, parse_bits, parse_gain
from .runner import EvalSettings, evaluate, format_table, run_model

__all__ = [
    "EvalSettings", "Point", "build_grid", "choose_gains", "evaluate", "format_table", "gain_overrides",
    "paper_grid", "parse_bits", "parse_gain", "run_model",
]
