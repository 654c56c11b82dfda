"""``torch.nn.attention.flex_attention`` inside a converted model: its two products (``QK^T``,
``PV``) on the device, the score_mod, the block mask's mask_mod and the softmax digital; counted
as SDPA's are. Checked against a float64 evaluation of SPEC section 1 of the two products, against
float32 flex_attention on a high-precision device, and for its MACs (was: float32, uncounted)."""

from __future__ import annotations

import math
import pytest
import torch
from torch import nn

import abfp
from abfp import ABFPConfig
from abfp.numerics import reference_product

fa = pytest.importorskip("torch.nn.attention.flex_attention")
flex_attention, create_block_mask = fa.flex_attention, fa.create_block_mask

# coarse device: clearly different from float32; noise off so the oracle is exact
CFG = ABFPConfig(tile_width=8, input_bits=6, weight_bits=6, output_bits=8, gain=1.0, noise_std=0.0)
IDEAL = ABFPConfig.preset("ideal")
B, HQ, HKV, L, S, D = 2, 4, 2, 6, 5, 8


pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


class Flex(nn.Module):
    def forward(self, q, k, v, **kw):
        return flex_attention(q, k, v, **kw)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, HQ, L, D, generator=g), torch.randn(B, HKV, S, D, generator=g),
            torch.randn(B, HKV, S, D, generator=g), torch.randn(HQ, generator=g))


def _mods(bias):
    def score_mod(s, b, h, q_idx, kv_idx):
        return s + bias[h] - 0.25 * (q_idx - kv_idx).abs()

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (h == 0)

    return score_mod, mask_mod


def oracle(q, k, v, bias, cfg=CFG):
    """float64 SPEC products per (batch, head), the score_mod and mask written out here: the scores
    ``P(q, k^T) / sqrt(D)``, modified and masked, softmax, then ``P(attn, v)`` on the float32 weights."""
    out = torch.empty(B, HQ, L, D, dtype=torch.float64)
    i, j = torch.arange(L)[:, None], torch.arange(S)[None, :]
    for b in range(B):
        for h in range(HQ):
            kh, vh = k[b, h // (HQ // HKV)], v[b, h // (HQ // HKV)]
            s = reference_product(q[b, h].double(), kh.double(), cfg).y[0].float() * (1 / math.sqrt(D))
            s = s + bias[h] - 0.25 * (i - j).abs()
            s = s.masked_fill(~((j <= i) | (h == 0)), float("-inf"))
            attn = torch.softmax(s, -1)
            out[b, h] = reference_product(attn.double(), vh.double().T.contiguous(), cfg).y[0]
    return out


def test_flex_attention_products_on_the_device_match_the_spec_oracle():
    q, k, v, bias = inputs()
    sm, mm = _mods(bias)
    bm = create_block_mask(mm, B, HQ, L, S, device="cpu")
    with torch.no_grad():
        out = abfp.convert(Flex(), CFG)(q, k, v, score_mod=sm, block_mask=bm, enable_gqa=True)
        ref32 = Flex()(q, k, v, score_mod=sm, block_mask=bm, enable_gqa=True)
    want = oracle(q, k, v, bias)
    err = (out.double() - want).abs()
    # chained products: a score one float32 ulp from a DAC tie may flip one code (SPEC's allowance)
    assert float(err.max()) < 0.05 * float(want.abs().max())
    off = err > 1e-5 * float(want.abs().max())  # float32 rounding (seen: 1e-7)
    assert float(off.double().mean()) < 0.05, float(off.double().mean())
    dev = float((out - ref32).norm() / ref32.norm())
    assert dev > 1e-3  # the device is no float32: the products did not run in float32
    assert float((want.float() - out).norm() / (want.float() - ref32).norm()) < 0.1


def test_flex_attention_on_an_ideal_device_is_float32_flex_attention_and_counted():
    q, k, v, bias = inputs(1)
    sm, mm = _mods(bias)
    bm = create_block_mask(mm, None, None, L, S, device="cpu")
    before = fa._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG
    cm = abfp.convert(Flex(), IDEAL)
    with torch.no_grad():
        out, aux = cm(q, k, v, score_mod=sm, block_mask=bm, enable_gqa=True,
                      return_aux=fa.AuxRequest(lse=True))
        ref, raux = Flex()(q, k, v, score_mod=sm, block_mask=bm, enable_gqa=True,
                           return_aux=fa.AuxRequest(lse=True))
        cov = abfp.coverage(cm)
        assert (cov.analog_macs, cov.digital_macs) == (B * HQ * L * S * (D + D), 0)
        s = abfp.summary(cm, (q, k, v), kwargs={"score_mod": sm, "block_mask": bm, "enable_gqa": True})
    assert fa._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG == before  # restored when the model returned
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(aux.lse, raux.lse, rtol=1e-3, atol=1e-3)
    assert sorted(r.kind for r in s.rows) == ["matmul", "matmul"] and s.total_macs == B * HQ * L * S * (D + D)


@pytest.mark.parametrize("how", ["excluded", "include_matmul=False"])
def test_flex_attention_off_the_device_is_float32_and_counted_digital(how):
    q, k, v, bias = inputs(2)
    sm, _ = _mods(bias)
    kw = {"exclude": [".*"]} if how == "excluded" else {"include_matmul": False}
    cm = abfp.convert(Flex(), CFG, **kw)
    with torch.no_grad():
        out = cm(q, k, v, score_mod=sm, enable_gqa=True)
        ref = Flex()(q, k, v, score_mod=sm, enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    cov = abfp.coverage(cm)
    assert (cov.analog_macs, cov.digital_macs) == (0, B * HQ * L * S * (D + D)), cov.digital_ops


def test_a_fully_masked_row_attends_to_nothing_as_in_torch():
    q, k, v, _ = inputs(3)
    bm = create_block_mask(lambda b, h, qi, ki: qi > 0, None, None, L, S, device="cpu")  # row 0: no key
    with torch.no_grad():
        out, aux = abfp.convert(Flex(), IDEAL)(q, k, v, block_mask=bm, enable_gqa=True, return_aux=fa.AuxRequest(lse=True))
        ref, raux = Flex()(q, k, v, block_mask=bm, enable_gqa=True, return_aux=fa.AuxRequest(lse=True))
    lse, rlse = aux.lse, raux.lse
    assert bool((out[:, :, 0] == 0).all()) and bool(torch.isneginf(lse[:, :, 0]).all())
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(lse, rlse, rtol=1e-3, atol=1e-3)
