"""Noise models as composable parts: shot, thermal and weight noise (SPEC section 5).

Each model turns an energy per MAC ``E`` (one value per layer or per output channel) into
zero-mean Gaussian noise on one product. Output noises (shot, thermal) give a standard
deviation per output; weight noise gives one per weight (a fresh draw every forward pass,
shared by the batch: the weights are programmed once per pass). A :class:`NoiseStack`
combines models that share the same energy: weight noises first (their variances add), then
the output noises (their variances add, drawn as one Gaussian).

Every model's variance scales as ``1/E``; :meth:`NoiseModel.unit_variance` gives the
output-referred variance per channel at ``E = 1`` from a :class:`SiteProfile`, which is what
the effective bits of a layer are computed from.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from .formulas import SHOT_COEFFICIENT, THERMAL_COEFFICIENT, WEIGHT_COEFFICIENT, tensor_range
from .product import ProductView

__all__ = ["NoiseModel", "NoiseStack", "ShotNoise", "ThermalNoise", "WeightNoise", "make_noise", "NOISE_NAMES",
           "apply_noise", "SiteProfile"]


@dataclass
class SiteProfile:
    """What one product site looked like on the profiling data (noise off).

    ``shot_ms[c]``: mean over channel c's outputs of ``||x||^2 ||w_c||^2 / D``;
    ``x_ms[c]``: mean ``||x||^2``; ``d_mean``: mean fan-in ``D``; ranges are ``max - min``.
    """

    site: str
    kind: str
    fan_in: int
    channels: int
    macs: int = 0
    samples: int = 0
    calls: int = 0
    input_range: float | None = None
    weight_range: float | None = None
    output_min: Tensor | None = None
    output_max: Tensor | None = None
    shot_sum: Tensor | None = None
    x_sum: Tensor | None = None
    d_sum: float = 0.0
    count: Tensor | None = None
    supported: bool = True

    @property
    def macs_per_sample(self) -> float:
        return self.macs / self.samples if self.samples else float(self.macs)

    @property
    def output_range(self) -> float:
        if self.output_max is None:
            return 0.0
        return float(self.output_max.max() - self.output_min.min())  # type: ignore[union-attr]

    @property
    def output_range_per_channel(self) -> Tensor:
        if self.output_max is None:
            return torch.zeros(self.channels, dtype=torch.float64)
        return self.output_max - self.output_min  # type: ignore[operator]

    @property
    def shot_ms(self) -> Tensor:
        return self.shot_sum / self.count  # type: ignore[operator]

    @property
    def x_ms(self) -> Tensor:
        return self.x_sum / self.count  # type: ignore[operator]

    @property
    def d_mean(self) -> float:
        n = float(self.count.sum()) if self.count is not None else 0.0
        return self.d_sum / n if n else float(self.fan_in)

    def update(self, view: ProductView, y: Tensor, macs: int) -> None:
        """Fold one call's statistics in."""
        self.calls += 1
        self.macs += macs
        y = y.detach().double()
        xn = view.input_norm_sq().double()
        d = view.fan_in().double()
        shot = view.per_channel_mean(xn * view.weight_norm_sq().double() / d, y)
        xm = view.per_channel_mean(xn, y)
        axis = view.output_channel_axis(y)
        flat = y.reshape(1, -1) if axis is None else y.movedim(axis, 0).reshape(y.shape[axis], -1)
        n = torch.full((flat.shape[0],), float(flat.shape[1]), dtype=torch.float64)
        lo, hi = flat.amin(1), flat.amax(1)
        self.d_sum += float(torch.broadcast_to(d, y.shape).sum())
        if self.count is None:
            self.output_min, self.output_max = lo, hi
            self.shot_sum, self.x_sum, self.count = shot * n, xm * n, n
        else:
            self.output_min = torch.minimum(self.output_min, lo)
            self.output_max = torch.maximum(self.output_max, hi)
            self.shot_sum, self.x_sum, self.count = self.shot_sum + shot * n, self.x_sum + xm * n, self.count + n
        rx = tensor_range(view.input)
        self.input_range = rx if self.input_range is None else max(self.input_range, rx)
        rw = tensor_range(view.weight)
        self.weight_range = rw if self.weight_range is None else max(self.weight_range, rw)

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "kind": self.kind, "fan_in": self.fan_in, "channels": self.channels,
                "macs_per_sample": self.macs_per_sample, "input_range": self.input_range,
                "weight_range": self.weight_range, "output_range": self.output_range}


class NoiseModel(ABC):
    """One physical noise source driven by the energy per MAC."""

    name: str = "noise"

    def output_std(self, view: ProductView, energy: Tensor, profile: "SiteProfile | None") -> Tensor | None:
        """Std of the noise added to each output (``energy`` already shaped for ``y``); None: none."""
        return None

    def weight_std(self, view: ProductView, energy: Tensor, profile: "SiteProfile | None") -> Tensor | None:
        """Std of the noise added to each weight (``energy`` shaped for the weight); None: none."""
        return None

    @abstractmethod
    def unit_variance(self, profile: "SiteProfile") -> Tensor:
        """Output-referred noise variance per output channel at ``E = 1`` (float64)."""

    def parts(self) -> tuple["NoiseModel", ...]:
        return (self,)


def _input_range(view: ProductView, profile: "SiteProfile | None") -> float:
    if profile is not None and profile.input_range is not None:
        return profile.input_range
    return tensor_range(view.input)


def _weight_range(view: ProductView, profile: "SiteProfile | None") -> float:
    # static weights: their own range now; an activation playing the weight: the calibrated one
    if view.kind == "matmul" and profile is not None and profile.weight_range is not None:
        return profile.weight_range
    return tensor_range(view.weight)


@dataclass(frozen=True)
class ShotNoise(NoiseModel):
    """Shot noise on each output: ``sigma_i = c ||x|| ||w_i|| / sqrt(D E)`` (c = 1).

    For a convolution ``||x||`` and ``D`` belong to the output position's im2col patch.
    """

    coefficient: float = SHOT_COEFFICIENT
    name: str = field(default="shot", init=False)

    def output_std(self, view, energy, profile=None):
        scale = view.input_norm_sq() * view.weight_norm_sq() / view.fan_in()
        return self.coefficient * torch.sqrt(scale) * torch.rsqrt(energy)

    def unit_variance(self, profile):
        return self.coefficient**2 * profile.shot_ms


@dataclass(frozen=True)
class ThermalNoise(NoiseModel):
    """Thermal noise on each output: ``sigma = c sqrt(D / E) R_w R_x`` (c = 0.01).

    ``R_w``: range of the layer's weights (``max - min``); ``R_x``: range of its input,
    calibrated once by :meth:`NoiseInjector.profile` (the static range of an 8-bit input
    quantiser), or the current input's range when not calibrated.
    """

    coefficient: float = THERMAL_COEFFICIENT
    name: str = field(default="thermal", init=False)

    def output_std(self, view, energy, profile=None):
        r = _weight_range(view, profile) * _input_range(view, profile)
        return self.coefficient * r * torch.sqrt(view.fan_in() / energy)

    def unit_variance(self, profile):
        r = (profile.weight_range or 0.0) * (profile.input_range or 0.0)
        return (self.coefficient * r) ** 2 * profile.d_mean


@dataclass(frozen=True)
class WeightNoise(NoiseModel):
    """Noise on every weight, redrawn every forward pass: ``sigma = c / sqrt(E) R_w`` (c = 0.1).

    Output-referred, an output sees variance ``sigma^2 ||x||^2``. In an activation-by-
    activation product the second operand plays the weight.
    """

    coefficient: float = WEIGHT_COEFFICIENT
    name: str = field(default="weight", init=False)

    def weight_std(self, view, energy, profile=None):
        return self.coefficient * _weight_range(view, profile) * torch.rsqrt(energy)

    def unit_variance(self, profile):
        return (self.coefficient * (profile.weight_range or 0.0)) ** 2 * profile.x_ms


@dataclass(frozen=True)
class NoiseStack(NoiseModel):
    """Several noise sources driven by the same energy; independent, so variances add."""

    models: tuple[NoiseModel, ...] = ()

    @property
    def name(self) -> str:  # type: ignore[override]
        return "+".join(m.name for m in self.models)

    def parts(self) -> tuple[NoiseModel, ...]:
        return tuple(p for m in self.models for p in m.parts())

    def output_std(self, view, energy, profile=None):
        return _quadrature(m.output_std(view, energy, profile) for m in self.parts())

    def weight_std(self, view, energy, profile=None):
        return _quadrature(m.weight_std(view, energy, profile) for m in self.parts())

    def unit_variance(self, profile):
        return sum((m.unit_variance(profile) for m in self.parts()), torch.zeros((), dtype=torch.float64))


def _quadrature(stds) -> Tensor | None:
    var = None
    for s in stds:
        if s is not None:
            var = s * s if var is None else var + s * s
    return None if var is None else torch.sqrt(var)


def apply_noise(noise: NoiseModel, view: ProductView, energy: Tensor, profile: "SiteProfile | None",
                generator: torch.Generator | None, y: Tensor | None = None) -> Tensor:
    """The product of ``view`` with ``noise`` at ``energy`` (length 1 or one per channel).

    ``y``: the noise-free product when already computed (skipped when weight noise recomputes it).
    Draws come from ``generator`` (torch's global one when None). Gradients reach ``energy``.
    """
    e_w = view.weight_channel(energy)
    ws = noise.weight_std(view, e_w, profile)
    if ws is not None:
        w = view.weight
        eps = torch.randn(w.shape, generator=generator, dtype=torch.float32, device=w.device)
        y = view.compute(w + (ws * eps).to(w.dtype))
    elif y is None:
        y = view.compute()
    os_ = noise.output_std(view, view.channel(energy), profile)
    if os_ is not None:
        eps = torch.randn(y.shape, generator=generator, dtype=torch.float32, device=y.device)
        y = y + (os_ * eps).to(y.dtype)
    return y


NOISE_NAMES = ("shot", "thermal", "weight")


def make_noise(spec: str | NoiseModel | Sequence[str | NoiseModel]) -> NoiseModel:
    """``"shot"``, ``"thermal"``, ``"weight"``, a ``+``-joined combination (``"shot+thermal"``),
    a model, or a list of them."""
    if isinstance(spec, NoiseModel):
        return spec
    if isinstance(spec, str):
        names = [s.strip() for s in spec.split("+") if s.strip()]
        if len(names) == 1:
            table = {"shot": ShotNoise, "thermal": ThermalNoise, "weight": WeightNoise}
            if names[0] not in table:
                raise ValueError(f"unknown noise {names[0]!r}; known: {', '.join(NOISE_NAMES)}")
            return table[names[0]]()
        spec = names
    models = tuple(make_noise(s) for s in spec)
    if not models:
        raise ValueError("no noise model given")
    return models[0] if len(models) == 1 else NoiseStack(models)
