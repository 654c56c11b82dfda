"""Histograms of the device's differential ``dy = y_device - y_fp32`` (SPEC section 4, step 2).

A :class:`Histogram` holds ``C`` rows (one row for a whole layer, or one per output channel),
each with ``B`` equal-width bins spanning ``[min dy, max dy]`` of that row:

    edge_j = lo + j * width,    width = (max dy - min dy) / B,    j = 0 .. B
    p_j    = (count_j + s) / (N + B * s)            (s = 0.5: no bin is empty)

It defines the piecewise-uniform density "pick bin j with probability p_j, then a point
uniform inside it". Its mean and variance, used for reporting, are

    mean = sum_j p_j c_j,      var = sum_j p_j (c_j^2 + width^2 / 12) - mean^2,

with ``c_j`` the bin centres. Sampling uses Walker's alias method (:meth:`alias_table`)
over ``S = 2^b >= B`` slots (``b = slot_bits(B)``; slots ``B .. S-1`` have probability 0):
slot ``s`` is drawn uniformly from ``0 .. S-1``; it keeps bin ``s`` with probability ``q_s``
and otherwise gives bin ``a_s``; Vose's construction makes
``(q_s + sum_{t: a_t = s} (1 - q_t)) / S = p_s`` for every bin, which is exact. The sampler
stores ``q_s`` as an integer threshold ``T_s = floor(q_s 2^(32-b))`` packed with the alias
into one 32-bit word ``T_s 2^b + a_s``, so every bin's probability is a multiple of 2^-32
within ``(number of slots pointing at it) * 2^-32`` of ``p_j``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import numpy as np

import torch
from torch import Tensor

__all__ = ["MAX_BINS", "Histogram", "alias_arrays", "slot_bits"]

#: Default number of bins and per-bin pseudo-count (SPEC section 4).
DEFAULT_BINS = 100
DEFAULT_SMOOTHING = 0.5

#: Most bins the sampler's packed tables hold (slot index and threshold share 32 bits).
MAX_BINS = 1 << 16


def slot_bits(bins: int) -> int:
    """``b``: the sampler draws one of ``2^b`` slots, the least power of two >= ``bins`` (at least 2)."""
    if not 1 <= bins <= MAX_BINS:
        raise ValueError(f"the DNF sampler handles 1 to {MAX_BINS} bins, got {bins}")
    return max(1, (bins - 1).bit_length())


def alias_arrays(probs: Tensor, slots: int | None = None) -> tuple[Tensor, Tensor]:
    """Vose's alias method for each row of ``probs`` (C, B), rows summing to 1, over ``slots``
    slots (default ``B``; more than ``B``: the extra bins have probability 0).

    Returns ``(q, alias)``: float64 (C, slots) thresholds in [0, 1] and int64 (C, slots) alias
    bins. Drawing slot ``s`` uniformly and keeping it when ``u < q[s]`` (``u`` uniform on
    [0, 1)), else taking ``alias[s]``, gives bin ``j`` with probability ``probs[j]``.
    """
    p = probs.detach().to(torch.float64).cpu()
    if slots is not None:
        if slots < p.shape[1]:
            raise ValueError(f"{slots} slots for {p.shape[1]} bins")
        p = torch.nn.functional.pad(p, (0, slots - p.shape[1]))
    c, b = p.shape
    qs: list[list[float]] = []
    aliases: list[list[int]] = []
    for row in p:
        scaled = (row / row.sum() * b).tolist()
        qr, ar = [1.0] * b, list(range(b))
        small = [j for j, v in enumerate(scaled) if v < 1.0]
        large = [j for j, v in enumerate(scaled) if v >= 1.0]
        while small and large:
            s, g = small.pop(), large.pop()
            qr[s], ar[s] = scaled[s], g
            scaled[g] -= 1.0 - scaled[s]
            (small if scaled[g] < 1.0 else large).append(g)
        # what is left is 1 up to rounding: those slots keep their own bin
        qs.append(qr)
        aliases.append(ar)
    q = torch.tensor(qs, dtype=torch.float64).reshape(c, b)
    alias = torch.tensor(aliases, dtype=torch.int64).reshape(c, b)
    return q, alias


@dataclass
class Histogram:
    """``C`` piecewise-uniform distributions of equal-width bins (see the module docstring).

    ``lo`` (C,): left edge of bin 0; ``width`` (C,): bin width (0 when all samples were equal:
    every draw is then ``lo``); ``probs`` (C, B); ``channel_dim``: the dimension of the layer
    output that indexes the rows (``None``: one row for the whole layer); ``std``: standard
    deviation of the raw samples the histogram was fitted to (all rows together); ``count``:
    how many samples; ``shape``: the shape of one recorded layer output; ``signal_rms``: root
    mean square of the float32 outputs ``y_fp32`` at the same site (both informative).
    """

    lo: Tensor
    width: Tensor
    probs: Tensor
    channel_dim: int | None = None
    std: float = 0.0
    count: int = 0
    shape: tuple[int, ...] = ()
    signal_rms: float = 0.0
    _tables: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.probs.ndim != 2 or self.lo.shape != (self.probs.shape[0],) or self.width.shape != self.lo.shape:
            raise ValueError(f"Histogram: probs must be (C, B) and lo, width (C,); got {tuple(self.probs.shape)}, "
                             f"{tuple(self.lo.shape)}, {tuple(self.width.shape)}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def fit(cls, samples: Tensor, *, bins: int = DEFAULT_BINS, smoothing: float = DEFAULT_SMOOTHING,
            channel_dim: int | None = None) -> "Histogram":
        """Histogram of ``samples``: all values together (``channel_dim=None``) or one row per
        index of ``channel_dim`` (per output channel). ``bins`` equal-width bins over each row's
        ``[min, max]``; ``smoothing`` is added to every bin's count before normalising."""
        if not 1 <= bins <= MAX_BINS:
            raise ValueError(f"bins must be in 1 .. {MAX_BINS} (the sampler's tables), got {bins}")
        if not smoothing >= 0:
            raise ValueError(f"smoothing must be >= 0, got {smoothing}")
        x = samples.detach().to(torch.float64)
        if x.numel() == 0:
            raise ValueError("cannot fit a histogram to no samples")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("differential samples contain NaN or Inf")
        rows = x.reshape(1, -1) if channel_dim is None else x.movedim(channel_dim, 0).reshape(x.shape[channel_dim], -1)
        return cls._fit_rows(rows, bins, smoothing, channel_dim, float(x.std()) if x.numel() > 1 else 0.0)

    @classmethod
    def _fit_rows(cls, rows: Tensor, bins: int, smoothing: float, channel_dim: int | None, std: float) -> "Histogram":
        c, m = rows.shape
        lo = rows.min(dim=1).values
        hi = rows.max(dim=1).values
        width = (hi - lo) / bins
        safe = torch.where(width > 0, width, torch.ones_like(width))
        idx = torch.floor((rows - lo[:, None]) / safe[:, None]).clamp_(0, bins - 1).to(torch.int64)
        idx += torch.arange(c, dtype=torch.int64)[:, None] * bins
        counts = torch.bincount(idx.reshape(-1), minlength=c * bins).reshape(c, bins).to(torch.float64)
        counts += smoothing
        total = counts.sum(dim=1, keepdim=True)
        if bool((total <= 0).any()):
            raise ValueError("histogram with zero total weight")
        return cls(lo=lo.float(), width=width.float(), probs=(counts / total).float(), channel_dim=channel_dim,
                   std=std, count=m * c)

    # ------------------------------------------------------------------ properties
    @property
    def bins(self) -> int:
        return int(self.probs.shape[1])

    @property
    def channels(self) -> int:
        return int(self.probs.shape[0])

    @property
    def edges(self) -> Tensor:
        """(C, B+1) bin edges ``lo + j * width``."""
        j = torch.arange(self.bins + 1, dtype=torch.float64)
        return (self.lo.double()[:, None] + j[None, :] * self.width.double()[:, None]).float()

    def mean(self) -> Tensor:
        """(C,) mean of each row's distribution."""
        centres = self.lo.double()[:, None] + (torch.arange(self.bins, dtype=torch.float64) + 0.5) * self.width.double()[:, None]
        return (self.probs.double() * centres).sum(1)

    def variance(self) -> Tensor:
        """(C,) variance of each row's distribution (bins are uniform: each adds width^2/12)."""
        centres = self.lo.double()[:, None] + (torch.arange(self.bins, dtype=torch.float64) + 0.5) * self.width.double()[:, None]
        m = (self.probs.double() * centres).sum(1)
        second = (self.probs.double() * (centres**2)).sum(1) + self.width.double() ** 2 / 12.0
        return (second - m**2).clamp_min(0.0)

    # ------------------------------------------------------------------ sampling
    def alias_table(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
        """Tables for the sampler: ``(packed, lo, width)`` on ``device``.

        ``packed`` (C, 2^b) int64 holds the 32-bit words ``T_s * 2^b + a_s`` (module doc;
        ``b = slot_bits(B)``, ``T_s = floor(q_s 2^(32-b))``); a slot that always keeps its own
        bin (``q_s = 1``) is stored as alias = itself, threshold 0.
        """
        key = str(device)
        hit = self._tables.get(key)
        if hit is not None:
            return hit
        b = slot_bits(self.bins)
        q, alias = alias_arrays(self.probs, 1 << b)
        if bool((alias >= self.bins).any()):  # pragma: no cover - Vose never aliases to an empty slot
            raise AssertionError("alias table points at a padding slot")
        one = 1 << (32 - b)
        thr = torch.floor(q * one).to(torch.int64)
        own = torch.arange(1 << b, dtype=torch.int64).expand_as(alias)
        full = thr >= one
        alias = torch.where(full, own, alias)
        thr = torch.where(full, torch.zeros_like(thr), thr)
        if bool((full & (own >= self.bins)).any()):  # pragma: no cover - padding slots have q = 0
            raise AssertionError("a padding slot keeps itself")
        packed = (thr << b) | alias
        out = (packed.to(device), self.lo.to(device), self.width.to(device))
        self._tables[key] = out
        return out

    def memo(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """``make()``, computed once per ``key`` and kept with this histogram's tables (what a
        sampler derives from it and the shape of an output, asked again at every step)."""
        hit = self._tables.get(key)
        if hit is None:
            hit = self._tables[key] = make()
        return hit

    def kernel_tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The tables of :meth:`alias_table` as the compiled sampler reads them: ``(packed,
        lo, width)`` numpy arrays, ``packed`` (C, 2^b) uint32, ``lo`` and ``width`` (C,) float32."""
        hit = self._tables.get("kernel")
        if hit is None:
            packed, lo, width = self.alias_table("cpu")
            hit = (packed.numpy().astype(np.uint32), lo.float().contiguous().numpy(), width.float().contiguous().numpy())
            self._tables["kernel"] = hit
        return hit  # type: ignore[return-value]

    def sample(self, shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None = None) -> Tensor:
        """Plain (unfused) draws, for inspection and tests: a tensor of ``shape`` whose
        ``channel_dim`` indexes the rows (any shape for a one-row histogram)."""
        shape = tuple(shape)
        if self.channel_dim is None:
            layout = (1, math.prod(shape))
        else:
            d = self.channel_dim % len(shape)
            if shape[d] != self.channels:
                raise ValueError(f"dimension {d} of {shape} must be {self.channels} (channels of this histogram)")
            layout = (self.channels, math.prod(shape) // self.channels)
        flat = torch.multinomial(self.probs.double(), layout[1], replacement=True, generator=generator)
        u = torch.rand(layout, generator=generator, dtype=torch.float64)
        xi = self.lo.double()[:, None] + (flat.double() + u) * self.width.double()[:, None]
        if self.channel_dim is None:
            return xi.float().reshape(shape)
        d = self.channel_dim % len(shape)
        moved = (shape[d],) + shape[:d] + shape[d + 1 :]
        return xi.float().reshape(moved).movedim(0, d)

    # ------------------------------------------------------------------ persistence
    def tensors(self, prefix: str) -> dict[str, Tensor]:
        return {f"{prefix}.lo": self.lo.contiguous(), f"{prefix}.width": self.width.contiguous(),
                f"{prefix}.probs": self.probs.contiguous()}

    def meta(self) -> dict:
        return {"channel_dim": self.channel_dim, "std": self.std, "count": self.count, "shape": list(self.shape),
                "signal_rms": self.signal_rms}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], prefix: str, meta: dict) -> "Histogram":
        return cls(lo=tensors[f"{prefix}.lo"], width=tensors[f"{prefix}.width"], probs=tensors[f"{prefix}.probs"],
                   channel_dim=meta.get("channel_dim"), std=float(meta.get("std", 0.0)), count=int(meta.get("count", 0)),
                   shape=tuple(meta.get("shape", ())), signal_rms=float(meta.get("signal_rms", 0.0)))
