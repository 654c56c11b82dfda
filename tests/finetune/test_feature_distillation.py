"""Feature distillation (``Distillation.feature_weight``): the loss is the output loss plus
``lambda * sum_l mean((s_l - t_l)^2) / mean(t_l^2)`` over the chosen modules' outputs, checked
against an independent float64 evaluation; ``lambda = 0`` is today's training bit for bit; the
training loop, ``abfp tune`` and ``abfp finetune`` pass it through; bad options are refused."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import abfp.finetune as ft
from abfp import ABFPConfig, convert
from abfp.finetune import Distillation
from abfp.finetune.distillation import FeatureMatch, feature_loss, feature_module_names
from abfp.zoo.base import Dataset

NOISELESS = ABFPConfig(tile_width=4, gain=4.0, noise_std=0.0)


class BlockNet(nn.Module):
    """linear(6 -> 8) -> [linear(8 -> 8) + ReLU] x 2 (an nn.ModuleList) -> linear(8 -> 3)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.stem = nn.Linear(6, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2))
        self.head = nn.Linear(8, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def _rel_mse_ref(s: torch.Tensor, t: torch.Tensor) -> float:
    a, b = s.double().flatten().tolist(), t.double().flatten().tolist()
    return (sum((x - y) ** 2 for x, y in zip(a, b)) / len(a)) / (sum(y * y for y in b) / len(b))


def _kl_ref(s: torch.Tensor, t: torch.Tensor, temp: float) -> float:
    total = 0.0
    for si, ti in zip(s.double().tolist(), t.double().tolist()):
        zs, zt = [v / temp for v in si], [v / temp for v in ti]
        ls = math.log(sum(math.exp(v) for v in zs))
        lt = math.log(sum(math.exp(v) for v in zt))
        total += sum(math.exp(b - lt) * ((b - lt) - (a - ls)) for a, b in zip(zs, zt))
    return temp**2 * total / len(s)


def _block_outputs(m: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The blocks' outputs, by running the layers by hand (no hooks)."""
    h, out = m.stem(x), []
    for b in m.blocks:
        h = b(h)
        out.append(h)
    return out


def test_feature_loss_matches_float64_formula() -> None:
    g = torch.Generator().manual_seed(1)
    s = [torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(2, 4, 4, generator=g, dtype=torch.float64)]
    t = [torch.randn(3, 5, generator=g, dtype=torch.float64), 3 * torch.randn(2, 4, 4, generator=g, dtype=torch.float64)]
    want = sum(_rel_mse_ref(a, b) for a, b in zip(s, t))
    assert feature_loss(s, t).item() == pytest.approx(want, rel=1e-12)
    assert feature_loss(t, t).item() == 0.0
    # scale-free per layer: scaling one layer's pair leaves its term unchanged
    assert feature_loss([10 * s[0], s[1]], [10 * t[0], t[1]]).item() == pytest.approx(want, rel=1e-12)


def test_feature_match_loss_is_kl_plus_weighted_relative_errors_float64() -> None:
    teacher = BlockNet(0).double().eval()
    student = BlockNet(0).double()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    d = Distillation("kl", 2.0, feature_weight=0.3)
    names = feature_module_names(teacher)
    assert names == ["blocks.0", "blocks.1"]
    match = FeatureMatch(student, teacher, names, d)
    got = match.loss(student, (x,))
    with torch.no_grad():
        want = _kl_ref(student(x), teacher(x), 2.0) + 0.3 * sum(
            _rel_mse_ref(a, b) for a, b in zip(_block_outputs(student, x), _block_outputs(teacher, x)))
    assert got.item() == pytest.approx(want, rel=1e-10)
    got.backward()  # gradients reach the student only
    assert all(p.grad is not None for p in student.parameters()) and all(p.grad is None for p in teacher.parameters())
    # precomputed targets give the same
    assert match.loss(student, (x,), teacher(x).detach()).item() == pytest.approx(want, rel=1e-10)
    match.close()
    assert not any(m._forward_hooks for m in [*student.modules(), *teacher.modules()])


def test_feature_module_names_regex_and_errors() -> None:
    m = BlockNet()
    assert feature_module_names(m, r"stem|blocks\.1") == ["stem", "blocks.1"]
    with pytest.raises(ValueError, match="no module name matching"):
        feature_module_names(m, r"nothing")
    with pytest.raises(ValueError, match="no nn.ModuleList entries"):
        feature_module_names(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="all zero"):
        feature_loss([torch.ones(2)], [torch.zeros(2)])


@pytest.mark.parametrize("kwargs, err", [
    ({"feature_weight": -0.1}, "feature_weight must be"), ({"feature_weight": float("nan")}, "feature_weight must be"),
    ({"feature_weight": True}, "feature_weight must be"), ({"feature_modules": "blocks"}, "goes with feature_weight"),
    ({"feature_weight": 1.0, "feature_modules": "("}, "not a regular expression"),
])
def test_bad_feature_options(kwargs: dict, err: str) -> None:
    with pytest.raises(ValueError, match=err):
        Distillation("kl", **kwargs)


def _train(distillation: Distillation, steps: int = 3) -> ft.FinetuneResult:
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(3))
    return ft.qat(BlockNet(0).eval(), Dataset((x,)), NOISELESS, steps=steps, lr=0.01, batch_size=8, loss=distillation,
                  progress=False, timing_steps=0)


def test_loop_adds_the_feature_term_and_weight_zero_is_todays_training() -> None:
    plain, zero = _train(Distillation("kl", 2.0)), _train(Distillation("kl", 2.0, feature_weight=0.0))
    assert plain.losses == zero.losses
    assert all(torch.equal(a, b) for a, b in zip(plain.model.state_dict().values(), zero.model.state_dict().values()))
    weighted = _train(Distillation("kl", 2.0, feature_weight=0.5), steps=1)
    # step 1 on the noiseless device, before any update: the same KL, plus 0.5 times the blocks'
    # relative errors of the converted model against float32 on the first batch
    model = BlockNet(0).eval()
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(3))
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))  # the loop's batch of step 0, seed 0
    xb = x[perm[:8]]
    device = convert(copy.deepcopy(model), NOISELESS, inplace=False).eval()
    with torch.no_grad():
        extra = sum(_rel_mse_ref(a, b) for a, b in zip(_block_outputs(device, xb), _block_outputs(model, xb)))
    assert extra > 1e-4  # the device differs: the check can fail
    assert weighted.losses[0] - plain.losses[0] == pytest.approx(0.5 * extra, rel=1e-4)
    assert not any(m._forward_hooks for m in weighted.model.modules())  # the hooks are gone
    assert "feature_weight" not in Distillation("kl").describe()  # earlier checkpoints keep their provenance
    assert Distillation("kl", feature_weight=0.5).describe()["feature_weight"] == 0.5


def test_tune_stage_and_cli_pass_the_feature_options(monkeypatch) -> None:
    import argparse

    from abfp.finetune.cli import _loss_options
    from abfp.tune.cli import _finetune_options
    from abfp.tune.finetune import DistilStage

    stage = DistilStage(feature_weight=0.2, feature_modules=r"blocks\.\d+")
    assert stage.distillation() == Distillation("kl", 1.0, 0.2, r"blocks\.\d+")
    assert "feature distillation x 0.2" in stage.note(10) and stage.describe()["feature_weight"] == 0.2
    assert "feature_weight" not in DistilStage().describe()
    with pytest.raises(ValueError, match="feature_weight"):
        DistilStage(feature_weight=-1.0)
    base = {f"finetune_{k}": None for k in ("steps", "lr", "batch_size", "loss", "samples", "schedule", "warmup",
                                           "temperature", "feature_weight", "feature_modules")}
    got = _finetune_options(argparse.Namespace(**{**base, "finetune_feature_weight": 0.1}, finetune="distil-qat",
                                               no_progress=True))
    assert got is not None and got["feature_weight"] == 0.1
    from abfp.cli_common import UsageError

    with pytest.raises(UsageError, match="--finetune-feature-modules goes with"):
        _finetune_options(argparse.Namespace(**{**base, "finetune_feature_modules": "x"}, finetune="distil-qat",
                                             no_progress=True))
    with pytest.raises(UsageError, match="goes with --finetune"):
        _finetune_options(argparse.Namespace(**{**base, "finetune_feature_weight": 0.1}, finetune="none",
                                             no_progress=True))
    ns = argparse.Namespace(loss="kl", temperature=2.0, feature_weight=0.3, feature_modules=None)
    assert _loss_options(ns) == {"loss": Distillation("kl", 2.0, 0.3), "temperature": None}
    assert _loss_options(argparse.Namespace(loss="kl", temperature=None, feature_weight=0.0, feature_modules=None)) \
        == {"loss": "kl", "temperature": None}
    with pytest.raises(UsageError, match="label-free"):
        _loss_options(argparse.Namespace(loss="ce", temperature=None, feature_weight=0.3, feature_modules=None))
