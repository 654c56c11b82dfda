"""DNF: differentials from the float32 network, noise only in training, training reduces loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import abfp
from abfp.finetune import DNFNoise, build_histograms, dnf, qat, record_differentials, select_noisiest
from abfp.finetune.histogram import Histogram

from ft_tiny import TinyNet


def test_differentials_use_fp32_inputs(tiny_model, tiny_train, tiny_config) -> None:
    cfg = tiny_config.replace(noise_std=0.0)  # deterministic device: dy can be checked exactly
    x = tiny_train.inputs[0][:16]
    m = abfp.convert(tiny_model, cfg)
    rec = record_differentials(m, (x,))
    assert sorted(rec) == ["conv:conv0", "fc:linear0"]
    assert rec["conv:conv0"].kind == "conv"
    (dy_conv,) = rec["conv:conv0"].dy
    conv_fp32 = F.conv2d(x, tiny_model.conv.weight, tiny_model.conv.bias, padding=1)
    conv_dev = abfp.functional.conv2d(x, tiny_model.conv.weight, tiny_model.conv.bias, padding=1, config=cfg)
    torch.testing.assert_close(dy_conv, conv_dev - conv_fp32, rtol=0, atol=1e-6)
    # the second layer's input is the float32 network's activation, not the device's
    h = torch.relu(conv_fp32).flatten(1)
    fc_dev = abfp.functional.linear(h, tiny_model.fc.weight, tiny_model.fc.bias, config=cfg)
    torch.testing.assert_close(rec["fc:linear0"].dy[0], fc_dev - F.linear(h, tiny_model.fc.weight, tiny_model.fc.bias),
                               rtol=0, atol=1e-6)
    assert float(dy_conv.abs().max()) > 0
    assert rec["conv:conv0"].y_rms == pytest.approx(float(conv_fp32.square().mean().sqrt()), rel=1e-5)
    assert not abfp.analog_state(m).interceptors  # the converted model is left as it was


def test_histograms_per_layer_and_per_channel(tiny_model, tiny_train, tiny_config) -> None:
    m = abfp.convert(tiny_model, tiny_config)
    x = (tiny_train.inputs[0][:32],)
    per_layer = build_histograms(m, x)
    assert set(per_layer) == {"conv:conv0", "fc:linear0"}
    for h in per_layer.values():
        assert h.bins == 100 and h.channels == 1 and bool((h.probs > 0).all())
        assert float(h.probs.sum()) == pytest.approx(1.0, abs=1e-5)
    per_channel = build_histograms(m, x, per_channel=True, bins=20)
    assert per_channel["conv:conv0"].channels == 4 and per_channel["conv:conv0"].channel_dim == -3
    assert per_channel["fc:linear0"].channels == 3 and per_channel["fc:linear0"].channel_dim == -1
    # repeatable: the device noise restarts from the config's seed
    again = build_histograms(m, x)
    assert torch.equal(again["conv:conv0"].probs, per_layer["conv:conv0"].probs)


def test_select_noisiest() -> None:
    def h(std: float, rms: float = 1.0) -> Histogram:
        return Histogram(torch.zeros(1), torch.ones(1), torch.full((1, 2), 0.5), std=std, signal_rms=rms)

    hists = {"a": h(0.1, 0.01), "b": h(3.0, 100.0), "c": h(1.0), "d": h(0.5)}
    assert select_noisiest(hists, 0.5) == ["b", "c"]
    assert select_noisiest(hists, 0.5, by="relative") == ["a", "c"]
    assert select_noisiest(hists, 0.1) == ["b"]
    assert select_noisiest(hists, 1.0) == ["b", "c", "d", "a"]
    with pytest.raises(ValueError):
        select_noisiest(hists, 0.0)


def test_noise_only_in_training(tiny_model, tiny_train, tiny_config) -> None:
    x = tiny_train.inputs[0][:16]
    m = abfp.convert(tiny_model, tiny_config)
    hists = build_histograms(m, (x,))
    DNFNoise(m, hists, backend="eager").attach()
    ref = tiny_model(x)
    m.eval()
    assert torch.equal(m(x), ref)  # eval: plain float32, no noise, no device
    m.train()
    torch.manual_seed(0)
    out = m(x)
    assert not torch.allclose(out, ref)
    out.sum().backward()  # ordinary float32 gradients
    assert tiny_model.fc.weight.grad is None and m.fc.weight.grad is not None
    # only the sites with a histogram get noise
    DNFNoise(m, {}, backend="eager").attach()
    assert torch.equal(m(x), ref)


def _mean(v: list[float]) -> float:
    return sum(v) / len(v)


@pytest.mark.parametrize("method", ["qat", "dnf"])
def test_training_reduces_loss(method, tiny_model, tiny_train, tiny_eval, tiny_config) -> None:
    fn = qat if method == "qat" else dnf
    extra = {"sampler": "eager", "calibration_samples": 32} if method == "dnf" else {}
    r = fn(tiny_model, tiny_train, tiny_config, steps=40, lr=0.02, batch_size=32, eval_data=tiny_eval,
           progress=False, timing_steps=1, **extra)
    assert r.method == method and r.steps == 40 and len(r.losses) == 40
    assert _mean(r.losses[-8:]) < 0.7 * _mean(r.losses[:8])
    assert r.metric_after is not None and r.metric_before is not None and r.fp32_metric is not None
    assert r.metric_after > r.metric_before
    assert r.seconds_per_step and r.seconds_per_step > 0 and r.fp32_seconds_per_step and r.seconds_total > 0
    d = r.to_dict()
    for key in ("method", "fp32_metric", "metric_before", "metric_after", "steps", "seconds_per_step",
                "seconds_total", "fp32_seconds_per_step"):
        assert key in d
    # the input model is untouched; the result is an unconverted float32 model
    assert not abfp.is_converted(r.model) and not abfp.is_converted(tiny_model)
    assert not torch.equal(r.model.fc.weight, tiny_model.fc.weight)


def test_dnf_variants_run(tiny_model, tiny_train, tiny_config) -> None:
    r = dnf(tiny_model, tiny_train, tiny_config, steps=6, lr=0.01, batch_size=32, progress=False, sampler="eager",
            calibration_samples=32, per_channel=True, refresh_every=2, layer_fraction=0.5, timing_steps=0)
    info = r.details["dnf"]
    assert info["refreshes"] == 2 and len(info["sites"]) == 1 and info["n_sites"] == 2
    assert info["sites"][0] == max(info["dy_std"], key=info["dy_std"].get)
    assert r.metric_after is None and r.fp32_seconds_per_step is None
    assert all(math.isfinite(v) for v in r.losses)


def test_bad_arguments(tiny_model, tiny_train, tiny_config) -> None:
    with pytest.raises(ValueError):
        dnf(tiny_model, tiny_train, tiny_config, steps=2, lr=-1.0, batch_size=8)
    with pytest.raises(ValueError):
        dnf(tiny_model, tiny_train, tiny_config, steps=2, lr=0.1, batch_size=8, layer_fraction=1.5)
    with pytest.raises(ValueError):
        qat(tiny_model, tiny_train, tiny_config, steps=2, lr=0.1, batch_size=1000)
    with pytest.raises(TypeError):
        qat(tiny_model, tiny_train, tiny_config, steps=2, lr=0.1, batch_size=8, no_such_option=1)
    with pytest.raises(ValueError):
        dnf(TinyNet(), tiny_train, tiny_config, steps=1, lr=0.1, batch_size=8, exclude=(".*",), sampler="eager")


def test_time_steps_interleaves_three_methods(tiny_model, tiny_train, tiny_config) -> None:
    from abfp.finetune import time_steps

    r = time_steps(tiny_model, tiny_train, tiny_config, batch_size=16, repeats=3, warmup=1, calibration_samples=16,
                   sampler="eager")
    for name in ("fp32", "dnf", "qat"):
        assert len(r[name]["times"]) == 3 and r[name]["median"] > 0
    assert r["qat_to_dnf"] == pytest.approx(r["qat"]["median"] / r["dnf"]["median"])
    assert not abfp.is_converted(tiny_model)


@pytest.mark.skipif(not abfp.finetune.sampler.alias_kernel.usable(), reason="numba not usable")
def test_compiled_and_eager_samplers_train_the_same(tiny_model, tiny_train, tiny_config) -> None:
    """The two samplers make the same draws: whole DNF runs end with the same weights (per
    channel, so the kernel's per-element channel path is exercised on the linear layer)."""
    kw = dict(steps=4, lr=0.01, batch_size=32, progress=False, calibration_samples=32, per_channel=True,
              timing_steps=0)
    a = dnf(tiny_model, tiny_train, tiny_config, sampler="eager", **kw)
    b = dnf(tiny_model, tiny_train, tiny_config, sampler="compiled", **kw)
    assert b.details["dnf"]["sampler_used"] == "compiled"
    assert a.losses == b.losses
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), name


def test_checkpoints_key_on_the_sampler_version(tmp_path) -> None:
    from abfp.finetune.loop import _check_compatible
    from abfp.finetune.methods import DNFMethod, DNFOptions
    from abfp.finetune.sampler import SAMPLER_VERSION

    opts = DNFMethod(abfp.ABFPConfig(), DNFOptions()).options()
    assert opts["sampler_version"] == SAMPLER_VERSION
    _check_compatible({"options": dict(opts)}, {"options": opts}, tmp_path / "c")
    with pytest.raises(ValueError, match=f"sampler_version: checkpoint {SAMPLER_VERSION - 1} vs now {SAMPLER_VERSION} .*drew other"):
        _check_compatible({"options": {**opts, "sampler_version": SAMPLER_VERSION - 1}}, {"options": opts},
                          tmp_path / "c")


def test_stream_keys_are_splitmix64_outputs() -> None:
    """``key_c`` is the c-th SplitMix64 output of ``base`` (computed here with the int64 tensor
    version of the mixer), 63 bits; distinct over a long stream and across bases."""
    from abfp.finetune.sampler import stream_key
    from abfp.numerics.counter_noise import splitmix64

    for base in (0, 1, 2**63 - 2, 0x1234_5678_9ABC_DEF):
        c = torch.arange(1000, dtype=torch.int64)
        ref = [(v & (2**64 - 1)) >> 1 for v in splitmix64(base, c + 1).tolist()]
        got = [stream_key(base, i) for i in range(1000)]
        assert got == ref
        assert all(0 <= k < 2**63 for k in got) and len(set(got)) == 1000
    assert stream_key(5, 0) != stream_key(6, 0)


def test_one_generator_draw_per_forward_and_the_documented_keys(tiny_model, tiny_train, tiny_config) -> None:
    """A training forward draws one key from torch's global generator (at its first noisy
    product) and gives its c-th noisy product the key ``stream_key(base, c)``: the output equals
    the float32 network with ``add_noise(..., key=stream_key(base, c))`` at each site in turn."""
    from abfp.finetune import add_noise
    from abfp.finetune.sampler import stream_key

    x = tiny_train.inputs[0][:16]
    m = abfp.convert(tiny_model, tiny_config)
    hists = build_histograms(m, (x,))
    noise = DNFNoise(m, hists, backend="eager").attach()
    m.train()
    torch.manual_seed(11)
    out = m(x)
    after = torch.get_rng_state()
    torch.manual_seed(11)
    base = int(torch.randint(0, 2**63 - 1, (1,)))
    assert torch.equal(torch.get_rng_state(), after)  # exactly one draw
    # the same forward by hand: float32 products, the noise of each site with its stream key
    ref = abfp.convert(tiny_model, tiny_config)
    count = iter(range(100))
    abfp.analog_state(ref).interceptors["*"] = lambda call: add_noise(
        call.digital(), hists[call.site], backend="eager", key=stream_key(base, next(count)))
    ref.train()
    assert torch.equal(out, ref(x))
    assert next(count) == len(hists)  # every site drew one key
    # a second forward starts a new stream from a new draw: other noise
    torch.manual_seed(11)
    assert torch.equal(m(x), out)
    assert not torch.equal(m(x), out)
    noise.detach()
    assert not m._forward_pre_hooks or all(h is not noise.keys for h in m._forward_pre_hooks.values())


class _Mixer(torch.nn.Module):
    """A functional module (its own ``@`` products) around leaf sites, a leaf called twice, a
    Linear subclass (not a leaf site: its forward is its own) and a module without products."""

    class Scaled(torch.nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 0.5 * super().forward(x)

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.q = torch.nn.Linear(4, 4)
        self.k = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.scaled = self.Scaled(4, 4)
        self.head = torch.nn.Linear(4, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.conv(x).flatten(2).transpose(1, 2)  # (N, 36, 4)
        q, k = self.q(self.norm(t)), self.k(t)
        a = (q @ k.transpose(1, 2)).softmax(-1) @ self.k(t)  # k called twice
        return self.head(self.scaled(a).mean(1))


@pytest.mark.parametrize("backend, per_channel, fraction", [("auto", False, 1.0), ("eager", True, 1.0),
                                                            ("auto", True, 0.5)])
def test_direct_sites_give_the_intercepted_values(backend, per_channel, fraction) -> None:
    """With direct sites (leaf sites noised on exit, modules without noisy sites not
    intercepted) a DNF forward and backward give the bits of the fully intercepted path, and
    draw one key per noisy product in the same order; both match a float32 run without noise
    in eval mode."""
    x = torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    cfg = abfp.ABFPConfig(tile_width=8, gain=1.0, noise_std=0.5, seed=3)
    base = _Mixer()
    runs = []
    for direct in (True, False):
        m = abfp.convert(base, cfg)
        hists = build_histograms(m, (x,), per_channel=per_channel)
        hists = {s: hists[s] for s in select_noisiest(hists, fraction)}
        noise = DNFNoise(m, hists, backend=backend, direct=direct).attach()
        state = abfp.analog_state(m)
        if direct:
            assert set(state.direct.leaf.values()) == {s for s in hists if s.split(":")[0] in ("conv", "q", "k", "head")}
            assert "scaled" not in [s.split(":")[0] for s in state.direct.leaf.values()]
        else:
            assert state.direct is None
        m.train()
        torch.manual_seed(7)
        outs = [m(x) for _ in range(2)]
        sum(o.square().sum() for o in outs).backward()
        runs.append((outs, [p.grad.clone() for p in m.parameters()], noise.keys.count, torch.get_rng_state()))
        m.eval()
        assert torch.equal(m(x), base(x))
    (a, ga, ca, ra), (b, gb, cb, rb) = runs
    assert ca == cb == len(hists) + ("k:linear0" in hists) and torch.equal(ra, rb)  # k runs twice
    assert all(torch.equal(p, q) for p, q in zip(a, b)) and not torch.equal(a[0], a[1])
    assert all(torch.equal(p, q) for p, q in zip(ga, gb))


def test_direct_sites_follow_refreshes_and_detach(tiny_model, tiny_train, tiny_config) -> None:
    """Replacing the histograms (a refresh) rebuilds the direct sites; detaching removes them and the key hook."""
    x = tiny_train.inputs[0][:16]
    m = abfp.convert(tiny_model, tiny_config)
    hists = build_histograms(m, (x,))
    noise = DNFNoise(m, hists).attach()
    state = abfp.analog_state(m)
    assert set(state.direct.leaf.values()) == {"conv:conv0", "fc:linear0"}
    noise.histograms = {"fc:linear0": hists["fc:linear0"]}
    assert set(state.direct.leaf.values()) == {"fc:linear0"}
    m.train()
    torch.manual_seed(0)
    m(x)
    assert noise.keys.count == 1
    noise.detach()
    assert state.direct is None and not state.interceptors and not m._forward_pre_hooks  # convert registers none
