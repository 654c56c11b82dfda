"""The distillation losses against an independent float64 evaluation of their formulas."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from abfp.finetune import Distillation
from abfp.finetune.distillation import as_inputs, cosine_loss, kl_loss, mse_loss


def _kl_ref(s: torch.Tensor, t: torch.Tensor, temp: float) -> float:
    total = 0.0
    for si, ti in zip(s.double().tolist(), t.double().tolist()):
        zs = [v / temp for v in si]
        zt = [v / temp for v in ti]
        ms, mt = max(zs), max(zt)
        ls = math.log(sum(math.exp(v - ms) for v in zs)) + ms
        lt = math.log(sum(math.exp(v - mt) for v in zt)) + mt
        total += sum(math.exp(b - lt) * ((b - lt) - (a - ls)) for a, b in zip(zs, zt))
    return temp**2 * total / len(s)


def _cos_ref(s: torch.Tensor, t: torch.Tensor) -> float:
    out = 0.0
    for si, ti in zip(s.double().tolist(), t.double().tolist()):
        dot = sum(a * b for a, b in zip(si, ti))
        out += 1 - dot / (math.sqrt(sum(a * a for a in si)) * math.sqrt(sum(b * b for b in ti)))
    return out / len(s)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), c=st.integers(2, 9), temp=st.sampled_from([0.5, 1.0, 2.0, 4.0]), seed=st.integers(0, 10**6),
       scale=st.sampled_from([0.1, 1.0, 8.0]))
def test_losses_match_float64_formulas(n: int, c: int, temp: float, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    s = scale * torch.randn(n, c, generator=g, dtype=torch.float64)
    t = scale * torch.randn(n, c, generator=g, dtype=torch.float64)
    assert kl_loss(s, t, temp).item() == pytest.approx(_kl_ref(s, t, temp), rel=1e-9, abs=1e-12)
    assert Distillation("kl", temp)(s, t).item() == pytest.approx(_kl_ref(s, t, temp), rel=1e-9, abs=1e-12)
    assert cosine_loss(s, t).item() == pytest.approx(_cos_ref(s, t), rel=1e-9, abs=1e-12)
    mse = sum((a - b) ** 2 for a, b in zip(s.flatten().tolist(), t.flatten().tolist())) / s.numel()
    assert mse_loss(s, t).item() == pytest.approx(mse, rel=1e-12)
    assert Distillation("mse")(s, t).item() == pytest.approx(mse, rel=1e-12)


def test_losses_vanish_at_the_teacher_and_gradients_flow_to_the_student_only() -> None:
    t = torch.randn(4, 10, dtype=torch.float64)
    for d in (Distillation("kl", 2.0), Distillation("cosine"), Distillation("mse")):
        assert d(t.clone(), t).item() == pytest.approx(0.0, abs=1e-12)
        s = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
        teacher = t.clone().requires_grad_(True)
        d(s, teacher).backward()
        assert s.grad is not None and s.grad.abs().sum() > 0 and teacher.grad is None


def test_bad_distillation_arguments() -> None:
    with pytest.raises(ValueError, match="distillation loss"):
        Distillation("l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature"):
        Distillation("kl", 0.0)
    with pytest.raises(ValueError, match="temperature"):
        Distillation("kl", float("nan"))
    with pytest.raises(ValueError, match="temperature only applies"):
        Distillation("mse", 2.0)
    with pytest.raises(ValueError, match="shape"):
        Distillation("mse")(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="teacher"):
        Distillation("kl")(torch.zeros(2, 3), None)
    with pytest.raises(TypeError, match="inputs must be"):
        as_inputs([1, 2, 3])


def test_cross_entropy_refuses_regression_targets_and_keeps_indices_and_probabilities() -> None:
    """``F.cross_entropy`` takes float targets of the outputs' shape for class probabilities: a
    user's regression targets trained on a meaningless loss, silently (``abfp finetune --loss ce``)."""
    import torch.nn.functional as F

    from abfp.finetune.loop import cross_entropy

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, generator=g)
    with pytest.raises(ValueError, match="regression targets"):
        cross_entropy(logits, torch.randn(6, 3, generator=g))
    with pytest.raises(ValueError, match="not probabilities"):
        cross_entropy(logits, torch.randn(6, generator=g))  # float values, one per sample
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    assert torch.equal(cross_entropy(logits, labels), F.cross_entropy(logits, labels))
    probs = torch.softmax(torch.randn(6, 3, generator=g), -1)
    assert torch.equal(cross_entropy((logits, None), probs), F.cross_entropy(logits, probs))
