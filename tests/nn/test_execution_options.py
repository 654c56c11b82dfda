"""``execution=`` (kernel, noise seed) given apart from the device: the same numbers as the old way."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import abfp
from abfp import ABFPConfig, DevicePlan, ExecutionOptions


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 10))


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    abfp.reseed(model)
    with torch.no_grad():
        return model(x)


DEVICE = ABFPConfig(tile_width=16, gain=2.0, noise_std=0.5)  # noisy: the seed decides the numbers
X = torch.randn(6, 48, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kernel", ["auto", "chunked", "reference"])
def test_convert_with_execution_is_bit_identical_to_kernel_and_seed_in_the_config(kernel):
    old_way = abfp.convert(_model(), DEVICE.replace(kernel=kernel, seed=3))
    new_way = abfp.convert(_model(), DEVICE, execution=ExecutionOptions(kernel=kernel, seed=3))
    y = _run(new_way, X)
    assert torch.equal(y, _run(old_way, X))
    # the seed does decide: another one moves the numbers
    other = abfp.convert(_model(), DEVICE, execution=ExecutionOptions(kernel=kernel, seed=4))
    assert not torch.equal(y, _run(other, X))


def test_execution_applies_to_the_overrides_too():
    head = DEVICE.replace(gain=4.0)
    old_way = abfp.convert(_model(), DEVICE.replace(seed=5), overrides={"2": head.replace(seed=5)})
    new_way = abfp.convert(_model(), DEVICE, overrides={"2": head}, execution=ExecutionOptions(seed=5))
    assert abfp.analog_state(new_way).overrides["2"].seed == 5
    assert torch.equal(_run(new_way, X), _run(old_way, X))


def test_set_config_with_execution():
    model = abfp.convert(_model(), DEVICE)
    abfp.set_config(model, DEVICE, execution=ExecutionOptions(kernel="chunked", seed=8))
    assert abfp.analog_state(model).config == DEVICE.replace(kernel="chunked", seed=8)
    assert torch.equal(_run(model, X), _run(abfp.convert(_model(), DEVICE.replace(kernel="chunked", seed=8)), X))
    with pytest.raises(TypeError, match="ExecutionOptions"):
        abfp.set_config(model, DEVICE, execution={"seed": 1})  # type: ignore[arg-type]


def test_device_plan_convert_with_execution_and_json():
    plan = DevicePlan(DEVICE, {"2": DEVICE.replace(gain=1.0)})
    new_way = plan.convert(_model(), execution=ExecutionOptions(seed=2))
    old_way = plan.with_seed(2).convert(_model())
    assert torch.equal(_run(new_way, X), _run(old_way, X))
    # a plan's JSON keeps each config's execution options; an old plan (seed in the base) loads
    seeded = plan.with_seed(2)
    assert DevicePlan.from_json(seeded.to_json()) == seeded
    old = {"format": "abfp-device-plan/1", "base": {**DEVICE.to_dict(), "seed": 2, "kernel": "auto"},
           "modules": {"2": {"gain": 1.0}}, "exclude": [], "info": {}}
    assert DevicePlan.from_dict(old) == seeded
