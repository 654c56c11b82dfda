"""ABFPConfig: defaults, validation, JSON round trip, presets."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from abfp import ABFPConfig, presets


def test_defaults_are_the_authors_reference_setting():
    c = ABFPConfig()
    assert (c.mode, c.tile_width, c.input_bits, c.weight_bits, c.output_bits, c.gain) == ("abfp", 128, 8, 8, 8, 8.0)
    assert c.noise_dist == "uniform" and math.isclose(c.noise_std, 1 / math.sqrt(12))
    assert c.scale_dtype == "bfloat16" and not c.bf16_tile_outputs and not c.bf16_io
    assert c.input_max_code == 127


@pytest.mark.parametrize("field,value", [
    ("mode", "analog"), ("tile_width", 0), ("tile_width", 2.5), ("input_bits", 1), ("weight_bits", 40),
    ("output_bits", True), ("gain", 0.0), ("gain", float("nan")), ("noise_std", -1.0),
    ("noise_dist", "laplace"), ("scale_dtype", "fp8"), ("seed", -3), ("bf16_io", 1), ("kernel", "cuda"),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ABFPConfig(**{field: value})


def test_tile_products_beyond_float64_exactness_are_refused():
    """n L(b_x) L(b_w) must stay within 2**53 (exact tile products); the message gives the limit."""
    ABFPConfig(tile_width=128, input_bits=24, weight_bits=24)  # 128 (2^23 - 1)^2 < 2^53
    ABFPConfig(tile_width=1 << 20, input_bits=17, weight_bits=17)  # 2^20 (2^16 - 1)^2 < 2^53
    for kw in (dict(tile_width=256, input_bits=24, weight_bits=24), dict(tile_width=1 << 20, input_bits=24, weight_bits=12)):
        with pytest.raises(ValueError, match=r"tile_width \* L\(input_bits\) \* L\(weight_bits\).*2\*\*53"):
            ABFPConfig(**kw)


@given(
    mode=st.sampled_from(["abfp", "fixed"]), n=st.integers(1, 4096), b=st.integers(2, 21),
    gain=st.floats(0.01, 1000), noise=st.floats(0, 10), seed=st.none() | st.integers(0, 2**63),
    dist=st.sampled_from(["uniform", "gaussian"]), sd=st.sampled_from(["bfloat16", "float32", "pow2"]),
    flag=st.booleans(),
)
def test_json_round_trip(mode, n, b, gain, noise, seed, dist, sd, flag):
    c = ABFPConfig(mode=mode, tile_width=n, input_bits=b, weight_bits=b, output_bits=b, gain=gain,
                   noise_std=noise, seed=seed, noise_dist=dist, scale_dtype=sd, bf16_tile_outputs=flag)
    assert ABFPConfig.from_json(c.to_json()) == c
    assert ABFPConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_json_files_and_bad_json(tmp_path):
    p = tmp_path / "dev.json"
    ABFPConfig(gain=4.0).to_json(p)
    assert ABFPConfig.from_json(p).gain == 4.0
    with pytest.raises(ValueError, match="unknown ABFPConfig field"):
        ABFPConfig.from_dict({"gian": 3})
    with pytest.raises(ValueError, match="JSON"):
        ABFPConfig.from_json("{not json")


def test_presets_cover_the_authors_grid():
    table = presets()
    for bits in ("888", "668"):
        for n in (8, 32, 128):
            c = table[f"abfp-{bits}-n{n}"]
            assert c.tile_width == n and c.output_bits == 8
            assert c.input_bits == c.weight_bits == (8 if bits == "888" else 6)
    assert ABFPConfig.preset("default") == ABFPConfig()
    assert ABFPConfig.preset("fixed-888-n128").mode == "fixed"
    with pytest.raises(ValueError, match="known presets"):
        ABFPConfig.preset("nope")
