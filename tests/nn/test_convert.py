"""convert / to_digital / calibrate / summary on standard layers and a Hugging Face BERT."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import abfp
import abfp.functional as AF
from abfp import ABFPConfig
from abfp.metrics import relative_error
from abfp.nn.mode import GuardedForward

QUIET = ABFPConfig(noise_std=0.0)
IDEAL = abfp.ABFPConfig.preset("ideal")


class PadInForward(nn.Conv2d):
    """A subclass that pads inside its own forward (like EfficientNet's 'same' convolutions)."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Attn(nn.Module):
    def __init__(self, d=16, h=2):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.h = h

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) / (d // self.h) ** 0.5, -1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, t, d))


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        PadInForward(3, 8, 3), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
        nn.Conv1d(8, 8, 1) if False else nn.Identity(),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 10),
    ).eval()


def _manual_cnn(m, x, cfg):
    """The same network through abfp.functional directly."""
    y = AF.conv2d(F.pad(x, (1, 1, 1, 1)), m[0].weight, m[0].bias, config=cfg)
    y = AF.conv2d(torch.relu(y), m[2].weight, m[2].bias, padding=1, groups=8, config=cfg)
    return AF.linear(torch.relu(y).flatten(1), m[6].weight, m[6].bias, config=cfg)


def test_converted_model_computes_the_functional_results():
    m = small_cnn()
    x = torch.randn(4, 3, 8, 8)
    cm = abfp.convert(m, QUIET)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), _manual_cnn(m, x, QUIET), rtol=0, atol=0)
        # the original is untouched (inplace=False)
        torch.testing.assert_close(m(x), _manual_cnn(m, x, IDEAL), rtol=1e-3, atol=1e-3)
        assert not torch.equal(m(x), cm(x))


def test_to_digital_and_state_dict_round_trip():
    m = small_cnn()
    x = torch.randn(2, 3, 8, 8)
    cm = abfp.convert(m, QUIET)
    assert set(cm.state_dict()) == set(m.state_dict())
    m2 = small_cnn()
    m2.load_state_dict(cm.state_dict())
    cm.load_state_dict(m2.state_dict())
    d = abfp.to_digital(cm)
    with torch.no_grad():
        assert torch.equal(d(x), m(x))
    assert not abfp.is_converted(d)


def test_exclude_and_overrides():
    m = small_cnn()
    x = torch.randn(2, 3, 8, 8)
    cm = abfp.convert(m, QUIET, exclude=["0"], overrides={r"[26]": IDEAL})
    s = abfp.summary(cm, x)
    sites = {r.site: r for r in s.rows}
    assert "0:conv0" not in sites  # excluded: digital
    assert sites["2:conv0"].config == IDEAL and sites["6:linear0"].config == IDEAL
    with pytest.raises(ValueError, match="matches no module"):
        abfp.convert(m, QUIET, exclude=["nope"])


def test_summary_reports_tiles_macs_conversions_and_errors():
    m = nn.Sequential(nn.Linear(300, 20)).eval()
    x = torch.randn(5, 300)
    s = abfp.summary(m, x, QUIET.replace(gain=64.0))
    (row,) = s.rows
    assert row.tiles == 3 and row.macs == 5 * 300 * 20 and row.adc_conversions == 5 * 20 * 3
    assert 0 < row.saturated_fraction <= 1
    with torch.no_grad():
        ref = m(x)
        y = AF.linear(x, m[0].weight, m[0].bias, config=QUIET.replace(gain=64.0))
    assert abs(row.relative_error - relative_error(y, ref)) < 1e-6
    assert "linear" in str(s)


def test_summary_without_errors_records_the_same_counts_and_no_error():
    """``errors=False`` (auto gain, energy accounting) runs no float32 reference: the same shapes,
    MACs, conversions and saturated counts as the full summary, relative errors unknown (None)."""
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()
    x = torch.randn(4, 3, 8, 8)
    cm = abfp.convert(m, QUIET.replace(gain=16.0, tile_width=8))
    full, light = abfp.summary(cm, x), abfp.summary(cm, x, errors=False)
    assert [r.site for r in full.rows] == [r.site for r in light.rows] == ["0:conv0", "3:linear0"]
    for a, b in zip(full.rows, light.rows):
        assert (a.macs, a.adc_conversions, a.saturated, a.x_shape, a.w_shape) == \
            (b.macs, b.adc_conversions, b.saturated, b.x_shape, b.w_shape)
        assert a.relative_error is not None and a.relative_error > 0 and b.relative_error is None
    assert any(r.saturated > 0 for r in light.rows)  # the comparison covers saturation
    assert all(d["relative_error"] is None for d in light.as_dicts())
    assert "       -" in str(light)
    assert abfp.analog_state(cm).record_errors  # left as it was
    assert [r.relative_error for r in abfp.summary(cm, x).rows] == [r.relative_error for r in full.rows]


def test_attention_products_are_analog_and_sites_counted():
    torch.manual_seed(0)
    m = Attn().eval()
    x = torch.randn(2, 5, 16)
    s = abfp.summary(m, x, QUIET.replace(tile_width=8, gain=1.0))
    kinds = sorted(r.site for r in s.rows)
    assert kinds == [":matmul0", ":matmul1", "proj:linear0", "qkv:linear0"]
    # without matmul interception only the linears are analog
    cm = abfp.convert(m, QUIET, include_matmul=False)
    rows = abfp.summary(cm, x).rows
    assert sorted(r.site for r in rows if r.kind != "digital") == ["proj:linear0", "qkv:linear0"]
    # the two attention products stayed float32 by that option: listed as digital, with their MACs
    assert sorted(r.site for r in rows if r.kind == "digital") == [":digital0", ":digital1"]
    assert all(r.macs == 2 * 5 * 5 * 16 for r in rows if r.kind == "digital")


@pytest.mark.parametrize("need_weights", [True, False])
def test_nn_multihead_attention(need_weights):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(3, 6, 16)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[0, -2:] = True
    with torch.no_grad():
        ref, _ = mha(x, x, x, key_padding_mask=pad, need_weights=need_weights)
        out, _ = abfp.convert(mha, IDEAL)(x, x, x, key_padding_mask=pad, need_weights=need_weights)
        torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
        s = abfp.summary(mha, (x, x, x), QUIET)
    assert sum(r.kind == "matmul" for r in s.rows) == 2 and sum(r.kind == "linear" for r in s.rows) == 4


@pytest.mark.parametrize("bias_kv,zero_attn,need_weights", [(True, False, True), (False, True, False), (True, True, True),
                                                           (True, True, False)])
def test_nn_multihead_attention_with_bias_kv_and_zero_attn(bias_kv, zero_attn, need_weights):
    """``add_bias_kv`` / ``add_zero_attn`` append a key/value row (and a mask column) as torch does;
    the products stay on the device (they used to be refused)."""
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(16, 4, batch_first=True, add_bias_kv=bias_kv, add_zero_attn=zero_attn).eval()
    q, kv = torch.randn(3, 4, 16), torch.randn(3, 6, 16)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[0, -2:] = True
    mask = torch.randn(4, 6)
    with torch.no_grad():
        ref, wref = mha(q, kv, kv, key_padding_mask=pad, attn_mask=mask, need_weights=need_weights,
                        average_attn_weights=False)
        cm = abfp.convert(mha, IDEAL)
        out, w = cm(q, kv, kv, key_padding_mask=pad, attn_mask=mask, need_weights=need_weights,
                    average_attn_weights=False)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    if need_weights:
        torch.testing.assert_close(w, wref, rtol=1e-3, atol=1e-3)
    assert abfp.coverage(cm).share == 1.0
    s_len = 6 + bias_kv + zero_attn
    assert abfp.coverage(cm).analog_macs == 3 * (4 * 16 * 16 * 2 + 6 * 16 * 16 * 2) + 2 * 3 * 4 * 4 * s_len * 4


def test_multi_head_attention_forward_with_static_keys_and_values():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2)

        def forward(self, x, sk, sv):
            m = self.mha
            return F.multi_head_attention_forward(x, x, x, 8, 2, m.in_proj_weight, m.in_proj_bias, None, None, False,
                                                  0.0, m.out_proj.weight, m.out_proj.bias, training=False,
                                                  static_k=sk, static_v=sv, need_weights=False)[0]

    torch.manual_seed(2)
    x, sk, sv = torch.randn(5, 3, 8), torch.randn(3 * 2, 7, 4), torch.randn(3 * 2, 7, 4)
    m = M().eval()
    with torch.no_grad():
        ref, out = m(x, sk, sv), abfp.convert(m, IDEAL)(x, sk, sv)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)


def test_fully_masked_query_rows():
    """A query row whose keys are all masked: ``scaled_dot_product_attention`` gives zeros there, as
    torch does; MHA with ``need_weights=True`` (where torch's softmax gives NaN) is refused naming
    the product, never a silent NaN."""
    class M(nn.Module):
        def forward(self, q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    q, k, v = torch.randn(2, 2, 4, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    for mask in (torch.ones(4, 5, dtype=torch.bool), torch.zeros(4, 5)):
        mask[1] = False if mask.dtype == torch.bool else float("-inf")
        with torch.no_grad():
            ref, out = M()(q, k, v, mask), abfp.convert(M(), IDEAL)(q, k, v, mask)
        assert bool(torch.isfinite(out).all()) and bool((out[:, :, 1] == 0).all())
        torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad(), pytest.raises(ValueError, match=r"product :matmul1 .*NaN or Inf"):
        abfp.convert(mha, IDEAL)(x, x, x, key_padding_mask=torch.ones(2, 5, dtype=torch.bool))


def test_scaled_dot_product_attention_with_masks():
    class M(nn.Module):
        def forward(self, q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = torch.rand(5, 5) > 0.3
    mask[:, 0] = True
    with torch.no_grad():
        ref = M()(q, k, v, mask)
        out = abfp.convert(M(), IDEAL)(q, k, v, mask)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_training_through_a_converted_model_reduces_the_loss():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3))
    x = torch.randn(256, 20)
    y = (x[:, :3] * 2).argmax(1)
    cm = abfp.convert(m, ABFPConfig(tile_width=8, gain=1.0, seed=0), inplace=True)
    cm.train()
    opt = torch.optim.Adam(cm.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = F.cross_entropy(cm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_fixed_point_calibration_sets_static_scales():
    m = nn.Sequential(nn.Linear(64, 16)).eval()
    cm = abfp.convert(m, QUIET.replace(mode="fixed", gain=1.0))
    x = torch.randn(32, 64)
    scales = abfp.calibrate(cm, [x[:16], x[16:]])
    assert scales["0:linear0"][0] == pytest.approx(float(x.abs().max()))
    with torch.no_grad():
        y = cm(x)
        expect = AF.linear(x, m[0].weight, m[0].bias, config=QUIET.replace(mode="fixed", gain=1.0), input_scale=float(x.abs().max()))
    torch.testing.assert_close(y, expect, rtol=0, atol=0)
    p99 = abfp.calibrate(cm, [x], percentile=99.0)["0:linear0"][0]
    assert p99 < float(x.abs().max())


def test_deepcopy_of_a_converted_model_is_independent():
    m = small_cnn()
    cm = abfp.convert(m, QUIET)
    cm2 = copy.deepcopy(cm)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(cm(x), cm2(x))
        cm2[6].weight.mul_(2)
        assert not torch.equal(cm(x), cm2(x))
    assert abfp.analog_state(cm2) is not abfp.analog_state(cm)


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickled_converted_model_loads_with_its_configs_and_fresh_streams(how, tmp_path):
    """A converted model pickles (``torch.save`` of the whole model): the copy keeps configs,
    overrides and calibration, starts its seeded noise streams afresh (as a deep copy does),
    and gives the original's numbers."""
    import pickle

    cm = abfp.convert(small_cnn(), ABFPConfig(seed=3, mode="fixed"), overrides={"6": ABFPConfig(seed=3, gain=2.0)})
    x = torch.randn(2, 3, 8, 8)
    abfp.calibrate(cm, [x])
    with torch.no_grad():
        cm(x)  # the original's streams have moved on; the copy's start afresh
        if how == "pickle":
            cm2 = pickle.loads(pickle.dumps(cm))
        else:
            torch.save(cm, tmp_path / "m.pt")
            cm2 = torch.load(tmp_path / "m.pt", weights_only=False)
        s, s2 = abfp.analog_state(cm), abfp.analog_state(cm2)
        assert s2 is not s and s2.overrides == s.overrides and s2.input_scales == s.input_scales
        abfp.reseed(cm)
        assert torch.equal(cm2(x), cm(x))
        assert abfp.coverage(cm2).analog_macs == abfp.coverage(cm).analog_macs // 2  # counted since loading


def test_seeded_noise_is_reproducible_across_runs_with_reseed():
    m = small_cnn()
    cm = abfp.convert(m, ABFPConfig(seed=7))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        a = cm(x)
        b = cm(x)
        abfp.reseed(cm)
        c = cm(x)
    assert not torch.equal(a, b) and torch.equal(a, c)


def test_hugging_face_bert_converts_with_eager_and_sdpa_attention():
    transformers = pytest.importorskip("transformers")
    def bert_config(impl):
        c = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, max_position_embeddings=32)
        c._attn_implementation = impl
        return c

    ids = torch.randint(0, 100, (2, 12))
    att = torch.ones(2, 12, dtype=torch.long)
    att[1, 8:] = 0
    for impl in ("eager", "sdpa"):
        torch.manual_seed(0)
        model = transformers.BertModel(bert_config(impl)).eval()
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=att).last_hidden_state
            out = abfp.convert(model, IDEAL)(input_ids=ids, attention_mask=att).last_hidden_state
        torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
        s = abfp.summary(model, (ids, att), QUIET)
        assert sum(r.kind == "matmul" for r in s.rows) == 4, impl  # QK^T and AV in both layers
        assert sum(r.kind == "linear" for r in s.rows) >= 12


def test_summary_takes_keyword_inputs_and_leaves_the_models_coverage_alone():
    """``summary(model, x, kwargs={...})`` runs ``model(x, **kwargs)`` (also when it converts and
    calibrates a fixed-point copy itself); its run is a diagnostic, not counted in the model's
    own coverage."""
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 6), nn.Linear(8, 6)

        def forward(self, x, *, other, use_b=False):
            return self.a(x) + (self.b(other) if use_b else 0)

    torch.manual_seed(0)
    x, o = torch.randn(3, 8), torch.randn(3, 8)
    s = abfp.summary(KW(), x, ABFPConfig(mode="fixed", noise_std=0.0), kwargs={"other": o, "use_b": True})
    assert sorted(r.site for r in s.rows) == ["a:linear0", "b:linear0"] and s.analog_macs == 2 * 3 * 6 * 8
    cm = abfp.convert(KW(), QUIET)
    with torch.no_grad():
        cm(x, other=o)
    before = abfp.coverage(cm).as_dict()
    s = abfp.summary(cm, (x,), kwargs={"other": o, "use_b": True})
    assert s.analog_macs == 2 * 3 * 6 * 8 and abfp.coverage(cm).as_dict() == before == {
        "analog_macs": 3 * 6 * 8, "digital_macs": 0, "share": 1.0, "digital_ops": {}}


def test_functional_call_runs_on_the_device_and_func_transforms_are_refused_by_name():
    """``torch.func.functional_call`` with other parameters gives the device numbers of a model holding
    them; ``torch.func.grad`` / ``vmap`` (whose wrapped tensors the device cannot read) are refused
    naming the product, instead of torch's 'tensor that doesn't have storage'."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    cm, x = abfp.convert(net, QUIET), torch.randn(4, 8)
    params = {k: v.detach() * 2 for k, v in cm.named_parameters()}
    twin = copy.deepcopy(net)
    twin.load_state_dict(params)
    with torch.no_grad():
        torch.testing.assert_close(functional_call(cm, params, (x,)), abfp.convert(twin, QUIET)(x), rtol=0, atol=0)
    for transform in (lambda: grad(lambda p: functional_call(cm, p, (x,)).sum())(params), lambda: vmap(cm)(x[:, None])):
        with pytest.raises(NotImplementedError, match=r"product 0:linear0 .*torch.func transform"):
            transform()


def test_product_free_torch_modules_get_no_hooks_and_sites_stay_put() -> None:
    """Activations, norms, dropout and a non-root ``nn.Sequential`` run without convert's hooks;
    a subclass with its own forward, an instance-level forward and the root keep them, and the
    products keep their sites and values (an independent evaluation with abfp.functional)."""

    class Doubled(nn.ReLU):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * torch.relu(x) @ torch.eye(x.shape[-1])  # a product inside an activation

    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.LayerNorm(8), nn.GELU(), nn.Dropout(0.0)), Doubled(),
                      nn.ReLU(), nn.Linear(8, 3))
    m[3].forward = lambda x: torch.relu(x)  # an instance forward: hooks stay
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    cfg = ABFPConfig(tile_width=8, gain=1.0, noise_std=0.0)
    am = abfp.convert(m, cfg)
    hooked = {name for name, mod in am.named_modules() if isinstance(mod.__dict__.get("forward"), GuardedForward)}
    assert not any(mod._forward_pre_hooks or mod._forward_hooks for mod in am.modules())  # torch's fast call path
    assert hooked == {"", "0", "2", "3", "4"}
    x = torch.randn(4, 8, generator=g)
    am.eval()
    with torch.no_grad():
        y = am(x)
        h = AF.linear(x, m[0].weight, m[0].bias, config=cfg)
        h = F.gelu(F.layer_norm(h, (8,), m[1][0].weight, m[1][0].bias))
        h = torch.relu(AF.matmul(2 * torch.relu(h), torch.eye(8), config=cfg))
        expect = AF.linear(h, m[4].weight, m[4].bias, config=cfg)
    torch.testing.assert_close(y, expect, rtol=0, atol=0)
    assert [r.site for r in abfp.summary(am, x).rows] == ["0:linear0", "2:matmul0", "4:linear0"]


def test_weight_parametrizations_are_prepared_digitally_not_on_the_device():
    """Spectral norm's power iteration (``torch.mv``, ``torch.vdot`` on the weight) ran as device
    products every forward, counted as the model's MACs and perturbing the weight itself; a
    deployed model's weights are prepared once. The converted model equals the device products of
    the float32 model's prepared weights, bit for bit, and only the layers' products are counted."""
    from torch.nn.utils import parametrizations as P

    torch.manual_seed(0)
    cfg = ABFPConfig(tile_width=8, noise_std=0.0)
    model = nn.Sequential(P.spectral_norm(nn.Linear(8, 6)), nn.ReLU(), P.weight_norm(nn.Linear(6, 3))).eval()
    x = torch.randn(4, 8)
    conv = abfp.convert(model, cfg, inplace=False)
    y = conv(x)
    h = torch.relu(AF.linear(x, model[0].weight.detach(), model[0].bias.detach(), config=cfg))
    assert torch.equal(y, AF.linear(h, model[2].weight.detach(), model[2].bias.detach(), config=cfg))
    assert torch.equal(conv[0].weight, model[0].weight)
    assert [r.site for r in abfp.summary(conv, x).rows] == ["0:linear0", "2:linear0"]
    abfp.to_digital(conv)
    assert torch.equal(conv(x), model(x))


def test_calibration_batches_of_keyword_inputs():
    """A batch that is a mapping is the model's keyword inputs (a tokenizer's output, a
    seq2seq model's ``decoder_input_ids``): it was passed as one positional argument."""

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(5, 3)

        def forward(self, x, *, other):
            return self.a(x) + self.b(other)

    torch.manual_seed(0)
    m = abfp.convert(TwoInputs(), ABFPConfig(mode="fixed", noise_std=0.0))
    batches = [{"x": torch.randn(2, 4), "other": torch.randn(2, 5)} for _ in range(3)]
    scales = abfp.calibrate(m, batches)
    assert scales["a:linear0"][0] == max(float(b["x"].abs().max()) for b in batches)
    assert scales["b:linear0"][0] == max(float(b["other"].abs().max()) for b in batches)
    assert m(**batches[0]).shape == (2, 3)


def test_a_calibration_that_fails_midway_keeps_the_scales_the_model_had():
    """Calibration cleared the scales, then a bad second batch raised: the model kept the first
    batch's scales only and its next forward used them without a word."""
    from abfp.nn.convert import needs_calibration

    torch.manual_seed(0)
    conv = abfp.convert(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).eval(),
                        ABFPConfig(mode="fixed", tile_width=8, noise_std=0.0))
    with pytest.raises(RuntimeError):
        abfp.calibrate(conv, [torch.randn(4, 8), torch.randn(4, 9)])
    assert abfp.analog_state(conv).input_scales == {} and needs_calibration(conv)
    good = abfp.calibrate(conv, [torch.randn(4, 8)], percentile=99.0)
    with pytest.raises(RuntimeError):
        abfp.calibrate(conv, [10 * torch.randn(4, 8), torch.randn(4, 9)])
    state = abfp.analog_state(conv)
    assert state.input_scales == good and state.calibration_percentile == 99.0


def test_an_override_of_modules_that_compute_no_product_is_refused():
    """An override on a ReLU or a LayerNorm sets nothing (they make no product): it was accepted
    and ignored; a pattern that also names a layer with products is fine."""
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.LayerNorm(4), nn.Sequential(nn.Linear(4, 2)))
    for pattern in ("1", "2", "[12]"):
        with pytest.raises(ValueError, match=f"override '{re.escape(pattern)}' names only modules that compute no product"):
            abfp.convert(m, QUIET, overrides={pattern: IDEAL})
    cm = abfp.convert(m, QUIET, overrides={"[01]": IDEAL, "3": IDEAL})  # a Sequential holds layers: fine
    with pytest.raises(ValueError, match=r"compute no product \(1 \(ReLU\)\)"):
        abfp.set_config(cm, QUIET, overrides={"1": IDEAL})
    assert abfp.analog_state(cm).overrides == {"[01]": IDEAL, "3": IDEAL}  # left as it was


@pytest.mark.parametrize("train", [False, True])
def test_the_hook_form_of_spectral_norm_is_prepared_digitally_too(train):
    """``torch.nn.utils.spectral_norm`` (a forward pre-hook, not a parametrization) ran its
    ``sigma`` (and in training its power iteration: ``mv``, ``dot``) as device products of the
    parent module: 45 extra MACs in eval, 125 in training, a perturbed weight."""
    from torch.nn.utils import remove_spectral_norm, spectral_norm

    torch.manual_seed(0)
    cfg = ABFPConfig(tile_width=8, noise_std=0.0, input_bits=4, weight_bits=4)
    model = nn.Sequential(spectral_norm(nn.Linear(8, 5)), nn.ReLU(), nn.Linear(5, 3)).train(train)
    x = torch.randn(3, 8)
    conv = abfp.convert(model, cfg).train(train)
    twin = copy.deepcopy(model)  # the float32 model
    y = conv(x)
    twin(x)  # the same hook step on the float32 copy: the weight the device must see
    assert torch.equal(conv[0].weight, twin[0].weight)
    h = torch.relu(AF.linear(x, twin[0].weight.detach(), twin[0].bias.detach(), config=cfg))
    assert torch.equal(y, AF.linear(h, twin[2].weight.detach(), twin[2].bias.detach(), config=cfg))
    assert abfp.coverage(conv).analog_macs == 3 * 8 * 5 + 3 * 5 * 3
    abfp.to_digital(conv)
    remove_spectral_norm(conv[0])  # the hook is torch's again
    assert not conv[0]._forward_pre_hooks


def test_a_model_torch_cannot_copy_is_refused_with_the_way_out():
    lin = torch.nn.utils.weight_norm(nn.Linear(4, 2))
    lin(torch.randn(1, 4))  # its weight is now computed: deepcopy refuses it
    with pytest.raises(ValueError, match=r"inplace=True"):
        abfp.convert(nn.Sequential(lin), QUIET)
    assert abfp.is_converted(abfp.convert(nn.Sequential(lin), QUIET, inplace=True))


def test_a_torchscript_module_is_refused_by_name():
    """A scripted or traced submodule made convert fail with "'_CachedForward' object has no
    attribute '__getattr__'"; its products run in TorchScript, out of abfp's sight."""
    x = torch.randn(2, 4)
    for inner, kind in ((torch.jit.script(nn.Linear(4, 4)), "RecursiveScriptModule"),
                        (torch.jit.trace(nn.Linear(4, 4), x), "TopLevelTracedModule")):
        model = nn.Sequential(nn.Linear(4, 4), inner)
        with pytest.raises(TypeError, match=f"module '1' is a TorchScript module \\({kind}\\)"):
            abfp.convert(model, QUIET, inplace=True)
        assert not abfp.is_converted(model) and "forward" not in model[0].__dict__  # nothing changed
    with pytest.raises(TypeError, match="module 'the root' is a TorchScript module"):
        abfp.convert(torch.jit.script(nn.Linear(4, 4)), QUIET)


def test_a_model_holding_a_converted_module_is_refused():
    """Converting a model that holds a converted module ran that module's products with its own
    device and state: missing from the model's summary and coverage, and still analog after
    ``to_digital`` of the model. Converting a module of a converted model did the same."""
    torch.manual_seed(0)
    inner = abfp.convert(nn.Linear(8, 8), QUIET)
    parent = nn.Sequential(inner, nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"module '0' is converted already .* overrides=\{'0': config\}"):
        abfp.convert(parent, IDEAL)
    assert "forward" not in parent[2].__dict__  # nothing changed
    abfp.to_digital(inner)
    whole = abfp.convert(parent, IDEAL)
    with pytest.raises(ValueError, match="this module is part of a converted model"):
        abfp.convert(whole[0], QUIET, inplace=True)
    abfp.convert(whole, QUIET, inplace=True)  # the converted model itself is converted anew
    assert abfp.analog_state(whole).config == QUIET


def test_calibration_without_batches_or_with_only_zeros_says_so():
    """``calibrate(model, [])`` wiped the model's scales and returned {} (the next forward then
    failed); a site that saw only zeros got a static scale of 0, which encodes every later input
    as 0: the layer's output was its bias alone, silently."""
    conv = abfp.convert(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).eval(),
                        ABFPConfig(mode="fixed", tile_width=8, noise_std=0.0))
    good = abfp.calibrate(conv, [torch.randn(4, 8)])
    with pytest.raises(ValueError, match="at least one batch"):
        abfp.calibrate(conv, iter([]))
    assert abfp.analog_state(conv).input_scales == good
    with pytest.warns(UserWarning, match=r"\['0:linear0'\] saw only zeros") as got:
        abfp.calibrate(conv, [torch.zeros(4, 8)])
    assert got[0].filename == __file__  # points at the caller


def test_convert_arguments_of_the_wrong_kind_are_refused_in_words():
    """``overrides`` as a list of pairs raised AttributeError ('list' object has no attribute
    'items'), ``exclude=[0]`` a regex TypeError, ``exclude=None`` 'NoneType' is not iterable,
    and ``include_matmul="no"`` was accepted as True."""
    m = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="overrides must be a mapping"):
        abfp.convert(m, QUIET, overrides=[("0", IDEAL)])
    with pytest.raises(TypeError, match="exclude takes module names or regular expressions"):
        abfp.convert(m, QUIET, exclude=[0])
    with pytest.raises(TypeError, match="include_matmul must be True or False"):
        abfp.convert(m, QUIET, include_matmul="no")
    assert abfp.analog_state(abfp.convert(m, QUIET, exclude=None)).exclude == ()


def test_a_module_replaced_after_convert_is_refused_when_it_runs():
    """A head replaced after convert (``model[2] = ...``) ran its products as the root's: analog
    although '2' was excluded, under the root's name and device. It is refused naming the module,
    through product-free containers too; converting again covers it."""
    m = abfp.convert(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), QUIET, exclude=["2"])
    m[2] = nn.Sequential(nn.ReLU(), nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"module '2\.1' was added or replaced after abfp.convert"):
        m(torch.randn(2, 4))
    again = abfp.convert(m, QUIET, exclude=["2"])
    assert [r.site for r in abfp.summary(again, torch.randn(2, 4)).rows if r.kind != "digital"] == ["0:linear0"]


@pytest.mark.parametrize("name", ["weight_norm", "orthogonal", "spectral_norm"])
def test_a_parametrization_registered_after_convert_is_refused_in_its_own_words(name):
    """The refusal named a module ``'0.parametrizations'`` 'added or replaced', which a user who
    called ``torch.nn.utils.parametrizations.weight_norm`` never added; it names the
    parametrization and the way out, and converting again prepares the weight digitally."""
    from torch.nn.utils import parametrizations as P

    torch.manual_seed(0)
    m = abfp.convert(nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2)), QUIET)
    getattr(P, name)(m[0])
    x = torch.randn(3, 6)
    with pytest.raises(ValueError, match=r"weight parametrization \('0\.parametrizations'.*registered after "
                                         r"abfp.convert.*convert the model again"):
        m(x)
    again = abfp.convert(m, QUIET).eval()
    with torch.no_grad():
        h = torch.relu(AF.linear(x, again[0].weight, again[0].bias, config=QUIET))
        assert torch.equal(again(x), AF.linear(h, again[2].weight, again[2].bias, config=QUIET))


def test_torch_jit_script_of_a_converted_model_is_refused_in_words():
    """It raised "'GuardedForward' object has no attribute '__globals__'"; now the error names
    abfp, the module and the tracers that work. The float32 model still scripts."""
    m = abfp.convert(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), QUIET)
    for target, name in ((m, "the root module"), (m[2], "module '2'")):
        with pytest.raises(AttributeError, match=rf"abfp: {name} is converted .*torch.jit.script.*"
                                                 r"torch.jit.trace, torch.compile or torch.export"):
            torch.jit.script(target)
    x = torch.randn(2, 4)
    assert torch.equal(torch.jit.script(abfp.to_digital(m, inplace=False))(x), abfp.to_digital(m)(x))


class _Clip(nn.Module):
    """OpenAI CLIP's shape: ``encode_text`` (a method, not ``forward``) runs layers and then a product
    with a parameter of its own, ``@ self.text_projection``; ``forward`` calls it and a helper that
    makes a product itself."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(10, 8)
        self.enc = nn.Linear(8, 8)
        self.text_projection = nn.Parameter(torch.randn(8, 4))

    def encode_text(self, t):
        return self.enc(self.tok(t)).mean(1) @ self.text_projection

    def scores(self, e):
        return e @ e.T

    def forward(self, t):
        return self.scores(self.encode_text(t))


def test_a_method_of_a_converted_model_called_from_outside_runs_on_the_device():
    """``model.encode_text(t)`` called by the user is no forward: its own product ``@ self.text_projection``
    ran in float32, uncounted (64 of 704 MACs missing). A public method that uses the module's own
    layers or weights now runs as ``forward`` does, on the device, with the numbers of a model whose
    forward it is; a helper called inside ``forward`` keeps the forward's site names; torch's own
    methods (``nn.Linear.reset_parameters``) are left as they were, ``to_digital`` removes the
    wrappers. A method that names none of the module's layers or weights but makes a product
    (``scores``: ``@``) is wrapped too since session 18 (tests/reach/test_unsaid_products.py)."""

    class Encoder(_Clip):
        def forward(self, t):
            return self.encode_text(t)

    cfg = ABFPConfig(noise_std=0.0)
    clip = _Clip()
    enc = Encoder()
    enc.load_state_dict(clip.state_dict())
    m, m_enc = abfp.convert(clip, cfg), abfp.convert(enc, cfg)
    t = torch.randint(0, 10, (2, 5))
    s = abfp.summary(m, (t,))
    assert [r.site for r in s.rows] == ["enc:linear0", ":matmul0", ":matmul1"]  # encode_text's, then scores'
    abfp.coverage(m).reset()
    with torch.no_grad():
        e = m.encode_text(t)
        assert abfp.coverage(m).analog_macs == 2 * 5 * 8 * 8 + 2 * 8 * 4 and abfp.coverage(m).digital_macs == 0
        torch.testing.assert_close(e, m_enc(t), rtol=0, atol=0)
        to_float = abfp.to_digital(copy.deepcopy(m)).encode_text(t)
        assert not torch.allclose(e, to_float, atol=1e-4)
    assert "encode_text" in m.__dict__ and "scores" in m.__dict__ and "reset_parameters" not in m.enc.__dict__
    abfp.to_digital(m)
    assert "encode_text" not in m.__dict__ and "scores" not in m.__dict__
    with torch.no_grad():
        torch.testing.assert_close(m.encode_text(t), to_float)
