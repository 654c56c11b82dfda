"""Product families: one module each, registered with :mod:`abfp.ops.registry`.

Importing this package registers every family. The layers (see ``docs/architecture.md``):
:mod:`abfp.ops.device` is the one place that calls the numerics, :mod:`abfp.ops.site` the
common path of every product inside a converted model, and each family module (its argument
parsing, MAC/tile accounting, reference and fast path, handlers) one file. Adding a family is
one new module here and one import line below.
"""

from __future__ import annotations

from .registry import handler_for, register, registered

__all__ = ["handler_for", "register", "registered"]

# the families (order: those others build on first)
from . import linear  # noqa: E402,F401  (F.linear, matmul/@/bmm/mm)
from . import conv  # noqa: E402,F401  (conv1d, conv2d)
from . import attention  # noqa: E402,F401  (scaled_dot_product_attention, multi_head_attention_forward)
from . import conv_nd  # noqa: E402,F401  (conv3d and the transposed convolutions)
from . import recurrent  # noqa: E402,F401  (LSTM, GRU, RNN and their cells)
from . import products  # noqa: E402,F401  (addmm, mv, tensordot, einsum of any arity, bilinear, ...)
from . import custom  # noqa: E402,F401  (the custom operators abfp::device, abfp::device_backward, abfp::conv2d)
