"""DevicePlan JSON round trip and convert, abfp.tune stages, abfp tune / abfp eval --plan, bad input."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import abfp
from abfp import ABFPConfig, DevicePlan
from abfp.cli import main

TASK = textwrap.dedent('''
    import torch
    from torch import nn
    from abfp.zoo.base import Dataset, Task, COSINE

    def make():
        def build():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 6))
        def data():
            g = torch.Generator().manual_seed(1)
            return Dataset((torch.randn(48, 24, generator=g),))
        return Task("tiny", "tiny mlp", build, data, COSINE, default_batch_size=16)
''')


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 6))


def test_plan_round_trip_and_convert() -> None:
    base = ABFPConfig(gain=8.0)
    plan = DevicePlan(base, {"0": base.replace(gain=32.0, repeats=4), "2": base.replace(gain=2.0)})
    back = DevicePlan.from_json(plan.to_json())
    assert back.base == base and back.modules == plan.modules
    m = back.convert(tiny())
    st = abfp.analog_state(m)
    assert st.module_configs["0"].gain == 32.0 and st.module_configs["0"].repeats == 4
    assert st.module_configs["2"].gain == 2.0 and st.module_configs[""] == base
    assert plan.config_for("0") .repeats == 4 and plan.config_for("1") == base


def test_plan_bad_input() -> None:
    with pytest.raises(ValueError, match="not a device plan"):
        DevicePlan.from_json('{"base": {}}')
    with pytest.raises(ValueError, match="module '0'"):
        DevicePlan.from_json(json.dumps({"format": "abfp-device-plan/1", "base": {}, "modules": {"0": {"repeats": 0}}}))
    with pytest.raises(ValueError, match="does not have"):
        DevicePlan(ABFPConfig(), {"nope": ABFPConfig()}).convert(tiny())
    with pytest.raises(TypeError, match="ABFPConfig"):
        DevicePlan(ABFPConfig(), {"0": 3})  # type: ignore[dict-item]


def test_tune_api_stages_and_plan() -> None:
    x = torch.randn(48, 24, generator=torch.Generator().manual_seed(1))
    res = abfp.tune(tiny(), x, ABFPConfig(), target=0.99999, max_repeats=4, repeat_steps=3)
    assert [s.name for s in res.stages] == ["single gain", "gain", "repeats"]
    assert set(res.plan.modules) == {"0", "2"}
    assert all(s.energy > 0 for s in res.stages)
    # repeats only where the stage put them, and they cost energy
    if any(c.repeats > 1 for c in res.plan.modules.values()):
        assert res.stages[2].energy > res.stages[1].energy
    assert res.model is not None and DevicePlan.from_json(res.plan.to_json()).modules == res.plan.modules
    for bad, err in ((dict(config=ABFPConfig(repeats=2)), ValueError), (dict(config=ABFPConfig(mode="fixed")), ValueError),
                     (dict(gain_samples=0), ValueError), (dict(target=float("nan")), ValueError)):
        with pytest.raises(err):
            abfp.tune(tiny(), x, **bad)
    with pytest.raises(TypeError, match="nn.Module"):
        abfp.tune("model", x)  # type: ignore[arg-type]


def test_tune_with_a_label_metric_and_unlabelled_data_says_so_before_any_work() -> None:
    """A label metric (top-1 accuracy) with calibration or evaluation data that has no labels (a
    user task whose load_calibration holds inputs only) is refused up front, naming the data."""
    from abfp.zoo.base import TOP1

    x, y = torch.randn(48, 24, generator=torch.Generator().manual_seed(1)), torch.zeros(48, dtype=torch.long)
    with pytest.raises(ValueError, match="calibration data has none: give calibration_targets"):
        abfp.tune(tiny(), x, metric=TOP1)
    with pytest.raises(ValueError, match="evaluation data has none: give eval_targets"):
        abfp.tune(tiny(), x, metric=TOP1, calibration_targets=y, eval_inputs=x)


def tiny_tune_args(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """The tiny task written to ``tmp_path``, the plan path and a quick ``abfp tune`` command line."""
    task = tmp_path / "tasks.py"
    task.write_text(TASK)
    plan = tmp_path / "out" / "plan.json"
    return task, plan, ["tune", "--task", f"{task}:make", "--json", str(plan), "--calibration", "16",
                        "--gain-samples", "8", "--max-repeats", "2", "--no-progress"]


def test_cli_tune_then_eval_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    task, plan, args = tiny_tune_args(tmp_path)
    assert main(args) == 0
    names = ["plan.json", "plan.safetensors", "plan.report.md", "plan.png"]
    assert all((plan.parent / n).is_file() for n in names)
    p = DevicePlan.from_json(plan)
    assert set(p.modules) == {"0", "2"} and p.info["task"] == "tiny"
    assert "| gain |" in (plan.parent / "plan.report.md").read_text()
    # outputs exist: refused before any work without --force
    assert main(args) == 2
    assert "exists" in capsys.readouterr().err
    out = tmp_path / "rec.json"
    assert main(["eval", "--task", f"{task}:make", "--plan", str(plan), "--weights", str(plan.with_suffix(".safetensors")),
                 "--runs", "1", "--json", str(out), "--cache-dir", "", "--no-progress"]) == 0
    recs = json.loads(out.read_text())
    assert [r["format"] for r in recs] == ["fp32", "abfp"]
    assert recs[1]["value"] > 0.9
    # the record says it ran the plan (per-module gains), not the single-gain base device
    r = recs[1]
    assert r["gain"] == "plan" and r["plan_file"] == str(plan) and r["label"].startswith("plan plan.json (base ")
    assert r["gains"] == {m: c.gain for m, c in p.modules.items()}
    assert r["repeats"] == {m: c.repeats for m, c in p.modules.items()}
    assert r["plan_modules"]["0"] == p.modules["0"].to_dict(execution=True)
    assert " plan " in capsys.readouterr().out
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    lo, hi = min(r["gains"].values()), max(r["gains"].values())
    assert f"| plan ({lo:g}–{hi:g}) |" in (tmp_path / "rep" / "report.md").read_text()


def test_cli_tune_energy_rule(tmp_path: Path) -> None:
    task = tmp_path / "tasks.py"
    task.write_text(TASK)
    plan = tmp_path / "plan.json"
    assert main(["tune", "--task", f"{task}:make", "--json", str(plan), "--calibration", "16", "--gain-samples", "8",
                 "--gain-rule", "energy", "--gains-per-octave", "2", "--max-gain", "32", "--max-repeats", "2",
                 "--no-progress"]) == 0
    p = DevicePlan.from_json(plan)
    grid = {2.0 ** (j / 2) for j in range(11)}
    assert set(p.modules) == {"0", "2"} and p.base.gain == 8
    assert all(any(abs(c.gain - g) < 1e-9 for g in grid) and c.repeats in (1, 2) for c in p.modules.values())
    assert [s["stage"] for s in p.info["stages"]] == ["single gain", "gain"]


@pytest.mark.parametrize("extra, msg", [
    (["--plan", "missing.json"], "--plan: no such file"),
    (["--weights", "w.safetensors"], "--weights: no such file"),  # --weights alone is allowed (a finetuned model)
    (["--plan", "PLAN", "--gains", "4"], "--plan sets the device"),
    (["--plan", "BAD"], "--plan"),
    (["--plan", "PLAN", "--weights", "BAD"], "--weights"),
    (["--plan", "FIXED_BASE"], "its base device is in mode 'fixed'"),
    # a fixed-point module ran the float32 pass, then failed telling a command-line user to call abfp.calibrate
    (["--plan", "FIXED_MODULE"], "the device of module '0' is in mode 'fixed'"),
])
def test_cli_eval_plan_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], msg: str) -> None:
    good = tmp_path / "plan.json"
    DevicePlan(ABFPConfig()).to_json(good)
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "other"}')
    plans = {"FIXED_BASE": DevicePlan(ABFPConfig(mode="fixed")),
             "FIXED_MODULE": DevicePlan(ABFPConfig(), {"0": ABFPConfig(mode="fixed")})}
    for name, plan in plans.items():
        plan.to_json(tmp_path / f"{name}.json")
    extra = [str(good) if e == "PLAN" else str(bad) if e == "BAD" else str(tmp_path / f"{e}.json") if e in plans
             else str(tmp_path / e) if e.endswith((".json", ".safetensors")) else e for e in extra]
    assert main(["eval", "--task", "fashion-cnn", "--no-progress", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0]


@pytest.mark.parametrize("extra, msg", [
    (["--calibration", "0"], "--calibration must be >= 1"),
    (["--gains", "2,-1"], "--gains"),
    (["--gain-rule", "saturation", "--gains", "2"], "--gains"),
    (["--max-gain", "0.5"], "--max-gain"),
    (["--config", '{"repeats": 2}'], "repeats 1"),
    (["--calibration", "48"], "leave some to evaluate"),
    (["--gains-per-octave", "0"], "--gains-per-octave must be >= 1"),
    (["--gains-per-octave", "2", "--gains", "2,4"], "without --gains"),
    (["--gain-rule", "energy", "--gain-tolerance", "0.2"], "--gain-rule energy"),
    (["--gain-rule", "energy", "--gain-descent"], "--gain-rule energy"),
    (["--energy-budget", "1.5"], "--energy-budget goes with --gain-rule energy"),
    (["--refine", "2"], "--refine goes with --gain-rule energy"),
    (["--gain-rule", "energy", "--refine", "-1"], "--refine must be >= 0"),
    (["--gain-rule", "energy", "--refine", "2", "--refine-passes", "-1"], "--refine-passes must be >= 0"),
    (["--gain-rule", "energy", "--refine-passes", "2"], "go with --refine N"),
    (["--gain-rule", "energy", "--refine-fill"], "go with --refine N"),
    (["--gain-rule", "energy", "--refine-margin", "0.01"], "go with --refine N"),
    (["--gain-rule", "energy", "--refine", "2", "--refine-margin", "1"], "--refine-margin must be in [0, 1)"),
    (["--metric", "top1"], "has none; use agreement, kl or cosine"),
])
def test_cli_tune_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], msg: str) -> None:
    task = tmp_path / "tasks.py"
    task.write_text(TASK)
    assert main(["tune", "--task", f"{task}:make", "--json", str(tmp_path / "p.json"), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0]
    assert not (tmp_path / "p.json").exists()


def test_cli_tune_out_that_is_a_file_is_named_as_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    task, plan, argv = tiny_tune_args(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("keep")
    assert main([*argv, "--out", str(afile)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and "is a file, not a folder" in err[0] and "journal" not in err[0]
    assert afile.read_text() == "keep" and not plan.exists()


def test_cli_tune_default_calibration_fits_the_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--calibration``'s default (64) is an upper bound: a task without a calibration split
    gives at most half of its data, a smaller calibration split is used whole. An explicit
    value larger than what the task has is still refused before any work."""
    task = tmp_path / "tasks.py"
    task.write_text(TASK + textwrap.dedent('''
        def with_split():
            t = make()
            g = torch.Generator().manual_seed(2)
            return Task("tiny-split", "tiny mlp", t.build_model, t.load_data, COSINE, default_batch_size=16,
                        load_calibration=lambda: Dataset((torch.randn(20, 24, generator=g),)))
    '''))
    quick = ["--gain-samples", "8", "--max-repeats", "2", "--no-progress"]
    for fn, n_calib, n_eval in (("make", 24, 24), ("with_split", 20, 48)):
        plan = tmp_path / fn / "plan.json"
        assert main(["tune", "--task", f"{task}:{fn}", "--json", str(plan), *quick]) == 0
        info = DevicePlan.from_json(plan).info
        assert (info["calibration_samples"], info["eval_samples"]) == (n_calib, n_eval)
    assert main(["tune", "--task", f"{task}:with_split", "--json", str(tmp_path / "x.json"), "--calibration", "30",
                 *quick]) == 2
    assert "calibration data has 20 samples" in capsys.readouterr().err


def test_cli_tune_interrupted_says_how_to_continue_and_resume_finishes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in the repeats stage: the line told the user to rerun the same command, which a tune
    journal refuses; it names --resume, and --resume finishes from the journal."""
    import abfp.tune.api as api

    task, plan, args = tiny_tune_args(tmp_path)
    real = api.search_repeats

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "search_repeats", interrupt)
    assert main(args) == 130
    assert "rerun the same command with --resume" in capsys.readouterr().err
    assert not plan.exists() and (plan.parent / "plan.journal.json").is_file()
    assert main(args) == 2 and "--resume continues it" in capsys.readouterr().err
    monkeypatch.setattr(api, "search_repeats", real)
    chosen = []
    monkeypatch.setattr(api, "choose_gains", lambda *a, **k: chosen.append(1))  # finished: not chosen again
    assert main([*args, "--resume"]) == 0
    assert plan.is_file() and not chosen and not (plan.parent / "plan.journal.json").exists()


def test_cli_tune_damaged_journal_says_the_flag_that_starts_afresh(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A damaged journal told the user to 'start afresh without resume', which the command refuses
    for an unfinished journal; the line names --force, and --force starts afresh."""
    import abfp.tune.api as api

    task, plan, args = tiny_tune_args(tmp_path)

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "search_repeats", interrupt)
    assert main(args) == 130
    monkeypatch.undo()
    journal = plan.parent / "plan.journal.json"
    journal.write_text(journal.read_text()[:100])
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    assert "--force instead of --resume" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0 and plan.is_file()


@pytest.mark.parametrize("modules, msg", [({"3": ABFPConfig()}, "does not have"),
                                          ({"1": ABFPConfig(gain=2.0)}, "compute no product")])
def test_cli_eval_plan_that_does_not_apply_is_refused_before_the_float32_pass(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, modules, msg) -> None:
    """A plan naming a module the model lacks, or only a ReLU, was refused by convert after the
    float32 evaluation of the whole data (minutes on a large task); now before it."""
    (tmp_path / "tinytask_plan.py").write_text(TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    plan = tmp_path / "plan.json"
    DevicePlan(ABFPConfig(), modules).to_json(plan)
    import abfp.evaluate as ev
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: pytest.fail("evaluated before the plan was checked"))
    assert main(["eval", "--task", "tinytask_plan:make", "--no-progress", "--plan", str(plan)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--plan {plan}" in err[0] and msg in err[0]
    with pytest.raises(ValueError, match=msg):
        DevicePlan(ABFPConfig(), modules).check(tiny())


def test_cli_tune_metric_chooses_what_is_tuned_and_reported_first(tmp_path: Path) -> None:
    """``--metric kl`` tunes a task whose own metric is cosine on the KL of its outputs instead; the
    task's cosine is still reported beside it. The names are zoo.METRICS' keys."""
    from abfp import zoo
    from abfp.tune.cli import METRIC_CHOICES

    assert set(METRIC_CHOICES) == {"task", *zoo.METRICS}
    task = tmp_path / "tasks.py"
    task.write_text(TASK)
    quick = ["--calibration", "16", "--gain-samples", "8", "--no-repeats", "--no-progress"]
    stages = {}
    for choice in ("task", "kl"):
        plan = tmp_path / f"{choice}.json"
        assert main(["tune", "--task", f"{task}:make", "--json", str(plan), "--metric", choice, *quick]) == 0
        stages[choice] = DevicePlan.from_json(plan).info["stages"]
    assert DevicePlan.from_json(tmp_path / "kl.json").info["metric"] == "KL divergence to fp32"
    assert DevicePlan.from_json(tmp_path / "task.json").info["metric"] == "cosine similarity to fp32"
    # the error rule chooses gains by each layer's output error, whatever the metric: the same plans, so the
    # task's cosine reported beside the KL equals the cosine the default run reports
    for a, b in zip(stages["kl"], stages["task"]):
        assert a["extra"]["cosine similarity to fp32"] == pytest.approx(b["metric"], abs=1e-12)
