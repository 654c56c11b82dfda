"""Resumable ``abfp tune``: a journal of finished stages (abfp.tune.journal). A resumed run equals
an uninterrupted one, does not recompute finished stages, and refuses another run's journal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import abfp
import abfp.tune.api as api
from abfp import ABFPConfig
from abfp.cli import main
from abfp.tune.finetune import DistilStage
from abfp.tune.journal import JournalMismatch
from abfp.tune.provenance import weights_digest

from test_tune_plan_cli import tiny_tune_args


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 6))


X = torch.randn(48, 24, generator=torch.Generator().manual_seed(1))
OPTIONS = dict(target=0.9995, gain_descent=True, max_repeats=4, finetune="distil-qat",
               finetune_options={"steps": 3, "batch_size": 16, "lr": 1e-3}, eval_inputs=X[32:])


def _run(**kw):
    return abfp.tune(_mlp(), X[:32], ABFPConfig(tile_width=8), **{**OPTIONS, **kw})


def _summary(res) -> tuple:
    return ([(s.name, s.metric, s.energy, s.note) for s in res.stages], res.plan.to_dict()["modules"],
            weights_digest(res.model.state_dict()))


class Killed(BaseException):
    pass


def test_resumed_run_equals_the_uninterrupted_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = _summary(_run())
    journal = tmp_path / "j.json"

    def killed(self, *a, **k):
        raise Killed  # the process dies inside the finetuning stage

    with monkeypatch.context() as m:
        m.setattr(DistilStage, "__call__", killed)
        with pytest.raises(Killed):
            _run(journal=journal)
    kept = json.loads(journal.read_text())["records"]
    assert set(kept) == {"single gain", "gain", "gain descent", "repeats"}

    def recomputed(*a, **k):
        raise AssertionError("a finished stage was computed again")

    with monkeypatch.context() as m:  # the finished stages come from the journal
        for name in ("choose_gains", "descend_gains", "search_repeats"):
            m.setattr(api, name, recomputed)
        res = _run(journal=journal, resume=True)
    assert _summary(res) == whole
    assert set(json.loads(journal.read_text())["records"]) == {*kept, "finetune"}
    # all five stages finished: a second resume computes nothing, the finetuned weights come from the journal
    with monkeypatch.context() as m:
        m.setattr(DistilStage, "__call__", killed)
        assert _summary(_run(journal=journal, resume=True)) == whole


def test_another_runs_journal_is_refused(tmp_path: Path) -> None:
    journal = tmp_path / "j.json"
    _run(journal=journal, finetune=None, finetune_options=None)
    # the refusal names the option that differs, with its value then and now
    with pytest.raises(JournalMismatch, match=r"its options \(target: [0-9.e-]+ -> 0\.999\) differ"):
        _run(journal=journal, resume=True, finetune=None, finetune_options=None, target=0.999)
    changed = _mlp()
    with torch.no_grad():
        changed[0].weight[0, 0] += 1e-3
    with pytest.raises(JournalMismatch, match="its model differ"):
        abfp.tune(changed, X[:32], ABFPConfig(tile_width=8), journal=journal, resume=True,
                  **{**OPTIONS, "finetune": None, "finetune_options": None})
    with pytest.raises(JournalMismatch, match="calibration, evaluation differ"):
        abfp.tune(_mlp(), X[:31], ABFPConfig(tile_width=8), journal=journal, resume=True,
                  **{**OPTIONS, "finetune": None, "finetune_options": None, "eval_inputs": X[31:]})
    # without resume the journal is started afresh
    _run(journal=journal, finetune=None, finetune_options=None, target=0.999)
    journal.write_text("{not json")
    with pytest.raises(JournalMismatch, match="damaged"):
        _run(journal=journal, resume=True)


def test_cli_journal_refuse_resume_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, plan, args = tiny_tune_args(tmp_path)
    journal = plan.parent / "plan.journal.json"
    assert main([*args, "--resume"]) == 0  # no journal: starts from the beginning, and says so
    assert f"--resume: no journal at {journal}, nothing to continue" in capsys.readouterr().err
    assert not journal.exists()  # a finished run leaves no journal
    plan.unlink()
    journal.write_text("{}")  # a killed run's journal
    assert main(args) == 2
    assert "holds an unfinished run: --resume continues it, --force starts afresh" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 2  # not this run's: refused, named
    assert "--resume: tune journal" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0 and plan.is_file() and not journal.exists()


def test_journal_refusal_names_the_keys_that_differ() -> None:
    from abfp.journal import _describe
    assert _describe("model", "abc", "abd") == "model"  # not JSON: the field alone
    assert _describe("options", json.dumps({"a": 1, "b": 2}), json.dumps({"a": 1, "b": 3, "c": [1]})) == \
        "options (b: 2 -> 3; c: (absent) -> [1])"
    many = _describe("config", json.dumps({f"k{i}": i for i in range(8)}), json.dumps({f"k{i}": -i - 1 for i in range(8)}))
    assert many.startswith("config (k0: 0 -> -1; k1: 1 -> -2;") and many.endswith("; ...)")
