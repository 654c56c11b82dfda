"""Noise bits: the same on any number of threads, uniform, and turned into the right noise."""

from __future__ import annotations

import math

import pytest
import torch

import abfp.numerics.rng as rng
from abfp import ABFPConfig
from abfp.numerics.adc import add_noise_


@pytest.mark.parametrize("words", [1, 1000, rng.SPLIT_WORDS, 3 * rng.SPLIT_WORDS + 1])
def test_bits_do_not_depend_on_the_thread_count(words):
    before = torch.get_num_threads()
    try:
        draws = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            draws.append(rng.random_bits(words, torch.Generator().manual_seed(7)))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(draws[0], draws[1])


def test_both_streams_are_uniform_and_distinct():
    bits = rng.random_bits(4 * rng.SPLIT_WORDS, torch.Generator().manual_seed(3))
    half = bits.numel() // 2
    assert not torch.equal(bits[:half], bits[half:])
    for part in (bits[:half], bits[half:]):
        # every one of the 64 bit positions is set about half the time
        ones = torch.stack([((part >> i) & 1).sum() for i in range(64)]).double() / part.numel()
        assert float((ones - 0.5).abs().max()) < 5 / math.sqrt(part.numel())


def test_uniform_noise_has_the_configured_moments():
    cfg = ABFPConfig(noise_std=0.7)
    r = torch.zeros(1 << 20)
    add_noise_(r, cfg, torch.Generator().manual_seed(1))
    w = math.sqrt(12) * 0.7
    assert float(r.abs().max()) < w / 2
    assert abs(float(r.mean())) < 5 * 0.7 / math.sqrt(r.numel())
    assert abs(float(r.std()) / 0.7 - 1) < 0.01
    # uniform: each tenth of the range holds a tenth of the samples
    hist = torch.histc(r, bins=10, min=-w / 2, max=w / 2) / r.numel()
    assert float((hist - 0.1).abs().max()) < 0.005


def test_noise_is_reproducible_from_the_generator():
    cfg = ABFPConfig(noise_std=1.0)
    a, b, c = (torch.zeros(3, 500_000) for _ in range(3))
    add_noise_(a, cfg, torch.Generator().manual_seed(5))
    add_noise_(b, cfg, torch.Generator().manual_seed(5))
    add_noise_(c, cfg, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
