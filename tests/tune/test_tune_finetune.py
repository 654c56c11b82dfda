"""The finetuning stage of abfp.tune / abfp tune: distillation on the tuned plan (per-module devices
in training), calibration inputs only, weights with provenance, eval --weights refuses another
architecture, the new options' bad input."""

from __future__ import annotations

import copy

import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import abfp
import abfp.finetune as ft
from abfp import ABFPConfig, DevicePlan
from abfp.cli import main
from abfp.tune.provenance import architecture_fingerprint, load_weights, save_weights, weights_digest
from abfp.zoo.base import AGREEMENT, KL, Dataset

torch.set_num_threads(1)

# tiles of 8 at gain 16 saturate the ADC: a systematic device error that finetuning can learn around
SATURATING = ABFPConfig(tile_width=8, gain=16.0)


def mlp(width: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, width), nn.ReLU(), nn.Linear(width, 6))


def inputs(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 24, generator=torch.Generator().manual_seed(seed))


def test_qat_trains_through_the_per_module_devices() -> None:
    data = Dataset((inputs(64, 1),))
    kw = dict(steps=3, lr=1e-3, batch_size=16, loss="mse", progress=False, timing_steps=0)
    plain = ft.qat(mlp(), data, SATURATING, **kw).losses
    same = ft.qat(mlp(), data, SATURATING, overrides={"0": SATURATING, "2": SATURATING}, **kw).losses
    other = ft.qat(mlp(), data, SATURATING, overrides={"0": SATURATING.replace(gain=1.0)}, **kw).losses
    assert same == plain  # overrides equal to the base: the same training, bit for bit
    assert other[0] < plain[0]  # module 0 at gain 1 does not saturate: a smaller first loss


def test_dnf_measures_the_per_module_devices() -> None:
    data = Dataset((inputs(64, 1),))
    kw = dict(steps=1, lr=1e-3, batch_size=16, loss="mse", progress=False, timing_steps=0, sampler="eager")
    plain = ft.dnf(mlp(), data, SATURATING, **kw).details["dnf"]["dy_std"]
    quiet = ft.dnf(mlp(), data, SATURATING, overrides={"0": SATURATING.replace(gain=1.0, noise_std=0.0)},
                   **kw).details["dnf"]["dy_std"]
    site0 = [s for s in plain if s.startswith("0")]
    assert site0 and all(quiet[s] < 0.5 * plain[s] for s in site0), (plain, quiet)


def test_tune_finetune_stage_improves_held_out_fidelity() -> None:
    model = mlp(32)
    cal, held = inputs(256, 1), inputs(256, 2)
    # one allowed gain (16): the gain stage cannot undo the saturation; finetuning must
    res = abfp.tune(model, cal, SATURATING, metric=KL, eval_inputs=held, gains=[16.0], repeats=False,
                    finetune="distil-qat", finetune_options=dict(steps=40, lr=0.01, batch_size=32),
                    extra_metrics=[AGREEMENT])
    names = [s.name for s in res.stages]
    assert names == ["single gain", "gain", "finetune"]
    gain, tuned = res.stages[1], res.stages[2]
    assert tuned.metric < 0.8 * gain.metric, (gain.metric, tuned.metric)
    assert tuned.stderr is not None and 0 < tuned.stderr < tuned.metric
    assert set(tuned.extra) == {AGREEMENT.name} and 0 <= tuned.extra[AGREEMENT.name] <= 100
    p = tuned.extra[AGREEMENT.name] / 100  # the agreement's standard error, 100 sqrt(p (1 - p) / (N - 1))
    assert tuned.extra_stderr[AGREEMENT.name] == pytest.approx(100 * (p * (1 - p) / 255) ** 0.5, rel=1e-9, abs=1e-12)
    assert tuned.energy == gain.energy  # finetuning changes weights, not the device
    assert res.details["finetune"]["loss"] == "kl" and res.details["finetune"]["method"] == "distil-qat"
    # the result's model is the finetuned float32 model; the input model is untouched
    assert not torch.equal(res.model[0].weight, model[0].weight)
    assert torch.equal(model[0].weight, mlp(32)[0].weight)
    # its metric is reproducible from the plan and the returned model
    ref = model(held).detach()
    again = abfp.tune.evaluate_plan(res.model, res.plan, Dataset((held,)), KL, ref, 64, 0)
    assert again == pytest.approx(tuned.metric, rel=1e-9)


def test_finetune_sees_calibration_inputs_only() -> None:
    cal, held = inputs(32, 1), inputs(48, 2)
    seen: list[tuple[torch.Tensor, ...]] = []

    def spy(model: nn.Module, plan: DevicePlan, xs: tuple[torch.Tensor, ...]) -> nn.Module:
        seen.append(xs)
        return model

    abfp.tune(mlp(), cal, ABFPConfig(), eval_inputs=held, repeats=False, finetune=spy)
    assert len(seen) == 1 and torch.equal(seen[0][0], cal)


@pytest.mark.parametrize("kwargs, err, msg", [
    (dict(finetune="distil-xyz"), ValueError, "finetune must be one of"),
    (dict(finetune="distil-qat", finetune_options=dict(steps=0)), ValueError, "steps"),
    (dict(finetune="distil-qat", finetune_options=dict(lr=float("nan"))), ValueError, "lr"),
    (dict(finetune="distil-qat", finetune_options=dict(loss="hinge")), ValueError, "distillation loss"),
    (dict(finetune="distil-qat", finetune_options=dict(colour=1)), ValueError, "unknown finetune option"),
    (dict(finetune="distil-qat", finetune_options=dict(schedule="step")), ValueError, "schedule must be one of"),
    (dict(finetune="distil-qat", finetune_options=dict(warmup=5)), ValueError, "warmup goes with schedule='cosine'"),
    (dict(finetune="distil-qat", finetune_options=dict(schedule="cosine", steps=5, warmup=5)), ValueError,
     r"warmup \(5\) must be below steps \(5\)"),
    (dict(finetune_options=dict(steps=3)), ValueError, "without finetune"),
    (dict(finetune=3), TypeError, "callable"),
    (dict(extra_metrics=["kl"]), TypeError, "Metric"),
])
def test_tune_finetune_bad_input(kwargs: dict, err: type, msg: str) -> None:
    with pytest.raises(err, match=msg):
        abfp.tune(mlp(), inputs(16, 1), ABFPConfig(), repeats=False, **kwargs)


def test_weights_provenance(tmp_path: Path) -> None:
    a, b = mlp(16), mlp(20)
    assert architecture_fingerprint(a) == architecture_fingerprint(mlp(16))
    assert architecture_fingerprint(a) != architecture_fingerprint(b)
    info = save_weights(a, tmp_path / "w.safetensors")
    assert info["architecture"] == architecture_fingerprint(a)
    assert info["weights_sha256"] == weights_digest(a.state_dict())
    target = mlp(16)
    with torch.no_grad():
        target[0].weight.zero_()
    assert load_weights(target, tmp_path / "w.safetensors", {"weights": info})["note"] == ""
    assert torch.equal(target[0].weight, a[0].weight)
    with pytest.raises(ValueError, match="another architecture"):
        load_weights(mlp(20), tmp_path / "w.safetensors")
    # same architecture, other values: loaded, with a note
    other = {**info, "weights_sha256": "0" * 64}
    assert "not the ones" in load_weights(mlp(16), tmp_path / "w.safetensors", {"weights": other})["note"]



def test_weights_provenance_of_a_model_with_batch_norm(tmp_path: Path) -> None:
    """BatchNorm's step count is a 0-dim int64 buffer: hashed by its bytes, saved and restored."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3))
    a.train()(torch.randn(4, 1, 6, 6))  # running statistics and num_batches_tracked = 1
    a.eval()
    info = save_weights(a, tmp_path / "bn.safetensors")
    assert info["weights_sha256"] == weights_digest(a.state_dict())
    b = copy.deepcopy(a)
    b[1].num_batches_tracked += 1  # only the 0-dim buffer differs
    assert weights_digest(b.state_dict()) != info["weights_sha256"]
    c = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3))
    assert load_weights(c, tmp_path / "bn.safetensors", {"weights": info})["note"] == ""
    assert int(c[1].num_batches_tracked) == 1 and torch.equal(c[1].running_mean, a[1].running_mean)


TASKS = textwrap.dedent('''
    import torch
    from torch import nn
    from abfp.zoo.base import Dataset, Task, KL

    def _build(width):
        def build():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(24, width), nn.ReLU(), nn.Linear(width, 6))
        return build

    def _data(seed, n):
        return lambda: Dataset((torch.randn(n, 24, generator=torch.Generator().manual_seed(seed)),))

    def narrow():
        return Task("narrow", "mlp 16", _build(16), _data(1, 40), KL, default_batch_size=16,
                    load_calibration=_data(2, 32))

    def wide():
        return Task("wide", "mlp 20", _build(20), _data(1, 40), KL, default_batch_size=16)
''')


def test_cli_tune_finetune_then_eval_refuses_another_architecture(tmp_path: Path, capsys) -> None:
    tasks = tmp_path / "tasks.py"
    tasks.write_text(TASKS)
    plan = tmp_path / "out" / "plan.json"
    assert main(["tune", "--task", f"{tasks}:narrow", "--json", str(plan), "--calibration", "32", "--gain-samples",
                 "8", "--no-repeats", "--finetune", "distil-qat", "--finetune-steps", "4", "--finetune-lr", "1e-3",
                 "--finetune-batch-size", "8", "--gain-tolerance", "0.5", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "finetune" in out
    p = DevicePlan.from_json(plan)
    assert p.info["calibration_source"] == "the task's calibration split" and p.info["calibration_samples"] == 32
    assert p.info["eval_samples"] == 40  # the whole evaluation data: calibration came from elsewhere
    weights = plan.with_suffix(".safetensors")
    assert p.info["weights"]["architecture"] == architecture_fingerprint(mlp(16))
    assert [s["stage"] for s in p.info["stages"]] == ["single gain", "gain", "finetune"]
    assert "finetune" in (plan.parent / "plan.report.md").read_text()
    rec = tmp_path / "rec.json"
    common = ["--runs", "1", "--cache-dir", "", "--no-progress"]
    assert main(["eval", "--task", f"{tasks}:narrow", "--plan", str(plan), "--weights", str(weights),
                 "--json", str(rec), *common]) == 0
    assert [r["format"] for r in json.loads(rec.read_text())] == ["fp32", "abfp"]
    capsys.readouterr()
    # the weights and the plan of the narrow model, on the wide one: one clear line each
    assert main(["eval", "--task", f"{tasks}:wide", "--plan", str(plan), "--weights", str(weights), *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another architecture" in err[0] and "--plan" in err[0]
    p.info.pop("weights")
    handmade = tmp_path / "handmade.json"
    DevicePlan(p.base, {}, (), p.info).to_json(handmade)
    assert main(["eval", "--task", f"{tasks}:wide", "--plan", str(handmade), "--weights", str(weights), *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--weights" in err[0] and "weights of another architecture" in err[0]


def test_cli_tune_bias_correct(tmp_path: Path, capsys) -> None:
    """``--finetune bias-correct``: a finetune stage, weights that load with ``abfp eval --weights``."""
    tasks = tmp_path / "tasks.py"
    tasks.write_text(TASKS)
    plan = tmp_path / "out" / "plan.json"
    assert main(["tune", "--task", f"{tasks}:narrow", "--json", str(plan), "--calibration", "32", "--gain-samples",
                 "8", "--no-repeats", "--finetune", "bias-correct", "--finetune-samples", "16", "--no-progress"]) == 0
    assert "bias-correct: 2 modules corrected, on 16 calibration inputs" in capsys.readouterr().out
    p = DevicePlan.from_json(plan)
    assert [s["stage"] for s in p.info["stages"]] == ["single gain", "gain", "finetune"]
    weights = plan.with_suffix(".safetensors")
    changed = mlp(16)
    load_weights(changed, weights, p.info)
    assert not torch.equal(changed[2].bias, mlp(16)[2].bias) and torch.equal(changed[2].weight, mlp(16)[2].weight)
    assert main(["eval", "--task", f"{tasks}:narrow", "--plan", str(plan), "--weights", str(weights), "--runs", "1",
                 "--cache-dir", "", "--no-progress"]) == 0


@pytest.mark.parametrize("extra, msg", [
    (["--finetune-steps", "5"], "--finetune-steps goes with --finetune"),
    (["--finetune-loss", "kl"], "--finetune-loss goes with --finetune"),
    (["--finetune", "distil-qat", "--finetune-steps", "0"], "--finetune-steps must be >= 1"),
    (["--finetune", "distil-qat", "--finetune-batch-size", "0"], "--finetune-batch-size must be >= 1"),
    (["--finetune", "distil-qat", "--finetune-lr", "0"], "--finetune-lr must be > 0"),
    (["--finetune", "distil-qat", "--finetune-lr", "nan"], "--finetune-lr must be a finite number"),
    (["--finetune", "distil-qat", "--finetune-warmup", "5"], "--finetune-warmup goes with --finetune-schedule cosine"),
    (["--finetune", "distil-qat", "--finetune-schedule", "cosine", "--finetune-warmup", "100"],
     "--finetune-warmup must be >= 0 and below the steps (100), got 100"),
    (["--finetune", "distil-qat", "--finetune-schedule", "step"], "invalid choice"),
    (["--finetune-schedule", "cosine"], "--finetune-schedule goes with --finetune"),
    (["--finetune", "distil-qat", "--finetune-temperature", "0"], "--finetune-temperature must be > 0"),
    (["--finetune", "distil-qat", "--finetune-temperature", "inf"], "--finetune-temperature must be a finite number"),
    (["--finetune", "distil-qat", "--finetune-loss", "cosine", "--finetune-temperature", "2"],
     "--finetune-temperature goes with --finetune-loss kl"),
    (["--finetune", "distil-xyz"], "invalid choice"),
    (["--finetune", "distil-dnf", "--finetune-loss", "hinge"], "invalid choice"),
    (["--finetune-samples", "8"], "--finetune-samples goes with --finetune"),
    (["--finetune", "distil-qat", "--finetune-samples", "8"], "--finetune-samples goes with --finetune bias-correct"),
    (["--finetune", "bias-correct", "--finetune-steps", "5"], "--finetune-steps goes with --finetune distil-qat|distil-dnf"),
    (["--finetune", "bias-correct", "--finetune-samples", "0"], "--finetune-samples must be >= 1"),
    (["--gain-tolerance", "-0.1"], "--gain-tolerance must be >= 0"),
    (["--gain-tolerance", "inf"], "--gain-tolerance must be a finite number"),
    (["--gain-rule", "saturation", "--gain-tolerance", "0.2"], "--gain-tolerance goes with the error rule"),
    (["--calibration", "33"], "calibration data has 32 samples"),
])
def test_cli_tune_new_options_bad_input(tmp_path: Path, capsys, extra: list[str], msg: str) -> None:
    tasks = tmp_path / "tasks.py"
    tasks.write_text(TASKS)
    code = None
    try:
        code = main(["tune", "--task", f"{tasks}:narrow", "--json", str(tmp_path / "p.json"), "--no-progress", *extra])
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert msg in err[-1]
    assert not (tmp_path / "p.json").exists()
