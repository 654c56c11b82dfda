"""``abfp eval``'s numbers against the model converted and run by hand: ``abfp.convert`` with
the record's device and the run's seed (``seed + run``), fixed point calibrated by
``abfp.calibrate`` on the evaluated batches, the noise of batch ``i`` reseeded to ``(seed, i)``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import abfp
from abfp.cli import main
from abfp.evaluate.runner import reseed

HERE = Path(__file__).resolve().parent
TASK = str(HERE.parent / "explore" / "explore_tiny_task.py") + ":make"


def test_eval_values_are_the_model_run_by_hand(tmp_path):
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("explore_tiny_task_ev", TASK.rsplit(":", 1)[0])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    task = mod.make()
    data = task.load_data()
    x = data.inputs[0]
    out = tmp_path / "rec.json"
    assert main(["eval", "--task", TASK, "--tile-widths", "8", "--gains", "2", "--bits", "8/8/6", "--runs", "2",
                 "--seed", "5", "--batch-size", "16", "--json", str(out), "--cache-dir", "", "--no-progress",
                 "--threads", "1"]) == 0
    recs = [r for r in json.loads(out.read_text()) if r["format"] != "fp32"]
    assert {r["format"] for r in recs} == {"fixed", "abfp"}
    with torch.no_grad():
        ref = task.build_model()(x)
    batches = [x[i:i + 16] for i in range(0, len(x), 16)]
    for r in recs:
        cfg = abfp.ABFPConfig.from_dict(r["config"])
        values = []
        for run in range(2):
            m = abfp.convert(task.build_model(), cfg, execution=abfp.ExecutionOptions(seed=5 + run))
            if r["format"] == "fixed":
                abfp.calibrate(m, [(b,) for b in batches])
            outs = []
            with torch.no_grad():
                for i, b in enumerate(batches):
                    reseed(m, i)
                    outs.append(m(b))
            values.append(task.metric(torch.cat(outs), data.targets, ref))
        assert values == r["values"], r["label"]
        assert len(set(values)) > 1 or r["format"] == "abfp"  # the runs' seeds differ (fixed point: visibly)
