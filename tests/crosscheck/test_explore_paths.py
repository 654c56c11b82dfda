"""An explored design's metric and energy through every path that reports them: ``abfp explore``
(``abfp.explore``), ``abfp eval`` of that design's device (``--config``/``--bits``, or
``--plan`` for a per-layer-gain design), and ``abfp.energy.account`` of the converted model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import abfp
from abfp import ABFPConfig, DevicePlan
from abfp.cli import main
from abfp.energy import account

HERE = Path(__file__).resolve().parent
TASK = str(HERE.parent / "explore" / "explore_tiny_task.py") + ":make"
RUNS = 2


@pytest.fixture(scope="module")
def explored():
    return abfp.explore(TASK, formats=("fixed", "abfp"), tile_widths=(8,), gains=(2,), auto_gain=True,
                        adc_bits=(4, 8), dac_search="none", runs=RUNS, energy_samples=3, progress=False)


def _task():
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("explore_tiny_task_cc", TASK.rsplit(":", 1)[0])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod.make()


def _config(d) -> ABFPConfig:
    return ABFPConfig(mode=d["format"], tile_width=d["tile_width"], input_bits=d["input_bits"],
                      weight_bits=d["weight_bits"], output_bits=d["output_bits"],
                      gain=1.0 if d["gain"] == "auto" else d["gain"], noise_std=d["noise_std"])


def _eval(tmp_path: Path, name: str, args: list[str]) -> list[dict]:
    out = tmp_path / f"rec-{name}.json"
    assert main(["eval", "--task", TASK, "--runs", str(RUNS), "--seed", "0", "--json", str(out), "--cache-dir", "",
                 "--no-progress", "--threads", "1", *args]) == 0
    return [r for r in json.loads(out.read_text()) if r["format"] != "fp32"]


def test_explore_values_are_abfp_eval_values(explored, tmp_path):
    designs = explored["designs"]
    assert {d["family"] for d in designs} == {"fixed-n8", "abfp-n8", "abfp-n8-auto"}
    checked = 0
    for fmt, fam in (("fixed", "fixed-n8"), ("abfp", "abfp-n8")):
        ds = [d for d in designs if d["family"] == fam]
        bits = ",".join(sorted({f"{d['weight_bits']}/{d['input_bits']}/{d['output_bits']}" for d in ds}))
        recs = _eval(tmp_path, fam, ["--config", json.dumps({"mode": fmt, "tile_width": 8}), "--tile-widths", "8",
                                     "--gains", "1" if fmt == "fixed" else "2", "--bits", bits,
                                     *(["--no-fixed"] if fmt == "abfp" else [])])  # a fixed base has no baseline
        by_bits = {(r["weight_bits"], r["input_bits"], r["output_bits"]): r for r in recs}
        for d in ds:
            r = by_bits[(d["weight_bits"], d["input_bits"], d["output_bits"])]
            assert (r["format"], r["tile_width"], r["gain"]) == (fmt, 8, d["gain"])
            assert (r["value"], r["std"], r["values"]) == (d["value"], d["std"], d["values"]), d
            checked += 1
    # a per-layer-gain design is the plan of its gains
    for d in [d for d in designs if d["family"] == "abfp-n8-auto"][:2]:
        cfg = _config(d)
        plan = tmp_path / f"auto{d['output_bits']}.json"
        DevicePlan(cfg, {m: cfg.replace(gain=g) for m, g in d["gains"].items()}).to_json(plan)
        (r,) = _eval(tmp_path, plan.stem, ["--plan", str(plan)])
        assert (r["value"], r["std"], r["values"]) == (d["value"], d["std"], d["values"]), d
        checked += 1
    assert checked >= 5


def test_explore_energies_are_abfp_energy_accounts(explored):
    task = _task()
    x = task.load_data().inputs[0][:3]  # energy_samples=3
    for d in explored["designs"]:
        cfg = _config(d)
        model = task.build_model()
        if d["gain"] == "auto":
            model = abfp.convert(model, cfg, overrides={m: cfg.replace(gain=g) for m, g in d["gains"].items()})
        t = account(model, x, cfg).totals()
        assert d["energy_pj_per_inference"] == pytest.approx(t["energy_total"], rel=1e-12), d
        assert d["adc_energy_pj_per_inference"] == pytest.approx(t["energy_adc"], rel=1e-12), d
        assert d["energy_by_kind_pj"] == pytest.approx({k: t[f"energy_{k}"] for k in ("analog", "dac", "adc", "digital")},
                                                       rel=1e-12)
