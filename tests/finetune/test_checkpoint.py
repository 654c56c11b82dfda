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


def test_resume_refuses_other_model_data_or_threads(tmp_path: Path, tiny_train, tiny_config) -> None:
    """A checkpoint knows the starting model, the training data and the thread count that produced it."""
    ckpt = tmp_path / "d.safetensors"
    kw = dict(steps=3, lr=0.01, batch_size=32, progress=False, timing_steps=0, checkpoint=ckpt)
    qat(TinyNet(), tiny_train, tiny_config, **{**kw, "steps": 2})
    other = TinyNet()
    with torch.no_grad():
        other.fc.bias[0] += 1e-3  # the same structure, one weight changed
    with pytest.raises(ValueError, match="model"):
        qat(other, tiny_train, tiny_config, resume=True, **kw)
    x = tiny_train.inputs[0].clone()
    x[0, 0, 0, 0] += 1.0  # the same number of samples, one pixel changed
    with pytest.raises(ValueError, match="train_data"):
        qat(TinyNet(), type(tiny_train)((x,), tiny_train.targets), tiny_config, resume=True, **kw)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        with pytest.raises(ValueError, match="threads: checkpoint"):
            qat(TinyNet(), tiny_train, tiny_config, resume=True, **kw)
    finally:
        torch.set_num_threads(threads)
    assert qat(TinyNet(), tiny_train, tiny_config, resume=True, **kw).details["resumed_from"] == 2


def test_resume_refuses_edited_user_code_of_the_model_or_the_loss(tmp_path: Path, tiny_train, tiny_config) -> None:
    """The checkpoint knew the starting weights and the loss function's name only: a model whose
    forward was edited, or a loss edited under the same name, was resumed and trained on."""
    ckpt = tmp_path / "e.safetensors"
    kw = dict(steps=3, lr=0.01, batch_size=32, progress=False, timing_steps=0, checkpoint=ckpt)

    def loss(out, tgt):
        return torch.nn.functional.cross_entropy(out, tgt)

    qat(TinyNet(), tiny_train, tiny_config, loss_fn=loss, **{**kw, "steps": 2})

    class Edited(TinyNet):  # the same weights and repr, another forward
        def forward(self, x):
            return 2 * super().forward(x)

    Edited.__name__ = Edited.__qualname__ = "TinyNet"
    with pytest.raises(ValueError, match="model"):
        qat(Edited(), tiny_train, tiny_config, loss_fn=loss, resume=True, **kw)

    def loss(out, tgt):  # noqa: F811  the same name, another loss
        return 2 * torch.nn.functional.cross_entropy(out, tgt)

    with pytest.raises(ValueError, match="loss"):
        qat(TinyNet(), tiny_train, tiny_config, loss_fn=loss, resume=True, **kw)


def test_resume_steps_below_or_equal_the_checkpoint(tmp_path: Path, tiny_train, tiny_eval, tiny_config) -> None:
    ckpt = tmp_path / "e.safetensors"
    kw = dict(lr=0.01, batch_size=32, progress=False, timing_steps=0, checkpoint=ckpt, eval_data=tiny_eval)
    full = qat(TinyNet(), tiny_train, tiny_config, steps=3, **kw)
    with pytest.raises(ValueError, match="at step 3, beyond steps=2"):
        qat(TinyNet(), tiny_train, tiny_config, steps=2, resume=True, **kw)
    same = qat(TinyNet(), tiny_train, tiny_config, steps=3, resume=True, **kw)  # nothing left to train
    assert same.steps == 3 and same.losses == full.losses and same.metric_after == full.metric_after
    for (name, a), b in zip(full.model.state_dict().items(), same.model.state_dict().values()):
        assert torch.equal(a, b), name


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) * 2 // 3]
    elif how == "flipped":  # one bit of a tensor's bytes: the header still parses
        data[-9] ^= 0x10
    elif how == "empty":
        data = bytearray()
    elif how == "garbage":
        data = bytearray(b"not a checkpoint\n" * 4)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "flipped", "empty", "garbage"])
def test_damaged_checkpoint_is_a_clear_error(how, tmp_path: Path, tiny_train, tiny_config) -> None:
    from abfp.finetune.checkpoint import CheckpointError

    ckpt = tmp_path / "f.safetensors"
    kw = dict(steps=2, lr=0.01, batch_size=32, progress=False, timing_steps=0, checkpoint=ckpt)
    qat(TinyNet(), tiny_train, tiny_config, **kw)
    _damage(ckpt, how)
    with pytest.raises(CheckpointError, match=r"checkpoint '.*f\.safetensors' is damaged") as e:
        load_checkpoint(ckpt)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="f.safetensors"):
        qat(TinyNet(), tiny_train, tiny_config, resume=True, **{**kw, "steps": 3})


_THREADS_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from ft_tiny import TinyNet, make_data
from abfp import ABFPConfig
from abfp.finetune import qat
torch.set_num_threads(1)
seen = []
r = qat(TinyNet(), make_data(128, 1), ABFPConfig(tile_width=8, gain=1.0, noise_std=0.5, seed=3), steps=2, lr=0.01,
        batch_size=32, progress=False, timing_steps=0, eval_data=make_data(32, 2),
        callback=lambda done, loss: seen.append(torch.get_num_threads()))
print(seen, torch.get_num_threads())
"""


@pytest.mark.slow
def test_thread_count_is_kept_through_device_evaluation(tmp_path: Path) -> None:
    """The first device evaluation of a process (numba's OpenMP pool starting) must not change
    torch's thread count: the uninterrupted run evaluates before training, a resumed one does
    not, so they trained with different counts and ended 5e-7 apart. A fresh process is needed."""
    import subprocess
    import sys

    script = _THREADS_SCRIPT.format(tests=str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[1,", "1]", "1"], out.stdout
