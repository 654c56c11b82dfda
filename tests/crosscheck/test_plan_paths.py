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


def test_eval_plan_reports_the_tune_stage_metric(tuned, tmp_path):
    info = json.loads(tuned.read_text())["info"]
    last = info["stages"][-1]
    rec_path = tmp_path / "rec.json"
    assert main(["eval", "--task", TASK, "--plan", str(tuned), "--weights", str(tuned.with_suffix(".safetensors")),
                 "--samples", str(EVAL_SAMPLES), "--runs", "1", "--seed", "0", "--json", str(rec_path),
                 "--cache-dir", "", "--no-progress", "--threads", "1"]) == 0
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
