"""Sweep grids: which device configurations an evaluation visits.

A :class:`Point` is one row of the result table: float32, the fixed-point baseline, or
ABFP at one tile width, bits, gain and noise. ``gain`` may be ``"auto"``: a gain per layer
chosen from calibration data (see :mod:`abfp.evaluate.autogain`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable, Literal, Union

from ..config import REFERENCE_NOISE_STD, ABFPConfig

Gain = Union[float, Literal["auto"]]


@dataclass(frozen=True)
class Point:
    format: Literal["fp32", "fixed", "abfp"]
    config: ABFPConfig | None = None  # None for fp32
    auto_gain: bool = False

    def __post_init__(self) -> None:
        if self.format not in ("fp32", "fixed", "abfp"):
            raise ValueError(f"Point format must be 'fp32', 'fixed' or 'abfp', got {self.format!r}")
        if (self.format == "fp32") != (self.config is None):
            raise ValueError("a Point has a config exactly when its format is not 'fp32'")
        if self.config is not None and self.config.mode != self.format:
            # the format decides calibration and overrides, the mode the numerics: they must agree
            raise ValueError(f"Point format {self.format!r} with a config in mode {self.config.mode!r}: "
                             f"give Point({self.config.mode!r}, config)")

    @property
    def noisy(self) -> bool:
        return self.config is not None and self.config.noise_std > 0

    def label(self) -> str:
        if self.config is None:
            return "fp32"
        c = self.config
        g = "auto" if self.auto_gain else f"{c.gain:g}"
        return f"{self.format} n={c.tile_width} {c.weight_bits}/{c.input_bits}/{c.output_bits} G={g} noise={c.noise_std:.3g}"


def parse_bits(spec: str) -> tuple[int, int, int]:
    """``"8/8/8"`` (weights/inputs/ADC) or ``"888"`` or ``"6/6/8"`` -> (w, x, y)."""
    s = spec.strip()
    parts = s.split("/") if "/" in s else (list(s) if len(s) == 3 else [])
    try:
        w, x, y = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"bits must look like 8/8/8 (weights/inputs/ADC), got {spec!r}") from None
    return w, x, y


def parse_gain(spec: str) -> Gain:
    if spec.strip().lower() == "auto":
        return "auto"
    try:
        g = float(spec)
    except ValueError:
        raise ValueError(f"gain must be a positive number or 'auto', got {spec!r}") from None
    if not g > 0:
        raise ValueError(f"gain must be > 0, got {spec!r}")
    return g


def build_grid(
    *,
    tile_widths: Iterable[int] = (8, 32, 128),
    gains: Iterable[Gain] = (1, 2, 4, 8, 16),
    bits: Iterable[tuple[int, int, int]] = ((8, 8, 8),),
    noise_stds: Iterable[float] = (REFERENCE_NOISE_STD,),
    fixed: bool = True,
    fixed_tile_width: int = 128,
    fp32: bool = True,
    base: ABFPConfig | None = None,
) -> list[Point]:
    """float32, the fixed-point baseline (gain 1, per bits and noise), and the device grid.

    Every point is ``base`` with the swept fields (tile width, bits, gain, noise std) replaced;
    every other field of ``base`` (noise distribution, scale format, bfloat16 options, kernel,
    seed) is kept. The grid's rows are in ``base.mode``: ``"abfp"`` rows, or ``"fixed"`` rows
    when the base device is fixed point (then there is no separate fixed-point baseline). The
    baseline (``fixed=True`` and an ABFP base) is ``base`` in fixed mode at ``fixed_tile_width``
    and gain 1, per bits and noise.
    """
    base = base or ABFPConfig()
    pts: list[Point] = [Point("fp32")] if fp32 else []
    bits, noise_stds = list(bits), list(noise_stds)
    if fixed and base.mode == "abfp":
        for (wb, xb, yb), ns in itertools.product(bits, noise_stds):
            pts.append(Point("fixed", base.replace(mode="fixed", tile_width=fixed_tile_width, weight_bits=wb,
                                                   input_bits=xb, output_bits=yb, gain=1.0, noise_std=float(ns))))
    for (wb, xb, yb), ns, n, g in itertools.product(bits, noise_stds, tile_widths, gains):
        auto = g == "auto"
        cfg = base.replace(tile_width=int(n), weight_bits=wb, input_bits=xb, output_bits=yb,
                           gain=1.0 if auto else float(g), noise_std=float(ns))
        pts.append(Point(base.mode, cfg, auto_gain=auto))
    return pts


def paper_grid(noise_std: float = REFERENCE_NOISE_STD) -> list[Point]:
    """The authors' whole grid: 6/6/8 and 8/8/8 bits, n = 8, 32, 128, G = 1..16, with fixed point."""
    return build_grid(bits=((6, 6, 8), (8, 8, 8)), noise_stds=(noise_std,))
