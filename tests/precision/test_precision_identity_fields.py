"""Every field of :class:`PrecisionSettings` is in the identity of ``abfp precision``'s journal
(generated from ``dataclasses.fields``: a field added later is keyed or this fails)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

import abfp.precision.experiment as experiment
from abfp.precision import PrecisionSettings, run_precision

sys.path.insert(0, str(Path(__file__).parent))
import tiny_precision_task  # noqa: E402


class Stop(BaseException):
    pass


def test_every_setting_is_in_the_journal_identity(monkeypatch, tmp_path):
    seen = {}

    def journal(path, identity, resume, **kw):
        seen.update(identity)
        raise Stop

    monkeypatch.setattr(experiment, "Journal", journal)
    with pytest.raises(Stop):
        run_precision(tiny_precision_task.make(), PrecisionSettings(noise="weight"), journal=tmp_path / "j.json")
    settings = json.loads(seen["settings"])
    assert {f.name for f in dataclasses.fields(PrecisionSettings)} <= set(settings)
    assert {"model", "evaluation", "training", "metric", "numerics"} <= set(seen)
