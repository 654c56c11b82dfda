"""The one place that calls the device numerics: input checks, noise streams of functional calls,
the weight cache, and the autograd function of one analog product.

Every product family computes its products through :func:`product` (``X3 @ W3^T`` of 3-D
operands, SPEC section 1) or, for its fast inference path, through the encoded weights of
:data:`WEIGHT_CACHE` and :mod:`abfp.numerics` directly. Gradients are straight-through
estimators (see :mod:`abfp.functional`).
"""

from __future__ import annotations

import functools
import json
import math
import threading
import weakref
from collections import OrderedDict
from typing import Any, Iterable

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..config import ABFPConfig
from ..noise_keys import FUNCTIONAL_STREAMS, product_generator
from ..numerics import Encoded, ProductStats, analog_product, dequant, encode_weights
from ..numerics.kernels import draw_key
from ..numerics.blocks import BF16_MAX, POW2_MAX, inside_clamp, pad_to_tiles, padded_block_scales, static_scales
from ..numerics.workspace import scratch

__all__ = ["check_finite", "check_output", "overflow_shift", "shifted", "shifted_input", "shift_for_overflow",
           "unshift_output", "generator_for", "reseed", "WEIGHT_CACHE", "WeightCache", "clear_cache", "product",
           "without_bf16_io", "bf16", "promoted_dtype", "dequantised", "AnalogProduct", "ste_grads", "tracing",
           "NotTraceable", "untraceable", "first_order_only", "training_product", "traced_key", "traced_product", "config_json", "config_from_json", "encoded_weights",
           "scale_arg"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_F32_MAX = float(torch.finfo(torch.float32).max)
_SATURATION = {"bfloat16": BF16_MAX, "pow2": POW2_MAX}  # the largest block scale of each scale format


# --------------------------------------------------------------------------- input checks
def check_finite(t: Tensor, name: str) -> None:
    """Raise ValueError naming the operand when ``t`` holds NaN or Inf."""
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16, float64), got {t.dtype}")
    # one reduction without temporaries; only a non-finite sum (NaN/Inf inside, or a
    # harmless overflow) pays for the exact element-wise check. Detached: a check records no
    # autograd graph (a saved tensor of it would differ between a checkpoint's forward and its
    # recomputation, where the weight cache skips the weight's check)
    t = t.detach()
    if t.numel() and not bool(torch.isfinite(t.sum(dtype=torch.float32))) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf; the analog device cannot encode it")
    if t.dtype == torch.float64 and t.numel():
        # the device computes in float32: a float64 value that float32 cannot hold would encode as
        # inf (NaN out of finite operands)
        big = float(t.abs().max())
        if not torch.isfinite(torch.tensor(big, dtype=torch.float32)):
            raise ValueError(f"{name} holds values beyond float32's range (max |v| = {big:.4g}); the analog "
                             "device computes in float32")


def check_output(y: Tensor, x: Tensor, w: Tensor | Encoded | None) -> Tensor:
    """``y``, the output of a device product on finite operands ``x`` and ``w``, or ValueError
    when it holds NaN: two tiles of one output overflowed float32 to ``+inf`` and ``-inf``
    (SPEC 1 steps 6-7 rescale and sum in float32; operands of about 1e19 x 1e19). A single
    ``+-inf`` is float32's own overflow and is returned (a mask of ``finfo.min`` through
    ``einsum`` comes out so, which a softmax takes as intended). One reduction (``y`` is ``K``
    times smaller than the product's work); the exact check only where the sum is not finite."""
    d = y.detach()
    if not d.numel() or bool(torch.isfinite(d.sum(dtype=torch.float32))) or not bool(torch.isnan(d).any()):
        return y
    ws = w.scales if isinstance(w, Encoded) else w  # an encoding's largest block scale is max |W| (bf16)
    wmax = f"{float(ws.detach().abs().max()):.3g}" if ws is not None and ws.numel() else "?"
    xmax = f"{float(x.detach().abs().max()):.3g}" if x.numel() else "?"
    raise ValueError(f"the device output holds NaN out of finite operands (|input| up to {xmax}, |weight| up to "
                     f"{wmax}): tiles of one output overflowed float32 to +inf and -inf (SPEC 1 steps 6-7 rescale "
                     "and sum in float32); scale the operands down")


def overflow_shift(x: Tensor, cfg: ABFPConfig, input_scale: Any = None) -> int:
    """``k >= 0`` such that the input ``x * 2**-k`` (block scales ``<= 2**e``, ``e`` below)
    cannot overflow the fast path's float32 rescale of a tile, ``(qy * sx) * sw'`` with
    ``|qy| <= L(b_y)`` and ``sw' = sw n / (G L(b_y))``: ``e = 126 - b_y - ceil(log2(max(1, n/G)))``
    (at least 64). The device result of ``x`` is ``2**k`` times that of ``x * 2**-k``, exactly
    (block scales, codes, noise and ADC are the same; powers of two scale float32 exactly), so
    :func:`product` and the convolutions compute it so: before, an input block max above
    ``float32 max / L(b_y)`` (2.7e36 at 8 bits) gave ``+-inf`` where SPEC's value is finite.
    0 for the reference kernel (float64), empty or float16 inputs."""
    if cfg.kernel == "reference" or not x.numel() or x.dtype == torch.float16:
        return 0
    lo, hi = torch.stack(torch.aminmax(x.detach())).tolist()  # one transfer, not two
    m = max(-lo, hi)
    if input_scale is not None and abs(float(input_scale)) <= _F32_MAX:  # one beyond it is refused later
        m = max(m, abs(float(input_scale)))
    if not 0 < m < math.inf:
        return 0
    limit = max(64, 126 - cfg.output_bits - max(0, math.ceil(math.log2(cfg.tile_width / cfg.gain))))
    return max(0, math.frexp(m)[1] - limit)


def shifted(v: Any, k: int) -> Any:
    """``v * 2**k`` (a tensor, a float, or ``None`` as it is)."""
    return v if v is None or k == 0 else v * (2.0 ** k)


def shifted_input(x: Tensor, k: int, cfg: ABFPConfig) -> Tensor:
    """The input ``x`` of a product computed as ``2**k`` times the product of ``x * 2**-k``
    (:func:`overflow_shift`), first saturated at the scale format's largest value
    (:data:`~abfp.numerics.blocks.BF16_MAX`, ``POW2_MAX``), where SPEC's block scale saturates
    and such elements encode at full scale: so the shifted block scales and codes are exactly
    SPEC's (unsaturated, ``bf16(m 2**-k)`` would round up past the saturated scale).
    Straight-through: the saturation passes gradients as the unshifted product does."""
    if k == 0:
        return x
    sat = _SATURATION.get(cfg.scale_dtype)
    if sat is not None:
        c = x.detach().clamp(-sat, sat)
        x = x + (c - x.detach()) if x.requires_grad else c  # c - x is exact (Sterbenz), so the value is c
    return x * (2.0 ** -k)


def shift_for_overflow(x: Tensor, cfg: ABFPConfig, input_scale: Any = None) -> tuple[int, Tensor, Any]:
    """``(k, x', s')``: the operands of the product whose ``2**k`` multiple is the device result
    of ``x`` (:func:`overflow_shift`; ``x'`` = :func:`shifted_input`, ``s'`` = ``input_scale * 2**-k``).
    Every device product computes through this and :func:`unshift_output` (0 but for inputs
    beyond about 1e35, where it is the same value without the float32 overflow)."""
    k = overflow_shift(x, cfg, input_scale)
    return k, shifted_input(x, k, cfg), shifted(input_scale, -k)


def unshift_output(y: Tensor, k: int, x: Tensor, w: Tensor | Encoded | None) -> Tensor:
    """``y * 2**k``, the result of the product :func:`shift_for_overflow` prepared, checked by
    :func:`check_output` against ``x`` and ``w`` (the unshifted operands)."""
    return check_output(shifted(y, k), x, w)


def generator_for(cfg: ABFPConfig, generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    return product_generator(cfg, FUNCTIONAL_STREAMS, device, generator)


def reseed(offset: int = 0) -> None:
    """Restart the noise streams of seeded functional calls at ``seed * 1_000_003 + offset``."""
    FUNCTIONAL_STREAMS.restart(offset)


# --------------------------------------------------------------------------- weight cache
class WeightCache:
    """Encoded weights keyed on (tensor identity, version, the config fields an encoding depends on,
    the kernel): encode once per value.

    A weight changed in place by ordinary ops (``load_state_dict``, ``w.mul_(2)`` under
    ``torch.no_grad()``, an optimizer step) bumps its version and is re-encoded. A step of any
    ``torch.optim`` optimizer also forgets its parameters' encodings (:func:`_forget_stepped`, a
    global step hook): fused optimizers (``fused=True``) and optimizers that write through
    ``p.data`` leave the version as it was. Other writes through ``.data`` (or a NumPy view) are
    invisible to the version counter: call :func:`clear_cache` after them. ``w.data = new``
    (``.half()``, ``.float()``, ``vector_to_parameters``) keeps the version too: an entry also
    holds a weak reference to the storage it encoded, so a new storage at the freed one's address
    (the allocator reuses it: keyed on ``data_ptr`` alone, such a weight was served the encoding of
    the values before) is a miss.
    """

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self._d: OrderedDict[tuple, tuple[weakref.ref, weakref.ref, Encoded]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _key(w: Tensor, cfg: ABFPConfig, weight_scale: Any) -> tuple | None:
        try:
            version = w._version
        except Exception:  # inference tensors have no version counter
            return None
        if isinstance(weight_scale, Tensor):
            weight_scale = float(weight_scale)
        return (
            id(w), version, w.data_ptr(), tuple(w.shape), w.dtype, str(w.device),
            cfg.mode, cfg.tile_width, cfg.weight_bits, cfg.output_bits, cfg.input_bits,
            cfg.gain, cfg.scale_dtype, cfg.bf16_io, weight_scale,
            cfg.kernel,  # "auto" keeps int8 codes beside the float ones (AdcPlan.int8), "chunked" none
        )

    @staticmethod
    def encode(w: Tensor, w3: Tensor, cfg: ABFPConfig, weight_scale: Any) -> Encoded:
        """``w3`` (a view of the weight ``w``) encoded without remembering it."""
        check_finite(w, "weight")
        return encode_weights(w3.detach().to(torch.bfloat16) if cfg.bf16_io else w3.detach(), cfg, weight_scale)

    def get(self, w: Tensor, w3: Tensor, cfg: ABFPConfig, weight_scale: Any) -> Encoded:
        key = self._key(w, cfg, weight_scale)
        if key is None:
            return self.encode(w, w3, cfg, weight_scale)
        w3 = w3.detach().to(torch.bfloat16) if cfg.bf16_io else w3.detach()
        try:
            storage = w.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a tensor without a storage of its own: not cached
            return self.encode(w, w3, cfg, weight_scale)
        with self._lock:
            hit = self._d.get(key)
            if hit is not None and hit[0]() is w and hit[1]() is storage:
                self._d.move_to_end(key)
                self.hits += 1
                return hit[2]
        check_finite(w, "weight")  # once per weight value
        enc = encode_weights(w3, cfg, weight_scale)
        with self._lock:
            self.misses += 1
            self._d[key] = (weakref.ref(w), weakref.ref(storage), enc)
            while len(self._d) > self.capacity:
                self._d.popitem(last=False)
            # drop stale versions of the same tensor
            for k in [k for k in self._d if k[0] == key[0] and k != key]:
                del self._d[k]
        return enc

    def clear(self) -> None:
        with self._lock:
            self._d.clear()

    def forget(self, tensors: Iterable[Tensor]) -> None:
        """Drop the encodings of ``tensors`` (in every layout: a key's first field is the tensor's
        ``id``, or ``(layout tag, id)``)."""
        ids = {id(t) for t in tensors}
        with self._lock:
            for k in [k for k in self._d if (k[0][1] if isinstance(k[0], tuple) else k[0]) in ids]:
                del self._d[k]


WEIGHT_CACHE = WeightCache()


def _forget_stepped(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """After any optimizer step, forget the encodings of the parameters it updated: a fused step
    (``fused=True``) or one through ``p.data`` writes without bumping the version the cache keys
    on (without this, the next forward computed with the weights of before the step)."""
    if WEIGHT_CACHE._d:
        WEIGHT_CACHE.forget(p for group in optimizer.param_groups for p in group["params"])


register_optimizer_step_post_hook(_forget_stepped)


def clear_cache() -> None:
    """Forget every cached weight encoding."""
    WEIGHT_CACHE.clear()


# --------------------------------------------------------------------------- autograd
def _dequantise_(q: Tensor, s: Tensor, max_code: int) -> Tensor:
    """``q = round(clamp(q / s, -1, 1) L) s / L`` in place over blocks ``q`` (..., n) with scales
    ``s`` (..., 1); zero where ``s`` is zero."""
    pos = s > 0
    everywhere = bool(pos.all())
    safe = s if everywhere else torch.where(pos, s, 1.0)
    q.div_(safe).clamp_(-1.0, 1.0).mul_(max_code).round_().mul_(safe / max_code)
    if not everywhere:
        q.masked_fill_(~pos, 0.0)
    return q


def dequantised(v3: Tensor, cfg: ABFPConfig, scale: Any, max_code: int) -> tuple[Tensor, Tensor | None]:
    """STE view of one operand: dequantised values ``q = round(clamp(v / s, -1, 1) L) s / L``
    (zero where the block scale ``s`` is zero) as (B, R, T, n'), and the DAC clamp mask
    (B, R, K), or ``None`` where no element can clip (ABFP mode). ``n' = n``, or ``K`` when one
    tile holds the whole reduction (the padding columns would be zeros that every consumer
    drops; the values are the same)."""
    n = cfg.tile_width
    v3 = v3.detach().to(torch.float32)
    k = v3.shape[-1]
    nt = k if 0 < k <= n else n
    vt = pad_to_tiles(v3, nt)
    t = vt.shape[-1] // nt
    s = padded_block_scales(vt, v3.shape[:-1], nt, cfg.scale_dtype) if cfg.mode == "abfp" else \
        static_scales(v3, n, scale, cfg.scale_dtype)
    q = _dequantise_(vt.reshape(*v3.shape[:-1], t, nt).clone(), s.unsqueeze(-1), max_code)
    return q, (None if cfg.mode == "abfp" else inside_clamp(v3, s, n))


def dequantised_rows(v3: Tensor, cfg: ABFPConfig, scale: Any, max_code: int,
                     buffer: str | None = None) -> tuple[Tensor, Tensor | None]:
    """:func:`dequantised` laid out as ``v3`` (B, R, K), without padding: the full tiles at once,
    then the last, shorter one on its own columns (the same values: padding zeros change no
    block maximum). ``buffer``: the compiled path (ABFP mode) writes into that scratch buffer
    (:func:`abfp.numerics.workspace.scratch`) instead of fresh memory."""
    n = cfg.tile_width
    v3 = v3.detach().to(torch.float32)
    lead, k = v3.shape[:-1], v3.shape[-1]
    if cfg.mode == "abfp" and k and dequant.usable(v3):  # compiled: the same values in two passes
        out = None if buffer is None else scratch(buffer, (v3.numel() // k, k), torch.float32, v3.device)
        return dequant.dequantise_rows(v3.reshape(-1, k), n, cfg.scale_dtype, max_code, out).view(v3.shape), None
    full = k // n
    spans = [(0, full * n)] * (full > 0) + [(full * n, k)] * (k > full * n)
    q = None if len(spans) == 1 else torch.empty(v3.shape, dtype=torch.float32, device=v3.device)
    for a, b in spans:
        w = min(n, b - a)
        part = torch.empty(*lead, (b - a) // w, w, dtype=torch.float32, device=v3.device)
        part.view(*lead, b - a).copy_(v3[..., a:b])
        if cfg.mode == "abfp":
            s = padded_block_scales(part.view(*lead, b - a), lead, w, cfg.scale_dtype)
        else:
            s = static_scales(part.view(*lead, b - a), w, scale, cfg.scale_dtype)
        _dequantise_(part, s.unsqueeze(-1), max_code)
        if q is None:
            q = part.view(*lead, k)
        else:
            q[..., a:b] = part.view(*lead, b - a)
    if q is None:  # an empty reduction
        q = v3.clone()
    return q, (None if cfg.mode == "abfp" else inside_clamp(v3, static_scales(v3, n, scale, cfg.scale_dtype), n))


def training_product(x3: Tensor, w3: Tensor, cfg: ABFPConfig, *, input_scale: Any = None, weight_scale: Any = None,
                     generator: torch.Generator | None = None, weights: Encoded | None = None,
                     stats: ProductStats | None = None, key: int | None = None) -> tuple[Tensor, Tensor | None]:
    """The forward of a product with gradients: ``Y`` and the ADC clamp mask of the
    straight-through backward, ``None`` when no ADC sample clipped (the usual case).

    Where the noise is a counter key (uniform or none, not the reference kernel) the product runs
    on the inference path, the compiled kernels, which count the clipped samples and mark them
    in the mask as they go (the torch path where they cannot run: the same ``Y`` and mask);
    the mask is dropped when none clipped. Otherwise it runs once with the mask."""
    counter = cfg.kernel != "reference" and (cfg.noise_std == 0 or cfg.noise_dist == "uniform")
    B, M, K = x3.shape
    if not counter or min(B, M, K, w3.shape[1]) == 0:
        return analog_product(x3, w3, cfg, input_scale=input_scale, weight_scale=weight_scale, generator=generator,
                              stats=stats, want_mask=True, weights=weights, key=key)
    if key is None:
        key = draw_key(cfg, generator)  # the one draw the product makes
    counted = ProductStats()
    y, mask = analog_product(x3, w3, cfg, input_scale=input_scale, weight_scale=weight_scale, stats=counted,
                             want_mask=True, weights=weights, key=key)
    if stats is not None:
        stats.saturated += counted.saturated
        stats.conversions += counted.conversions
    return y, (mask if counted.saturated else None)


_TWICE = ("abfp: a device product cannot be differentiated twice (create_graph=True: a gradient penalty, "
          "meta-learning): its straight-through gradient is defined to first order only; compute the second-order "
          "term on the float32 model (abfp.digital(model))")


def first_order_only(grads: tuple, *saved: Tensor | None) -> tuple:
    """A backward's ``grads`` as they are, or, when the backward runs to build a graph
    (``create_graph=True``) and a gradient would depend on a saved operand that needs grad,
    behind a node that raises :data:`_TWICE` if the graph is differentiated: the straight-through
    gradients are not differentiable, and silently treating them as constants gave wrong
    second-order gradients (a gradient penalty's parameter gradients 98 % off, or missing)."""
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in saved):
        return grads
    live = [i for i, g in enumerate(grads) if isinstance(g, Tensor)]
    err = torch._C._functions.DelayedError(_TWICE, len(live))
    wrapped = err(*[grads[i].detach().requires_grad_() for i in live])
    wrapped = wrapped if isinstance(wrapped, tuple) else (wrapped,)
    out = list(grads)
    for i, g in zip(live, wrapped):
        out[i] = g
    return tuple(out)


class AnalogProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x3, w3, cfg, input_scale, weight_scale, generator, weights, stats, key=None):  # type: ignore[override]
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            y, _ = analog_product(x3, w3, cfg, input_scale=input_scale, weight_scale=weight_scale,
                                  generator=generator, stats=stats, weights=weights, key=key)
            return y
        y, mask = training_product(x3, w3, cfg, input_scale=input_scale, weight_scale=weight_scale,
                                   generator=generator, weights=weights, stats=stats, key=key)
        ctx.clipped = mask is not None
        ctx.save_for_backward(x3, w3, *([mask] if mask is not None else []))
        ctx.cfg, ctx.input_scale, ctx.weight_scale = cfg, input_scale, weight_scale
        return y

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        x3, w3, *mask = ctx.saved_tensors
        with torch.no_grad():
            gx, gw = ste_grads(gy, x3, w3, mask[0] if mask else None, ctx.cfg, ctx.input_scale, ctx.weight_scale,
                               ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return first_order_only((gx, gw, None, None, None, None, None, None, None), gy, x3, w3)


def ste_grads(gy: Tensor, x3: Tensor, w3: Tensor, mask: Tensor | None, cfg: ABFPConfig, input_scale: Any, weight_scale: Any,
              need_x: bool, need_w: bool, in_scratch: bool = False,
              x_dequantised: bool = False) -> tuple[Tensor | None, Tensor | None]:
    """Straight-through gradients of ``Y = X3 @ W3^T`` on the device, in float32: the tile products
    of the dequantised codes, ``dX = sum_t (dY * m_t) Wq_t`` and ``dW = sum_t (dY * m_t)^T Xq_t``
    with ``m_t`` the ADC clamp mask of tile ``t`` (one GEMM each way when no sample clipped),
    times the DAC clamp masks. ``mask``: (B, T, M, N) bool, True where not clipped (``None``:
    no sample clipped). ``in_scratch``: with no sample clipped, the dequantised ``X3`` and ``dX``
    live in scratch buffers (:func:`abfp.numerics.workspace.scratch`: no fresh memory to fault
    in), so ``dX`` is valid until the next such call on this thread. ``x_dequantised``: ``X3``
    already holds the dequantised values (ABFP mode, no sample clipped: the caller built them)."""
    gy = gy.to(torch.float32)
    B, M, K = x3.shape
    Bw, N = w3.shape[0], w3.shape[1]
    gx = gw = None
    if mask is None or bool(mask.all()):
        # no ADC sample clipped: the tiles recombine into one GEMM each way
        if x_dequantised:
            assert cfg.mode == "abfp" and mask is None
            xf, mx = x3, None
        else:
            xf, mx = dequantised_rows(x3, cfg, input_scale, cfg.input_max_code, "ste_xq" if in_scratch else None)  # (B, M, K)
        wf, mw = dequantised_rows(w3, cfg, weight_scale, cfg.weight_max_code)  # (Bw, N, K)
        if need_x:
            out = scratch("ste_gx", (B, M, K), torch.float32, gy.device) if in_scratch else None
            gx = torch.matmul(gy, wf, out=out)
        if need_w:
            gw = torch.matmul(gy.transpose(1, 2), xf)
    else:
        xq, mx = dequantised(x3, cfg, input_scale, cfg.input_max_code)  # (B, M, T, n)
        wq, mw = dequantised(w3, cfg, weight_scale, cfg.weight_max_code)  # (Bw, N, T, n)
        T, n = xq.shape[2], xq.shape[3]
        gm = gy.unsqueeze(1) * mask  # (B, T, M, N)
        if need_x:
            gx = torch.matmul(gm, wq.permute(0, 2, 1, 3))  # (B, T, M, n)
            gx = gx.permute(0, 2, 1, 3).reshape(B, M, T * n)[..., :K]
        if need_w:
            gw = torch.matmul(gm.transpose(-1, -2), xq.permute(0, 2, 1, 3))  # (B, T, N, n)
            gw = gw.permute(0, 2, 1, 3).reshape(B, N, T * n)[..., :K]
    if gx is not None and mx is not None:
        gx = gx * mx
    if gw is not None:
        if Bw == 1 and B > 1:
            gw = gw.sum(0, keepdim=True)
        if mw is not None:
            gw = gw * mw
        gw = gw.to(w3.dtype)
    if gx is not None:
        gx = gx.to(x3.dtype)
    return gx, gw


def product(
    x3: Tensor,
    w3: Tensor,
    cfg: ABFPConfig,
    *,
    input_scale: Any = None,
    weight_scale: Any = None,
    generator: torch.Generator | None = None,
    weights: Encoded | None = None,
    stats: ProductStats | None = None,
    key: int | None = None,
    weight_config: ABFPConfig | None = None,
) -> Tensor:
    """``X3 @ W3^T`` on the device (see :func:`abfp.numerics.analog_product`), with the
    straight-through backward when an operand requires a gradient. Under a tracer
    (:func:`tracing`) the product is the custom operator ``abfp::device`` (:func:`traced_product`).
    ``key``: the uniform-noise key (default: drawn from the generator). ``weight_config``: under
    a tracer, the config ``w3`` is encoded under (the one ``weights`` were encoded under in eager)."""
    generator = generator_for(cfg, generator, x3.device)
    if tracing():
        if weights is not None or stats is not None:
            raise NotTraceable("a product on pre-encoded weights or with ADC statistics cannot be traced")
        return traced_product(x3, w3, cfg, input_scale=input_scale, weight_scale=weight_scale, generator=generator,
                              weight_config=weight_config)
    k, xs, s_in = shift_for_overflow(x3, cfg, input_scale)  # k = 0 but for inputs beyond about 1e35
    if torch.is_grad_enabled() and (x3.requires_grad or w3.requires_grad):
        y = AnalogProduct.apply(xs, w3, cfg, s_in, weight_scale, generator, weights, stats, key)
    else:
        y, _ = analog_product(xs, w3, cfg, input_scale=s_in, weight_scale=weight_scale, generator=generator,
                              stats=stats, weights=weights, key=key)
    return unshift_output(y, k, x3, w3)


# --------------------------------------------------------------------------- tracing
class NotTraceable(RuntimeError):
    """A product a tracer (``torch.compile``, ``torch.export``, ``torch.jit.trace``) cannot record
    as the custom operators of :mod:`abfp.ops.custom`; the message says why."""


def tracing() -> bool:
    """Whether a tracer runs this code: dynamo (``torch.compile``, strict ``torch.export``), a
    fake-tensor tracer (non-strict ``torch.export``, ``make_fx``) or ``torch.jit.trace``."""
    # cheap checks only (a few tenths of a microsecond each): this runs on every eager product
    return (torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None
            or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None)


@torch.compiler.assume_constant_result
def config_json(cfg: ABFPConfig) -> str:
    """The canonical JSON of ``cfg`` with its execution options (sorted keys, separators ``,``
    and ``:``: the text of ``json.dumps(cfg.to_dict(execution=True), sort_keys=True,
    separators=(",", ":"))``): how a config travels into a custom operator; a constant to
    dynamo (``assume_constant_result``), so that tracers fold it."""
    return json.dumps(cfg.to_dict(execution=True), sort_keys=True, separators=(",", ":"))


@functools.lru_cache(maxsize=256)
def config_from_json(text: str) -> ABFPConfig:
    """:func:`config_json`'s inverse (cached: one parse per distinct config)."""
    return ABFPConfig.from_json(text)


def untraceable(cfg: ABFPConfig, generator: torch.Generator | None = None) -> str | None:
    """Why a product with ``cfg`` cannot be traced, or ``None``: its noise cannot be drawn in a
    graph when it is Gaussian or the reference kernel's (both drawn sample by sample from a
    ``torch.Generator`` inside the product) or comes from a seeded stream (``config.seed`` or an
    explicit ``generator``: a ``torch.Generator`` object)."""
    if cfg.noise_std == 0:
        return None
    if cfg.noise_dist != "uniform":
        return ("Gaussian device noise is drawn from a torch.Generator inside the product; "
                "use noise_dist='uniform' (counter noise) or noise_std=0")
    if cfg.kernel == "reference":
        return "the reference kernel draws its device noise from a torch.Generator; use kernel='auto' or noise_std=0"
    if cfg.seed is not None or generator is not None:
        return ("a seeded noise stream (config.seed or generator=) is a torch.Generator a tracer cannot record; "
                "trace with seed=None (keys from torch's global generator: torch.manual_seed) or noise_std=0")
    return None


def traced_key(cfg: ABFPConfig, generator: torch.Generator | None) -> Tensor | None:
    """The uniform-noise key of one traced product, drawn in the graph from torch's global
    generator exactly as an eager product without a seed draws it (``torch.randint(0, 2**63 - 1,
    (1,))``), as an int64 tensor; ``None`` without noise. Raises :class:`NotTraceable` where
    :func:`untraceable` says why."""
    why = untraceable(cfg, generator)
    if why is not None:
        raise NotTraceable(why)
    if cfg.noise_std == 0:
        return None
    return torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64, device=torch.device("cpu"))


def encoded_weights(w: Tensor, w3: Tensor, cfg: ABFPConfig, weight_config: str, weight_scale: Any) -> Encoded:
    """The encoding of ``w3`` (a view of the weight ``w``) inside a custom operator: under
    ``weight_config`` (a :func:`config_json`) cached per weight value when ``w`` is a tensor of
    its own (a parameter), encoded once when it is a view made in the graph (a fresh object
    every call, which the cache would only fill); with ``weight_config == ""`` encoded per call
    under ``cfg``. The weight's finiteness is checked on every encoding."""
    if not weight_config:
        return WEIGHT_CACHE.encode(w, w3, cfg, weight_scale)
    wcfg = config_from_json(weight_config)
    if w._base is None:
        return WEIGHT_CACHE.get(w, w3, wcfg, weight_scale)
    return WEIGHT_CACHE.encode(w, w3, wcfg, weight_scale)


def scale_arg(scale: Any) -> float | None:
    """A static scale as a custom operator takes it: ``None`` or a Python float."""
    if scale is None or isinstance(scale, (int, float)):
        return None if scale is None else float(scale)
    raise NotTraceable("a tensor-valued static scale cannot be traced; pass a Python float")


def traced_product(x3: Tensor, w: Tensor, cfg: ABFPConfig, *, input_scale: Any = None, weight_scale: Any = None,
                   generator: torch.Generator | None = None, weight_config: ABFPConfig | None = None) -> Tensor:
    """``X3 @ W^T`` as the custom operator ``abfp::device`` (:mod:`abfp.ops.custom`), which the
    tracers record as one node: the input check, the encodings, the code GEMMs and the ADC run
    inside it; its registered backward is ``abfp::device_backward`` (:func:`ste_grads`).
    ``w``: (Bw, N, K), or a 2-D static weight (N, K) whose encoding is cached per weight value
    under ``weight_config`` (as :data:`WEIGHT_CACHE` does in eager)."""
    key = traced_key(cfg, generator)
    want_mask = torch.is_grad_enabled() and (x3.requires_grad or w.requires_grad)
    y, _ = torch.ops.abfp.device(x3, w, config_json(cfg), "" if weight_config is None else config_json(weight_config),
                                 scale_arg(input_scale), scale_arg(weight_scale), key, want_mask)
    return y


def without_bf16_io(cfg: ABFPConfig) -> ABFPConfig:
    """``cfg`` without the bfloat16 rounding of its output: a layer with a bias rounds after
    adding it (SPEC 1 step 7: the bias add is digital, the layer output is bfloat16). The twin
    the config made when it was constructed (:attr:`ABFPConfig.without_bf16_io`), never one made
    under a tracer."""
    return cfg.without_bf16_io


def bf16(t: Tensor) -> Tensor:
    """``t``'s values rounded to bfloat16 (round to nearest even), kept in float32 (differentiable)."""
    return t.to(torch.bfloat16).to(torch.float32)


def promoted_dtype(*ts: Tensor) -> torch.dtype:
    return torch.promote_types(ts[0].dtype, ts[1].dtype) if len(ts) > 1 else ts[0].dtype


# the names these had in abfp.functional (kept for code that imports them from there)
_generator_for, _WeightCache, _product = generator_for, WeightCache, product
_without_bf16_io, _bf16, _out_dtype, _dequantised, _AnalogProduct = without_bf16_io, bf16, promoted_dtype, dequantised, AnalogProduct
