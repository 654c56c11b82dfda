"""Label-free finetuning on a tiny model: distillation from the frozen float32 copy improves
fidelity on the device, needs no labels, keeps batch norm frozen, resumes bit-identically, and
its checkpoints refuse a resume with another loss or temperature."""

from __future__ import annotations

import pytest
import torch
from ft_tiny import TinyNet, make_data

import abfp.finetune as ft
from abfp import ABFPConfig
from abfp.finetune.loop import device_metric
from abfp.zoo.base import KL, Dataset

# tiles of 8 at gain 16 saturate the ADC: a systematic device error that finetuning can learn around
SATURATING = ABFPConfig(tile_width=8, gain=16.0, seed=3)


def _unlabelled(n: int, seed: int) -> Dataset:
    return Dataset(make_data(n, seed).inputs)


@pytest.mark.parametrize("loss", ["kl", "mse", "cosine"])
def test_unlabelled_qat_improves_fidelity(loss: str) -> None:
    model = TinyNet().eval()
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    train, held_out = _unlabelled(256, 1), _unlabelled(256, 2)
    ref = model(held_out.inputs[0]).detach()
    kl_before = device_metric(model, held_out, KL, SATURATING, reference=ref)
    tuned = ft.distil(model, train.inputs[0], SATURATING, method="qat", loss=loss, steps=40, lr=0.01,
                      batch_size=32, timing_steps=0)  # type: ignore[arg-type]
    kl_after = device_metric(tuned, held_out, KL, SATURATING, reference=ref)
    assert kl_after < 0.8 * kl_before, (kl_before, kl_after)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before_state.items())  # input model untouched
    assert not any(type(m).__module__.startswith("abfp.nn") for m in tuned.modules())  # float32, digital


def test_unlabelled_dnf_learns_to_tolerate_its_noise() -> None:
    # DNF's i.i.d. noise cannot model saturation (device fidelity need not improve, see
    # docs/finetune.md), but the distillation loss under the sampled noise must fall
    r = ft.dnf(TinyNet().eval(), _unlabelled(256, 1), SATURATING, steps=50, lr=0.01, batch_size=32, loss="mse",
               sampler="eager", progress=False, timing_steps=0)
    assert sum(r.losses[-10:]) < 0.9 * sum(r.losses[:10]), r.losses


def test_result_metrics_and_labels_unused() -> None:
    labelled = make_data(128, 1)
    ev = make_data(128, 2)
    kw = dict(steps=8, lr=0.01, batch_size=32, loss="kl", temperature=2.0, eval_data=ev, progress=False, timing_steps=0)
    r1 = ft.qat(TinyNet().eval(), labelled, SATURATING, **kw)
    r2 = ft.qat(TinyNet().eval(), Dataset(labelled.inputs), SATURATING, **kw)
    assert r1.losses == r2.losses
    assert r1.details["metric"] == "top-1 agreement with fp32" and r1.fp32_metric == 100.0
    assert r1.metric_before is not None and r1.metric_after is not None


def test_batch_norm_statistics_frozen_while_distilling() -> None:
    model = TinyNet(dropout=0.5, batch_norm=True).eval()
    with torch.no_grad():
        model.norm.running_mean.fill_(0.1)
    tuned = ft.distil(model, _unlabelled(64, 1).inputs, SATURATING, method="qat", loss="mse", steps=4, lr=0.01,
                      batch_size=16, timing_steps=0)
    assert torch.equal(tuned.norm.running_mean, model.norm.running_mean)
    assert torch.equal(tuned.norm.running_var, model.norm.running_var)
    # with labels (cross entropy) the statistics are trained as before
    r = ft.qat(model, make_data(64, 1), SATURATING, steps=4, lr=0.01, batch_size=16, progress=False, timing_steps=0)
    assert not torch.equal(r.model.norm.running_mean, model.norm.running_mean)


def test_resume_bit_identical_and_provenance_names_the_loss(tmp_path) -> None:
    train = _unlabelled(128, 1)
    ck = tmp_path / "d.safetensors"
    kw = dict(lr=0.01, batch_size=32, loss="kl", temperature=2.0, progress=False, timing_steps=0, checkpoint_every=3)
    full = ft.dnf(TinyNet().eval(), train, SATURATING, steps=6, sampler="eager", **kw)
    ft.dnf(TinyNet().eval(), train, SATURATING, steps=3, sampler="eager", checkpoint=ck, **kw)
    resumed = ft.dnf(TinyNet().eval(), train, SATURATING, steps=6, sampler="eager", checkpoint=ck, resume=True, **kw)
    assert resumed.details["resumed_from"] == 3 and resumed.losses == full.losses
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    other = {**kw, "temperature": 1.0}
    with pytest.raises(ValueError, match="loss.temperature"):
        ft.dnf(TinyNet().eval(), train, SATURATING, steps=6, sampler="eager", checkpoint=ck, resume=True, **other)
    other = {**kw, "loss": "mse", "temperature": None}
    with pytest.raises(ValueError, match=r"cannot resume.*loss\.loss"):
        ft.dnf(TinyNet().eval(), train, SATURATING, steps=6, sampler="eager", checkpoint=ck, resume=True, **other)
    other = {**kw, "loss": None, "temperature": None}
    with pytest.raises(ValueError, match="cannot resume.*loss"):
        ft.dnf(TinyNet().eval(), make_data(128, 1), SATURATING, steps=6, sampler="eager", checkpoint=ck,
               resume=True, **other)


def test_teacher_is_part_of_provenance(tmp_path) -> None:
    train = _unlabelled(64, 1)
    ck = tmp_path / "t.safetensors"
    kw = dict(lr=0.01, batch_size=32, loss="mse", progress=False, timing_steps=0)
    ft.qat(TinyNet().eval(), train, SATURATING, steps=2, checkpoint=ck, **kw)
    teacher = TinyNet().eval()
    with torch.no_grad():
        teacher.fc.bias.add_(0.5)  # other weights: another teacher
    with pytest.raises(ValueError, match="teacher"):
        ft.qat(teacher, train, SATURATING, steps=4, checkpoint=ck, resume=True, **kw)


def test_bad_loss_arguments() -> None:
    train = _unlabelled(64, 1)
    with pytest.raises(ValueError, match="distillation loss"):
        ft.qat(TinyNet(), train, SATURATING, steps=1, lr=0.01, batch_size=8, loss="hinge")
    with pytest.raises(ValueError, match="temperature needs"):
        ft.qat(TinyNet(), make_data(64, 1), SATURATING, steps=1, lr=0.01, batch_size=8, temperature=2.0)
    with pytest.raises(ValueError, match="either a distillation loss or loss_fn"):
        ft.qat(TinyNet(), train, SATURATING, steps=1, lr=0.01, batch_size=8, loss="kl", loss_fn=lambda o, t: o.sum())
    with pytest.raises(ValueError, match="method"):
        ft.distil(TinyNet(), train, SATURATING, method="sgd", steps=1, lr=0.01)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="labelled"):  # cross entropy without labels: one clear line
        ft.qat(TinyNet(), train, SATURATING, steps=1, lr=0.01, batch_size=8, progress=False, timing_steps=0)


def test_abfp_finetune_is_reachable_from_import_abfp_as_the_readme_spells_it():
    """``import abfp; abfp.finetune.distil(...)`` (README): the subpackage is loaded with abfp (a
    fresh process: no other test's import of abfp.finetune can stand in for it)."""
    import subprocess
    import sys

    code = "import abfp; assert callable(abfp.finetune.distil) and callable(abfp.finetune.qat)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
