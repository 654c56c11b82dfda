"""Every argument of :func:`abfp.tune` and every field of its finetuning stages reaches the
journal's identity, or is in a commented allow-list of what cannot change a stage's result.

Generated from ``inspect.signature`` and ``dataclasses.fields``: an argument or field added later
fails here until it is keyed or allowed, so a resume never takes stages another setting made.
"""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
import torch
from torch import nn


import abfp.tune.api as api
from abfp import ABFPConfig
from abfp.tune.finetune import BiasCorrectStage, DistilStage

#: arguments keyed by the identity's own fields (model, data, metric, device), not by ``options``
IN_IDENTITY = {"model", "calibration_inputs", "calibration_targets", "eval_inputs", "eval_targets", "metric",
               "extra_metrics", "config"}
#: arguments that cannot change a stage's result
ALLOWED = {
    "progress": "progress lines",
    "journal": "where the journal is",
    "resume": "whether to continue it",
    "finetune_options": "keyed through options['finetune']: the stage's describe(), checked below",
}
#: finetuning stage fields that cannot change its result
STAGE_ALLOWED = {
    "progress": "a progress bar",
    "losses": "the losses of the last call (an output)",
    "report": "what the last call corrected (an output)",
    "checkpoint": "where the step checkpoint is (a resumed finetuning ends bit-identical)",
    "resume": "whether to continue the step checkpoint",
    "fresh_inputs": "keyed by sampler_identity when set (describe() adds it)",
}


class Stop(BaseException):
    pass


def test_every_tune_argument_is_in_the_journal_identity(monkeypatch, tmp_path):
    seen: dict[str, object] = {}

    def identity(model, calibration, evaluation, metric, extra_metrics, config, options):
        seen.update(options)
        raise Stop

    monkeypatch.setattr(api, "run_identity", identity)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(Stop):
        api.tune(model, torch.randn(16, 8), ABFPConfig(tile_width=8), journal=tmp_path / "j.json")
    params = set(inspect.signature(api.tune).parameters)
    missing = params - IN_IDENTITY - set(ALLOWED) - set(seen)
    assert not missing, f"tune arguments not in the journal identity: {sorted(missing)}"
    json.dumps(seen, sort_keys=True, default=str)  # what the identity writes


@pytest.mark.parametrize("stage", [DistilStage(fresh_inputs=lambda g, n: torch.zeros(n, 2)), BiasCorrectStage()],
                         ids=["distil", "bias-correct"])
def test_every_finetuning_stage_field_is_described_or_allowed(stage):
    """Each field is in describe() (some only when not at their default, so that journals of runs
    without them stay valid: the next test changes each one), or in STAGE_ALLOWED."""
    names = {f.name for f in dataclasses.fields(stage)} - set(STAGE_ALLOWED)
    described = set(stage.describe()) | set(OPTIONAL_WHEN_DEFAULT)
    assert names <= described, sorted(names - described)
    if isinstance(stage, DistilStage):
        assert "fresh_inputs" in stage.describe()  # a sampler in use is keyed


#: fields described only when they differ from their default (journals written before them stay valid)
OPTIONAL_WHEN_DEFAULT = {"schedule": "the lr schedule, when not constant", "warmup": "with a cosine schedule",
                         "feature_weight": "feature distillation, when on", "feature_modules": "with feature_weight > 0"}


@pytest.mark.parametrize("cls", [DistilStage, BiasCorrectStage])
def test_a_changed_stage_field_changes_the_description(cls):
    changes = {"steps": 7, "lr": 3e-5, "batch_size": 5, "loss": "cosine", "temperature": 2.0, "seed": 3,
               "samples": 9, "target": "local", "schedule": "cosine", "warmup": 5, "feature_weight": 0.5,
               "feature_modules": r"blocks\.\d+"}
    for f in dataclasses.fields(cls):
        if f.name in STAGE_ALLOWED or f.name == "method":
            continue
        assert f.name in changes, f"a new {cls.__name__} field {f.name!r}: add a changed value here"
        # warm-up shapes a cosine schedule; the feature modules, feature distillation
        base = cls(schedule="cosine") if f.name == "warmup" else cls(feature_weight=0.5) \
            if f.name == "feature_modules" else cls()
        assert dataclasses.replace(base, **{f.name: changes[f.name]}).describe() != base.describe(), f.name


def test_a_config_with_its_own_seed_runs_every_stage_at_it():
    """The gains ran at the config's own noise seed while every stage's metric ran at ``seed``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 6))
    x = torch.randn(32, 24, generator=torch.Generator().manual_seed(1))
    cfg = ABFPConfig(tile_width=8, noise_std=1.0)
    own = api.tune(model, x, cfg.replace(seed=4), target=0.999, max_repeats=2, repeat_steps=2)
    given = api.tune(model, x, cfg, target=0.999, max_repeats=2, repeat_steps=2, seed=4)
    assert [(s.name, s.metric, s.energy) for s in own.stages] == [(s.name, s.metric, s.energy) for s in given.stages]
