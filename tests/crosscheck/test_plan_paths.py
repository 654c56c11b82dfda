"""A plan's metric and energy through every path that reports them: ``abfp tune``'s stage table
(the plan JSON), ``abfp eval --plan --weights``, the plan converted and run by hand, and
``abfp.energy.account`` of the converted plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from abfp import DevicePlan
from abfp.cli import main
from abfp.energy import account
from abfp.evaluate.runner import reseed

TASK = str(Path(__file__).with_name("plan_task.py")) + ":make"
EVAL_SAMPLES = 32


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan")
    plan = out / "plan.json"
    # noise 2 LSB and a target the base device misses: the repeats stage puts k > 1 somewhere
    assert main(["tune", "--task", TASK, "--json", str(plan), "--calibration", "16", "--gain-samples", "8",
                 "--max-repeats", "4", "--eval-samples", str(EVAL_SAMPLES), "--config", json.dumps({"noise_std": 2.0}), "--target", "0.998",
                 "--no-progress", "--threads", "1"]) == 0
    return plan


def test_eval_plan_reports_the_tune_stage_metric(tuned, tmp_path, capsys):
    info = json.loads(tuned.read_text())["info"]
    last = info["stages"][-1]
    rec_path = tmp_path / "rec.json"
    assert main(["eval", "--task", TASK, "--plan", str(tuned), "--weights", str(tuned.with_suffix(".safetensors")),
                 "--samples", str(EVAL_SAMPLES), "--runs", "1", "--seed", "0", "--json", str(rec_path),
                 "--cache-dir", "", "--no-progress", "--threads", "1"]) == 0
    assert "tuned on the first" not in capsys.readouterr().out  # a calibration split: no overlap
    rec = json.loads(rec_path.read_text())[1]
    assert rec["samples"] == info["eval_samples"] == EVAL_SAMPLES
    assert rec["value"] == last["metric"] and rec["stderr"] == last["stderr"]
    assert rec["extra"] == last["extra"]
    assert rec["repeats"] == {m: c.get("repeats", 1) for m, c in json.loads(tuned.read_text())["modules"].items()}


def test_plan_converted_by_hand_gives_the_stage_metric_and_energy(tuned):
    from plan_task import make  # noqa: PLC0415  (the test folder is on sys.path)

    task = make()
    plan = DevicePlan.from_json(tuned)
    info = json.loads(tuned.read_text())["info"]
    data = task.load_data().take(EVAL_SAMPLES)
    model = task.build_model()
    with torch.no_grad():
        ref = model(data.inputs[0])
        m = plan.with_seed(0).convert(task.build_model())
        outs = []
        for i, (inputs, _) in enumerate(data.batches(task.default_batch_size)):
            reseed(m, i)  # the noise of batch i is (seed, i): abfp eval's and tune's batching
            outs.append(m(*inputs))
    assert task.metric(torch.cat(outs), data.targets, ref) == info["stages"][-1]["metric"]
    # the plan's energy per inference: abfp.energy.account of the converted plan on one calibration input
    x1 = task.load_calibration().inputs[0][:1]
    e = account(plan.convert(task.build_model()), x1, plan.base).totals()["energy_total"]
    assert e == pytest.approx(info["stages"][-1]["energy_pj"], rel=1e-12)
    assert {c.repeats for c in plan.modules.values()} - {1}, "the plan was meant to have repeats"
    assert e > info["stages"][0]["energy_pj"]


def test_eval_plan_says_when_it_scores_the_tuning_inputs(tmp_path, capsys):
    """A task without a calibration split: tune calibrates on its first samples and scores the
    stages on the rest; abfp eval --plan scores from sample 0, so its number is not the stage
    table's, and it says so (with a calibration split it says nothing: the test above)."""
    task = tmp_path / "nosplit.py"
    task.write_text(Path(__file__).with_name("plan_task.py").read_text().replace(
        ", load_calibration=lambda: Dataset((xc,))", ""))
    plan = tmp_path / "plan.json"
    assert main(["tune", "--task", f"{task}:make", "--json", str(plan), "--calibration", "16", "--gain-samples", "8",
                 "--no-repeats", "--no-progress", "--threads", "1"]) == 0
    info = json.loads(plan.read_text())["info"]
    assert info["calibration_source"].startswith("the first samples") and info["eval_samples"] == 24
    capsys.readouterr()
    assert main(["eval", "--task", f"{task}:make", "--plan", str(plan), "--runs", "1", "--cache-dir", "",
                 "--no-progress", "--threads", "1"]) == 0
    assert "tuned on the first 16 samples of this task's data" in capsys.readouterr().out


def test_abfp_energy_of_the_plan_is_the_stage_energy(tuned, tmp_path, capsys):
    """``abfp energy --plan`` (and, for the single-gain stage, ``abfp energy --config`` of the
    base device) gives the energies of ``abfp tune``'s stage table."""
    stages = json.loads(tuned.read_text())["info"]["stages"]
    for name, extra in (("plan", ["--plan", str(tuned)]), ("base", ["--config", json.dumps({"noise_std": 2.0})])):
        out = tmp_path / f"{name}.json"
        assert main(["energy", "--task", TASK, "--json", str(out), *extra]) == 0
        got = json.loads(out.read_text())["per_inference"]["energy_total"]
        want = stages[-1 if name == "plan" else 0]["energy_pj"]
        assert got == pytest.approx(want, rel=1e-12), name
    assert stages[-1]["energy_pj"] > stages[0]["energy_pj"]
    capsys.readouterr()
    assert main(["energy", "--task", TASK, "--plan", str(tuned), "--preset", "default"]) == 2
    assert "--plan sets the device" in capsys.readouterr().err
    assert main(["energy", "--task", TASK, "--plan", str(tmp_path / "none.json")]) == 2
    assert "no such file" in capsys.readouterr().err
