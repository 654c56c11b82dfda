"""``y + xi`` with ``xi`` drawn i.i.d. element-wise from a :class:`Histogram`, in one pass.

A DNF training step adds one noise sample to every output element of every analog layer,
so drawing the noise must cost little next to the layer itself. The sampler needs no
random-number state: each call gets one 63-bit ``key``, and the draw of
the element with flat index ``i`` (in the contiguous (outer, C, inner) view, row ``c`` of the
tables for its channel ``c``) is a pure function of ``key`` and ``i``: two 32-bit words
``u, r`` (:mod:`.hash32`: a 32-bit hash of ``i``, keyed per call; it vectorises 8 wide on
AVX2), then

    slot s = u >> (32 - b) (uniform on 0..2^b-1),   f = u mod 2^(32-b)
    e = packed[c, s] = T_s 2^b + a_s,   bin k = s if f < T_s else a_s      (Walker's alias method,
                                                                         :meth:`Histogram.alias_table`)
    xi = lo[c] + width[c] * (float32(k) + float32(r >> 8) * 2^-24)   (float32; uniform inside bin k)

``2^b`` is the least power of two >= the number of bins ``B`` (:func:`.histogram.slot_bits`);
bin probabilities are multiples of 2^-32 (exact to a few 2^-32), the position inside a
bin has 24 bits.
Gradients pass through unchanged: ``d(y + xi)/dy = 1``.

Keys (version 4): :func:`add_noise` alone draws its key from torch's global generator
(:func:`abfp.numerics.counter_noise.noise_key`). Inside a model (:class:`.dnf.DNFNoise`) one
forward draws one ``base`` key from torch's global generator, at its first noisy product,
and its ``c``-th noisy product (``c = 0, 1, ...``, in call order) gets

    key_c = splitmix64(base + (c + 1) * 0x9E3779B97F4A7C15) >> 1            (:func:`stream_key`)

the ``c``-th output of a SplitMix64 generator seeded with ``base`` (63 bits, as the drawn
keys): distinct, independent-looking keys, a pure function of torch's generator state at
the forward (``torch.manual_seed`` and ``torch.get_rng_state`` make runs repeatable and
checkpoints resumable), at the cost of one generator draw per forward instead of one per
product (a ``torch.randint`` right after a layer's GEMM cost about 90 us on a cold cache).

Two implementations give the same bits (tested): the compiled kernel
(:mod:`.alias_kernel`, numba, CPU float32) adds the noise *in place* in one pass over the
output, with no other tensor per element; :func:`noisy_eager` is the readable torch version
(any device and dtype, a handful of int64 temporaries per element). ``backend="auto"``
takes the kernel wherever it applies. Inside a model, :class:`SiteSampler` (one per site)
calls the kernel with the least Python per product (the stream key derived in the kernel,
torch functions disabled); where the kernel may not write, it is :func:`add_noise`.

:data:`SAMPLER_VERSION` names the formula. Version 4 (this one, 2026-12-02) draws each
element as version 3 did from its key; version 3 drew every product's key from torch's global
generator. Version 3 draws other values than version 2 (one splitmix64 per element, ``B`` slots: 64-bit multiplies, which
CPUs without AVX-512 do not vectorise; 4-5x slower there) and version 1 (a 32-bit
multiply-xorshift hash with three seeds per call, ``torch.compile``), from the same
distributions. A finetuning checkpoint records it, so a run is never resumed with other
draws than it started with.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from ..numerics.counter_noise import derived_key, noise_key
from . import alias_kernel
from .hash32 import words
from .histogram import Histogram

__all__ = ["SAMPLER_VERSION", "SiteSampler", "add_noise", "backend_in_use", "noisy_eager", "noisy_layout", "owns_memory", "stream_key",
           "warm_up", "Backend"]

Backend = Literal["auto", "compiled", "eager"]

#: Version of the draw formula above (checkpoints key on it).
SAMPLER_VERSION = 4

_M32 = 0xFFFFFFFF


def stream_key(base: int, c: int) -> int:
    """``key_c`` of the module doc: the ``c``-th output of SplitMix64 seeded with ``base``, 63 bits."""
    return derived_key(base, c)


def noisy_eager(y3: Tensor, key: int, packed: Tensor, lo: Tensor, width: Tensor) -> Tensor:
    """``y3 + xi`` for ``y3`` laid out as (outer, C, inner), in torch (the formula of the module doc)."""
    o, c, n = y3.shape
    b = packed.shape[1].bit_length() - 1
    ch = torch.arange(c, device=y3.device, dtype=torch.int64).view(1, c, 1)
    i = torch.arange(o * c * n, device=y3.device, dtype=torch.int64).view(o, c, n)
    u, r = words(key, i)
    slot = u >> (32 - b)
    e = packed.reshape(-1)[(ch << b) + slot]
    k = torch.where((u & ((1 << (32 - b)) - 1)) < (e >> b), slot, e & ((1 << b) - 1))
    pos = k.to(torch.float32) + (r >> 8).to(torch.float32) * (2.0**-24)
    return y3 + (lo.view(1, c, 1) + width.view(1, c, 1) * pos)


def _compiled_applies(y: Tensor) -> bool:
    return y.is_cpu and y.dtype == torch.float32 and alias_kernel.usable()


def _layout_for(hist: Histogram, shape: torch.Size) -> tuple[int, int, int]:
    """:func:`noisy_layout` of ``shape``, checked against ``hist``'s channels; kept with ``hist``
    per shape (a training step asks for the same few shapes at every site and step, and Python
    work right after a layer's GEMM runs on a cold cache: tens of us per site)."""

    def make() -> tuple[int, int, int]:
        layout = noisy_layout(shape, hist.channel_dim)
        if layout[1] != hist.channels:
            raise ValueError(f"output of shape {tuple(shape)} has {layout[1]} channels along dim "
                             f"{hist.channel_dim}, the histogram {hist.channels}")
        return layout

    return hist.memo(("layout", shape), make)


def backend_in_use(backend: Backend) -> str:
    """``"compiled"`` or ``"eager"``: what ``backend`` runs as in this process on CPU float32 outputs."""
    return "compiled" if backend != "eager" and alias_kernel.usable() else "eager"


def noisy_layout(shape: tuple[int, ...] | torch.Size, channel_dim: int | None) -> tuple[int, int, int]:
    """(outer, C, inner) view of a contiguous tensor of ``shape`` with ``channel_dim`` in the middle."""
    shape = tuple(shape)
    if channel_dim is None:
        return (1, 1, math.prod(shape))
    d = channel_dim % len(shape)
    return (math.prod(shape[:d]), shape[d], math.prod(shape[d + 1 :]))


def owns_memory(y: Tensor) -> bool:
    """Whether the noise may be written into ``y``'s memory: ``y`` is contiguous and covers its
    whole storage (a product's fresh output, or a view of all of it, as ``F.linear`` returns for
    3-D inputs), and neither it nor its base is a leaf that requires a gradient (a parameter)."""
    if not y.is_contiguous() or y.storage_offset() != 0 or \
            y.untyped_storage().nbytes() != y.numel() * y.element_size():
        return False
    base = y if y._base is None else y._base
    return not (y.requires_grad and y.is_leaf) and not (base.requires_grad and base.is_leaf)


class _AddNoise(torch.autograd.Function):
    """``y + xi`` out of place (a new tensor), gradient the identity."""

    @staticmethod
    def forward(ctx, y: Tensor, hist: Histogram, compiled: bool, key: int,  # type: ignore[override]
                layout: tuple[int, int, int]) -> Tensor:
        if not compiled:
            packed, lo, width = hist.alias_table(y.device)
            return noisy_eager(y.detach().contiguous().view(layout), key, packed, lo, width).view(y.shape)
        out = y.detach().contiguous()
        if out.data_ptr() == y.data_ptr():
            out = out.clone()
        alias_kernel.add_alias_noise_(out, layout, key, *hist.kernel_tables())
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad, None, None, None, None


def add_noise(y: Tensor, hist: Histogram, *, backend: Backend = "auto", key: int | None = None) -> Tensor:
    """``y + xi``, ``xi`` i.i.d. from ``hist`` (row ``c`` for index ``c`` of ``hist.channel_dim``).

    ``key``: the call's 63-bit key (module doc); ``None`` draws one from torch's global
    generator. The gradient with respect to ``y`` is the identity. The compiled backend adds
    the noise to ``y``'s own memory where :func:`owns_memory` allows (a layer's fresh output)
    and returns ``y``: the addition is outside autograd, which needs no node for it (the noise
    has no gradient, ``y``'s gradient passes to ``y``'s producer unchanged); ``y``'s version is
    bumped, so that a producer that kept its output for its backward makes autograd's version
    check raise there. Otherwise the result is a new tensor.
    ``backend="compiled"`` raises where the kernel cannot run (numba absent, not a float32 CPU
    tensor).
    """
    if backend not in ("auto", "compiled", "eager"):
        raise ValueError(f"backend must be 'auto', 'compiled' or 'eager', got {backend!r}")
    layout = _layout_for(hist, y.shape)
    compiled = backend != "eager" and _compiled_applies(y)
    if backend == "compiled" and not compiled:
        raise ValueError(f"the compiled DNF sampler needs numba and a float32 CPU tensor (got {y.dtype} on "
                         f"{y.device.type}, numba {'usable' if alias_kernel.usable() else 'not usable'}); "
                         "use backend 'auto' or 'eager'")
    if key is None:
        key = noise_key(None)
    if compiled and owns_memory(y):
        tables = hist.memo("kernel_args", lambda: alias_kernel.kernel_args(*hist.kernel_tables()))
        alias_kernel.launch(y.detach().numpy().reshape(-1), max(1, layout[2]), key, *tables)
        increment_version(y)  # written through numpy: tell autograd's version check
        return y
    return _AddNoise.apply(y, hist, compiled, key, layout)


class SiteSampler:
    """:func:`add_noise` of one histogram with the keys of a :class:`~.dnf.KeyStream`, with the least
    Python per call (a training step calls it right after each noisy product, where Python runs
    on a cold cache: each tensor attribute or call read there cost several us inside a
    fashion-vit step). Where the compiled kernel applies (:func:`owns_memory`, float32 CPU, one
    thread or one chunk) it writes the noise at ``y.data_ptr()`` with the stream key computed in
    the kernel (:func:`.alias_kernel.stream_noise_at`), the output's layout and the kernel's
    tables kept from the call before; elsewhere it is :func:`add_noise`. The same bits either
    way (tested)."""

    __slots__ = ("hist", "backend", "shape", "size", "n", "tables")

    def __init__(self, hist: Histogram, backend: Backend = "auto") -> None:
        if backend not in ("auto", "compiled", "eager"):
            raise ValueError(f"backend must be 'auto', 'compiled' or 'eager', got {backend!r}")
        self.hist = hist
        self.backend: Backend = backend
        self.shape: torch.Size | None = None  # the shape of the last output, its numel and inner length
        self.size = self.n = 0
        self.tables = hist.memo("kernel_args", lambda: alias_kernel.kernel_args(*hist.kernel_tables())) \
            if backend != "eager" and alias_kernel.usable() else None

    def __call__(self, y: Tensor, keys) -> Tensor:
        """``y + xi`` (in place where allowed, as :func:`add_noise`) with the key ``keys.take()``
        (``keys``: a :class:`~.dnf.KeyStream`). Runs with torch functions disabled: an output
        handed over inside a converted module that holds :class:`abfp.nn.mode.AnalogMode` (a
        linear layer inside fashion-vit's attention) would otherwise send every tensor
        attribute read here through the mode's Python (about 12 per call)."""
        with torch._C.DisableTorchFunction():
            return self._add(y, keys)

    def _add(self, y: Tensor, keys) -> Tensor:
        shape = y.shape
        if shape != self.shape:
            self.shape = None
            self.n = max(1, _layout_for(self.hist, shape)[2])  # checks the channels
            self.size = y.numel()
            self.shape = shape
        tables = self.tables  # (serial kernel: no thread pool, so no check of the process per call)
        if tables is not None and y.dtype is torch.float32 and y.is_cpu \
                and (self.size <= alias_kernel.CHUNK or torch.get_num_threads() == 1) and owns_memory(y):
            base, c = keys.take()
            alias_kernel.stream_noise_at(y.data_ptr(), self.size, self.n, base, c, *tables)
            torch._C._increment_version((y,))  # written behind autograd's back: its version check
            return y
        base, c = keys.take()
        return add_noise(y, self.hist, backend=self.backend, key=stream_key(base, c))


def warm_up(hist: Histogram, shape: tuple[int, ...], *, backend: Backend = "auto") -> None:
    """Compile the sampler now (outside any timed step; numba caches it on disk); draws no
    random numbers from the global generator."""
    if backend == "eager" or not alias_kernel.usable():
        return
    y = torch.zeros(noisy_layout(shape, hist.channel_dim))
    alias_kernel.add_alias_noise_(y, tuple(y.shape), 0, *hist.kernel_tables())
    SiteSampler(hist, backend)(torch.zeros(shape), _FixedKey())  # the kernel that SiteSampler calls


class _FixedKey:
    """A key stream that always gives ``(0, 0)`` (for :func:`warm_up`: no global random numbers)."""

    def take(self) -> tuple[int, int]:
        return 0, 0
