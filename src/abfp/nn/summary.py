"""``summary``: a per-product table of a converted model on one example input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from ..ops.coverage import Coverage
from .convert import analog_state, calibrating, convert, is_converted, needs_calibration
from .state import SiteRecord


@dataclass
class Summary:
    """Rows of :func:`summary`; ``str()`` gives the table."""

    rows: list[SiteRecord]
    coverage: Coverage | None = None
    """MACs computed on the device and in float32 during this run (see :mod:`abfp.ops.coverage`)."""

    def as_dicts(self) -> list[dict[str, Any]]:
        return [
            {
                "site": r.site,
                "kind": r.kind,
                "input_shape": list(r.x_shape),
                "weight_shape": list(r.w_shape),
                "tiles": r.tiles,
                "macs": r.macs,
                "adc_conversions": r.adc_conversions,
                "saturated_fraction": r.saturated_fraction,
                "relative_error": r.relative_error,
                "config": r.config.label() if r.config else "digital",
            }
            for r in self.rows
        ]

    @property
    def total_macs(self) -> int:
        return sum(r.macs for r in self.rows)

    @property
    def analog_macs(self) -> int:
        return sum(r.macs for r in self.rows if r.kind != "digital")

    @property
    def device_mac_share(self) -> float:
        """Share of the model's MACs computed on the device in this run."""
        if self.coverage is not None:
            return self.coverage.share
        return self.analog_macs / self.total_macs if self.total_macs else 1.0

    def __str__(self) -> str:
        head = f"{'site':<44} {'kind':<7} {'input':<18} {'weight':<18} {'tiles':>5} {'MACs':>12} {'ADC conv':>11} {'sat %':>7} {'rel err':>9}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(
                f"{r.site[-44:]:<44} {r.kind:<7} {str(tuple(r.x_shape))[:18]:<18} {str(tuple(r.w_shape))[:18]:<18} "
                f"{r.tiles:>5} {r.macs:>12,} {r.adc_conversions:>11,} {100 * r.saturated_fraction:>7.3f} "
                + (f"{r.relative_error:>9.4f}" if r.relative_error is not None else f"{'-':>9}")
            )
        lines.append(f"total MACs {self.total_macs:,}; ADC conversions {sum(r.adc_conversions for r in self.rows):,}")
        if self.coverage is not None:
            lines.append(str(self.coverage))
        return "\n".join(lines)


@torch.no_grad()
def summary(model: nn.Module, example_input: Any, config=None, *, kwargs: Mapping[str, Any] | None = None,
            errors: bool = True) -> Summary:
    """Run ``model`` once on ``example_input`` (a tensor or a tuple of inputs; ``kwargs``: keyword
    inputs, ``model(*inputs, **kwargs)``) and tabulate each analog product: kind, shapes, tiles,
    MACs, ADC conversions, saturated fraction, and the relative error of its output against
    float32 on the same input.

    ``model`` may be converted already (a fixed-point one calibrated: see :func:`abfp.calibrate`);
    otherwise it is converted (a copy) with ``config`` and, in fixed mode, calibrated on
    ``example_input`` itself (its max |x| per site, SPEC section 2). The run is a diagnostic: the
    model's own coverage counters (:func:`abfp.coverage`) are left as they were.

    ``errors=False``: no float32 reference product is run and each row's ``relative_error`` is
    None (shapes, MACs, ADC conversions and saturation only: about a quarter of the work, what
    auto gain and energy accounting need).
    """
    inputs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    kwargs = dict(kwargs or {})
    if not is_converted(model):
        model = convert(model, config)
        if needs_calibration(model):
            with calibrating(model):
                model(*inputs, **kwargs)
    state = analog_state(model)
    state.records.clear()
    saved, state.coverage = state.coverage, Coverage(warned=state.coverage.warned)
    state.recording, state.record_errors = True, bool(errors)
    try:
        model(*inputs, **kwargs)
    finally:
        state.recording, state.record_errors = False, True
        state.coverage, run = saved, state.coverage
    cov = Coverage(run.analog_macs, run.digital_macs, dict(run.digital_ops))
    return Summary(rows=list(state.records.values()), coverage=cov)
