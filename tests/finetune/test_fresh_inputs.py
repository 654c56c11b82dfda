"""Distillation on fresh inputs (``sample_inputs`` / ``fresh_inputs``): the batch of step k is the sampler's
draw from a generator seeded by (seed, k), the targets are the float32 teacher's outputs on it, runs are
deterministic and resume bit-identically, ``abfp tune`` passes a task's ``sample_finetuning_batch``, and bad
input is refused clearly."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import abfp
import abfp.finetune as ft
from abfp import ABFPConfig, DevicePlan
from abfp.cli import main
from abfp.finetune.distillation import kl_loss
from abfp.tune.finetune import DistilStage
from abfp.zoo.base import KL, Dataset

torch.set_num_threads(1)

SATURATING = ABFPConfig(tile_width=8, gain=16.0)
QUIET = SATURATING.replace(noise_std=0.0)  # no device noise: a step's loss depends on its batch only


def mlp(width: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, width), nn.ReLU(), nn.Linear(width, 6))


def randn_sampler(generator: torch.Generator, n: int) -> tuple[torch.Tensor]:
    return (torch.randn(n, 24, generator=generator),)


def fixed(n: int = 32, seed: int = 1) -> Dataset:
    return Dataset((torch.randn(n, 24, generator=torch.Generator().manual_seed(seed)),))


KW = dict(lr=1e-3, batch_size=8, loss="kl", progress=False, timing_steps=0)


def test_batch_of_step_k_and_teacher_targets() -> None:
    seen: list[torch.Tensor] = []

    def recording(g: torch.Generator, n: int) -> tuple[torch.Tensor]:
        seen.append(randn_sampler(g, n)[0])
        return (seen[-1],)

    # a learning rate too small to move the float32 weights: every step's loss is the device's KL on its batch
    res = ft.qat(mlp(), fixed(), QUIET, steps=3, sample_inputs=recording, seed=5, **{**KW, "lr": 1e-30})
    assert len(seen) == 3
    for k, x in enumerate(seen):
        expect = torch.randn(8, 24, generator=torch.Generator().manual_seed(5 * 1_000_003 + k))
        assert torch.equal(x, expect)
    teacher = mlp().eval()
    device = abfp.convert(mlp(), QUIET).eval()
    for k, x in enumerate(seen):
        with torch.no_grad():
            want = float(kl_loss(device(x), teacher(x)))
        assert res.losses[k] == pytest.approx(want, rel=1e-5, abs=1e-9)
    assert res.details["seed"] == 5


def test_fixed_inputs_unchanged_without_a_sampler() -> None:
    # the fixed-input path is not touched: a sampler that returns the fixed batch's rows gives other batches
    a = ft.qat(mlp(), fixed(), QUIET, steps=3, **KW).losses
    b = ft.qat(mlp(), fixed(), QUIET, steps=3, **KW).losses
    c = ft.qat(mlp(), fixed(), QUIET, steps=3, sample_inputs=randn_sampler, **KW).losses
    assert a == b and a != c


def test_deterministic_under_a_seed_and_resume_bit_identical(tmp_path: Path) -> None:
    kw = dict(**KW, sample_inputs=randn_sampler)
    one = ft.qat(mlp(), fixed(), SATURATING, steps=4, seed=2, **kw)
    two = ft.qat(mlp(), fixed(), SATURATING, steps=4, seed=2, **kw)
    other = ft.qat(mlp(), fixed(), SATURATING, steps=4, seed=3, **kw)
    assert one.losses == two.losses and one.losses != other.losses
    ck = tmp_path / "f.safetensors"
    ft.qat(mlp(), fixed(), SATURATING, steps=2, seed=2, checkpoint=ck, checkpoint_every=2, **kw)
    resumed = ft.qat(mlp(), fixed(), SATURATING, steps=4, seed=2, checkpoint=ck, resume=True, **kw)
    assert resumed.details["resumed_from"] == 2 and resumed.losses == one.losses
    for k, v in one.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    with pytest.raises(ValueError, match="sample_inputs"):  # the checkpoint names its sampler
        ft.qat(mlp(), fixed(), SATURATING, steps=4, seed=2, checkpoint=ck, resume=True, **KW)


def test_a_checkpoint_refuses_a_sampler_that_draws_other_inputs_under_the_same_name(tmp_path: Path) -> None:
    """The checkpoint records the sampler's code and a probe of its output, not only its name:
    a sampler with the same name that draws other inputs is refused, never resumed into."""
    ck = tmp_path / "f.safetensors"
    ft.qat(mlp(), fixed(), SATURATING, steps=2, seed=2, checkpoint=ck, checkpoint_every=2,
           sample_inputs=randn_sampler, **KW)

    def other(generator: torch.Generator, n: int) -> tuple[torch.Tensor]:
        return (2 * torch.randn(n, 24, generator=generator),)

    other.__qualname__ = randn_sampler.__qualname__  # same name, other inputs
    with pytest.raises(ValueError, match="sample_inputs"):
        ft.qat(mlp(), fixed(), SATURATING, steps=4, seed=2, checkpoint=ck, resume=True, sample_inputs=other, **KW)


def test_fresh_inputs_generalise_where_few_fixed_inputs_overfit() -> None:
    held = torch.randn(512, 24, generator=torch.Generator().manual_seed(99))
    teacher = mlp().eval()
    ref = teacher(held).detach()

    def held_kl(m: nn.Module) -> float:
        with torch.no_grad():
            out = abfp.convert(m, SATURATING.replace(seed=0)).eval()(held)
        return KL(out, None, ref)

    kw = dict(lr=0.01, batch_size=8, loss="kl", progress=False, timing_steps=0, steps=150)
    before = held_kl(mlp())
    few = held_kl(ft.qat(mlp(), fixed(8), SATURATING, **kw).model)
    fresh = held_kl(ft.qat(mlp(), fixed(8), SATURATING, sample_inputs=randn_sampler, **kw).model)
    assert fresh < 0.8 * before, (before, fresh)
    assert fresh < few, (few, fresh)


def test_dnf_takes_fresh_inputs_too() -> None:
    res = ft.dnf(mlp(), fixed(), SATURATING, steps=3, sampler="eager", sample_inputs=randn_sampler, **KW)
    assert len(res.losses) == 3 and all(v == v for v in res.losses)


def test_batch_size_is_not_capped_by_the_fixed_inputs() -> None:
    res = ft.qat(mlp(), fixed(4), QUIET, steps=2, sample_inputs=randn_sampler, **{**KW, "batch_size": 16})
    assert len(res.losses) == 2


@pytest.mark.parametrize("sampler, err, msg", [
    ("not callable", TypeError, "sample_inputs must be a callable"),
    (lambda g, n: (torch.randn(n + 1, 24, generator=g),), ValueError, r"returned \[9\] rows, asked for 8"),
    (lambda g, n: [1, 2], TypeError, "must return a Tensor or a tuple of Tensors"),
    (lambda g, n: torch.randn(n, 24, generator=g), None, None),  # a bare tensor is one input
])
def test_bad_samplers(sampler, err, msg) -> None:
    if err is None:
        assert len(ft.qat(mlp(), fixed(), QUIET, steps=1, sample_inputs=sampler, **KW).losses) == 1
        return
    with pytest.raises(err, match=msg):
        ft.qat(mlp(), fixed(), QUIET, steps=1, sample_inputs=sampler, **KW)


def test_fresh_inputs_need_a_distillation_loss() -> None:
    labelled = Dataset(fixed().inputs, torch.zeros(32, dtype=torch.long))
    with pytest.raises(ValueError, match="needs a distillation loss"):
        ft.qat(mlp(), labelled, QUIET, steps=1, lr=1e-3, batch_size=8, progress=False, timing_steps=0,
               sample_inputs=randn_sampler)


def test_tune_stage_with_fresh_inputs() -> None:
    model = mlp(32)
    res = abfp.tune(model, fixed(16).inputs, SATURATING, metric=KL, eval_inputs=fixed(64, 7).inputs, gains=[16.0],
                    repeats=False, finetune="distil-qat",
                    finetune_options=dict(steps=6, lr=0.01, batch_size=32, fresh_inputs=randn_sampler))
    assert [s.name for s in res.stages] == ["single gain", "gain", "finetune"]
    assert res.details["finetune"]["fresh_inputs"].endswith("randn_sampler")
    assert res.details["finetune"]["batch_size"] == 32  # not capped at the 16 calibration inputs
    assert "32 fresh inputs" in res.stages[2].note
    with pytest.raises(TypeError, match="fresh_inputs must be a callable"):
        DistilStage(fresh_inputs=3)  # type: ignore[arg-type]
    assert "fresh_inputs" not in DistilStage().describe()  # unset: earlier journals stay valid


TASKS = textwrap.dedent('''
    import torch
    from torch import nn
    from abfp.zoo.base import Dataset, Task, KL

    def _build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 6))

    def _data(seed, n):
        return lambda: Dataset((torch.randn(n, 24, generator=torch.Generator().manual_seed(seed)),))

    CALLS = []

    def sample(generator, n):
        CALLS.append(n)
        return (torch.randn(n, 24, generator=generator),)

    def fresh():
        return Task("fresh", "mlp", _build, _data(1, 40), KL, default_batch_size=16, load_calibration=_data(2, 32),
                    sample_finetuning_batch=sample)

    def plain():
        return Task("plain", "mlp", _build, _data(1, 40), KL, default_batch_size=16, load_calibration=_data(2, 32))

    def small():  # declares its own finetuning batch size, as efficientnet-lite0 does
        return Task("small", "mlp", _build, _data(1, 40), KL, default_batch_size=16, load_calibration=_data(2, 32),
                    sample_finetuning_batch=sample, finetune_batch_size=4)
''')


def _tune(tmp_path: Path, task: str, *extra: str) -> int:
    common = ["--calibration", "32", "--gain-samples", "8", "--no-repeats", "--no-progress", "--gains", "16"]
    try:
        return main(["tune", "--task", f"{tmp_path / 'tasks.py'}:{task}", "--json", str(tmp_path / "o" / "p.json"),
                     *common, *extra])
    except SystemExit as e:
        return int(e.code)


def test_cli_tune_uses_the_tasks_sampler(tmp_path: Path, capsys) -> None:
    (tmp_path / "tasks.py").write_text(TASKS)
    ft_args = ["--finetune", "distil-qat", "--finetune-steps", "3", "--finetune-batch-size", "8"]
    assert _tune(tmp_path, "fresh", *ft_args) == 0
    p = DevicePlan.from_json(tmp_path / "o" / "p.json")
    stage = [s for s in p.info["stages"] if s["stage"] == "finetune"][0]
    assert "8 fresh inputs" in str(stage)
    capsys.readouterr()
    assert _tune(tmp_path, "fresh", *ft_args, "--finetune-inputs", "fixed", "--force") == 0
    p = DevicePlan.from_json(tmp_path / "o" / "p.json")
    stage = [s for s in p.info["stages"] if s["stage"] == "finetune"][0]
    assert "fresh" not in str(stage) and "calibration inputs" in str(stage)


@pytest.mark.parametrize("task, extra, msg", [
    ("plain", ["--finetune", "distil-qat", "--finetune-inputs", "fresh"], "has no sample_finetuning_batch"),
    ("fresh", ["--finetune-inputs", "fresh"], "--finetune-inputs goes with --finetune distil-qat|distil-dnf"),
    ("fresh", ["--finetune", "bias-correct", "--finetune-inputs", "fixed"], "--finetune-inputs goes with"),
])
def test_cli_finetune_inputs_bad_input(tmp_path: Path, capsys, task: str, extra: list[str], msg: str) -> None:
    (tmp_path / "tasks.py").write_text(TASKS)
    assert _tune(tmp_path, task, *extra) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert msg in err[-1]
    assert not (tmp_path / "o" / "p.json").exists()


def _finetune_note(tmp_path: Path) -> str:
    p = DevicePlan.from_json(tmp_path / "o" / "p.json")
    return str([s for s in p.info["stages"] if s["stage"] == "finetune"][0])


def test_cli_tune_takes_the_tasks_finetune_batch_size(tmp_path: Path, capsys) -> None:
    """Without --finetune-batch-size a task's own finetune_batch_size is used (fresh or fixed inputs, qat or
    dnf), a given --finetune-batch-size wins, and a task without one gets the general default (32)."""
    (tmp_path / "tasks.py").write_text(TASKS)
    ft_args = ["--finetune", "distil-qat", "--finetune-steps", "2"]
    assert _tune(tmp_path, "small", *ft_args) == 0
    assert "4 fresh inputs" in _finetune_note(tmp_path)
    assert _tune(tmp_path, "small", *ft_args, "--finetune-batch-size", "8", "--force") == 0
    assert "8 fresh inputs" in _finetune_note(tmp_path)
    assert _tune(tmp_path, "fresh", *ft_args, "--force") == 0
    assert "32 fresh inputs" in _finetune_note(tmp_path)
    assert _tune(tmp_path, "small", "--finetune", "distil-dnf", "--finetune-steps", "2", "--finetune-inputs", "fixed",
                 "--force") == 0
    assert "2 steps of 4 on 32 calibration inputs" in _finetune_note(tmp_path)
    capsys.readouterr()


def test_task_finetune_batch_size_bad_input() -> None:
    from abfp.zoo import Task

    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(ValueError, match="finetune_batch_size must be an integer >= 1 or None"):
            Task("t", "d", mlp, lambda: fixed(4), KL, finetune_batch_size=bad)  # type: ignore[arg-type]
    assert Task("t", "d", mlp, lambda: fixed(4), KL).finetune_batch_size is None


def test_efficientnet_declares_batch_8() -> None:
    from abfp.zoo.efficientnet import TASKS as EFF

    assert EFF[0].finetune_batch_size == 8
