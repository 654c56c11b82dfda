"""A converted model refuses what torch refuses: operands that mix a half-precision dtype (float16,
bfloat16) with another (a float16 model given float32 input, a float16 by float32 activation
product) are a ``RuntimeError`` as in torch, naming abfp and the product; under ``torch.autocast``
the mix runs, as in torch; same-dtype half and float64 models keep their dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import abfp
from abfp import ABFPConfig

CFG = ABFPConfig(noise_std=0.0, tile_width=8)
HALF = [torch.float16, torch.bfloat16]


class Product(nn.Module):
    def forward(self, a, b):
        return a @ b


def _models():
    return {"linear": (lambda: nn.Linear(16, 4), lambda d: (torch.randn(3, 16, dtype=d),)),
            "conv2d": (lambda: nn.Conv2d(2, 3, 3), lambda d: (torch.randn(1, 2, 5, 5, dtype=d),))}


@pytest.mark.parametrize("model_dtype, input_dtype", [(h, torch.float32) for h in HALF] + [(torch.float32, h) for h in HALF]
                         + [(torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("name", ["linear", "conv2d"])
def test_a_half_model_and_another_input_dtype_raise_as_in_torch(name, model_dtype, input_dtype):
    make, inputs = _models()[name]
    torch.manual_seed(0)
    x = inputs(input_dtype)
    with pytest.raises(RuntimeError):
        make().to(model_dtype)(*x)  # what torch does
    am = abfp.convert(make().to(model_dtype), CFG)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"abfp: torch.(linear|conv2d) \(module 'the root'\) mixes .* torch "
                                                           "refuses operands"):
        am(*x)
    assert abfp.coverage(am).analog_macs == 0


@pytest.mark.parametrize("half", HALF)
def test_a_half_by_float32_activation_product_raises_as_in_torch(half):
    a, b = torch.randn(3, 4, dtype=half), torch.randn(4, 5)
    with pytest.raises(RuntimeError):
        Product()(a, b)
    am = abfp.convert(Product(), CFG)
    for x, y in ((a, b), (b.t(), a.t())):
        with pytest.raises(RuntimeError, match=r"abfp: product :matmul0 \(module 'the root'\) mixes"):
            am(x, y)


@pytest.mark.parametrize("dtype", [*HALF, torch.float64])
def test_one_dtype_throughout_keeps_it(dtype):
    torch.manual_seed(0)
    am = abfp.convert(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).to(dtype), CFG)
    with torch.no_grad():
        assert am(torch.randn(3, 16, dtype=dtype)).dtype == dtype


def test_under_autocast_a_half_activation_meets_float32_weights_as_in_torch():
    """An excluded (float32, digital) layer gives bfloat16 under CPU autocast; the next layer's
    product on the device takes it with its float32 weights, as torch's autocast linear does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4))
    am = abfp.convert(model, CFG, exclude=["0"])
    x = torch.randn(3, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(x)
        got = am(x)
    assert want.dtype == torch.bfloat16 and got.dtype == torch.bfloat16
    assert abfp.coverage(am).analog_macs == 3 * 8 * 4


def test_float64_input_to_a_float32_model_stays_as_it_was():
    """Left as before (the device computes in float32; the output in the input's dtype)."""
    torch.manual_seed(0)
    am = abfp.convert(nn.Linear(16, 4), CFG)
    x = torch.randn(3, 16)
    with torch.no_grad():
        got = am(x.double())
        assert got.dtype == torch.float64
        assert torch.allclose(got.float(), am(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("call", ["linear", "conv1d", "addmm", "baddbmm"])
def test_a_bias_or_addend_of_another_dtype_than_half_factors_raises_as_in_torch(call):
    """The products alone (float16 by float16) would not see the float32 bias or added matrix."""
    h = torch.float16
    fn, args = {"linear": (F.linear, (torch.randn(3, 4, dtype=h), torch.randn(5, 4, dtype=h), torch.randn(5))),
                "conv1d": (F.conv1d, (torch.randn(1, 2, 5, dtype=h), torch.randn(3, 2, 1, dtype=h), torch.randn(3))),
                "addmm": (torch.addmm, (torch.randn(3, 5), torch.randn(3, 4, dtype=h), torch.randn(4, 5, dtype=h))),
                "baddbmm": (torch.baddbmm, (torch.randn(2, 3, 5), torch.randn(2, 3, 4, dtype=h),
                                            torch.randn(2, 4, 5, dtype=h)))}[call]
    with pytest.raises(RuntimeError):
        fn(*args)
    with pytest.raises(RuntimeError, match=rf"abfp: torch.{call} \(module 'the root'\) mixes"):
        abfp.convert(Call(fn), CFG)(*args)


class Call(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.unused = nn.Linear(1, 1)  # a module with a product layer: convert refuses none

    def forward(self, *args):
        return self.fn(*args)
