"""``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention`` and ``nn.Transformer*``
call) with its projections and attention products routed to the device.

Needed because that function dispatches as a whole, hiding its inner products from a
``TorchFunctionMode``. Covers the usual arguments; ``bias_k``/``bias_v``, ``add_zero_attn``
and ``static_k``/``static_v`` are rejected with a clear error.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


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
    if bias_k is not None or bias_v is not None or add_zero_attn or static_k is not None or static_v is not None:
        raise NotImplementedError("abfp: multi-head attention with bias_k/bias_v, add_zero_attn or static_k/v is not supported")
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

    def heads(t: Tensor, length: int) -> Tensor:  # (L, B, E) -> (B, H, L, D)
        return t.reshape(length, bsz, num_heads, head_dim).permute(1, 2, 0, 3)

    q, k, v = heads(q, tgt_len), heads(k, src_len), heads(v, src_len)

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
        attn = torch.softmax(scores.float(), dim=-1).to(q.dtype)
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
