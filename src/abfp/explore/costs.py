"""Energy per inference of a design, from :mod:`abfp.energy` (SPEC section 6).

The shapes and MAC counts of a model's analog products do not depend on the device, so the
explorer records them once (one :func:`abfp.summary` pass on ``samples`` inputs) and prices
every design from them with :func:`abfp.energy.row_cost`: analog MACs at
``analog_mac * G`` (with auto gain, each layer's own ``G``), DAC conversions at
``dac * 2**(b - reference_bits)``, ADC conversions at ``adc * 2**(b_y - reference_bits)``
(one per output per tile), and the digital work (scales, tile sums, block max search).
Totals are divided by ``samples``: energy per inference, in picojoules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..config import ABFPConfig
from ..energy import EnergyParams, row_cost, shape_groups
from .designs import Design

__all__ = ["CostModel", "ProductShape"]


@dataclass(frozen=True)
class ProductShape:
    """One analog product site as :func:`abfp.summary` recorded it (what the energy counts need)."""

    site: str
    kind: str
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    macs: int
    calls: int
    #: ``(x_shape, w_shape, macs, calls)`` per pair of operand shapes the site ran with
    #: (:meth:`abfp.ops.site.SiteRecord.shape_groups`); empty: the fields above, one group
    groups: tuple[tuple[tuple[int, ...], tuple[int, ...], int, int], ...] = ()

    def shape_groups(self) -> list[tuple[tuple[int, ...], tuple[int, ...], int, int]]:
        return list(self.groups) or [(self.x_shape, self.w_shape, self.macs, self.calls)]

    @property
    def module(self) -> str:
        """The module the site belongs to (the key of auto gain's per-layer gains)."""
        return self.site.rsplit(":", 1)[0]


class CostModel:
    """Prices designs of one model: ``energy(design, gains)`` -> (total, ADC) pJ per inference."""

    def __init__(self, products: Sequence[ProductShape], samples: int, params: EnergyParams | None = None) -> None:
        if samples < 1:
            raise ValueError(f"CostModel: samples must be >= 1, got {samples}")
        self.products = list(products)
        self.samples = int(samples)
        self.params = params or EnergyParams()

    @classmethod
    @torch.no_grad()
    def from_model(cls, model: nn.Module, example_inputs: Sequence[torch.Tensor], params: EnergyParams | None = None,
                   base: ABFPConfig | None = None) -> "CostModel":
        """Record the model's products on ``example_inputs`` (one noise-free ABFP pass on a copy)."""
        from ..nn import summary

        cfg = (base or ABFPConfig()).replace(mode="abfp", noise_std=0.0)
        inputs = tuple(example_inputs)
        rows = summary(model, inputs, cfg, errors=False).rows
        products = [ProductShape(r.site, r.kind, tuple(r.x_shape), tuple(r.w_shape), int(r.macs), max(1, int(r.calls)),
                                 tuple((tuple(x), tuple(w), int(m), int(c)) for x, w, m, c in shape_groups(r)))
                    for r in rows if r.kind != "digital"]
        return cls(products, int(inputs[0].shape[0]) if inputs[0].dim() else 1, params)

    def energy(self, design: Design, base: ABFPConfig | None = None,
               gains: Mapping[str, float] | None = None) -> dict[str, float]:
        """Energy per inference of ``design`` by kind (``analog``, ``dac``, ``adc``, ``digital``)
        and ``total``, in pJ. ``gains``: module -> gain, needed for an auto-gain design (a
        module it does not name runs at ``G = 1``)."""
        if design.auto_gain and gains is None:
            raise ValueError(f"CostModel.energy: the auto-gain design {design.label()} needs its per-layer gains")
        cfg = design.config(base or ABFPConfig())
        sums = {"analog": 0.0, "dac": 0.0, "adc": 0.0, "digital": 0.0}
        for p in self.products:
            c = cfg.replace(gain=float(gains.get(p.module, 1.0))) if gains is not None and design.auto_gain else cfg
            cost = row_cost(p, c, self.params)
            for k, v in cost.energy.items():
                sums[k] += v
        out = {k: v / self.samples for k, v in sums.items()}
        out["total"] = sum(out.values())
        return out

    def describe(self) -> dict[str, Any]:
        return {"samples_accounted": self.samples, "products": len(self.products),
                "macs_per_inference": sum(p.macs for p in self.products) / self.samples}
