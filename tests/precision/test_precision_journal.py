"""Resumable ``abfp precision``: a journal of every search evaluation and the learned energies.
A resumed run equals an uninterrupted one without evaluating again; another run's journal is refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import abfp.precision.experiment as experiment
from abfp.cli import main
from abfp.journal import JournalMismatch
from abfp.precision import PrecisionSettings, run_precision

sys.path.insert(0, str(Path(__file__).parent))
import tiny_precision_task  # noqa: E402

SETTINGS = dict(noise="weight", steps=20, batch_size=16, final_seeds=1, rel_tol=0.1, target_drop=10.0,
                start_energy=1.0, lr=0.05)


class Killed(BaseException):
    pass


real_run_model = experiment.run_model


def _numbers(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("seconds", "learning")} | {"history": r["learning"]["history"]}


def test_resumed_run_equals_the_uninterrupted_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task = tiny_precision_task.make()
    whole = run_precision(task, PrecisionSettings(**SETTINGS))
    journal = tmp_path / "p.journal.json"
    real = experiment.search_min_energy
    calls = {"n": 0}

    def dies_in_the_second_search(fn, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the process dies during the learned allocation's search
            fn(k["start"])
            raise Killed
        return real(fn, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(experiment, "search_min_energy", dies_in_the_second_search)
        with pytest.raises(Killed):
            run_precision(task, PrecisionSettings(**SETTINGS), journal=journal)
    kept = json.loads(journal.read_text())["records"]
    assert "learned" in kept and any(k.startswith("uniform E=") for k in kept)
    assert sum(k.startswith("learned E_mean=") for k in kept) == 1
    assert (tmp_path / "p.journal.learned.safetensors").is_file()

    def no_learning(*a, **k):
        raise AssertionError("the energies were learned again")

    evaluated = []
    with monkeypatch.context() as m:
        m.setattr(experiment, "learn_energies", no_learning)
        m.setattr(experiment, "run_model", lambda *a, **k: evaluated.append(1) or real_run_model(*a, **k))
        resumed = run_precision(task, PrecisionSettings(**SETTINGS), journal=journal, resume=True)
    assert _numbers(resumed) == _numbers(whole)
    # only the learned search's evaluations after the first, and its final seed, ran again (plus the float32 reference)
    n_learned = len(whole["search"]["learned"])
    assert len(evaluated) == 1 + (n_learned - 1) + 1


def test_another_runs_journal_is_refused(tmp_path: Path) -> None:
    task = tiny_precision_task.make()
    journal = tmp_path / "p.journal.json"
    run_precision(task, PrecisionSettings(**SETTINGS), journal=journal)
    with pytest.raises(JournalMismatch, match=r"its settings \(lr: 0\.05 -> 0\.1\) differ"):
        run_precision(task, PrecisionSettings(**{**SETTINGS, "lr": 0.1}), journal=journal, resume=True)


def test_cli_journal_refuse_resume_finish(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    journal = tmp_path / "r.journal.json"
    argv = ["precision", "--task", "tiny_precision_task:make", "--noise", "shot", "--steps", "5", "--batch-size",
            "16", "--target-drop", "20", "--rel-tol", "0.2", "--json", str(out), "--quiet"]
    journal.write_text("{}")  # a killed run's journal
    assert main(argv) == 2
    assert "holds an unfinished run: --resume continues it, --force starts afresh" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--resume: precision journal" in err and "is damaged" in err
    assert main([*argv, "--force"]) == 0
    assert out.is_file() and not journal.exists() and not (tmp_path / "r.journal.learned.safetensors").exists()


def test_labels_the_learning_cannot_use_are_refused_before_a_journal_is_started(tmp_path: Path) -> None:
    """Regression targets reached F.cross_entropy mid-run (a model returning a tuple, a raw torch
    error) and unlabelled data was refused after the journal was written, so the next run was
    told it 'holds an unfinished run'. Both are refused first, leaving nothing behind."""
    import dataclasses

    import torch

    from abfp.zoo.base import COSINE, Dataset

    base = tiny_precision_task.make()
    x = base.load_data().inputs[0]
    model = base.build_model()
    with torch.no_grad():
        y = model(x) + 0.5  # regression targets of the outputs' shape

    class Pair(torch.nn.Module):  # returns (outputs, features): scored on its first tensor
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x), x

    tuple_out = Pair().eval()
    for task, message in ((dataclasses.replace(base, load_data=lambda: Dataset((x,), y), metric=COSINE),
                           "regression targets"),
                          (dataclasses.replace(base, build_model=lambda: tuple_out, load_data=lambda: Dataset((x,), y),
                                               metric=COSINE), "regression targets"),
                          (dataclasses.replace(base, load_data=lambda: Dataset((x,)), metric=COSINE),
                           "needs labelled training data")):
        journal = tmp_path / "p.journal.json"
        with pytest.raises(ValueError, match=message) as err:
            run_precision(task, PrecisionSettings(**SETTINGS), journal=journal)
        assert "distillation" not in str(err.value)  # finetuning's advice: precision has no such option
        assert not journal.exists()
