"""A lower-is-better metric (KL divergence, MSE): a finetuning run that lowers it *recovered*
a positive amount; ``abfp finetune`` printed ``-0.03 points`` for a KL that fell from 0.05 to 0.02."""

from __future__ import annotations

import pytest
import torch

from abfp.finetune import qat
from abfp.finetune.cli import _gain_text
from abfp.finetune.loop import FinetuneResult
from abfp.zoo.base import KL


def _result(before: float, after: float, fp32: float, higher_is_better: bool) -> FinetuneResult:
    return FinetuneResult("qat", fp32, before, after, 1, None, 0.0, None, model=torch.nn.Identity(),
                          higher_is_better=higher_is_better)


def test_recovered_is_positive_when_a_lower_is_better_metric_falls() -> None:
    r = _result(before=0.05, after=0.02, fp32=0.0, higher_is_better=False)
    assert r.recovered == pytest.approx(0.03) and r.recovered_fraction == pytest.approx(0.6)
    assert r.to_dict()["recovered"] == pytest.approx(0.03)
    worse = _result(before=0.05, after=0.07, fp32=0.0, higher_is_better=False)
    assert worse.recovered == pytest.approx(-0.02) and worse.recovered_fraction == pytest.approx(-0.4)
    up = _result(before=80.0, after=85.0, fp32=90.0, higher_is_better=True)  # unchanged for accuracy
    assert up.recovered == pytest.approx(5.0) and up.recovered_fraction == pytest.approx(0.5)


def test_the_run_records_its_metrics_direction(tiny_model, tiny_train, tiny_eval, tiny_config) -> None:
    r = qat(tiny_model, tiny_train, tiny_config, steps=2, lr=0.01, batch_size=64, progress=False, timing_steps=0,
            eval_data=tiny_eval, metric=KL)
    assert r.higher_is_better is False and r.to_dict()["higher_is_better"] is False
    assert r.recovered == pytest.approx(r.metric_before - r.metric_after)


def test_the_summary_line_says_better_or_worse() -> None:
    assert _gain_text(0.03, "nats") == "better by 0.03" and _gain_text(-0.02, "") == "worse by 0.02"
    assert _gain_text(1.25, "%") == "+1.25 points" and _gain_text(None, "%") == "-"
