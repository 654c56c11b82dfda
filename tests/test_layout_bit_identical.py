"""Bit-for-bit guard of the package layout (issue #15): moving code must not move numbers.

A fixed set of outputs (functional products of every family, converted models, noise on with
seeds under all three kernels, the calibrated fixed-point baseline, and the gradients of a
QAT-like backward) is hashed (sha256 of the float32 bytes, plus a few values for a readable
diff) and compared with ``layout_golden.json``, generated ONCE from the commit before the
layout change (``python3 tests/test_layout_bit_identical.py --write``). Numbers that move are
a bug of the refactor, not a reason to regenerate.

The golden values hold for the torch version that wrote them (digital float32 parts such as
softmax and layer norm may round differently under another torch build): under another
version the test is skipped, saying so.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import abfp
import abfp.functional as AF
from abfp import ABFPConfig

GOLDEN = Path(__file__).with_name("layout_golden.json")
KERNELS = ("auto", "chunked", "reference")


def _cfg(kernel: str, **kw) -> ABFPConfig:
    return ABFPConfig(**{"tile_width": 32, "gain": 2.0, "seed": 7, "kernel": kernel, **kw})


def _rand(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4)
        self.c3 = nn.Conv1d(8, 6, 3, padding="same")
        self.fc = nn.Linear(6 * 16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c1(x))
        y = torch.relu(self.c2(y))  # (B, 8, 4, 4)
        y = self.c3(y.flatten(2))  # (B, 6, 16)
        return self.fc(y.flatten(1))


def _cnn() -> nn.Module:
    torch.manual_seed(1)
    return _CNN().eval()


def _transformer() -> nn.Module:
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=48, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()


class _SdpaBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, 2, 8).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return torch.einsum("bhtd,bhsd->bhts", y, k).sum(-1)


def _functional_cases(kernel: str) -> dict[str, Callable[[], torch.Tensor]]:
    cfg = _cfg(kernel)
    x = _rand(5, 70, seed=10)
    w = _rand(9, 70, seed=11)
    b = _rand(9, seed=12)
    img = _rand(2, 6, 9, 9, seed=13)
    cw = _rand(8, 3, 3, 3, seed=14)
    sig = _rand(2, 4, 20, seed=15)
    c1w = _rand(6, 4, 5, seed=16)
    q, k, v = (_rand(2, 2, 7, 16, seed=s) for s in (17, 18, 19))
    a3, b3 = _rand(3, 6, 40, seed=20), _rand(3, 40, 5, seed=21)
    return {
        "linear": lambda: AF.linear(x, w, b, config=cfg),
        "linear_bf16_io": lambda: AF.linear(x, w, b, config=cfg.replace(bf16_io=True)),
        "matmul": lambda: AF.matmul(a3, b3, config=cfg),
        "conv2d_grouped_strided": lambda: AF.conv2d(img, cw, None, 2, 1, 1, 2, config=cfg),
        "conv2d_dilated_same": lambda: AF.conv2d(img, cw[:, :, :, :], None, 1, "same", 2, 2, config=cfg),
        "conv1d": lambda: AF.conv1d(sig, c1w, None, 2, 1, config=cfg),
        "einsum": lambda: AF.einsum("bik,bjk->bij", a3, a3[:, :4], config=cfg),
        "sdpa": lambda: _converted_sdpa(cfg, q),
    }


def _converted_sdpa(cfg: ABFPConfig, x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(3)
    m = abfp.convert(_SdpaBlock().eval(), cfg)
    abfp.reseed(m)
    with torch.no_grad():
        return m(x.reshape(2, 14, 16))


def _model_cases(kernel: str) -> dict[str, Callable[[], torch.Tensor]]:
    cfg = _cfg(kernel)
    img = _rand(3, 3, 8, 8, seed=30)
    seq = _rand(2, 6, 32, seed=31)

    def cnn() -> torch.Tensor:
        m = abfp.convert(_cnn(), cfg)
        abfp.reseed(m)
        with torch.no_grad():
            return torch.cat([m(img).flatten(), m(img).flatten()])  # two batches: the stream continues

    def transformer() -> torch.Tensor:
        m = abfp.convert(_transformer(), cfg)
        abfp.reseed(m)
        with torch.no_grad():
            return m(seq)

    def mha_weights() -> torch.Tensor:
        torch.manual_seed(4)
        m = abfp.convert(nn.MultiheadAttention(32, 4, batch_first=True).eval(), cfg)
        abfp.reseed(m)
        with torch.no_grad():
            out, wts = m(seq, seq, seq, need_weights=True)
        return torch.cat([out.flatten(), wts.flatten()])

    def fixed_calibrated() -> torch.Tensor:
        m = abfp.convert(_cnn(), _cfg(kernel, mode="fixed", gain=1.0))
        abfp.calibrate(m, [img[:2], img[1:]])
        abfp.reseed(m)
        with torch.no_grad():
            return m(img)

    def qat_gradients() -> torch.Tensor:
        m = abfp.convert(_cnn().train(), cfg)
        abfp.reseed(m)
        xin = img.clone().requires_grad_(True)
        loss = (m(xin) ** 2).sum()
        loss.backward()
        grads = [p.grad.flatten() for p in m.parameters()]
        return torch.cat([*grads, xin.grad.flatten()])

    return {"cnn": cnn, "transformer": transformer, "mha_weights": mha_weights,
            "fixed_calibrated": fixed_calibrated, "qat_gradients": qat_gradients}


def compute_all() -> dict[str, torch.Tensor]:
    """Every guarded output, computed in a fixed order with the noise streams restarted first,
    on one thread (the digital float32 parts, e.g. the backward GEMMs, sum in an order that
    depends on the thread count; the device numbers do not)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _compute_all()
    finally:
        torch.set_num_threads(threads)


def _compute_all() -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for kernel in KERNELS:
        AF.clear_cache()
        abfp.reseed()  # the functional streams
        for name, fn in _functional_cases(kernel).items():
            out[f"{kernel}/{name}"] = fn()
        for name, fn in _model_cases(kernel).items():
            out[f"{kernel}/model/{name}"] = fn()
    # noise off: one more pass through the default kernel
    quiet = ABFPConfig(tile_width=16, noise_std=0.0)
    out["quiet/linear"] = AF.linear(_rand(4, 50, seed=40), _rand(7, 50, seed=41), config=quiet)
    return out


def fingerprint(t: torch.Tensor) -> dict:
    f = t.detach().to(torch.float32).contiguous()
    flat = f.flatten()
    picks = [0, flat.numel() // 2, flat.numel() - 1] if flat.numel() else []
    return {
        "shape": list(f.shape),
        "sha256": hashlib.sha256(f.numpy().tobytes()).hexdigest(),
        "values": [float(flat[i]) for i in picks],
    }


def _golden() -> dict:
    if not GOLDEN.exists():
        pytest.skip(f"{GOLDEN.name} missing: generate it once with python3 {Path(__file__).name} --write")
    data = json.loads(GOLDEN.read_text())
    if data["torch"] != torch.__version__:
        pytest.skip(f"golden values written under torch {data['torch']}, running {torch.__version__}")
    return data


@pytest.mark.slow
def test_layout_change_moves_no_number():
    golden = _golden()["outputs"]
    got = {k: fingerprint(v) for k, v in compute_all().items()}
    assert sorted(got) == sorted(golden)
    moved = [f"{k}: {golden[k]['values']} -> {got[k]['values']}" for k in golden
             if got[k]["sha256"] != golden[k]["sha256"] or got[k]["shape"] != golden[k]["shape"]]
    assert not moved, "numbers moved:\n" + "\n".join(moved)


if __name__ == "__main__" and "--write" in sys.argv:
    rows = [f"  {json.dumps(k)}: {json.dumps(fingerprint(v))}" for k, v in compute_all().items()]
    GOLDEN.write_text('{"torch": %s, "outputs": {\n%s\n}}\n' % (json.dumps(torch.__version__), ",\n".join(rows)))
    print(f"wrote {GOLDEN}")
