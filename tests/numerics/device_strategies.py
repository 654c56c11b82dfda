"""Hypothesis strategies shared by the numerics tests: random device configurations."""

from __future__ import annotations

from hypothesis import strategies as st

from abfp import ABFPConfig


def device_configs(max_dac_bits: int = 10, gains: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 4.0, 8.0, 16.0, 64.0),
                   *, noise: tuple[float, ...] = (0.0,), bf16_io: bool = False,
                   kernels: tuple[str, ...] = ("auto",), tile_widths: tuple[int, ...] = (1, 3, 8, 16, 32, 100, 128)):
    """Configurations across modes, tile widths, converter bits, gains and scale formats.

    By default noise-free, float32 in and out, ``kernel="auto"``; ``noise`` (uniform noise
    std values to draw from), ``bf16_io`` (draw it too) and ``kernels`` widen the draw.
    """
    return st.builds(
        ABFPConfig,
        mode=st.sampled_from(["abfp", "abfp", "fixed"]),
        tile_width=st.sampled_from(tile_widths),
        input_bits=st.integers(2, max_dac_bits),
        weight_bits=st.integers(2, max_dac_bits),
        output_bits=st.integers(2, 12),
        gain=st.sampled_from(gains),
        noise_std=st.sampled_from(noise),
        scale_dtype=st.sampled_from(["bfloat16", "float32", "pow2"]),
        bf16_tile_outputs=st.booleans(),
        bf16_io=st.booleans() if bf16_io else st.just(False),
        kernel=st.sampled_from(kernels),
    )
