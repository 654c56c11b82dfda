"""Block scales and DAC codes (SPEC.md section 1, steps 1-3), the fast path's encoder.

``sx[m,t] = fmt(max |X[m, tile t]|)`` with ``fmt`` the configured scale format, and
``q = round(clamp(X_t / s, -1, 1) * L(b))``; a block whose scale is 0 encodes as zeros.
All work is in float32 (codes are small integers, exact in float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


#: The smallest positive normal float32 (and bfloat16): below it bfloat16 keeps fewer than
#: 8 significant bits, so rounding a block maximum to bfloat16 may move it by up to 100 %.
MIN_NORMAL = 2.0**-126
#: The largest finite bfloat16, ``(2 - 2^-7) 2^127``, and the largest pow2 scale, ``2^127``: a
#: scale format saturates there (a block max beyond it, up to float32's ``(2 - 2^-23) 2^127``,
#: would round to ``inf``, encode as zeros and rescale to NaN); the DAC clamp saturates the codes.
BF16_MAX = float(torch.finfo(torch.bfloat16).max)
POW2_MAX = 2.0**127


def round_scale(s: Tensor, scale_dtype: str) -> Tensor:
    """Round non-negative scales to the device's scale format (float32 result).

    ``"pow2"``: ``2**ceil(log2 s)`` computed exactly from the binary exponent
    (``s = m 2**e`` with ``m`` in [1/2, 1): ``ceil(log2 s) = e - 1`` if ``m = 1/2``, else
    ``e``), not through a float32 ``log2``, which rounds ``log2(2**k (1 + 2**-23))`` to ``k``.
    Both saturate at their largest finite value (:data:`BF16_MAX`, :data:`POW2_MAX`): a block
    max beyond it is encoded at full scale, its codes clamped (:func:`has_subnormal`).
    """
    s = s.to(torch.float32)
    if scale_dtype == "bfloat16":
        return s.to(torch.bfloat16).to(torch.float32).clamp_(max=BF16_MAX)
    if scale_dtype == "pow2":
        m, e = torch.frexp(s)
        e = (e - (m == 0.5).to(e.dtype)).clamp_(max=127)
        return torch.where(s > 0, torch.ldexp(torch.ones_like(s), e), torch.zeros_like(s))
    return s


def num_tiles(k: int, n: int) -> int:
    return math.ceil(k / n)


def pad_to_tiles(v: Tensor, n: int, dtype: torch.dtype | None = None, out: Tensor | None = None) -> Tensor:
    """Zero-pad the last dimension to a multiple of ``n`` (one copy; only the tail is filled).

    Without ``out`` an unpadded ``v`` of the right dtype is returned as it is; with ``out``
    (contiguous, the padded shape) the result is always written there.
    """
    k = v.shape[-1]
    kp = num_tiles(k, n) * n
    dtype = dtype or v.dtype
    if kp == k and out is None:
        return v if v.dtype == dtype else v.to(dtype)
    if out is None:
        out = v.new_empty(*v.shape[:-1], kp, dtype=dtype)
    out[..., :k] = v
    out[..., k:] = 0
    return out


def _max_abs_blocks(vt: Tensor) -> Tensor:
    """max |v| over the last axis without an |v| temporary (two reductions: on CPU several
    times faster than ``aminmax`` or ``abs().amax()``)."""
    return torch.maximum(vt.amax(-1), vt.amin(-1).neg_())


def padded_block_scales(vt: Tensor, lead: tuple[int, ...], n: int, scale_dtype: str) -> Tensor:
    """The one block-scale function: ``s[..., t] = fmt(max |vt[..., t*n:(t+1)*n]|)`` (float32,
    shape ``(*lead, T)``) of ``vt`` already zero-padded to ``T*n`` along its last axis, with
    ``fmt`` the scale format (:func:`round_scale`); zeros for an empty tensor."""
    t = vt.shape[-1] // n
    if vt.numel() == 0:
        return torch.zeros(*lead, t, dtype=torch.float32, device=vt.device)
    return round_scale(_max_abs_blocks(vt.reshape(*lead, t, n)), scale_dtype)


def block_scales(v: Tensor, n: int, scale_dtype: str) -> Tensor:
    """Per-block scales of ``v`` (..., K) -> (..., T): max |v| over each tile of width n."""
    return padded_block_scales(pad_to_tiles(v, n), v.shape[:-1], n, scale_dtype)


def static_scale_value(v: Tensor, scale: float | Tensor | None, scale_dtype: str) -> Tensor:
    """The fixed-point scale of ``v`` as a 0-d tensor in the scale format: ``scale`` if given,
    else max |v| of the whole tensor."""
    if scale is None:
        scale = v.abs().max() if v.numel() else torch.zeros(())
    s = torch.as_tensor(scale, dtype=torch.float32, device=v.device).reshape(())
    if not torch.isfinite(s) or s < 0:
        given = float(torch.as_tensor(scale, dtype=torch.float64).reshape(()))  # not its float32 inf
        raise ValueError(f"a fixed-point scale must be finite in float32 and >= 0, got {given}")
    return round_scale(s, scale_dtype)


def static_scales(v: Tensor, n: int, scale: float | Tensor | None, scale_dtype: str) -> Tensor:
    """Fixed-point scales: one value for the whole tensor, broadcast to (..., T)."""
    return static_scale_value(v, scale, scale_dtype).expand(*v.shape[:-1], num_tiles(v.shape[-1], n))


def needs_clamp(own_max: bool, max_code: int) -> bool:
    """Whether the DAC clamp can change a code (see :func:`codes_`) for *normal* scales: not
    when the scales are the blocks' own maxima and the DAC has at most 8 bits. A subnormal
    scale (:func:`has_subnormal`) always needs it: callers check the scales as well."""
    return not (own_max and max_code <= 127)


def has_subnormal(s: Tensor) -> bool:
    """Whether any positive scale is below :data:`MIN_NORMAL` (bfloat16 rounding of such a
    block maximum can put ``|v / s|`` far above 1: ``1.4 * 2**-133`` rounds to ``2**-133``) or
    at least :data:`POW2_MAX` (where a scale format saturates, ``|v / s|`` may reach 2): the
    codes of such blocks need the clamp."""
    return bool(((s > 0) & (s < MIN_NORMAL) | (s >= POW2_MAX)).any())


def codes_(v: Tensor, s: Tensor, max_code: int, *, own_max: bool = False) -> Tensor:
    """In place: ``v <- round(clamp(v / s, -1, 1) * max_code)``, ``s`` broadcast against ``v``.

    A zero scale divides by +inf, which encodes the (all-zero) block as zeros. ``own_max``:
    each ``s`` is its block's own max |v| in a format that rounds to nearest (bfloat16,
    relative error at most 2^-9 for a normal ``s``), up (pow2) or not at all (float32), so
    ``|v / s| <= 1 + 2^-9``; with ``max_code <= 127`` the product then stays below
    ``max_code + 1/2`` and rounds to at most ``max_code``: the clamp would change nothing and
    is skipped (one pass fewer), unless a scale is subnormal (:func:`has_subnormal`).
    """
    clamp = needs_clamp(own_max, max_code) or has_subnormal(s)
    v.div_(torch.where(s > 0, s, torch.full_like(s, float("inf"))))
    if clamp:
        v.clamp_(-1.0, 1.0)
    return v.mul_(max_code).round_()


def encode(v: Tensor, scales: Tensor, n: int, max_code: int, *, padded: Tensor | None = None,
           inplace: bool = False, own_max: bool = False) -> Tensor:
    """DAC codes of ``v`` (..., K) given per-block ``scales`` (..., T): returns (..., T, n) float32.

    ``inplace``: ``padded`` is a private copy and may be overwritten with the codes.
    ``own_max``: the scales are the blocks' own maxima (see :func:`codes_`).
    """
    vt = padded if padded is not None else pad_to_tiles(v, n, torch.float32)
    t = scales.shape[-1]
    vt = vt.reshape(*v.shape[:-1], t, n)
    return codes_(vt if inplace else vt.clone(), scales.unsqueeze(-1), max_code, own_max=own_max)


def encode_rows(
    v: Tensor, *, n: int, max_code: int, mode: str, scale_dtype: str, static_scale: Tensor | None = None,
    buffer: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Codes (..., T, n) and scales (..., T) of ``v`` (..., K); ``static_scale`` (fixed mode) is
    a 0-d tensor already in the scale format. ``buffer``: contiguous float32 of the padded
    shape (..., T*n) that receives the codes (else a private copy is made when needed)."""
    k = v.shape[-1]
    vt = pad_to_tiles(v, n, torch.float32, out=buffer)
    private = vt.data_ptr() != v.data_ptr()
    t = vt.shape[-1] // n
    if mode == "abfp":
        s = padded_block_scales(vt, v.shape[:-1], n, scale_dtype)
    else:
        assert static_scale is not None
        s = static_scale.expand(*v.shape[:-1], t)
    return encode(v, s, n, max_code, padded=vt, inplace=private and k > 0, own_max=mode == "abfp"), s


def inside_clamp(v: Tensor, scales: Tensor, n: int) -> Tensor:
    """Straight-through mask of the DAC clamp: ``|v| <= s`` of v's block (shape of v)."""
    t = scales.shape[-1]
    vt = pad_to_tiles(v, n).reshape(*v.shape[:-1], t, n)
    m = vt.abs() <= scales.unsqueeze(-1).to(vt.dtype)
    return m.reshape(*v.shape[:-1], t * n)[..., : v.shape[-1]]


@dataclass
class Encoded:
    """One operand, encoded: codes laid out for a batched GEMM and its block scales.

    ``codes``: (B, T, R, n) with R the rows (M for inputs, N for weights); ``scales``:
    (B, T, R). ``transposed`` weights are stored as (B, T, n, R) for ``matmul``.
    """

    codes: Tensor
    scales: Tensor
    codes_i8: Tensor | None = None
    """The same codes as int8 *without* the code multiplier (CPU, at most 8 bits), for the
    int8 GEMM; ``None`` where that path is not used."""
    vnni_rows: tuple[Tensor, Tensor] | None = None
    """``codes_i8`` of tiles of width 8 and the scales packed for
    :func:`abfp.numerics.vnni8.narrow_rows8_vnni` (:func:`abfp.numerics.vnni8.pack_rows`), made on
    first use."""


def encode_operand(
    v: Tensor,
    *,
    n: int,
    bits_max_code: int,
    mode: str,
    scale_dtype: str,
    static_scale: float | Tensor | None = None,
    as_rhs: bool = False,
    code_multiplier: float = 1.0,
) -> Encoded:
    """Encode ``v`` (B, R, K) into an :class:`Encoded` ready for ``kernels``.

    ``as_rhs`` lays codes out as (B, T, n, R) (the right operand of a GEMM). ``code_multiplier``
    (:attr:`abfp.numerics.adc.AdcPlan.code_multiplier`: ``G/n``, a power of two, or ``G L(b_y)/n``,
    a power of two times an integer) is folded into the codes; the products stay exact integers
    times a power of two, and it saves a pass later.
    """
    vt = pad_to_tiles(v, n, torch.float32)
    if mode == "abfp":
        s = padded_block_scales(vt, v.shape[:-1], n, scale_dtype)
    else:
        s = static_scales(v, n, static_scale, scale_dtype)
    q = encode(v, s, n, bits_max_code, padded=vt, own_max=mode == "abfp")  # (B, R, T, n)
    if code_multiplier != 1.0:
        q.mul_(code_multiplier)
    if as_rhs:
        codes = q.permute(0, 2, 3, 1).contiguous()  # (B, T, n, R)
    else:
        codes = q.permute(0, 2, 1, 3).contiguous()  # (B, T, R, n)
    return Encoded(codes=codes, scales=s.permute(0, 2, 1).contiguous())
