"""Keeping the best weights by a held-out validation loss on the device (``validation=``,
``abfp finetune --validation-samples``): a run that over-fits or diverges ends no worse than it
began on held-out inputs; the choice survives a kill and ``--resume``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ft_tiny import TinyNet, make_data

import abfp
from abfp.cli import main
from abfp.finetune import dnf, qat
from abfp.finetune.selection import split_validation


def _device_ce(model: torch.nn.Module, data, config) -> float:
    """Cross entropy of ``model`` on the device, computed here without the finetuning code."""
    m = abfp.convert(model, config, inplace=False).eval()
    with torch.no_grad():
        return float(F.cross_entropy(m(*data.inputs), data.targets))


@pytest.mark.parametrize("method", ["qat", "dnf"])
def test_a_diverging_run_returns_the_starting_weights(method, tiny_model, tiny_eval, tiny_config) -> None:
    train, val = split_validation(make_data(256, 1), 64)
    kw = dict(steps=6, batch_size=64, progress=False, timing_steps=0, eval_data=tiny_eval, validation=val,
              validate_every=2)
    fn = qat
    if method == "dnf":
        fn = dnf
        kw.update(sampler="eager", calibration_samples=32)
    r = fn(tiny_model, train, tiny_config, lr=3.0, **kw)  # lr 3: every step makes it worse
    d = r.details
    assert [s for s, _ in d["validation_history"]] == [0, 2, 4, 6]
    assert d["selected_step"] == 0 and d["validation_loss"] < d["validation_loss_last"]
    for (name, a), b in zip(tiny_model.state_dict().items(), r.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert r.metric_after == r.metric_before
    # the recorded losses are the device's cross entropy of the weights, measured independently
    assert d["validation_history"][0][1] == pytest.approx(_device_ce(tiny_model, val, tiny_config), rel=1e-5)

    plain = fn(tiny_model, train, tiny_config, lr=3.0, **{**kw, "validation": None})
    assert plain.metric_after < r.metric_after  # without validation the diverged weights are returned


def test_a_converging_run_keeps_its_best_step(tiny_model, tiny_eval, tiny_config) -> None:
    train, val = split_validation(make_data(256, 1), 64)
    r = qat(tiny_model, train, tiny_config, lr=0.01, steps=6, batch_size=64, progress=False, timing_steps=0,
            eval_data=tiny_eval, validation=val, validate_every=3)
    hist = dict(r.details["validation_history"])
    best = r.details["selected_step"]
    assert best != 0 and hist[best] == min(hist.values()) and hist[best] < hist[0]
    assert _device_ce(r.model, val, tiny_config) == pytest.approx(hist[best], rel=1e-5)


class Killed(Exception):
    pass


def test_resume_chooses_as_the_uninterrupted_run(tmp_path: Path, tiny_model, tiny_eval, tiny_config) -> None:
    train, val = split_validation(make_data(256, 1), 64)
    kw = dict(steps=6, lr=0.3, batch_size=32, progress=False, timing_steps=0, eval_data=tiny_eval, validation=val,
              validate_every=2, checkpoint_every=2)
    full = qat(tiny_model, train, tiny_config, checkpoint=tmp_path / "a.safetensors", **kw)

    def kill(done: int, loss: float) -> None:
        if done == 5:
            raise Killed

    ck = tmp_path / "b.safetensors"
    with pytest.raises(Killed):
        qat(tiny_model, train, tiny_config, checkpoint=ck, callback=kill, **kw)
    resumed = qat(tiny_model, train, tiny_config, checkpoint=ck, resume=True, **kw)
    assert resumed.details["resumed_from"] == 4
    assert resumed.details["validation_history"] == full.details["validation_history"]
    assert resumed.details["selected_step"] == full.details["selected_step"]
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    # other validation data is another run: refused
    _, other = split_validation(make_data(256, 1), 32)
    with pytest.raises(ValueError, match="settings.validation: .*other held-out inputs: --validation-samples"):
        qat(tiny_model, train, tiny_config, checkpoint=ck, resume=True, **{**kw, "validation": other})


def test_validation_needs_targets(tiny_model, tiny_config) -> None:
    train, val = split_validation(make_data(256, 1), 64)
    with pytest.raises(ValueError, match="validation data without targets"):
        qat(tiny_model, train, tiny_config, lr=0.01, steps=1, batch_size=64, progress=False,
            validation=abfp.zoo.Dataset(val.inputs))


TINY = "tests/evaluate/tiny_task.py:make"  # 96 labelled samples, no calibration split


def test_cli_holds_out_a_fifth_and_says_what_it_kept(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    root = __file__.rsplit("/tests/", 1)[0]
    out = tmp_path / "r.json"
    code = main(["finetune", "--task", f"{root}/{TINY}", "--method", "qat", "--loss", "ce", "--lr", "3",
                 "--steps", "4", "--batch-size", "16", "--validate-every", "2", "--json", str(out),
                 "--checkpoint", "", "--no-progress", "--threads", "1"])
    assert code == 0
    rec = json.loads(out.read_text())
    # 48 training samples (the first half): 9 held out, 39 trained on
    assert rec["train_samples"] == 39 and rec["validation_samples"] == 9
    assert [s for s, _ in rec["validation_history"]] == [0, 2, 4]
    losses = dict(rec["validation_history"])
    best = min(losses, key=lambda k: (losses[k], k))  # the lowest, the earliest on a tie
    assert rec["selected_step"] == best
    kept = {0: "the starting weights", 4: "the last step's weights"}.get(best, f"the weights of step {best}")
    assert f"kept {kept}" in capsys.readouterr().out

