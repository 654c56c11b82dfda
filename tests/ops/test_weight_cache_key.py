"""The weight cache (``ops/device.WEIGHT_CACHE``) never serves an encoding made for another device.

Generated from ``dataclasses.fields(ABFPConfig)`` and ``ExecutionOptions``: a weight encoded under
the base device, then used under a device with one field changed, gives the product computed
without the cache (``cache=False``), bit for bit. A new field fails until it has a perturbation.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import abfp.functional as AF
from abfp.config import ABFPConfig, ExecutionOptions

BASE = ABFPConfig(tile_width=32, gain=2.0, noise_std=0.0)
PERTURB = {"mode": "fixed", "tile_width": 16, "input_bits": 6, "weight_bits": 6, "output_bits": 6, "gain": 4.0,
           "noise_std": 0.5, "noise_dist": "gaussian", "scale_dtype": "pow2", "bf16_tile_outputs": True,
           "bf16_io": True, "recurrent_concat": True, "repeats": 2}
EXEC_PERTURB = {"kernel": "chunked", "seed": 3}


def _product(cfg: ABFPConfig, w: torch.Tensor, cache: bool) -> torch.Tensor:
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    scales = dict(input_scale=3.0, weight_scale=float(w.abs().max())) if cfg.mode == "fixed" else {}
    return AF.linear(x, w, None, config=cfg, generator=torch.Generator().manual_seed(2), cache=cache, **scales)


def _configs() -> list[tuple[str, ABFPConfig]]:
    out = [(k, BASE.replace(**{k: v})) for k, v in PERTURB.items()]
    out += [(k, BASE.with_execution(BASE.execution.replace(**{k: v}))) for k, v in EXEC_PERTURB.items()]
    return out


def test_every_field_has_a_perturbation():
    assert {f.name for f in dataclasses.fields(ABFPConfig)} - {"execution"} == set(PERTURB)
    assert {f.name for f in dataclasses.fields(ExecutionOptions)} == set(EXEC_PERTURB)


@pytest.mark.parametrize("name,cfg", _configs(), ids=[n for n, _ in _configs()])
@pytest.mark.parametrize("first", ["base", "perturbed"])
def test_a_weight_encoded_for_one_device_is_not_served_to_another(name, cfg, first):
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    a, b = (BASE, cfg) if first == "base" else (cfg, BASE)
    _product(a, w, cache=True)  # encoded and cached for the first device
    assert torch.equal(_product(b, w, cache=True), _product(b, w, cache=False)), name


def test_a_kernel_change_re_encodes_so_the_int8_path_keeps_its_codes():
    """Encodings made for kernel='chunked' (no int8 codes) were served to kernel='auto', which
    then ran float32 GEMMs: the same numbers, without the int8 speed."""
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    chunked = BASE.with_execution(ExecutionOptions(kernel="chunked"))
    AF.WEIGHT_CACHE.get(w, w[None], chunked, None)
    enc = AF.WEIGHT_CACHE.get(w, w[None], BASE, None)
    assert enc.codes_i8 is not None
