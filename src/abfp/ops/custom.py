"""The device products as PyTorch custom operators, so that tracers record them as single nodes.

``torch.compile``, ``torch.export`` (strict and non-strict) and ``torch.jit.trace`` cannot look
inside the device numerics (data-dependent checks, compiled numba kernels, Python caches).
Under a tracer (:func:`abfp.ops.device.tracing`) the product families call these operators
instead; each one runs the same eager code, so a traced model gives the numbers of the eager one:

- ``abfp::device(x3, w, config, weight_config, input_scale, weight_scale, key, want_mask) -> (y, mask)``:
  ``Y = X3 @ W^T`` (SPEC section 1: DAC codes, exact tile products, gain, noise, ADC, rescale,
  sum of tiles) by :func:`abfp.numerics.analog_product`. ``w`` is (Bw, N, K), or a static 2-D
  weight (N, K) whose encoding is cached per weight value under ``weight_config`` (``""``: encode
  per call with ``config``). ``mask`` (B, T, M, N) is the ADC clamp mask when ``want_mask``
  (an empty tensor otherwise). Its registered backward is ``abfp::device_backward``.
- ``abfp::device_backward(gy, x3, w, mask, config, input_scale, weight_scale, need_x, need_w) -> (gx, gw)``:
  the straight-through gradients (:func:`abfp.ops.device.ste_grads`); empty where not needed.
- ``abfp::conv2d(x, weight, pads, stride, dilation, groups, config, weight_config, input_scale,
  weight_scale, key) -> y``: an inference 2-D convolution in the column layout (the compiled
  kernels of :func:`abfp.ops.conv._conv2d_cols`), without bias; contiguous NCHW float32.

- ``abfp::count(after, token, analog_macs, digital_macs, digital_name) -> ()``: adds one traced
  product's MACs to the :class:`~abfp.ops.coverage.Coverage` whose token is ``token``
  (:func:`~abfp.ops.coverage.coverage_for`; none: nothing), when the graph runs: ``analog_macs`` to
  ``analog_macs``, ``digital_macs`` to ``digital_ops[digital_name]``. ``after`` is the product's
  output (so the count follows it in the graph); the counts are SymInts, so a graph exported with
  a dynamic batch counts each call's own. Registered as a side effect (no tracer drops it); its
  fake implementation counts nothing, so tracing a graph is no call of the model. It has no
  backward: a backward pass counts nothing, as in eager.

The configuration travels as its canonical JSON (:func:`abfp.ops.device.config_json`), the
uniform-noise key as a one-element int64 tensor drawn in the graph (:func:`abfp.ops.device.traced_key`);
the same key gives the same numbers as eager. The input finiteness check runs inside the
operators (a ``ValueError`` at run time, not a data-dependent guard at trace time). Each
operator has a fake (meta) implementation that gives the output shapes without computing.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..numerics import analog_product
from ..numerics.blocks import num_tiles
from .conv import conv2d_columns
from .coverage import coverage_for
from .device import (check_finite, config_from_json, encoded_weights, shift_for_overflow, ste_grads, training_product,
                     unshift_output)

__all__ = ["device", "device_backward", "conv2d", "count"]


def _key(key: Optional[Tensor]) -> int | None:
    return None if key is None else int(key.reshape(-1)[0])


@torch.library.custom_op("abfp::device", mutates_args=())
def device(x3: Tensor, w: Tensor, config: str, weight_config: str, input_scale: Optional[float],
           weight_scale: Optional[float], key: Optional[Tensor], want_mask: bool) -> tuple[Tensor, Tensor]:
    cfg = config_from_json(config)
    check_finite(x3, "input")
    w3 = w.unsqueeze(0) if w.dim() == 2 else w
    if cfg.kernel == "reference":  # the float64 oracle encodes nothing in advance
        check_finite(w3, "weight")
        weights = None
    else:
        weights = encoded_weights(w, w3, cfg, weight_config, weight_scale)
    k, xs, s_in = shift_for_overflow(x3, cfg, input_scale)  # as ops.device.product
    if not want_mask:
        y, _ = analog_product(xs, w3, cfg, input_scale=s_in, weight_scale=weight_scale, weights=weights,
                              key=_key(key))
        return unshift_output(y, k, x3, w3), torch.empty(0, dtype=torch.bool, device=x3.device)
    y, mask = training_product(xs, w3, cfg, input_scale=s_in, weight_scale=weight_scale, weights=weights,
                               key=_key(key))
    y = unshift_output(y, k, x3, w3)
    if mask is None:  # no ADC sample clipped
        mask = torch.ones(x3.shape[0], num_tiles(x3.shape[2], cfg.tile_width), x3.shape[1], w3.shape[1],
                          dtype=torch.bool, device=x3.device)
    return y, mask


@device.register_fake
def _device_fake(x3, w, config, weight_config, input_scale, weight_scale, key, want_mask):
    cfg = config_from_json(config)
    B, M, K = x3.shape
    N = w.shape[-2]
    y = x3.new_empty((B, M, N), dtype=torch.float32)
    shape = (B, num_tiles(K, cfg.tile_width), M, N) if want_mask else (0,)
    return y, x3.new_empty(shape, dtype=torch.bool)


@torch.library.custom_op("abfp::device_backward", mutates_args=())
def device_backward(gy: Tensor, x3: Tensor, w: Tensor, mask: Tensor, config: str, input_scale: Optional[float],
                    weight_scale: Optional[float], need_x: bool, need_w: bool) -> tuple[Tensor, Tensor]:
    w3 = w.unsqueeze(0) if w.dim() == 2 else w
    gx, gw = ste_grads(gy, x3, w3, mask, config_from_json(config), input_scale, weight_scale, need_x, need_w)
    gx = x3.new_empty(0) if gx is None else gx.contiguous()
    gw = w.new_empty(0) if gw is None else gw.reshape(w.shape).contiguous()
    return gx, gw


@device_backward.register_fake
def _device_backward_fake(gy, x3, w, mask, config, input_scale, weight_scale, need_x, need_w):
    return (x3.new_empty(x3.shape) if need_x else x3.new_empty(0)), (w.new_empty(w.shape) if need_w else w.new_empty(0))


def _setup_device(ctx, inputs, output) -> None:
    x3, w, config, _, input_scale, weight_scale, _, want_mask = inputs
    if not want_mask:
        raise RuntimeError("abfp::device was called with want_mask=False on operands that require gradients")
    ctx.save_for_backward(x3, w, output[1])
    ctx.config, ctx.input_scale, ctx.weight_scale = config, input_scale, weight_scale


def _backward_device(ctx, gy, _gmask):
    x3, w, mask = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gx, gw = torch.ops.abfp.device_backward(gy, x3, w, mask, ctx.config, ctx.input_scale, ctx.weight_scale,
                                            need_x, need_w)
    return (gx if need_x else None), (gw if need_w else None), None, None, None, None, None, None


device.register_autograd(_backward_device, setup_context=_setup_device)


@torch.library.custom_op("abfp::conv2d", mutates_args=())
def conv2d(x: Tensor, weight: Tensor, pads: list[int], stride: list[int], dilation: list[int], groups: int,
           config: str, weight_config: str, input_scale: Optional[float], weight_scale: Optional[float],
           key: Optional[Tensor]) -> Tensor:
    return conv2d_columns(x, weight, tuple(pads), tuple(stride), tuple(dilation), groups, config_from_json(config),
                          weight_config, input_scale, weight_scale, _key(key)).contiguous()


@conv2d.register_fake
def _conv2d_fake(x, weight, pads, stride, dilation, groups, config, weight_config, input_scale, weight_scale, key):
    bt, _, h, w_ = x.shape
    cout, _, kh, kw = weight.shape
    ho = (h + pads[2] + pads[3] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w_ + pads[0] + pads[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return x.new_empty((bt, cout, ho, wo), dtype=torch.float32)


@torch.library.custom_op("abfp::count", mutates_args=())
def count(after: Optional[Tensor], token: int, analog_macs: int, digital_macs: int, digital_name: str) -> None:
    cov = coverage_for(token)
    if cov is None:  # an exported program whose model is gone, or run in another process
        return
    cov.analog_macs += int(analog_macs)
    if digital_name:
        cov.add_digital(digital_name, int(digital_macs))


@count.register_fake
def _count_fake(after, token, analog_macs, digital_macs, digital_name):
    return None


torch.fx.node.has_side_effect(torch.ops.abfp.count.default)  # kept by dead-code elimination (it has no output)
