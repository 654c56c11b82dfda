"""The geometry of one intercepted product: what each output sees (``||x||``, ``D``, ``||w_i||``).

A :class:`ProductView` wraps an :class:`abfp.ops.site.ProductCall` (or plain operands) and
answers, broadcastable to the product's output ``y``:

* ``input_norm_sq()``: ``||x||^2`` of the vector each output is a dot product with. Linear:
  the input row; convolution (1-D, 2-D, 3-D): the im2col patch of that output position
  (computed as a convolution of ``x^2`` with a kernel of ones, per group); transposed
  convolution: the input vectors ``x[group, p]`` of every input position ``p`` whose product
  lands on that output in the overlap-add (``sum_p ||x[g, :, p]||^2``, computed as a transposed
  convolution of ``x^2`` with a kernel of ones, per group); matmul ``a @ b``: the row of ``a``.
* ``fan_in()``: ``D``, the number of MACs behind each output. Linear and matmul: ``K``;
  convolution: the non-padding entries of that position's patch (``C_in/groups * k`` inside
  the image, fewer at a zero-padded border); transposed convolution: ``C_in/groups`` times
  the number of (input position, kernel tap) pairs that land on that output.
* ``weight_norm_sq()``: ``||w_i||^2``. Linear/conv: the weight row of output channel ``i``;
  transposed convolution: ``sum_{c in group, k} W[c, i, k]^2`` (all taps of output channel
  ``i``); matmul: the column of ``b`` (the second operand plays the weight).
* ``macs(y)``: the MACs of the product given its output: ``y.numel() * K`` for linear, conv
  and matmul; a transposed convolution does ``C_out/groups * prod(kernel)`` per input
  element (every input position times ``C_in``).
* ``channel(v)``: a per-output-channel vector (length 1 or ``channels``) shaped to broadcast
  over ``y``. Linear and conv have ``weight.shape[0]`` channels; a matmul has 1 (activation
  by activation products own one energy per layer).
* ``compute(weight)``: the float32 product again, with another weight (weight noise).

All norms are computed without autograd: noise magnitudes are data-dependent constants;
gradients reach the energies (and, through ``y``, everything upstream).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.conv import conv_args
from ..ops.linear import linear_args

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _conv_t_args(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    return input, weight, bias, stride, padding, output_padding, groups, dilation


@dataclass
class ProductView:
    """One product ``y = x (*) w`` of kind ``"linear"``, ``"conv"``, ``"conv_transpose"`` or ``"matmul"``."""

    kind: str
    input: Tensor
    weight: Tensor
    bias: Tensor | None = None
    conv: tuple[Any, Any, Any, int] | None = None  # stride, padding, dilation, groups
    output_padding: Any = 0  # transposed convolutions only
    _cache: dict[str, Tensor] = field(default_factory=dict, repr=False)

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_call(cls, call: Any) -> "ProductView | None":
        """From an interceptor's ``ProductCall``; ``None`` for products it cannot describe (einsum)."""
        func, args, kwargs = call.call
        if call.kind == "linear":
            x, w, b = linear_args(*args, **kwargs)
            return cls("linear", x, w, b)
        if call.kind == "conv" and func in _CONV_T.values():
            x, w, b, stride, padding, output_padding, groups, dilation = _conv_t_args(*args, **kwargs)
            return cls("conv_transpose", x, w, b, (stride, padding, dilation, groups), output_padding)
        if call.kind == "conv":
            x, w, b, stride, padding, dilation, groups = conv_args(*args, **kwargs)
            if w.dim() - 2 not in _CONV:
                return None
            return cls("conv", x, w, b, (stride, padding, dilation, groups))
        if call.kind == "matmul" and func is not torch.einsum:
            a, b = call.operands
            if a.dim() == 0 or b.dim() == 0:
                return None
            return cls("matmul", a, b)
        return None

    # ----------------------------------------------------------------- shape facts
    @property
    def channels(self) -> int:
        """Output channels that can own their own energy (1 for a matmul)."""
        if self.kind == "conv_transpose":
            return int(self.weight.shape[1]) * self._groups
        return 1 if self.kind == "matmul" else int(self.weight.shape[0])

    @property
    def _groups(self) -> int:
        return int(self.conv[3]) if self.conv is not None else 1

    @property
    def reduction(self) -> int:
        """``K``: the dot-product length per output (per group for convolutions)."""
        if self.kind == "linear":
            return int(self.weight.shape[-1])
        if self.kind == "conv":
            return int(self.weight[0].numel())
        if self.kind == "conv_transpose":  # each analog product reduces over C_in/groups
            return int(self.weight.shape[0]) // self._groups
        return int(self.input.shape[-1])

    @property
    def _nd(self) -> int:
        return self.weight.dim() - 2

    @property
    def _batched(self) -> bool:
        return self.kind not in ("conv", "conv_transpose") or self.input.dim() == self._nd + 2

    def _conv_t(self, x: Tensor, w: Tensor, bias: Tensor | None, groups: int) -> Tensor:
        stride, padding, dilation, _ = self.conv  # type: ignore[misc]
        return _CONV_T[self._nd](x, w, bias, stride, padding, self.output_padding, groups, dilation)

    def macs(self, y: Tensor) -> int:
        """Multiply-accumulates of the product that gave ``y`` (as :func:`abfp.summary` counts them)."""
        if self.kind == "conv_transpose":
            return int(self.input.numel()) * int(self.weight[0].numel())
        return int(y.numel()) * self.reduction

    # ----------------------------------------------------------------- the product
    def compute(self, weight: Tensor | None = None) -> Tensor:
        """``y`` in float32 with ``weight`` (default: the product's own)."""
        w = self.weight if weight is None else weight
        if self.kind == "linear":
            return F.linear(self.input, w, self.bias)
        if self.kind == "conv":
            assert self.conv is not None
            stride, padding, dilation, groups = self.conv
            return _CONV[self._nd](self.input, w, self.bias, stride, padding, dilation, groups)
        if self.kind == "conv_transpose":
            return self._conv_t(self.input, w, self.bias, self._groups)
        return torch.matmul(self.input, w)

    # ----------------------------------------------------------------- per output
    def input_norm_sq(self) -> Tensor:
        """``||x||^2`` per output, broadcastable to ``y``."""
        if "xn" in self._cache:
            return self._cache["xn"]
        x = self.input.detach().float()
        if self.kind == "linear":
            out = (x * x).sum(-1, keepdim=True)
        elif self.kind == "conv":
            stride, padding, dilation, groups = self.conv  # type: ignore[misc]
            w = self.weight
            cin_g = w.shape[1]
            ones = torch.ones((groups, cin_g, *w.shape[2:]), dtype=x.dtype, device=x.device)
            out = _CONV[self._nd](x * x, ones, None, stride, padding, dilation, groups)  # (B, g, ...)
            axis = 1 if self._batched else 0
            out = out.repeat_interleave(w.shape[0] // groups, dim=axis)
        elif self.kind == "conv_transpose":
            groups, w = self._groups, self.weight
            ones = torch.ones((w.shape[0], 1, *w.shape[2:]), dtype=x.dtype, device=x.device)
            out = self._conv_t(x * x, ones, None, groups)  # (B, g, ...): sum over the group's inputs landing there
            axis = 1 if self._batched else 0
            out = out.repeat_interleave(w.shape[1], dim=axis)
        else:
            a, b = x, self.weight
            keep = b.dim() > 1 and a.dim() > 1
            out = (a * a).sum(-1, keepdim=keep)
        self._cache["xn"] = out
        return out

    def weight_norm_sq(self) -> Tensor:
        """``||w_i||^2`` per output, broadcastable to ``y``."""
        w = self.weight.detach().float()
        if self.kind == "linear":
            return (w * w).sum(-1)
        if self.kind == "conv":
            return self.channel((w * w).flatten(1).sum(1))
        if self.kind == "conv_transpose":  # (C_in, C_out/g, *k) -> per output channel g*C_out/g + o
            per = (w * w).flatten(2).sum(2).reshape(self._groups, -1, w.shape[1]).sum(1)
            return self.channel(per.reshape(-1))
        if w.dim() == 1:
            return (w * w).sum()
        out = (w * w).sum(-2)  # (..., N)
        return out.unsqueeze(-2) if self.input.dim() > 1 else out

    def fan_in(self) -> Tensor:
        """``D`` per output, broadcastable to ``y`` (conv: non-padding entries of the patch)."""
        if "d" in self._cache:
            return self._cache["d"]
        if self.kind == "conv_transpose":
            w = self.weight
            cg = w.shape[0] // self._groups
            spatial = self.input.shape[-self._nd:]
            ones_x = torch.ones((1, cg, *spatial), dtype=torch.float32, device=self.input.device)
            ones_w = torch.ones((cg, 1, *w.shape[2:]), dtype=torch.float32, device=self.input.device)
            out = self._conv_t(ones_x, ones_w, None, 1).round().clamp_min(1.0)  # (1, 1, ...)
            if not self._batched:
                out = out.squeeze(0)
        elif self.kind != "conv":
            out = torch.tensor(float(self.reduction), device=self.input.device)
        else:
            stride, padding, dilation, groups = self.conv  # type: ignore[misc]
            w = self.weight
            spatial = self.input.shape[-self._nd:]
            ones_x = torch.ones((1, w.shape[1], *spatial), dtype=torch.float32, device=self.input.device)
            ones_w = torch.ones((1, w.shape[1], *w.shape[2:]), dtype=torch.float32, device=self.input.device)
            out = _CONV[self._nd](ones_x, ones_w, None, stride, padding, dilation, 1)  # (1, 1, ...)
            out = out.round().clamp_min(1.0)  # a patch all padding: its output is 0 anyway
            if not self._batched:
                out = out.squeeze(0)
        self._cache["d"] = out
        return out

    def channel(self, v: Tensor) -> Tensor:
        """A vector per output channel (length 1 or ``channels``) shaped to broadcast over ``y``."""
        if v.dim() == 0 or v.numel() == 1:
            return v.reshape(())
        if self.kind == "linear":
            return v
        if self.kind in ("conv", "conv_transpose"):
            return v.reshape(-1, *([1] * self._nd))
        raise ValueError("a matmul has one energy per layer, not per channel")

    def weight_channel(self, v: Tensor) -> Tensor:
        """A vector per output channel shaped to broadcast over the weight tensor."""
        if v.dim() == 0 or v.numel() == 1:
            return v.reshape(())
        if self.kind == "conv_transpose":  # weight (C_in, C_out/g, *k): channel g*C_out/g + o at [c in g, o]
            w = self.weight
            g, cout_g = self._groups, w.shape[1]
            per = v.reshape(g, 1, cout_g).expand(g, w.shape[0] // g, cout_g).reshape(w.shape[0], cout_g)
            return per.reshape(*per.shape, *([1] * self._nd))
        return v.reshape(-1, *([1] * (self.weight.dim() - 1)))

    def output_channel_axis(self, y: Tensor) -> int | None:
        """The axis of ``y`` that indexes output channels (None for a matmul)."""
        if self.kind == "linear":
            return y.dim() - 1
        if self.kind in ("conv", "conv_transpose"):
            return 1 if self._batched else 0
        return None

    def per_channel_mean(self, v: Tensor, y: Tensor) -> Tensor:
        """Mean of ``v`` (broadcast to ``y``) over everything but the output channel axis."""
        v = torch.broadcast_to(v, y.shape)
        axis = self.output_channel_axis(y)
        if axis is None:
            return v.mean().reshape(1)
        return v.movedim(axis, 0).reshape(v.shape[axis], -1).mean(1)

