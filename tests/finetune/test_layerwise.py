"""Label-free layer-wise bias correction (abfp.finetune.layerwise): the corrected model's device
output has ~zero mean error per channel on the calibration inputs, measured independently of
the correction's own hooks; the model keeps its architecture; what cannot be corrected is named;
the tune stage and CLI; bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import abfp
from abfp import ABFPConfig
from abfp.finetune.layerwise import bias_correct, channel_mean_errors
from abfp.nn.convert import is_converted
from abfp.zoo.base import KL

torch.set_num_threads(1)

# gain 1 on 128-wide tiles with K = 9 or 27: the ADC rounds the small tile products coarsely,
# a systematic error per channel; noise off so the correction is exact on the calibration data
QUIET = ABFPConfig(tile_width=128, gain=1.0, noise_std=0.0)


def cnn(seed: int = 0) -> nn.Module:
    """conv -> BN -> ReLU -> depthwise conv -> BN -> ReLU -> linear (with bias), like a MobileNet block."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.Flatten(), nn.Linear(16 * 6 * 6, 10))
    for bn in (m[1], m[4]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return m.eval()


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logit_mean_error(model: nn.Module, reference: nn.Module, x: torch.Tensor, cfg: ABFPConfig) -> torch.Tensor:
    """Per logit, mean over ``x`` of (``model`` on the device - ``reference`` in float32), float64:
    an independent measurement (no hooks, no code of the correction)."""
    dev = abfp.convert(model, cfg)
    return (dev(x).double() - reference(x).double()).mean(0)


def test_corrected_output_has_zero_mean_error_per_channel() -> None:
    m, x = cnn(), images(64, 1)
    res = bias_correct(m, x, QUIET)
    assert res.targets == {"0": "1.running_mean", "3": "4.running_mean", "7": "7.bias"}
    assert res.skipped == {} and res.samples == 64
    before = logit_mean_error(m, m, x, QUIET)
    after = logit_mean_error(res.model, m, x, QUIET)
    # the uncorrected device has a clear mean error per logit; the corrected one none (float32 rounding)
    assert before.abs().max() > 1e-3
    assert after.abs().max() < 1e-5 * before.abs().max() * 100
    # every corrected module, measured at its own output (the batch norm's input for the convolutions)
    errs_before = channel_mean_errors(m, x, QUIET)
    errs_after = channel_mean_errors(res.model, x, QUIET, reference=m)
    for name in res.targets:
        assert errs_before[name].abs().max() > 1e-4, name
        assert errs_after[name].abs().max() < 1e-3 * errs_before[name].abs().max() + 1e-7, name
        # what was removed is the upstream-corrected error: for the first module the raw one
    assert torch.allclose(res.corrections["0"], errs_before["0"], atol=1e-6)


def test_skipping_the_correction_fails_the_zero_mean_check() -> None:
    """The check of the test above can fail: with the correction of the last layer undone it does."""
    m, x = cnn(), images(64, 1)
    res = bias_correct(m, x, QUIET)
    with torch.no_grad():
        res.model[7].bias.copy_(m[7].bias)
    after = logit_mean_error(res.model, m, x, QUIET)
    assert after.abs().max() > 1e-3


def test_the_model_keeps_its_architecture_and_the_input_is_untouched() -> None:
    m, x = cnn(), images(32, 1)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    res = bias_correct(m, x, QUIET)
    assert list(res.model.state_dict()) == list(state)
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    assert not is_converted(res.model) and not is_converted(m)
    changed = {k for k, v in res.model.state_dict().items() if not torch.equal(v, state[k])}
    assert changed == {"1.running_mean", "4.running_mean", "7.bias"}


def test_noise_the_systematic_error_is_removed_on_held_out_inputs() -> None:
    # 4-bit weights: a large systematic error (post-ReLU inputs have a nonzero mean); noise one bin wide
    noisy = ABFPConfig(tile_width=128, gain=8.0, weight_bits=4, seed=3)
    m = cnn()
    res = bias_correct(m, images(256, 1), noisy, seed=5)
    held = images(256, 2)
    before = logit_mean_error(m, m, held, noisy).abs().mean()
    after = logit_mean_error(res.model, m, held, noisy).abs().mean()
    assert after < 0.5 * before, (before, after)


def test_per_module_devices_and_excluded_modules() -> None:
    m, x = cnn(), images(64, 1)
    over = {"3": QUIET.replace(gain=4.0)}
    res = bias_correct(m, x, QUIET, overrides=over, exclude=["7"])
    assert set(res.targets) == {"0", "3"}  # the excluded linear layer is float32: nothing to correct
    errs = channel_mean_errors(res.model, x, QUIET, overrides=over, exclude=["7"], reference=m)
    assert set(errs) == {"0", "3"} and all(e.abs().max() < 1e-5 for e in errs.values())
    # the override's device was the one corrected for: with the base device instead, an error is left
    wrong = channel_mean_errors(res.model, x, QUIET, exclude=["7"], reference=m)
    assert wrong["3"].abs().max() > 1e-4


def test_what_cannot_be_corrected_is_named() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1, bias=False)  # no bias, a ReLU after it
            self.b = nn.Linear(6, 6)  # run twice per forward

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.b(torch.relu(self.a(x))))

    res = bias_correct(Twice().eval(), images(8, 1), QUIET)
    assert "no bias" in res.skipped["a"]
    assert "2 times" in res.skipped["b"]
    assert res.targets == {}
    # an embedding look-up is digital: neither corrected nor reported as skipped
    emb = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 3)).eval()
    res = bias_correct(emb, torch.arange(10).reshape(5, 2), QUIET)
    assert res.targets == {"1": "1.bias"} and res.skipped == {}


@settings(max_examples=8, deadline=None)
@given(gain=st.sampled_from([0.5, 1.0, 2.0, 8.0]), width=st.sampled_from([8, 32, 128]),
       seed=st.integers(0, 50), target=st.sampled_from(["float32", "local"]))
def test_linear_correction_matches_a_float64_mean(gain: float, width: int, seed: int, target: str) -> None:
    """One linear layer: the correction is the float64 mean of (device - float32) over the samples
    (either target: a single layer has no upstream)."""
    torch.manual_seed(seed)
    lin = nn.Linear(40, 7).eval()
    x = torch.randn(48, 40, generator=torch.Generator().manual_seed(seed + 1))
    cfg = ABFPConfig(tile_width=width, gain=gain, noise_std=0.0)
    res = bias_correct(lin, x, cfg, target=target)
    with torch.no_grad():
        want = (abfp.convert(lin, cfg)(x).double() - lin(x).double()).mean(0)
    assert torch.allclose(res.corrections[""].double(), want, atol=1e-6, rtol=1e-5)
    assert torch.allclose(res.model.bias.double(), lin.bias.double() - want, atol=1e-6)


def test_local_target_is_each_modules_own_error() -> None:
    """``target="local"``: module 3's correction is its own mean error on the inputs it gets on the
    (corrected) device, measured here independently by running module 3 alone on those inputs."""
    m, x = cnn(), images(64, 1)
    local = bias_correct(m, x, QUIET, target="local")
    full = bias_correct(m, x, QUIET)
    assert torch.allclose(local.corrections["0"], full.corrections["0"], atol=1e-7)  # no upstream: the same
    with torch.no_grad():
        dev = abfp.convert(local.model, QUIET)
        h = dev[2](dev[1](dev[0](x)))  # the device input of module 3, upstream corrected
        conv3 = abfp.convert(local.model[3], QUIET)
        want = (conv3(h).double() - local.model[3](h).double()).mean((0, 2, 3))
    assert torch.allclose(local.corrections["3"].double(), want, atol=1e-6)
    assert not torch.allclose(local.corrections["3"], full.corrections["3"], atol=1e-4)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(samples=0), ValueError, "samples"),
    (dict(samples=True), ValueError, "samples"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(target="global"), ValueError, "target"),
])
def test_bad_options(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        bias_correct(cnn(), images(8, 1), QUIET, **kwargs)


def test_bad_inputs() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        bias_correct("model", images(8, 1), QUIET)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="inputs must be"):
        bias_correct(cnn(), [1, 2, 3], QUIET)
    with pytest.raises(ValueError, match="ABFP"):
        bias_correct(cnn(), images(8, 1), QUIET.replace(mode="fixed"))
    with pytest.raises(ValueError, match="at least one"):
        bias_correct(cnn(), images(0, 1), QUIET)


def test_tune_bias_correct_stage() -> None:
    m = cnn()
    cal, held = images(128, 1), images(128, 2)
    cfg = ABFPConfig(tile_width=128, gain=4.0, weight_bits=3)  # 3-bit weights, noise one bin wide
    res = abfp.tune(m, cal, cfg, metric=KL, eval_inputs=held, gains=[4.0], repeats=False,
                    finetune="bias-correct", finetune_options=dict(samples=64))
    names = [s.name for s in res.stages]
    assert names == ["single gain", "gain", "finetune"]
    gain, fixed = res.stages[1], res.stages[2]
    assert fixed.metric < 0.85 * gain.metric, (gain.metric, fixed.metric)  # held-out KL falls
    assert fixed.energy == gain.energy
    assert res.details["finetune"]["method"] == "bias-correct" and res.details["finetune"]["samples"] == 64
    assert "3 modules corrected" in fixed.note
    assert not torch.equal(res.model[7].bias, m[7].bias) and torch.equal(m[7].bias, cnn()[7].bias)
    with pytest.raises(ValueError, match="unknown finetune option"):
        abfp.tune(m, cal, QUIET, gains=[1.0], repeats=False, finetune="bias-correct",
                  finetune_options=dict(steps=3))
    with pytest.raises(ValueError, match="samples"):
        abfp.tune(m, cal, QUIET, gains=[1.0], repeats=False, finetune="bias-correct",
                  finetune_options=dict(samples=0))
