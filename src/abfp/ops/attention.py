"""The attention family: ``F.scaled_dot_product_attention``, ``F.multi_head_attention_forward``
(what ``nn.MultiheadAttention`` and ``nn.Transformer*`` call) and ``flex_attention`` (torch's
higher-order operator) with their products on the device.

Both dispatch as a whole, hiding their inner products from a ``TorchFunctionMode``; here they
are rewritten with their projections as ``linear`` products and ``QK^T``, ``AV`` as ``matmul``
products (:mod:`abfp.ops.linear`); scaling, masking, softmax and dropout are digital (float32).
MHA covers every argument torch's has, ``bias_k``/``bias_v``, ``add_zero_attn`` and
``static_k``/``static_v`` included (appended key/value rows, as torch appends them).
A query row whose keys are all masked attends to nothing in ``scaled_dot_product_attention``
(its output row is 0, torch's ``_safe_softmax``); in MHA with ``need_weights=True`` torch's
softmax gives NaN there, which the device refuses by name (a clear error, not a silent NaN).
``torch.nn.attention.flex_attention.flex_attention`` wraps its operator in ``torch.compile`` even
in eager mode, where dynamo would trace the function mode; while a converted model runs,
:class:`abfp.nn.mode.AnalogMode` has it call the operator eagerly (:func:`flex_eager`), and
:func:`flex` answers it: ``score_mod``, the block mask's ``mask_mod``, GQA and the log-sum-exp
as torch's eager path computes them.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .coverage import register_macs
from .linear import answer_linear, answer_matmul
from .registry import register
from .site import Frame, digital_call

__all__ = ["sdpa", "multi_head_attention", "flex", "answer_sdpa", "answer_mha", "answer_flex", "FLEX_HOP"]


#: torch's softmax for attention (``F.scaled_dot_product_attention``'s math path): a row of
#: only ``-inf`` scores gives zeros rather than NaN; plain softmax where torch lacks it.
_softmax = getattr(torch, "_safe_softmax", torch.softmax)


def sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
         is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
         matmul: Callable[[Tensor, Tensor], Tensor] = torch.matmul) -> Tensor:
    """Scaled dot-product attention with its two products done by ``matmul``; the scaling,
    masking, softmax and dropout are digital (float32)."""
    L, S = query.shape[-2], key.shape[-2]
    sc = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(rep, dim=-3)
        value = value.repeat_interleave(rep, dim=-3)
    scores = matmul(query, key.transpose(-2, -1)) * sc
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    attn = _softmax(scores.float(), dim=-1).to(query.dtype)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p, training=True)
    return matmul(attn, value)


def multi_head_attention(
    query: Tensor, key: Tensor, value: Tensor, embed_dim_to_check: int, num_heads: int,
    in_proj_weight: Tensor | None, in_proj_bias: Tensor | None, bias_k: Tensor | None, bias_v: Tensor | None,
    add_zero_attn: bool, dropout_p: float, out_proj_weight: Tensor, out_proj_bias: Tensor | None,
    training: bool = True, key_padding_mask: Tensor | None = None, need_weights: bool = True,
    attn_mask: Tensor | None = None, use_separate_proj_weight: bool = False,
    q_proj_weight: Tensor | None = None, k_proj_weight: Tensor | None = None, v_proj_weight: Tensor | None = None,
    static_k: Tensor | None = None, static_v: Tensor | None = None, average_attn_weights: bool = True,
    is_causal: bool = False, *,
    linear: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    attention: Callable[..., Tensor],
    matmul: Callable[[Tensor, Tensor], Tensor],
) -> tuple[Tensor, Tensor | None]:
    if (bias_k is None) != (bias_v is None):
        raise ValueError("multi-head attention: bias_k and bias_v must be given together")
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    src_len = key.shape[0]
    if embed_dim != embed_dim_to_check:
        raise ValueError(f"expected embed_dim {embed_dim_to_check}, got {embed_dim}")
    head_dim = embed_dim // num_heads
    if use_separate_proj_weight:
        wq, wk, wv = q_proj_weight, k_proj_weight, v_proj_weight
    else:
        assert in_proj_weight is not None
        wq, wk, wv = in_proj_weight.chunk(3)
    bq = bk = bv = None
    if in_proj_bias is not None:
        bq, bk, bv = in_proj_bias.chunk(3)
    q = linear(query, wq, bq)
    k = linear(key, wk, bk)
    v = linear(value, wv, bv)
    if bias_k is not None and bias_v is not None:  # one more key/value row, as torch appends it
        k, v = torch.cat([k, bias_k.repeat(1, bsz, 1)]), torch.cat([v, bias_v.repeat(1, bsz, 1)])
        attn_mask, key_padding_mask = _pad_last(attn_mask), _pad_last(key_padding_mask)

    def heads(t: Tensor) -> Tensor:  # (L, B, E) -> (B, H, L, D)
        return t.reshape(t.shape[0], bsz, num_heads, head_dim).permute(1, 2, 0, 3)

    def static(t: Tensor) -> Tensor:  # (B*H, S, D) -> (B, H, S, D)
        return t.reshape(bsz, num_heads, t.shape[1], head_dim)

    q = heads(q)
    k = heads(k) if static_k is None else static(static_k)
    v = heads(v) if static_v is None else static(static_v)
    if add_zero_attn:  # a zero key/value row
        k, v = F.pad(k, (0, 0, 0, 1)), F.pad(v, (0, 0, 0, 1))
        attn_mask, key_padding_mask = _pad_last(attn_mask), _pad_last(key_padding_mask)
    src_len = k.shape[-2]

    mask: Tensor | None = None
    if attn_mask is not None:
        am = attn_mask
        if am.dim() == 3:  # (B*H, L, S)
            am = am.reshape(bsz, num_heads, tgt_len, src_len)
        mask = torch.zeros_like(am, dtype=q.dtype).masked_fill(am, float("-inf")) if am.dtype == torch.bool else am.to(q.dtype)
    elif is_causal:
        mask = torch.zeros(tgt_len, src_len, dtype=q.dtype, device=q.device).masked_fill(
            ~torch.ones(tgt_len, src_len, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if key_padding_mask is not None:
        kp = key_padding_mask.reshape(bsz, 1, 1, src_len)
        kpm = torch.zeros_like(kp, dtype=q.dtype).masked_fill(kp, float("-inf")) if kp.dtype == torch.bool else kp.to(q.dtype)
        mask = kpm if mask is None else mask + kpm
    p = dropout_p if training else 0.0

    if need_weights:
        scores = matmul(q, k.transpose(-2, -1)) / (head_dim**0.5)
        if mask is not None:
            scores = scores + mask
        attn = torch.softmax(scores.float(), dim=-1).to(q.dtype)  # torch's: NaN where every key is masked
        weights = attn
        if p > 0:
            attn = F.dropout(attn, p=p)
        out = matmul(attn, v)
    else:
        out = attention(q, k, v, mask, p, False)
        weights = None
    out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, embed_dim)
    out = linear(out, out_proj_weight, out_proj_bias)
    if weights is not None and average_attn_weights:
        weights = weights.mean(dim=1)
    if unbatched:
        out = out.squeeze(1)
        if weights is not None:
            weights = weights.squeeze(0)
    return out, weights


def _pad_last(mask: Tensor | None) -> Tensor | None:
    """A mask with one more key column that masks nothing (False, or 0.0), as torch pads it."""
    return None if mask is None else F.pad(mask, (0, 1))


# ----------------------------------------------------------------------------- handlers
def answer_sdpa(frame: Frame, func: Callable, args: tuple, kwargs: dict) -> Any:
    """``F.scaled_dot_product_attention``: two ``matmul`` products; float32 with ``include_matmul=False``."""
    if not frame.state.include_matmul:
        return digital_call(frame, func, args, kwargs, "include_matmul=False")
    return sdpa(*args, **kwargs, matmul=lambda a, b: answer_matmul(frame, torch.matmul, (a, b), {}))


def answer_mha(frame: Frame, func: Callable, args: tuple, kwargs: dict) -> Any:
    """``F.multi_head_attention_forward``: four ``linear`` products and the attention products."""
    return multi_head_attention(
        *args, **kwargs,
        linear=lambda x, w, b: answer_linear(frame, F.linear, (x, w, b), {}),
        attention=lambda q, k, v, mask, p, causal: answer_sdpa(frame, F.scaled_dot_product_attention,
                                                               (q, k, v, mask, p, causal), {}),
        matmul=lambda a, b: answer_matmul(frame, torch.matmul, (a, b), {}),
    )


_MHA_PARAMS = inspect.signature(multi_head_attention)


def mha_macs(args: tuple, kwargs: dict, out: Any) -> int:
    """MACs of one ``F.multi_head_attention_forward`` as :func:`multi_head_attention` computes it:
    the three input projections (all three run, also beside ``static_k``/``static_v``), ``QK^T``
    and ``AV`` over the keys after ``bias_k`` and the zero row are appended, the output projection."""
    a = _MHA_PARAMS.bind_partial(*args, **kwargs).arguments
    q, k, v = a["query"], a["key"], a["value"]
    if a.get("use_separate_proj_weight", False):
        wq, wk, wv = a["q_proj_weight"].numel(), a["k_proj_weight"].numel(), a["v_proj_weight"].numel()
    else:
        wq = wk = wv = a["in_proj_weight"].numel() // 3
    rows = math.prod(q.shape[:-1])
    batch = 1 if q.dim() == 2 else q.shape[1]
    static_k = a.get("static_k")
    keys = (k.shape[0] if static_k is None else static_k.shape[1]) + (a.get("bias_k") is not None) \
        + bool(a.get("add_zero_attn", False))
    attention = 2 * batch * q.shape[0] * keys * q.shape[-1]  # QK^T and AV: heads x head_dim = embed_dim
    return (rows * wq + math.prod(k.shape[:-1]) * wk + math.prod(v.shape[:-1]) * wv + attention
            + rows * a["out_proj_weight"].numel())


# ----------------------------------------------------------------------------- flex_attention
try:  # torch's flex_attention higher-order operator (torch >= 2.5): what the function mode sees of a
    # ``torch.nn.attention.flex_attention.flex_attention`` call
    import torch.nn.attention.flex_attention as _flex_module
    from torch._higher_order_ops.flex_attention import flex_attention as FLEX_HOP
except ImportError:  # pragma: no cover - an older torch
    _flex_module = None
    FLEX_HOP = None


def flex(query: Tensor, key: Tensor, value: Tensor, score_mod: Callable, block_mask: tuple, scale: float,
         kernel_options: dict | None = None, score_mod_other_buffers: tuple = (), mask_mod_other_buffers: tuple = (),
         *, matmul: Callable[[Tensor, Tensor], Tensor] = torch.matmul) -> tuple[Tensor, Tensor, Tensor]:
    """torch's flex_attention operator (its arguments: ``block_mask`` is ``BlockMask.as_tuple()``,
    whose last entry is the ``mask_mod``) with its two products done by ``matmul``:
    ``scores = matmul(q, k^T) * scale`` (scaled after the product, as :func:`sdpa`), then, digitally
    (float32), ``score_mod(score, b, h, q_idx, kv_idx)``, the ``mask_mod`` (masked -> ``-inf``) and
    the softmax (a fully masked row attends to nothing: 0), then ``matmul(P, v)``. GQA: the key and
    value heads repeat for their query groups. Returns ``(out, lse, max_scores)`` as the operator
    does: the log-sum-exp and the row maxima of the modified scores in base 2 (``flex_attention``
    multiplies them by ln 2); ``-inf`` for a fully masked row. As torch's eager (math) path, only
    the ``mask_mod`` masks: the block structure of the mask is a kernel's shortcut."""
    from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex

    if query.size(1) % key.size(1):
        raise ValueError(f"flex_attention: {query.size(1)} query heads are not a multiple of {key.size(1)} key heads")
    group = query.size(1) // key.size(1)
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    bq, bkv = query.size(0), key.size(0)
    if not (bq == bkv or bkv == 1):
        raise ValueError(f"flex_attention: batch sizes {bq} (query) and {bkv} (key/value) do not broadcast")
    key, value = key.expand(bq, *key.shape[1:]), value.expand(bq, *value.shape[1:])
    scores = matmul(query, key.transpose(-2, -1)) * scale
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    scores = scores.to(work)
    b, h, m, n = (torch.arange(s, device=scores.device) for s in scores.shape)
    vmapped = _flex_module._vmap_for_bhqkv  # torch's: each index is one vmapped dimension, as its kernels see it
    smod = vmapped(score_mod, prefix=(0,), suffix=(None,) * len(score_mod_other_buffers))
    mmod = vmapped(block_mask[-1], prefix=(), suffix=(None,) * len(mask_mod_other_buffers))
    with TransformGetItemToIndex():  # ``buffer[h]`` in a mod indexes with a tensor, as under vmap it must
        scores = torch.where(mmod(b, h, m, n, *mask_mod_other_buffers),
                             smod(scores, b, h, m, n, *score_mod_other_buffers),
                             torch.tensor(float("-inf"), dtype=work, device=scores.device))
    empty = torch.all(scores == float("-inf"), dim=-1)
    lse = torch.where(empty, float("-inf"), scores.logsumexp(dim=-1))
    top = scores.max(dim=-1).values
    attn = _softmax(scores, dim=-1).to(query.dtype)
    out = matmul(attn, value.to(query.dtype))
    return out, lse / math.log(2), top / math.log(2)


def answer_flex(frame: Frame, func: Callable, args: tuple, kwargs: dict) -> Any:
    """torch's flex_attention operator: two ``matmul`` products; float32 with ``include_matmul=False``."""
    if not frame.state.include_matmul:
        return digital_call(frame, func, args, kwargs, "include_matmul=False")
    return flex(*args, **kwargs, matmul=lambda a, b: answer_matmul(frame, torch.matmul, (a, b), {}))


def flex_macs(args: tuple, kwargs: dict, out: Any) -> int:
    """MACs of one flex_attention call as :func:`flex` computes it: ``QK^T`` and ``PV`` over every
    query head (the key/value heads repeated for GQA), every query and every key."""
    q, k, v = args[0], args[1], args[2]
    return q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * (q.shape[3] + v.shape[3])


def flex_eager() -> Any:
    """Make ``flex_attention`` call its operator eagerly (not under dynamo) while a converted model
    runs, so the function mode answers it with real tensors; returns what to restore (:func:`flex_restore`).
    torch otherwise wraps the operator in ``torch.compile`` even in eager mode, and dynamo would trace
    the mode itself. The eager operator is torch's math path, the numbers torch's eager compile gives."""
    if _flex_module is None or torch.compiler.is_dynamo_compiling():
        return None
    before = _flex_module._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG
    _flex_module._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = True
    return before


def flex_restore(before: Any) -> None:
    if before is not None and _flex_module is not None:
        _flex_module._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = before


if FLEX_HOP is not None:
    register(FLEX_HOP)(answer_flex)
    register_macs(FLEX_HOP)(flex_macs)
register(F.scaled_dot_product_attention)(answer_sdpa)
register(F.multi_head_attention_forward)(answer_mha)
register_macs(F.multi_head_attention_forward)(mha_macs)
