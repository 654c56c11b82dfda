"""Differential Noise Finetuning (SPEC section 4): measure ``dy``, fit histograms, inject noise.

1. :func:`record_differentials` runs the float32 network on a calibration batch; at every
   analog product site it also computes the device result on the *same* input (the float32
   network's own activation) and keeps ``dy = y_device - y_fp32``. The network continues
   with ``y_fp32``, so errors do not compound from layer to layer.
2. :func:`build_histograms` pours each site's ``dy`` into a :class:`Histogram` (100 bins,
   +0.5 per bin, normalised), per layer or per output channel.
3. :class:`DNFNoise` is an interceptor (``abfp.analog_state(m).interceptors["*"]``): in
   training mode a product returns ``y_fp32(x) + xi`` with ``xi`` i.i.d. from its site's
   histogram (ordinary float32 autograd; no tiling or quantisation); in eval mode, and at
   sites without a histogram, it returns ``y_fp32(x)``. One forward draws one key from
   torch's global generator; its noisy products take the keys of a SplitMix64 stream seeded
   with it (:mod:`.sampler`, :class:`KeyStream`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..nn import analog_state, reseed
from ..nn.mode import DirectSites, GuardedForward, ProductCall
from ..ops.device import tracing
from .histogram import DEFAULT_BINS, DEFAULT_SMOOTHING, Histogram
from ..numerics.counter_noise import noise_key
from .sampler import Backend, SiteSampler, stream_key, warm_up

__all__ = ["DNFNoise", "KeyStream", "SiteDifferential", "build_histograms", "channel_dim_of", "record_differentials",
           "select_noisiest"]


def channel_dim_of(kind: str, ndim: int) -> int:
    """The output-channel dimension of a product's result: dim 1 for convolutions (N, C, ...),
    the last dimension for linear layers and activation products (the columns of ``A @ B``)."""
    return 1 if kind == "conv" and ndim > 1 else ndim - 1


@dataclass
class SiteDifferential:
    """What :func:`record_differentials` saw at one site: ``dy`` of every call, and the sum of
    squares and count of the float32 outputs (for the relative error ``std(dy) / rms(y)``)."""

    kind: str
    dy: list[Tensor] = field(default_factory=list)
    y_sq: float = 0.0
    y_count: int = 0

    @property
    def y_rms(self) -> float:
        return math.sqrt(self.y_sq / self.y_count) if self.y_count else 0.0


@torch.no_grad()
def record_differentials(model: nn.Module, inputs: Sequence[Tensor], *,
                         sites: Iterable[str] | None = None) -> dict[str, SiteDifferential]:
    """``{site: SiteDifferential}`` of a converted ``model`` on one batch, in eval mode.

    ``dy = analog(x) - digital(x)`` with ``x`` the float32 network's activation (each call
    of a site adds one tensor). ``sites``: only these (default all analog sites).
    """
    state = analog_state(model)
    wanted = None if sites is None else set(sites)
    out: dict[str, SiteDifferential] = {}

    def recorder(call: ProductCall) -> Tensor:
        y = call.digital()
        if wanted is None or call.site in wanted:
            y32 = y.to(torch.float32)
            rec = out.setdefault(call.site, SiteDifferential(call.kind))
            rec.dy.append(call.analog().to(torch.float32) - y32)
            rec.y_sq += float(y32.double().square().sum())
            rec.y_count += y32.numel()
        return y

    saved = dict(state.interceptors)
    was_training = model.training
    state.interceptors.clear()
    state.interceptors["*"] = recorder
    try:
        model.eval()
        model(*inputs)
    finally:
        state.interceptors.clear()
        state.interceptors.update(saved)
        model.train(was_training)
    return out


def build_histograms(model: nn.Module, inputs: Sequence[Tensor], *, bins: int = DEFAULT_BINS,
                     smoothing: float = DEFAULT_SMOOTHING, per_channel: bool = False,
                     sites: Iterable[str] | None = None, seed_offset: int = 0) -> dict[str, Histogram]:
    """One :class:`Histogram` of ``dy`` per analog site of the converted ``model`` (or per output
    channel with ``per_channel``), from one calibration batch ``inputs``. The device noise
    generators restart at ``config.seed + seed_offset`` first, so the result is repeatable."""
    reseed(model, seed_offset)
    recorded = record_differentials(model, inputs, sites=sites)
    hists: dict[str, Histogram] = {}
    for site, rec in recorded.items():
        kind, dys = rec.kind, rec.dy
        if per_channel:
            d = channel_dim_of(kind, dys[0].ndim)
            rows = torch.cat([t.movedim(d, 0).reshape(t.shape[d], -1) for t in dys], dim=1)
            h = Histogram.fit(rows, bins=bins, smoothing=smoothing, channel_dim=0)
            h.channel_dim = d - dys[0].ndim  # negative: counts from the end, valid for any batch shape
        else:
            h = Histogram.fit(torch.cat([t.reshape(-1) for t in dys]), bins=bins, smoothing=smoothing)
        h.shape = tuple(dys[0].shape)
        h.signal_rms = rec.y_rms
        hists[site] = h
    return hists


def select_noisiest(hists: Mapping[str, Histogram], fraction: float, by: str = "std") -> list[str]:
    """The ``ceil(fraction * n)`` noisiest sites: largest standard deviation of ``dy``
    (``by="std"``, the authors' criterion) or largest ``std(dy) / rms(y_fp32)`` (``"relative"``)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"layer fraction must be in (0, 1], got {fraction}")
    if by not in ("std", "relative"):
        raise ValueError(f"rank sites by 'std' or 'relative', got {by!r}")

    def key(site: str) -> float:
        h = hists[site]
        return h.std if by == "std" else h.std / h.signal_rms if h.signal_rms > 0 else math.inf

    ranked = sorted(hists, key=key, reverse=True)
    return ranked[: max(1, math.ceil(fraction * len(ranked)))]


class KeyStream:
    """The sampler keys of one model's forwards (:mod:`.sampler`, version 4): a forward pre-hook
    of the model's root (a new forward, a new stream) and :meth:`next`, the key of the next
    noisy product: the first of a forward draws ``base`` from torch's global generator, the
    ``c``-th gets :func:`~.sampler.stream_key` ``(base, c)``."""

    __slots__ = ("base", "count")

    def __init__(self) -> None:
        self.base: int | None = None
        self.count = 0

    def __call__(self, module: nn.Module, args: object) -> None:
        self.base = None

    def take(self) -> tuple[int, int]:
        """``(base, c)`` of the next noisy product (its key is ``stream_key(base, c)``)."""
        if self.base is None:
            self.base = noise_key(None)
            self.count = 0
        c = self.count
        self.count = c + 1
        return self.base, c

    def next(self) -> int:
        return stream_key(*self.take())


#: modules whose forward makes exactly one product, its output (``forward`` of the class as torch defines it)
_LEAF_KINDS = {nn.Linear: ("linear0", nn.Linear.forward), nn.Conv1d: ("conv0", nn.Conv1d.forward),
               nn.Conv2d: ("conv0", nn.Conv2d.forward), nn.Conv3d: ("conv0", nn.Conv3d.forward)}


class _DirectDNF(DirectSites):
    """The direct sites of a model under :class:`DNFNoise` (:mod:`abfp.nn.mode`): a site's output
    is ``y_fp32 + xi`` wherever DNF would intercept it, ``y_fp32`` elsewhere, so a module whose
    sites have no histogram needs no interception at all, and an ``nn.Linear`` or ``nn.Conv*d``
    whose one product has a histogram gets its noise on exit, without the function mode."""

    def __init__(self, noise: "DNFNoise") -> None:
        self.noise = noise
        self.state = analog_state(noise.model)
        modules = dict(noise.model.named_modules())
        by_module: dict[str, list[str]] = {}
        for site in noise.histograms:
            by_module.setdefault(site.rpartition(":")[0], []).append(site)
        self.leaf: dict[nn.Module, str] = {}
        functional = set()
        for name, sites in by_module.items():
            m = modules.get(name)
            kind = _LEAF_KINDS.get(type(m))  # type: ignore[arg-type]
            guard = None if m is None else m.__dict__.get("forward")
            if (kind is not None and sites == [f"{name}:{kind[0]}"] and type(m).forward is kind[1]
                    and isinstance(guard, GuardedForward) and guard.inner is None):
                self.leaf[m] = sites[0]  # type: ignore[index]
            else:
                functional.add(name)
        self.functional = frozenset(functional)

    def active(self) -> bool:
        st = self.state
        return (self.noise.model.training and len(st.interceptors) == 1 and st.interceptors.get("*") is self.noise
                and not st.recording and not st.calibrating and not tracing())

    def output(self, site: str, y: Tensor) -> Tensor:
        return self.noise.samplers[site](y, self.noise.keys)


class DNFNoise:
    """Interceptor of a converted model: ``y_fp32(x) + xi`` in training mode (see module doc).
    :meth:`attach` also registers the :class:`KeyStream` as a forward pre-hook of the model's
    root (a forward that does not enter through the root continues the previous stream) and,
    with ``direct`` (default), sets the model's direct sites (:mod:`abfp.nn.mode`): modules
    whose products get no noise run without interception, and an ``nn.Linear`` / ``nn.Conv*d``
    gets its noise on exit (the same values, in the same order: tested). Assigning
    :attr:`histograms` (a refresh) updates the direct sites."""

    def __init__(self, model: nn.Module, histograms: Mapping[str, Histogram], *, backend: Backend = "auto",
                 direct: bool = True) -> None:
        self.model = model
        self._backend: Backend = backend
        self.direct = direct
        self.keys = KeyStream()
        self._hook: object | None = None
        self.histograms = histograms

    def __call__(self, call: ProductCall) -> Tensor:
        y = call.digital()
        sample = self.samplers.get(call.site)
        if sample is None or not self.model.training:
            return y
        return sample(y, self.keys)

    @property
    def backend(self) -> Backend:
        return self._backend

    @backend.setter
    def backend(self, backend: Backend) -> None:
        self._backend = backend
        self.samplers = {site: SiteSampler(h, backend) for site, h in self._histograms.items()}

    @property
    def histograms(self) -> dict[str, Histogram]:
        return self._histograms

    @histograms.setter
    def histograms(self, histograms: Mapping[str, Histogram]) -> None:
        """Replace the histograms (a refresh) and, when attached, the direct sites with them."""
        self._histograms = dict(histograms)
        #: each site's :class:`~.sampler.SiteSampler` (what draws its noise)
        self.samplers = {site: SiteSampler(h, self._backend) for site, h in self._histograms.items()}
        state = analog_state(self.model)
        if state.interceptors.get("*") is self:
            state.direct = _DirectDNF(self) if self.direct else None

    def attach(self) -> "DNFNoise":
        state = analog_state(self.model)
        state.interceptors.clear()
        state.interceptors["*"] = self
        state.direct = _DirectDNF(self) if self.direct else None
        if self._hook is None:
            self._hook = self.model.register_forward_pre_hook(self.keys)
        self.keys.base = None
        return self

    def detach(self) -> None:
        state = analog_state(self.model)
        if state.interceptors.get("*") is self:
            del state.interceptors["*"]
        if isinstance(state.direct, _DirectDNF) and state.direct.noise is self:
            state.direct = None
        if self._hook is not None:
            self._hook.remove()  # type: ignore[attr-defined]
            self._hook = None

    def warm_up(self) -> None:
        """Compile the sampler for each site's recorded output shape (draws no global random numbers)."""
        for hist in self.histograms.values():
            if hist.shape:
                warm_up(hist, hist.shape, backend=self.backend)
