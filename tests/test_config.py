"""ABFPConfig: defaults, validation, JSON round trip, presets; ExecutionOptions apart from the device."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from abfp import ABFPConfig, ExecutionOptions, presets
from abfp.config import config_key


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
    assert ABFPConfig.from_json(c.to_json(execution=True)) == c
    assert ABFPConfig.from_dict(json.loads(json.dumps(c.to_dict(execution=True)))) == c
    # the device alone: everything but the execution options
    device = ABFPConfig.from_json(c.to_json())
    assert device == c.replace(execution=ExecutionOptions()) and device.seed is None


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


# --------------------------------------------------------------------------- execution options
#: An ABFPConfig.to_dict() as written before the execution options were split off (kernel and
#: seed among the device fields), e.g. in a config file or a plan's base.
OLD_JSON = {"mode": "abfp", "tile_width": 32, "input_bits": 6, "weight_bits": 7, "output_bits": 9, "gain": 2.0,
            "noise_std": 0.5, "noise_dist": "gaussian", "scale_dtype": "float32", "seed": 11,
            "bf16_tile_outputs": False, "bf16_io": False, "kernel": "chunked", "recurrent_concat": False, "repeats": 1}


def test_device_description_leaves_out_the_execution_options():
    c = ABFPConfig(tile_width=32, kernel="reference", seed=4)
    assert c.execution == ExecutionOptions(kernel="reference", seed=4)
    assert (c.kernel, c.seed) == ("reference", 4)
    d = c.to_dict()
    assert "kernel" not in d and "seed" not in d and "execution" not in d and d["tile_width"] == 32
    assert c.to_dict(execution=True)["execution"] == {"kernel": "reference", "seed": 4}
    assert json.loads(c.to_json())["tile_width"] == 32 and "execution" not in json.loads(c.to_json())


def test_old_json_with_kernel_and_seed_at_the_top_level_still_loads(tmp_path):
    c = ABFPConfig.from_dict(OLD_JSON)
    assert c.execution == ExecutionOptions(kernel="chunked", seed=11)
    assert (c.tile_width, c.input_bits, c.weight_bits, c.output_bits, c.noise_dist) == (32, 6, 7, 9, "gaussian")
    p = tmp_path / "old.json"
    p.write_text(json.dumps(OLD_JSON))
    assert ABFPConfig.from_json(p) == c
    # the top-level (old) keys win over an execution object
    both = ABFPConfig.from_dict({"seed": 2, "execution": {"kernel": "reference", "seed": 9}})
    assert both.execution == ExecutionOptions(kernel="reference", seed=2)
    with pytest.raises(ValueError, match="unknown ExecutionOptions field"):
        ABFPConfig.from_dict({"execution": {"kernal": "auto"}})


def test_config_key_is_the_old_flat_dict():
    """Caches and checkpoints keyed on the old to_dict() keep matching: config_key gives it back."""
    c = ABFPConfig.from_dict(OLD_JSON)
    assert config_key(c) == OLD_JSON
    # every field decides the key: configs that differ only in execution options never share one
    assert config_key(c.replace(seed=12)) != config_key(c)
    assert config_key(c.replace(kernel="auto")) != config_key(c)


def test_replace_and_the_old_keywords_set_the_execution_options():
    c = ABFPConfig(gain=2.0, seed=3)
    assert c.replace(seed=5).execution == ExecutionOptions(seed=5)
    assert c.replace(kernel="chunked").execution == ExecutionOptions(kernel="chunked", seed=3)
    assert c.replace(gain=4.0).execution == c.execution
    assert ABFPConfig(execution=ExecutionOptions(seed=1), kernel="reference").execution == ExecutionOptions("reference", 1)
    assert c.with_execution(None) is c
    assert c.with_execution(ExecutionOptions(kernel="chunked")) == ABFPConfig(gain=2.0, kernel="chunked")
    with pytest.raises(TypeError, match="ExecutionOptions"):
        c.with_execution({"kernel": "auto"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="execution"):
        ABFPConfig(execution={"kernel": "auto"})  # type: ignore[arg-type]
    for field, value in (("kernel", "cuda"), ("seed", -1), ("seed", True)):
        with pytest.raises(ValueError, match=f"ExecutionOptions.{field}"):
            ExecutionOptions(**{field: value})


def test_configs_pickled_before_the_split_unpickle():
    import pickle

    c = ABFPConfig(tile_width=32, kernel="chunked", seed=6)
    assert pickle.loads(pickle.dumps(c)) == c
    old_state = {**c.to_dict(), "kernel": "chunked", "seed": 6}  # the __dict__ of an old config
    restored = ABFPConfig.__new__(ABFPConfig)
    restored.__setstate__(old_state)
    assert restored == c
