"""One point of the device space (a design) and the families the explorer compares.

A :class:`Design` is a device for the whole model: number format (``"fixed"``: one static
scale per tensor, SPEC section 2; ``"abfp"``: a scale per block of ``n`` values, section 1),
tile width ``n``, converter bits (input DAC ``b_x``, weight DAC ``b_w``, ADC ``b_y``), the
gain ``G`` before the ADC (a number, or ``"auto"``: one gain per layer from calibration data,
see :mod:`abfp.evaluate.autogain`) and the device noise ``noise_std`` in ADC LSBs.

A *family* is the set of designs that differ only in converter bits (and, for a single
gain, in ``G``): ``"fixed-n8"``, ``"abfp-n128"`` (the best single gain), ``"abfp-n128-auto"``
(per-layer gains); with several noise levels the family name ends in ``"@noise=<std>"``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Union

from ..config import ABFPConfig
from ..evaluate.grid import Point

__all__ = ["Design", "Gain", "family_name"]

Gain = Union[float, Literal["auto"]]


def family_name(fmt: str, tile_width: int, auto_gain: bool = False, noise_std: float | None = None) -> str:
    """``"abfp-n128"``, ``"abfp-n128-auto"``, ``"fixed-n8"``; ``noise_std`` given: ``"...@noise=0.2887"``."""
    name = f"{fmt}-n{tile_width}" + ("-auto" if auto_gain else "")
    return name if noise_std is None else f"{name}@noise={noise_std:.4g}"


@dataclass(frozen=True)
class Design:
    """A device for the whole model (every field a knob of :class:`abfp.ABFPConfig`)."""

    format: Literal["fixed", "abfp"]
    tile_width: int
    input_bits: int
    weight_bits: int
    output_bits: int
    gain: Gain
    noise_std: float

    @property
    def auto_gain(self) -> bool:
        return self.gain == "auto"

    def config(self, base: ABFPConfig) -> ABFPConfig:
        """``base`` with this design's fields (auto gain: ``G = 1`` until the per-layer gains are chosen)."""
        return base.replace(mode=self.format, tile_width=self.tile_width, input_bits=self.input_bits,
                            weight_bits=self.weight_bits, output_bits=self.output_bits,
                            gain=1.0 if self.auto_gain else float(self.gain), noise_std=float(self.noise_std))

    def point(self, base: ABFPConfig) -> Point:
        """The evaluation grid point of this design (see :func:`abfp.evaluate.evaluate`)."""
        return Point(self.format, self.config(base), auto_gain=self.auto_gain)

    def with_bits(self, *, input_bits: int | None = None, weight_bits: int | None = None,
                  output_bits: int | None = None) -> "Design":
        return dataclasses.replace(
            self, input_bits=self.input_bits if input_bits is None else int(input_bits),
            weight_bits=self.weight_bits if weight_bits is None else int(weight_bits),
            output_bits=self.output_bits if output_bits is None else int(output_bits))

    def fields(self) -> dict[str, Any]:
        """The design's fields as the explore JSON writes them."""
        return {"format": self.format, "tile_width": self.tile_width, "input_bits": self.input_bits,
                "weight_bits": self.weight_bits, "output_bits": self.output_bits, "gain": self.gain,
                "noise_std": self.noise_std}

    def label(self) -> str:
        g = "auto" if self.auto_gain else f"{float(self.gain):g}"
        return (f"{self.format} n={self.tile_width} {self.weight_bits}/{self.input_bits}/{self.output_bits} "
                f"G={g} noise={self.noise_std:.3g}")
