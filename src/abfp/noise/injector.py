"""Put a noise model on every analog product of a model, with an energy per layer or channel.

:class:`NoiseInjector` converts a model (hooks only, see :func:`abfp.convert`) and installs
itself as the interceptor of every product site: each linear, convolution and matmul then
computes its float32 product and adds the noise of its :class:`~abfp.noise.NoiseModel` at
that site's energy per MAC ``E``. The energies are ``exp`` of float32 tensors
(``log_energy``) that can be trained (see :mod:`abfp.precision`).

    inj = NoiseInjector(model, "shot", per_channel=False, seed=0)
    inj.profile([x_calibration])          # sites, MACs, quantiser ranges, output ranges
    inj.set_energy(100.0)                 # photons per MAC everywhere
    y = inj(x)                            # noisy forward, redrawn every call
    inj.reseed()                          # the same draws again
    inj.effective_bits()                  # {site: b_eff}

Repeats: :meth:`NoiseInjector.set_repeats` sets ``E = k * E_base`` per layer (integer ``k``
repeats of a base operation, averaged); :meth:`NoiseInjector.repeats` rounds learned
energies up to integer repeats.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..config import ABFPConfig
from ..nn import analog_state, convert, is_converted
from ..noise_keys import NoiseStreams, injector_start
from .formulas import effective_bits, tensor_range
from .models import NoiseModel, SiteProfile, apply_noise, make_noise
from .product import ProductView

__all__ = ["NoiseInjector", "SiteProfile"]


def _macs(view: ProductView, y: Tensor) -> int:
    """MACs as :func:`abfp.summary` counts them (:meth:`ProductView.macs`)."""
    return view.macs(y)


class NoiseInjector:
    """A converted model whose products carry ``noise`` at a trainable energy per MAC.

    ``model``: converted already or converted here (a copy, ``config`` only decides which modules
    are analog: the products themselves are float32 plus noise). ``per_channel``: one energy per
    output channel of linear/conv layers (a matmul keeps one per layer). ``seed``: the noise
    draws (a generator per device; :meth:`reseed` restarts it). ``energy``: initial E everywhere.
    """

    def __init__(self, model: nn.Module, noise: str | NoiseModel | Sequence[str | NoiseModel] = "shot", *,
                 per_channel: bool = False, seed: int | None = 0, energy: float = 1.0,
                 config: ABFPConfig | None = None, exclude: Sequence[str] = ()) -> None:
        if not energy > 0:
            raise ValueError(f"energy must be > 0, got {energy}")
        if not is_converted(model):
            model = convert(model, config or ABFPConfig(noise_std=0.0), exclude=exclude)
        self.model = model
        self.noise = make_noise(noise)
        self.per_channel = bool(per_channel)
        self.seed = seed
        self.default_energy = float(energy)
        self.enabled = True
        self.profiles: dict[str, SiteProfile] = {}
        self.log_energy: dict[str, Tensor] = {}
        # one stream per device, started at the seed itself (abfp.noise_keys)
        self._streams = NoiseStreams(start=injector_start)
        self._profiling = False
        self._samples = 0
        self._warned: set[str] = set()
        analog_state(model).interceptors["*"] = self._intercept

    # ------------------------------------------------------------------ running
    def __call__(self, *inputs: Any, **kwargs: Any) -> Any:
        return self.model(*inputs, **kwargs)

    def remove(self) -> nn.Module:
        """Uninstall the interceptor; the model computes on the ABFP device again."""
        state = analog_state(self.model)
        if state.interceptors.get("*") == self._intercept:
            del state.interceptors["*"]
        return self.model

    def _generator(self, device: torch.device) -> torch.Generator | None:
        """The injector's noise stream on ``device`` (torch's global generator without a seed)."""
        return None if self.seed is None else self._streams.get(self.seed, device)

    def reseed(self, seed: int | None = None) -> None:
        """Restart the noise draws (from ``seed``, default the injector's own)."""
        if seed is not None:
            self.seed = seed
        self._streams.restart()

    def _intercept(self, call: Any) -> Tensor:
        view = ProductView.from_call(call)
        if view is None:
            if call.site not in self._warned:
                self._warned.add(call.site)
                warnings.warn(f"abfp.noise: {call.site} ({call.kind}) has no noise model and stays noise-free",
                              stacklevel=2)
            return call.digital()
        if self._profiling:
            with torch.no_grad():
                y = view.compute()
            self._profile_site(call.site, view, y)
            return y
        if not self.enabled:
            return view.compute()
        if call.site not in self.log_energy:
            with torch.no_grad():
                self._profile_site(call.site, view, view.compute())
        energy = self.log_energy[call.site].exp()
        return apply_noise(self.noise, view, energy, self.profiles.get(call.site), self._generator(view.input.device))

    def _profile_site(self, site: str, view: ProductView, y: Tensor) -> None:
        p = self.profiles.get(site)
        if p is None:
            p = self.profiles[site] = SiteProfile(site, view.kind, view.reduction, view.channels)
        p.update(view, y, _macs(view, y))
        if not self._profiling:  # met outside profile(): assume one sample per leading row
            p.samples = int(view.input.shape[0]) if view.input.dim() > 1 else 1
        if site not in self.log_energy:
            n = p.channels if self.per_channel else 1
            self.log_energy[site] = torch.full((n,), math.log(self.default_energy), dtype=torch.float32)

    # ------------------------------------------------------------------ profiling
    @torch.no_grad()
    def profile(self, batches: Iterable[Any], *, reset: bool = True) -> dict[str, SiteProfile]:
        """Run the model noise-free on ``batches`` (each a tensor or a tuple of inputs) and record,
        per site: kind, fan-in, channels, MACs per sample, quantiser ranges of input and weight,
        output ranges and the statistics the effective bits need. Creates the energies
        (``default_energy``) of new sites."""
        if reset:
            self.profiles.clear()
            self._samples = 0
        self._profiling = True
        try:
            for batch in batches:
                inputs = batch if isinstance(batch, (tuple, list)) else (batch,)
                first = inputs[0] if inputs else None
                self._samples += int(first.shape[0]) if isinstance(first, Tensor) and first.dim() else 1
                self.model(*inputs)
        finally:
            self._profiling = False
        for p in self.profiles.values():
            p.samples = self._samples
        stale = [s for s in self.log_energy if s not in self.profiles]
        for s in stale:
            del self.log_energy[s]
        return self.profiles

    @property
    def sites(self) -> list[str]:
        return list(self.profiles)

    # ------------------------------------------------------------------ energies
    def parameters(self) -> list[Tensor]:
        """The ``log E`` tensors (one per site), for an optimiser."""
        return list(self.log_energy.values())

    def requires_grad_(self, flag: bool = True) -> "NoiseInjector":
        for t in self.log_energy.values():
            t.requires_grad_(flag)
        return self

    def energy(self, site: str) -> Tensor:
        """``E`` of ``site``: one value, or one per output channel (no autograd)."""
        return self.log_energy[site].detach().exp()

    def energies(self) -> dict[str, list[float]]:
        return {s: [float(v) for v in self.energy(s)] for s in self.log_energy}

    def layer_energy(self, site: str) -> float:
        """Mean E over the site's channels (each channel does the same number of MACs)."""
        return float(self.energy(site).mean())

    def set_energy(self, value: float | Mapping[str, float | Sequence[float] | Tensor]) -> None:
        """One E for every site, or per site: a number or one value per channel."""
        if isinstance(value, Mapping):
            for site, v in value.items():
                if site not in self.log_energy:
                    raise KeyError(f"unknown site {site!r}; profiled sites: {', '.join(self.sites)}")
                t = torch.as_tensor(v, dtype=torch.float64).reshape(-1)
                cur = self.log_energy[site]
                if t.numel() not in (1, cur.numel()):
                    raise ValueError(f"{site}: {t.numel()} energies for {cur.numel()} channels")
                if not bool((t > 0).all()):
                    raise ValueError(f"{site}: energies must be > 0")
                with torch.no_grad():
                    cur.copy_(torch.broadcast_to(t.log(), cur.shape).float())
            return
        v = float(value)
        if not v > 0:
            raise ValueError(f"energy must be > 0, got {v}")
        with torch.no_grad():
            for t in self.log_energy.values():
                t.fill_(math.log(v))

    def scale_energy(self, factor: float) -> None:
        """Multiply every energy by ``factor`` (the allocation's shape is kept)."""
        if not factor > 0:
            raise ValueError(f"factor must be > 0, got {factor}")
        with torch.no_grad():
            for t in self.log_energy.values():
                t.add_(math.log(factor))

    def macs(self) -> dict[str, float]:
        """MACs per sample of every profiled site."""
        return {s: p.macs_per_sample for s, p in self.profiles.items()}

    def mean_energy(self) -> Tensor:
        """``E_mean = sum_l MACs_l * mean_c E_l,c / sum_l MACs_l`` (differentiable)."""
        sites = [s for s in self.log_energy if self.profiles.get(s) and self.profiles[s].macs > 0]
        if not sites:
            raise RuntimeError("no profiled sites: call profile() first")
        w = torch.tensor([self.profiles[s].macs_per_sample for s in sites], dtype=torch.float64)
        e = torch.stack([self.log_energy[s].exp().mean() for s in sites]).double()
        return (w * e).sum() / w.sum()

    # ------------------------------------------------------------------ repeats
    def set_repeats(self, base_energy: float, repeats: int | Mapping[str, int | Sequence[int]] = 1,
                    default: int = 1) -> None:
        """``E = k * base_energy``: each MAC repeated ``k`` times (integer, per site or per
        channel) and averaged. Sites missing from a mapping repeat ``default`` times."""
        if not base_energy > 0:
            raise ValueError(f"base_energy must be > 0, got {base_energy}")
        table: Mapping[str, Any] = repeats if isinstance(repeats, Mapping) else {}
        unknown = [site for site in table if site not in self.log_energy]
        if unknown:
            raise KeyError(f"unknown site {unknown[0]!r}; profiled sites: {', '.join(self.sites)}")
        uniform = default if isinstance(repeats, Mapping) else repeats
        values: dict[str, Any] = {}
        for site in self.log_energy:
            k = torch.as_tensor(table.get(site, uniform)).reshape(-1)
            if k.dtype.is_floating_point and not bool((k == k.round()).all()):
                raise ValueError(f"{site}: repeats must be integers, got {k.tolist()}")
            if not bool((k >= 1).all()):
                raise ValueError(f"{site}: repeats must be >= 1, got {k.tolist()}")
            values[site] = k.double() * base_energy
        self.set_energy(values)

    def repeats(self, base_energy: float) -> dict[str, list[int]]:
        """The integer repeats of a ``base_energy`` operation that reach at least each site's E
        (``ceil(E / E_base)``, at least 1; energies are float32, so a ratio within 1e-5 of an
        integer counts as that integer)."""
        if not base_energy > 0:
            raise ValueError(f"base_energy must be > 0, got {base_energy}")
        out = {}
        for s in self.log_energy:
            k = torch.ceil(self.energy(s).double() / base_energy * (1 - 1e-5)).clamp_min(1)
            out[s] = [int(v) for v in k]
        return out

    # ------------------------------------------------------------------ effective bits
    def effective_bits(self) -> dict[str, float]:
        """``b_eff = log2(1 + R / (sqrt(12) sigma))`` per site: ``R`` the range of the site's
        noise-free outputs on the profiling data, ``sigma`` the RMS output-referred noise at the
        current energies (see :meth:`NoiseModel.unit_variance`)."""
        out = {}
        for s, p in self.profiles.items():
            if s not in self.log_energy:
                continue
            var = (self.noise.unit_variance(p) / self.energy(s).double()).mean()
            out[s] = float(effective_bits(torch.tensor(p.output_range, dtype=torch.float64), var.sqrt()))
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"noise": self.noise.name, "per_channel": self.per_channel, "seed": self.seed,
                "energies": self.energies()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.set_energy(state["energies"])
