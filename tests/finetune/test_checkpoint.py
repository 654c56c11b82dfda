"""Checkpoints: a run killed after a checkpoint and resumed ends exactly where an uninterrupted run does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ft_tiny import TinyNet

from abfp.finetune import dnf, qat
from abfp.finetune.checkpoint import load_checkpoint


class Killed(Exception):
    pass


def _kill_at(step: int):
    def callback(done: int, loss: float) -> None:
        if done == step:
            raise Killed

    return callback


@pytest.mark.parametrize("method", ["qat", "dnf"])
def test_resume_equals_uninterrupted(method, tmp_path: Path, tiny_train, tiny_eval, tiny_config) -> None:
    model = TinyNet(dropout=0.2).eval()  # dropout: the global RNG state must be restored too
    fn = qat if method == "qat" else dnf
    kw = dict(steps=7, lr=0.01, batch_size=64, checkpoint_every=3, progress=False, timing_steps=1, timing_every=2,
              eval_data=tiny_eval)  # 256 samples / 64: the run crosses an epoch boundary
    if method == "dnf":
        kw.update(sampler="eager", calibration_samples=32, refresh_every=2)

    full = fn(model, tiny_train, tiny_config, checkpoint=tmp_path / "a.safetensors", **kw)

    ckpt = tmp_path / "b.safetensors"
    with pytest.raises(Killed):
        fn(model, tiny_train, tiny_config, checkpoint=ckpt, callback=_kill_at(5), **kw)
    tensors, meta = load_checkpoint(ckpt)
    assert meta["step"] == 3 and "rng.torch" in tensors and any(k.startswith("optim.") for k in tensors)
    if method == "dnf":
        assert any(k.startswith("dnf.") for k in tensors)
    resumed = fn(model, tiny_train, tiny_config, checkpoint=ckpt, resume=True, **kw)

    assert resumed.details["resumed_from"] == 3
    assert resumed.losses == full.losses
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.metric_after == full.metric_after and resumed.metric_before == full.metric_before
    final_a, _ = load_checkpoint(tmp_path / "a.safetensors")
    final_b, meta_b = load_checkpoint(ckpt)
    assert meta_b["step"] == 7
    assert final_a.keys() == final_b.keys()
    for k in final_a:
        assert torch.equal(final_a[k], final_b[k]), k


def test_resume_refuses_other_settings(tmp_path: Path, tiny_model, tiny_train, tiny_config) -> None:
    ckpt = tmp_path / "c.safetensors"
    kw = dict(steps=2, batch_size=32, progress=False, timing_steps=0, checkpoint=ckpt)
    qat(tiny_model, tiny_train, tiny_config, lr=0.01, **kw)
    with pytest.raises(ValueError, match="lr"):
        qat(tiny_model, tiny_train, tiny_config, lr=0.02, resume=True, **kw)
    with pytest.raises(ValueError, match="method"):
        dnf(tiny_model, tiny_train, tiny_config, lr=0.01, resume=True, sampler="eager", **kw)
    # more steps than the checkpoint: continues; without resume: starts again
    r = qat(tiny_model, tiny_train, tiny_config, lr=0.01, resume=True, **{**kw, "steps": 3})
    assert r.details["resumed_from"] == 2 and len(r.losses) == 3
