"""abfp.evaluate: records, noisy runs, resumable cache, auto gain, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import abfp
from abfp.evaluate import EvalSettings, build_grid, choose_gains, evaluate, format_table
from abfp.evaluate.grid import Point, parse_bits, parse_gain

sys.path.insert(0, str(Path(__file__).parent))
import tiny_task  # noqa: E402

KEYS = {"model", "format", "tile_width", "input_bits", "weight_bits", "output_bits", "gain", "noise_std",
        "metric", "value", "delta_vs_fp32", "seconds"}


def _run(points, **kw):
    t = tiny_task.make()
    return evaluate(t.build_model(), t.load_data(), t.metric, points, task_name="tiny",
                    settings=EvalSettings(progress=False, batch_size=32, **kw))


def test_records_have_the_documented_keys_and_noise_runs_are_averaged():
    pts = build_grid(tile_widths=(8,), gains=(1.0,), noise_stds=(0.0, 2.0))
    recs = _run(pts, runs=3)
    assert [r["format"] for r in recs] == ["fp32", "fixed", "fixed", "abfp", "abfp"]
    for r in recs:
        assert KEYS <= set(r)
    fp32 = recs[0]
    assert fp32["value"] == 100.0 and fp32["delta_vs_fp32"] == 0.0
    quiet, noisy = recs[3], recs[4]
    assert quiet["runs"] == 1 and noisy["runs"] == 3 and len(noisy["values"]) == 3
    assert noisy["std"] == pytest.approx(torch.tensor(noisy["values"], dtype=torch.float64).std().item())
    assert noisy["delta_vs_fp32"] == pytest.approx(noisy["value"] - 100.0)
    assert quiet["layers"] and {row["kind"] for row in quiet["layers"]} == {"conv", "linear"}
    assert "tiny" in format_table(recs)


@pytest.mark.parametrize("wrap", ["dict", "logits-key", "dataclass", "tuple"])
def test_models_returning_dicts_dataclasses_or_tuples_are_scored_on_their_first_output(wrap):
    """A model whose forward returns a dict (first value, or its ``logits``), a dataclass (first
    field) or a tuple is scored on that tensor: the same records as the bare model."""
    import dataclasses

    from torch import nn

    @dataclasses.dataclass
    class Out:
        scores: torch.Tensor
        extra: int = 0

    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            y = self.inner(x)
            return {"dict": lambda: {"scores": y, "aux": y.sum()}, "logits-key": lambda: {"aux": 1.0, "logits": y},
                    "dataclass": lambda: Out(y), "tuple": lambda: (y, None)}[wrap]()

    t = tiny_task.make()
    pts = build_grid(tile_widths=(8,), gains=(1.0,), noise_stds=(0.0,))
    settings = EvalSettings(progress=False, batch_size=32)
    bare = evaluate(t.build_model(), t.load_data(), t.metric, pts, task_name="tiny", settings=settings)
    got = evaluate(Wrapped(t.build_model()), t.load_data(), t.metric, pts, task_name="tiny", settings=settings)
    assert [r["value"] for r in got] == [r["value"] for r in bare]
    from abfp.evaluate.runner import _first_tensor

    with pytest.raises(TypeError, match="returned dict; evaluate needs a tensor"):
        _first_tensor({"a": 1})  # no tensor to score: named, not guessed


def test_seeded_runs_are_reproducible():
    pts = [Point("abfp", abfp.ABFPConfig(tile_width=8, gain=1.0, noise_std=3.0))]
    assert _run(pts, runs=2)[0]["values"] == _run(pts, runs=2)[0]["values"]


def test_cache_resumes_a_killed_sweep(tmp_path, monkeypatch):
    from abfp.evaluate import runner
    from abfp.evaluate.cache import RunCache

    cache = tmp_path / "c.sqlite"
    pts = build_grid(tile_widths=(8, 32), gains=(1.0, 4.0), noise_stds=(1.0,), fixed=False)
    # kill the sweep after a few runs: the 5th model pass (fp32 + 3 device runs done) is interrupted
    calls = {"n": 0}
    real_run_all = runner.run_all

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_run_all(*a, **k)

    monkeypatch.setattr(runner, "run_all", flaky)
    with pytest.raises(KeyboardInterrupt):
        _run(pts, runs=2, cache_path=str(cache))
    monkeypatch.setattr(runner, "run_all", real_run_all)
    with RunCache(cache) as c:
        assert len(c) == 3  # the finished runs survived, each committed on its own
    before = tiny_task.CALLS["forward"]
    full = _run(pts, runs=2, cache_path=str(cache))
    after_resume = tiny_task.CALLS["forward"] - before
    again_before = tiny_task.CALLS["forward"]
    again = _run(pts, runs=2, cache_path=str(cache))
    # a complete cache re-runs only the float32 reference
    assert tiny_task.CALLS["forward"] - again_before < after_resume
    assert [r["values"] for r in again] == [r["values"] for r in full]
    fresh = _run(pts, runs=2)
    assert [r["values"] for r in fresh] == [r["values"] for r in full]


def test_auto_gain_gives_short_reductions_larger_gains():
    t = tiny_task.make()
    x = t.load_data().inputs[0]  # the evaluator calibrates on (up to 256 of) the same samples
    gains = choose_gains(t.build_model(), (x,), abfp.ABFPConfig(tile_width=128, noise_std=0.0))
    assert gains["dw"] > gains["fc"] >= 1
    recs = _run([Point("abfp", abfp.ABFPConfig(tile_width=128, gain=1.0), auto_gain=True)], runs=1)
    assert recs[0]["gain"] == "auto" and recs[0]["gains"] == gains


def test_grid_parsing_and_errors():
    assert parse_bits("6/6/8") == (6, 6, 8) and parse_bits("888") == (8, 8, 8)
    assert parse_gain("auto") == "auto" and parse_gain("4") == 4.0
    for bad in ("8/8", "x/8/8"):
        with pytest.raises(ValueError):
            parse_bits(bad)
    for bad in ("0", "-1", "fast"):
        with pytest.raises(ValueError):
            parse_gain(bad)
    with pytest.raises(ValueError, match="runs"):
        _run([Point("fp32")], runs=0)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "abfp", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_cli_eval_writes_json_for_a_user_task_file(tmp_path):
    task = Path(__file__).parent / "tiny_task.py"
    out = tmp_path / "r.json"
    p = _cli("eval", "--task", f"{task}:make", "--tile-widths", "8,128", "--gains", "1,auto", "--runs", "2",
             "--json", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress")
    assert p.returncode == 0, p.stderr
    recs = json.loads(out.read_text())
    assert len(recs) == 1 + 1 + 4 and all(KEYS <= set(r) for r in recs)
    assert "tiny" in p.stdout


@pytest.mark.parametrize("args,msg", [
    (["eval", "--task", "no-such-model"], "unknown zoo task"),
    (["eval", "--task", "/no/such/file.py:make"], "no such file"),
    (["eval", "--gains", "0"], "gain"),
    (["eval", "--bits", "9/9"], "bits"),
    (["eval", "--bits", "1/8/8"], "weight_bits"),
    (["eval", "--tile-widths", "0"], "tile-widths"),
    (["eval", "--runs", "0"], "runs"),
    (["report", "/no/such.json"], "no such file"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, msg):
    p = _cli(*args)
    assert p.returncode == 2
    assert msg in p.stderr and "Traceback" not in p.stderr


def test_cache_keys_change_with_the_numerics_version(monkeypatch):
    import abfp.evaluate.cache as cache

    k1 = cache.run_key({"format": "abfp", "config": {"gain": 8}, "run": 0})
    monkeypatch.setattr(cache, "NUMERICS_VERSION", cache.NUMERICS_VERSION + 1)
    assert cache.run_key({"format": "abfp", "config": {"gain": 8}, "run": 0}) != k1


def test_a_nan_score_or_nan_outputs_are_refused_naming_the_sample_not_tabled():
    """An arg-max metric scores NaN outputs as some class, and a NaN score passes every comparison:
    both must stop the evaluation with the sample or the metric named, never reach the table."""
    from abfp.zoo.base import AGREEMENT, Dataset, Metric

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    x = torch.randn(6, 4)
    pts = [Point("fp32"), Point("abfp", abfp.ABFPConfig(tile_width=8, noise_std=0.0))]
    settings = EvalSettings(progress=False, runs=1, batch_size=4, layer_stats=False)
    nan_metric = Metric("broken", "fidelity", lambda out, tgt, ref: float("nan"))
    with pytest.raises(FloatingPointError, match="'broken' of model in float32 is nan"):
        evaluate(model, Dataset((x,)), nan_metric, pts[:1], settings=settings)
    bad = x.clone()
    bad[5, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="sample 5 is NaN.*input 0 holds NaN"):
        evaluate(model, Dataset((bad,)), AGREEMENT, pts, settings=settings)

    class LogHead(torch.nn.Module):  # a NaN made after the last product: the device cannot see it
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            return torch.log(self.fc(x))

    with pytest.raises(FloatingPointError, match="float32 model's output for sample 0 is NaN.*the model made it"):
        evaluate(LogHead().eval(), Dataset((x,)), AGREEMENT, pts, settings=settings)


def test_an_output_dataclass_with_logits_none_is_scored_on_its_hidden_state():
    """An output type with a ``logits`` field left None (a HF-style output of a base model) gave
    None to the metric, an AttributeError later; the tensor field it holds is scored."""
    import dataclasses

    from abfp.evaluate.runner import _first_tensor

    @dataclasses.dataclass
    class Out:
        loss: object = None
        logits: object = None
        last_hidden_state: object = None

    h = torch.ones(2, 3)
    assert _first_tensor(Out(last_hidden_state=h)) is h
    with pytest.raises(TypeError, match="returned Out"):
        _first_tensor(Out())


def test_a_model_that_is_not_float32_is_said_to_be_the_reference():
    """A Task's bfloat16 model was evaluated as is and its row labelled fp32 without a word."""
    import warnings

    from abfp.zoo.base import AGREEMENT, Dataset

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).to(torch.bfloat16).eval()
    settings = EvalSettings(progress=False, runs=1, batch_size=4, layer_stats=False)
    with pytest.warns(UserWarning, match="bfloat16 weights: the 'fp32' reference is this model in its own precision"):
        evaluate(model, Dataset((torch.randn(4, 4).bfloat16(),)), AGREEMENT, [Point("fp32")], settings=settings)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate(model.float(), Dataset((torch.randn(4, 4),)), AGREEMENT, [Point("fp32")], settings=settings)
