"""Every finetuning setting a checkpoint's resume depends on is in its provenance.

Generated from ``dataclasses.fields(TrainSettings)``: a field is either in
:meth:`TrainSettings.fingerprint`, keyed elsewhere in :func:`produced_by` (named below), or in a
commented allow-list of what cannot change the trained weights. A field added later fails here.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from abfp import ABFPConfig
from abfp.finetune.loop import TrainSettings
from abfp.zoo.base import Dataset

#: keyed by produced_by outside ``settings``
ELSEWHERE = {"loss_fn": "produced_by's 'loss'", "distillation": "produced_by's 'loss' and 'teacher'"}
#: what cannot change the trained weights
ALLOWED = {
    "steps": "a checkpoint may be continued to more steps (documented)",
    "eval_data": "evaluation after training", "metric": "evaluation after training",
    "eval_batch_size": "evaluation after training",
    "checkpoint": "where the checkpoint is", "checkpoint_every": "how often it is written (resumes are bit-identical)",
    "resume": "whether to continue it", "progress": "a progress bar",
    "timing_steps": "timing of steps", "timing_every": "timing of steps",
    "callback": "called with each step's loss", "desc": "a progress label",
}


def test_every_training_setting_is_in_the_checkpoint_provenance():
    # every optional part set (overrides, fresh inputs, a schedule, validation: keyed only when set, so that
    # checkpoints written before them stay valid)
    s = TrainSettings(steps=4, lr=1e-3, batch_size=2, overrides={"fc": ABFPConfig()},
                      sample_inputs=lambda g, n: None, lr_schedule="cosine", warmup=1,
                      validation=Dataset((torch.zeros(2, 1),), torch.zeros(2)))
    keyed = set(s.fingerprint())
    names = {f.name for f in dataclasses.fields(TrainSettings)}
    missing = names - keyed - set(ELSEWHERE) - set(ALLOWED)
    assert not missing, f"TrainSettings fields in no checkpoint provenance: {sorted(missing)}"


@pytest.mark.parametrize("change", [{"kernel": "reference"}, {"gain": 2.0}])
def test_an_override_devices_kernel_and_fields_are_in_the_provenance(change):
    """A plan's override run with kernel='reference' (other float rounding) resumed a checkpoint
    written with the fast path: the override's execution options were not recorded."""
    def fp(cfg):
        return TrainSettings(steps=1, lr=1e-3, batch_size=2, overrides={"fc": cfg}).fingerprint()

    assert fp(ABFPConfig().replace(**change)) != fp(ABFPConfig())
    # default execution options: the provenance written before is unchanged
    assert fp(ABFPConfig())["overrides"]["fc"] == ABFPConfig().to_dict()
