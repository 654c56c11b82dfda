"""Product families: one module each, registered with :mod:`abfp.ops.registry`.

Importing this package registers every family. The families of linear layers, matrix
products, 1-D/2-D convolutions and attention still live in :mod:`abfp.nn.mode` and
:mod:`abfp.functional` and are registered from there. :mod:`.recurrent`: LSTM, GRU, RNN and
their cells.
"""

from __future__ import annotations

from .registry import handler_for, register, registered
from . import conv_nd  # noqa: E402,F401  (registers conv3d and the transposed convolutions)

from . import recurrent  # noqa: E402,F401  (LSTM, GRU, RNN and their cells)

__all__ = ["handler_for", "register", "registered"]

from . import products  # noqa: E402,F401  (addmm, mv, tensordot, einsum of any arity, bilinear, ...)
