"""Counter-based device noise: the documented formula, the configured moments, independence
of neighbouring samples, and the same values from torch and from the compiled kernels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from abfp import ABFPConfig
from abfp.numerics import counter_noise as cn
from abfp.numerics import fused
from abfp.numerics.adc import add_noise_


def python_ints(key: int, indices: list[int]) -> list[int]:
    """The module docstring's formula with Python integers (arbitrary precision, masked)."""
    m64 = (1 << 64) - 1
    out = []
    for i in indices:
        z = (key + ((i >> 2) + 1) * cn.GOLDEN) & m64
        z = ((z ^ (z >> 30)) * cn.MIX1) & m64
        z = ((z ^ (z >> 27)) * cn.MIX2) & m64
        z ^= z >> 31
        v = (z >> (16 * (i & 3))) & 0xFFFF
        out.append((v - 65536 if v >= 32768 else v) | 1)
    return out


@settings(max_examples=40, deadline=None)
@given(key=st.integers(0, 2**63 - 2), start=st.integers(0, 2**50), n=st.integers(1, 64))
def test_torch_ints_follow_the_formula(key, start, n):
    idx = torch.arange(start, start + n, dtype=torch.int64)
    assert cn.noise_ints(key, idx).tolist() == python_ints(key, idx.tolist())


@pytest.mark.skipif(not fused.AVAILABLE, reason="numba is not installed")
@settings(max_examples=25, deadline=None)
@given(key=st.integers(0, 2**63 - 2), start=st.integers(0, 2**40))
def test_compiled_noise_equals_torch_noise(key, start):
    """The compiled epilogue adds exactly the integers of :func:`noise_ints` (a product of
    zeros with one noise LSB per integer and an ADC range beyond them: the output is ``k``)."""
    n = 300
    d = np.zeros((1, 1, 1, n), np.int32)
    y = np.zeros((1, 1, n), np.float32)
    fused.epilogue_rows(d, np.float32(1), np.float32(1), np.float32(1), np.float32(1e6), np.uint64(key), True, False,
                        np.ones((1, 1, 1), np.float32), np.ones((1, 1, n), np.float32), y, 0, 1, start, np.ones(0, np.uint8))
    k = cn.noise_ints(key, torch.arange(start * n, start * n + n))
    assert torch.equal(torch.from_numpy(y[0, 0]), k.float())


def test_uniform_noise_has_the_configured_moments():
    cfg = ABFPConfig(noise_std=0.7)
    r = torch.zeros(1 << 20)
    add_noise_(r, cfg, None, key=12345, index=torch.arange(r.numel()))
    w = math.sqrt(12) * 0.7
    assert float(r.abs().max()) < w / 2
    assert abs(float(r.mean())) < 5 * 0.7 / math.sqrt(r.numel())
    assert abs(float(r.std()) / 0.7 - 1) < 0.01
    # uniform: each tenth of the range holds a tenth of the samples
    hist = torch.histc(r, bins=10, min=-w / 2, max=w / 2) / r.numel()
    assert float((hist - 0.1).abs().max()) < 0.005
    # neighbours (the four lanes of one word, and the next word) are uncorrelated
    for lag in (1, 2, 3, 4, 5):
        c = float(torch.corrcoef(torch.stack([r[:-lag], r[lag:]]))[0, 1])
        assert abs(c) < 5 / math.sqrt(r.numel())


def test_every_bit_of_the_lanes_is_fair():
    k = cn.noise_ints(7, torch.arange(1 << 18)) & 0xFFFF
    ones = torch.stack([((k >> i) & 1).sum() for i in range(1, 16)]).double() / k.numel()
    assert float((ones - 0.5).abs().max()) < 5 / math.sqrt(k.numel())


def test_keys_give_different_streams_and_generators_reproduce_keys():
    idx = torch.arange(10_000)
    assert not torch.equal(cn.noise_ints(1, idx), cn.noise_ints(2, idx))
    assert cn.noise_key(torch.Generator().manual_seed(5)) == cn.noise_key(torch.Generator().manual_seed(5))
    assert cn.noise_key(torch.Generator().manual_seed(5)) != cn.noise_key(torch.Generator().manual_seed(6))


def test_uniform_noise_needs_its_index():
    with pytest.raises(ValueError, match="key"):
        add_noise_(torch.zeros(4), ABFPConfig(noise_std=1.0), None)
