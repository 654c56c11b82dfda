"""Hypothesis strategies shared by the numerics tests: random device configurations."""

from __future__ import annotations

from hypothesis import strategies as st

from abfp import ABFPConfig


def device_configs(max_dac_bits: int = 10, gains: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 4.0, 8.0, 16.0, 64.0)):
    """Noise-free configurations across modes, tile widths, converter bits, gains and scale formats."""
    return st.builds(
        ABFPConfig,
        mode=st.sampled_from(["abfp", "abfp", "fixed"]),
        tile_width=st.sampled_from([1, 3, 8, 16, 32, 100, 128]),
        input_bits=st.integers(2, max_dac_bits),
        weight_bits=st.integers(2, max_dac_bits),
        output_bits=st.integers(2, 12),
        gain=st.sampled_from(gains),
        noise_std=st.just(0.0),
        scale_dtype=st.sampled_from(["bfloat16", "float32", "pow2"]),
        bf16_tile_outputs=st.booleans(),
    )
