"""The warm-up + cosine learning-rate factor (:func:`abfp.finetune.loop.warmup_cosine`)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from abfp.finetune.loop import warmup_cosine



def record_lrs(monkeypatch) -> list[float]:
    """The learning rate of every AdamW step taken from now on (appended as the steps run)."""
    seen: list[float] = []
    step = torch.optim.AdamW.step

    def recording(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    return seen


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))

def test_known_rates() -> None:
    # 10 steps, 2 of warm-up: 0.5, 1 (the peak), then the cosine over the 8 remaining steps
    got = [warmup_cosine(s, 10, 2) for s in range(10)]
    assert got[:2] == [0.5, 1.0]
    assert got[2] == 1.0
    assert got[6] == pytest.approx(0.5, abs=1e-12)  # half-way through the decay: cos(pi/2)
    assert got[9] == pytest.approx((1 + math.cos(math.pi * 7 / 8)) / 2, rel=1e-12)
    assert 0 < got[9] < 0.04  # the last step is nearly, not exactly, zero
    # no warm-up: the first step at the peak
    assert warmup_cosine(0, 5) == 1.0
    assert warmup_cosine(4, 5) == pytest.approx((1 + math.cos(math.pi * 4 / 5)) / 2, rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(steps=st.integers(2, 3000), data=st.data())
def test_shape(steps: int, data: st.DataObject) -> None:
    warmup = data.draw(st.integers(0, steps - 1))
    f = [warmup_cosine(s, steps, warmup) for s in range(steps)]
    assert all(0 < v <= 1 for v in f)
    assert f[:warmup] == [(s + 1) / warmup for s in range(warmup)]  # linear, up to the peak
    assert f[warmup] == 1.0
    assert all(a >= b for a, b in zip(f[warmup:], f[warmup + 1:]))  # then never rises
    # the mean over the decay is about a half (the integral of (1 + cos) / 2 over [0, pi] / pi)
    if steps - warmup >= 100:
        assert sum(f[warmup:]) / (steps - warmup) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("args", [(5, 5, 0), (-1, 5, 0), (0, 5, 5), (0, 0, 0), (0, 5, -1), (1.0, 5, 0), (True, 5, 0)])
def test_bad_input(args: tuple) -> None:
    with pytest.raises(ValueError, match="warmup_cosine"):
        warmup_cosine(*args)


def _lrs_of_run(monkeypatch: pytest.MonkeyPatch, **kw) -> list[float]:
    """The learning rate AdamW had at each step of a tiny distillation run."""
    import torch
    from torch import nn

    import abfp.finetune as ft
    from abfp import ABFPConfig
    from abfp.zoo.base import Dataset

    seen = record_lrs(monkeypatch)
    model = tiny_model()
    data = Dataset((torch.randn(32, 12, generator=torch.Generator().manual_seed(1)),))
    ft.qat(model, data, ABFPConfig(tile_width=4), batch_size=8, loss="kl", progress=False, timing_steps=0, **kw)
    return seen


def test_loop_follows_the_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    got = _lrs_of_run(monkeypatch, steps=7, lr=1e-3, lr_schedule="cosine", warmup=2)
    assert got == pytest.approx([1e-3 * warmup_cosine(k, 7, 2) for k in range(7)], rel=1e-12)
    assert got[1] == pytest.approx(1e-3) and got[0] == pytest.approx(5e-4) and got[-1] < 1e-4
    # the default stays constant (times lr_decay per epoch: 4 batches of 8 in the 32 inputs)
    got = _lrs_of_run(monkeypatch, steps=6, lr=1e-3, lr_decay=0.5)
    assert got == pytest.approx([1e-3] * 4 + [5e-4] * 2, rel=1e-12)


@pytest.mark.parametrize("kw, msg", [
    (dict(lr_schedule="linear"), "lr_schedule must be one of constant, cosine"),
    (dict(warmup=2), "warmup goes with lr_schedule='cosine'"),
    (dict(lr_schedule="cosine", warmup=4), r"warmup \(4\) must be below steps \(4\)"),
    (dict(lr_schedule="cosine", warmup=-1), "warmup must be a non-negative integer"),
])
def test_settings_bad_input(kw: dict, msg: str) -> None:
    from abfp.finetune.loop import TrainSettings

    with pytest.raises(ValueError, match=msg):
        TrainSettings(steps=4, lr=1e-3, batch_size=2, **kw).validate()


def test_stage_and_cli_pass_the_schedule_on(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    import torch
    from torch import nn

    from abfp import ABFPConfig, DevicePlan
    from abfp.tune.cli import _finetune_options
    from abfp.tune.finetune import DistilStage

    args = argparse.Namespace(finetune="distil-qat", finetune_steps=5, finetune_lr=2e-3, finetune_batch_size=8,
                              finetune_loss=None, finetune_samples=None, finetune_schedule="cosine",
                              finetune_warmup=1, finetune_temperature=2.0, finetune_feature_weight=None,
                              finetune_feature_modules=None, no_progress=True)
    options = _finetune_options(args)
    assert (options["schedule"], options["warmup"], options["temperature"]) == ("cosine", 1, 2.0)
    seen = record_lrs(monkeypatch)
    model = tiny_model()
    stage = DistilStage(**{k: v for k, v in options.items()})
    stage(model, DevicePlan(ABFPConfig(tile_width=4)), (torch.randn(32, 12),))
    assert seen == pytest.approx([2e-3 * warmup_cosine(k, 5, 1) for k in range(5)], rel=1e-12)
    assert stage.describe()["temperature"] == 2.0


def test_stage_describes_its_schedule_only_when_set() -> None:
    from abfp.tune.finetune import DistilStage

    assert "schedule" not in DistilStage().describe()  # earlier journals stay valid
    d = DistilStage(schedule="cosine", warmup=10).describe()
    assert (d["schedule"], d["warmup"]) == ("cosine", 10)
    assert "cosine lr schedule (10 warm-up steps)" in DistilStage(schedule="cosine", warmup=10).note(64)
    # the stage note names a softmax temperature other than 1 (a report of a T = 2 run did not say so)
    assert DistilStage(temperature=2.0).note(64).endswith(", temperature 2")
    assert "temperature" not in DistilStage().note(64)
