"""Energy and cost accounting of a model on an ABFP device (SPEC section 6).

Counted per analog product site for the example input given to :func:`account` (per
inference: divided by its number of samples), from the rows of :func:`abfp.summary`. With a
product of ``M`` input rows, ``N`` outputs, reduction ``K`` (per group), ``T = ceil(K / n)``
tiles, ``g`` groups and ``P`` products of that shape (batched matmuls):

* ``macs``: ``M N K`` (the summary's count: every output a dot product of length K);
* ``dac_inputs``: ``M K g`` input conversions (the im2col rows of a convolution);
* ``dac_weights``: ``N K`` per call for static weights (converted once per call, shared by
  the batch); ``P K N`` for a matmul, whose second operand is an activation (``K N`` per call
  when that operand is one matrix shared by every product);
* ``adc_conversions``: ``M N T`` (one per output per tile);
* digital work: ``scale_multiplies = 2 M N T`` in ABFP (``sx * sw``, then times the code; the
  constant ``n / (G L(b_y))`` is folded into ``sw``), ``M N T`` in fixed point (one static
  scale); ``accumulate_adds = M N (T - 1)`` (tile outputs summed in float32);
  ``max_compares``: one per input value converted with a dynamic block scale (``M K g``, and
  ``P K N`` more for a matmul's second operand; 0 in fixed point);
  ``normalise_multiplies``: one per dynamically converted value (``x / s`` before the DAC).

A site run with several pairs of operand shapes is counted per pair (:func:`site_cost`, from
``SiteRecord.shape_groups``) and summed.

Repeats (``config.repeats = k``, SPEC section 5): each product runs ``k`` times and its outputs
are averaged, so ``dac_inputs`` and ``adc_conversions`` are ``k`` times the counts above, the
analog energy is ``k`` times (``macs`` stays the model's count), and the average costs
``M N T (k - 1)`` more ``accumulate_adds`` (the ``1/k`` folds into the scale).

Energies (:class:`EnergyParams`, picojoules, every value a parameter):

* analog: ``macs * analog_mac * G`` (a gain G costs G times the analog product energy, as the
  method's authors count it);
* DAC: conversions times ``dac_input`` / ``dac_weight`` at ``reference_bits``, doubling per bit;
* ADC: conversions times ``adc * 2**(b_y - reference_bits)`` (ADC energy proportional to
  ``2**b_y``);
* digital: multiplies, adds and compares times their energies.

The authors' comparison (:func:`authors_adc_comparison`): ABFP at ``n = 128, G = 8`` with an
8-bit ADC costs ``2**8 * 8`` per conversion (the gain charged to the conversion), fixed point at
``n = 8`` needs 12.5 bits (``2**12.5``): ``2**4.5 / 8 = 2.83`` times cheaper, and ``n = 128``
does 16 times more MACs per conversion than ``n = 8``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from . import jsonio
from .config import ABFPConfig

__all__ = ["AdcComparison", "EnergyParams", "EnergyReport", "LayerCost", "account", "account_rows",
           "authors_adc_comparison", "layer_cost", "row_cost", "shape_groups", "site_cost", "unaccounted_settings"]

#: Device fields the accounting does not read: they change the numbers a product gives, not what it
#: costs (noise is paid for through ``repeats``, SPEC section 5; scale formats and bfloat16 rounding
#: do not change the operation counts), nor how the simulator runs it (``execution``: kernel, seed).
UNACCOUNTED_FIELDS = ("noise_std", "noise_dist", "scale_dtype", "bf16_tile_outputs", "bf16_io")


def unaccounted_settings(config: ABFPConfig) -> list[str]:
    """The settings of ``config`` that differ from the default device and that the accounting does
    not read (:data:`UNACCOUNTED_FIELDS`, the execution options), as ``"name value"``: what
    ``abfp energy`` says it did not use."""
    default = ABFPConfig()
    out = [f"{f} {getattr(config, f)!r}" for f in UNACCOUNTED_FIELDS if getattr(config, f) != getattr(default, f)]
    for f in ("kernel", "seed"):
        if getattr(config.execution, f) != getattr(default.execution, f):
            out.append(f"{f} {getattr(config.execution, f)!r}")
    return out


@dataclass(frozen=True)
class EnergyParams:
    """Energy per event in picojoules. The defaults are round illustrative numbers, not a
    measured device: set them from your technology (``--params params.json``)."""

    analog_mac: float = 0.001
    """One analog multiply-accumulate at gain 1."""
    dac_input: float = 0.05
    """One input DAC conversion at ``reference_bits``."""
    dac_weight: float = 0.05
    """One weight DAC conversion at ``reference_bits``."""
    adc: float = 1.0
    """One ADC conversion at ``reference_bits``; ``adc * 2**(b_y - reference_bits)`` at b_y bits."""
    reference_bits: float = 8.0
    """Converter resolution at which ``dac_*`` and ``adc`` are given."""
    digital_multiply: float = 0.3
    """One digital multiply (scales, normalisation)."""
    digital_add: float = 0.1
    """One float32 add (tile accumulation)."""
    digital_compare: float = 0.03
    """One compare (block max search)."""
    gain_costs_analog: bool = True
    """A gain G multiplies the analog product energy by G (the authors' count)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "gain_costs_analog":
                if not isinstance(v, bool):
                    raise ValueError(f"EnergyParams.{f.name} must be true or false, got {v!r}")
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"EnergyParams.{f.name}={v!r} is invalid: must be a finite number >= 0")
            object.__setattr__(self, f.name, float(v))

    def adc_energy(self, bits: float) -> float:
        """Energy of one ADC conversion at ``bits``: ``adc * 2**(bits - reference_bits)``."""
        return self.adc * 2.0 ** (bits - self.reference_bits)

    def dac_energy(self, bits: float, kind: str = "input") -> float:
        """Energy of one DAC conversion at ``bits`` (doubling per bit)."""
        base = self.dac_input if kind == "input" else self.dac_weight
        return base * 2.0 ** (bits - self.reference_bits)

    def analog_energy(self, gain: float = 1.0) -> float:
        """Energy of one analog MAC at gain ``G`` (``G * analog_mac`` when the gain costs)."""
        return self.analog_mac * (gain if self.gain_costs_analog else 1.0)

    # JSON round trip
    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EnergyParams":
        if not isinstance(d, dict):
            raise ValueError(f"EnergyParams needs a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown EnergyParams field(s) {unknown}; known: {[f.name for f in fields(cls)]}")
        return cls(**d)

    def to_json(self, path: str | Path | None = None) -> str:
        return jsonio.dump(self.to_dict(), path)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "EnergyParams":
        """A JSON string, or a file when given a path that exists."""
        return cls.from_dict(jsonio.load(text_or_path, "EnergyParams"))

    def replace(self, **changes: Any) -> "EnergyParams":
        return dataclasses.replace(self, **changes)


_COUNTS = ("macs", "dac_inputs", "dac_weights", "adc_conversions", "scale_multiplies", "normalise_multiplies",
           "accumulate_adds", "max_compares")
_ENERGIES = ("analog", "dac", "adc", "digital")


@dataclass
class LayerCost:
    """Counts and energies (pJ) of one product site for the accounted batch."""

    site: str
    kind: str
    config: str
    M: int
    N: int
    K: int
    tiles: int
    groups: int = 1
    products: int = 1
    macs: int = 0
    dac_inputs: int = 0
    dac_weights: int = 0
    adc_conversions: int = 0
    scale_multiplies: int = 0
    normalise_multiplies: int = 0
    accumulate_adds: int = 0
    max_compares: int = 0
    energy: dict[str, float] = field(default_factory=dict)

    @property
    def total_energy(self) -> float:
        return sum(self.energy.values())

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["energy_total"] = self.total_energy
        return d


def _prod(shape: Sequence[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def layer_cost(site: str, kind: str, x_shape: Sequence[int], w_shape: Sequence[int], macs: int, calls: int,
               config: ABFPConfig, params: EnergyParams) -> LayerCost:
    """Counts and energies of one site from its shapes and MACs (as :func:`abfp.summary` records them)."""
    n = config.tile_width
    fixed = config.mode == "fixed"
    groups, products = 1, 1
    dynamic_weights = False
    if kind == "linear":
        N, K = int(w_shape[0]), int(w_shape[-1])
        M = macs // max(1, N * K)
    elif kind == "conv":
        N, K = int(w_shape[0]), _prod(w_shape[1:])
        nd = len(w_shape) - 2
        cin = int(x_shape[-nd - 1]) if len(x_shape) > nd else int(w_shape[1])
        groups = max(1, cin // int(w_shape[1]))
        M = macs // max(1, N * K)  # output positions; each group sees M rows of its own K
    elif kind == "matmul":
        if not x_shape or not w_shape or macs == 0:  # einsum: not accounted
            return LayerCost(site, kind, config.label(), 0, 0, 0, 0, energy={k: 0.0 for k in _ENERGIES})
        K = int(x_shape[-1])
        M = int(x_shape[-2]) if len(x_shape) > 1 else 1
        N = int(w_shape[-1]) if len(w_shape) > 1 else 1
        products = macs // max(1, M * N * K)
        M *= products  # rows over all products
        # the second operand's own products: one (K, N) matrix shared by every product when it
        # broadcasts (``x @ w`` with ``w`` 2-d), converted once per call like a static weight
        w_products = calls * _prod(w_shape[:-2]) if len(w_shape) > 2 else calls
        dynamic_weights = True
    else:
        raise ValueError(f"unknown product kind {kind!r}")
    T = math.ceil(K / n)
    outputs = M * N
    c = LayerCost(site, kind, config.label(), M, N, K, T, groups, products, macs=int(macs))
    k = config.repeats  # k repeated analog passes, averaged digitally
    c.dac_inputs = M * K * groups * k
    c.dac_weights = K * N * min(products, w_products) if dynamic_weights else N * K * calls
    c.adc_conversions = outputs * T * k
    c.accumulate_adds = outputs * (T - 1) + outputs * T * (k - 1)
    dyn = M * K * groups + (c.dac_weights if dynamic_weights else 0)  # block scales: once per input
    c.scale_multiplies = (1 if fixed else 2) * outputs * T  # after the average
    c.normalise_multiplies = dyn
    c.max_compares = 0 if fixed else dyn
    p = params
    c.energy = {
        "analog": c.macs * k * p.analog_energy(config.gain),
        "dac": c.dac_inputs * p.dac_energy(config.input_bits, "input")
        + c.dac_weights * p.dac_energy(config.weight_bits, "weight"),
        "adc": c.adc_conversions * p.adc_energy(config.output_bits),
        "digital": (c.scale_multiplies + c.normalise_multiplies) * p.digital_multiply
        + c.accumulate_adds * p.digital_add + c.max_compares * p.digital_compare,
    }
    return c


ShapeGroup = tuple[Sequence[int], Sequence[int], int, int]
"""``(x_shape, w_shape, macs, calls)`` of the calls of one site with one pair of operand shapes."""


def shape_groups(row: Any) -> list[ShapeGroup]:
    """The shape groups of an :func:`abfp.summary` row (``SiteRecord.shape_groups``), or the
    row's own shapes, MACs and calls for a record that has none."""
    groups = getattr(row, "shape_groups", None)
    if callable(groups):
        return list(groups())
    return [(tuple(row.x_shape), tuple(row.w_shape), int(row.macs), max(1, int(row.calls)))]


def site_cost(site: str, kind: str, groups: Sequence[ShapeGroup], config: ABFPConfig,
              params: EnergyParams) -> LayerCost:
    """Counts and energies of one site that ran with one or more pairs of operand shapes (a
    shared module on two sequence lengths): :func:`layer_cost` of each group, summed. ``M``
    and ``products`` are summed too; ``N``, ``K``, ``tiles`` and ``groups`` are the last group's."""
    parts = [layer_cost(site, kind, x, w, macs, max(1, calls), config, params) for x, w, macs, calls in groups]
    if len(parts) == 1:
        return parts[0]
    out = dataclasses.replace(parts[-1], energy=dict(parts[-1].energy))
    for name in _COUNTS + ("M", "products"):
        setattr(out, name, sum(getattr(p, name) for p in parts))
    out.energy = {k: sum(p.energy.get(k, 0.0) for p in parts) for k in _ENERGIES}
    return out


def row_cost(row: Any, config: ABFPConfig, params: EnergyParams) -> LayerCost:
    """:func:`site_cost` of one :func:`abfp.summary` row (every shape it ran with) on ``config``."""
    return site_cost(row.site, row.kind, shape_groups(row), config, params)


@dataclass
class EnergyReport:
    """Per-layer costs of one batch of ``samples`` inputs, and totals (per batch and per inference)."""

    layers: list[LayerCost]
    samples: int
    params: EnergyParams

    def totals(self, per_inference: bool = True) -> dict[str, float]:
        div = self.samples if per_inference and self.samples else 1
        out: dict[str, float] = {k: sum(getattr(c, k) for c in self.layers) / div for k in _COUNTS}
        for k in _ENERGIES:
            out[f"energy_{k}"] = sum(c.energy.get(k, 0.0) for c in self.layers) / div
        out["energy_total"] = sum(c.total_energy for c in self.layers) / div
        out["energy_per_mac"] = out["energy_total"] / out["macs"] if out["macs"] else 0.0
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "params": self.params.to_dict(), "unit": "pJ",
                "layers": [c.to_dict() for c in self.layers], "per_inference": self.totals(True),
                "per_batch": self.totals(False)}

    def __str__(self) -> str:
        div = max(1, self.samples)
        head = (f"{'site':<34} {'kind':<6} {'MACs':>11} {'DAC in':>9} {'DAC w':>8} {'ADC':>9} {'dig ops':>9} "
                f"{'analog':>9} {'DAC':>9} {'ADC':>9} {'digital':>9} {'total':>10}")
        lines = [f"energy per inference (pJ; {self.samples} sample(s) accounted, weights converted once per call)",
                 head, "-" * len(head)]
        for c in self.layers:
            dig = c.scale_multiplies + c.normalise_multiplies + c.accumulate_adds + c.max_compares
            e = c.energy
            lines.append(
                f"{c.site[-34:]:<34} {c.kind:<6} {c.macs / div:>11,.0f} {c.dac_inputs / div:>9,.0f} "
                f"{c.dac_weights / div:>8,.0f} {c.adc_conversions / div:>9,.0f} {dig / div:>9,.0f} "
                f"{e['analog'] / div:>9.4g} {e['dac'] / div:>9.4g} {e['adc'] / div:>9.4g} {e['digital'] / div:>9.4g} "
                f"{c.total_energy / div:>10.4g}")
        t = self.totals(True)
        dig = t["scale_multiplies"] + t["normalise_multiplies"] + t["accumulate_adds"] + t["max_compares"]
        lines.append("-" * len(head))
        lines.append(
            f"{'total':<34} {'':<6} {t['macs']:>11,.0f} {t['dac_inputs']:>9,.0f} {t['dac_weights']:>8,.0f} "
            f"{t['adc_conversions']:>9,.0f} {dig:>9,.0f} {t['energy_analog']:>9.4g} {t['energy_dac']:>9.4g} "
            f"{t['energy_adc']:>9.4g} {t['energy_digital']:>9.4g} {t['energy_total']:>10.4g}")
        lines.append(f"{t['energy_total'] / 1e6:.4g} uJ per inference; {1e3 * t['energy_per_mac']:.4g} fJ per MAC")
        return "\n".join(lines)


def account_rows(rows: Sequence[Any], samples: int, params: EnergyParams | None = None,
                 config: ABFPConfig | None = None) -> EnergyReport:
    """Account :func:`abfp.summary` rows (``SiteRecord``) of a batch of ``samples`` inputs."""
    params = params or EnergyParams()
    layers = []
    for r in rows:
        if r.kind == "digital":  # stayed float32 (see abfp.ops.coverage): no converter energy
            continue
        cfg = r.config or config or ABFPConfig()
        layers.append(row_cost(r, cfg, params))
    return EnergyReport(layers, samples, params)


def account(model: Any, example_input: Any, config: ABFPConfig | None = None,
            params: EnergyParams | None = None) -> EnergyReport:
    """Run :func:`abfp.summary` on ``example_input`` and account every analog product."""
    from .nn import summary

    inputs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    samples = int(inputs[0].shape[0]) if hasattr(inputs[0], "shape") and inputs[0].dim() else 1
    s = summary(model, example_input, config, errors=False)
    return account_rows(s.rows, samples, params, config)


@dataclass(frozen=True)
class AdcComparison:
    """The authors' ADC-energy comparison of ABFP against fixed point."""

    abfp_per_conversion: float
    fixed_per_conversion: float
    ratio: float
    macs_per_conversion_ratio: float

    @property
    def per_mac_ratio(self) -> float:
        """ADC energy per MAC, fixed point over ABFP."""
        return self.ratio * self.macs_per_conversion_ratio


def authors_adc_comparison(params: EnergyParams | None = None, *, abfp_tile: int = 128, abfp_gain: float = 8.0,
                           abfp_bits: float = 8.0, fixed_tile: int = 8, fixed_bits: float = 12.5,
                           fixed_gain: float = 1.0) -> AdcComparison:
    """ADC energy per conversion ``adc(b) * G`` (the gain charged to the conversion, as the
    authors count it) of ABFP (n=128, G=8, 8 bits) against fixed point (n=8, 12.5 bits):
    ``2**12.5 / (2**8 * 8) = 2**4.5 / 8 = 2.83``; and MACs per conversion ``128 / 8 = 16``."""
    p = params or EnergyParams()
    abfp_energy = p.adc_energy(abfp_bits) * abfp_gain
    fixed_energy = p.adc_energy(fixed_bits) * fixed_gain
    return AdcComparison(abfp_energy, fixed_energy, fixed_energy / abfp_energy if abfp_energy else math.inf,
                         abfp_tile / fixed_tile)
