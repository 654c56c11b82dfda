"""Hypothesis strategies shared by the numerics tests: random device configurations."""

from __future__ import annotations

import torch
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


def conv_geometries(groups=(1, 1, 2, 3), cin_per_group=st.integers(1, 7), cout_per_group=st.integers(1, 5),
                    size=(3, 12), kernel=((1, 4), (1, 3))):
    """2-D convolution geometries (batch, groups, channels per group, image size, kernel, stride,
    padding, dilation, memory layout) for :func:`conv_case`."""
    return st.fixed_dictionaries({
        "batch": st.integers(1, 3),
        "groups": st.sampled_from(list(groups)),
        "cin_per_group": cin_per_group,
        "cout_per_group": cout_per_group,
        "h": st.integers(*size),
        "w": st.integers(*size),
        "kh": st.integers(*kernel[0]),
        "kw": st.integers(*kernel[1]),
        "stride": st.tuples(st.integers(1, 3), st.integers(1, 2)),
        "padding": st.tuples(st.integers(0, 2), st.integers(0, 2)),
        "dilation": st.tuples(st.integers(1, 2), st.integers(1, 2)),
        "channels_last": st.booleans(),
    })


def conv_case(geo: dict, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict, bool]:
    """``(x, weight, conv2d keyword arguments, valid)`` of a geometry drawn by :func:`conv_geometries`
    (``valid``: the kernel fits the padded input)."""
    G = geo["groups"]
    x = torch.randn(geo["batch"], G * geo["cin_per_group"], geo["h"], geo["w"], generator=g) * 2
    if geo["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    wt = torch.randn(G * geo["cout_per_group"], geo["cin_per_group"], geo["kh"], geo["kw"], generator=g)
    kw = dict(stride=geo["stride"], padding=geo["padding"], dilation=geo["dilation"], groups=G)
    ok = all(geo[s] + 2 * p - d * (k - 1) > 0 for s, p, d, k in
             (("h", geo["padding"][0], geo["dilation"][0], geo["kh"]), ("w", geo["padding"][1], geo["dilation"][1], geo["kw"])))
    return x, wt, kw, ok
