"""The one door into the numerics: ``linear``, ``matmul``, ``conv1d``, ``conv2d`` on the device.

Each behaves like its ``torch`` namesake (shapes, broadcasting, dtypes) but computes the
product as SPEC.md section 1 defines it. Gradients are straight-through estimators: rounding
is the identity and a clamp passes the gradient inside its range and zero outside, so
``d y / d X = mask_adc * W_hat * mask_dac`` with ``W_hat`` the dequantised weights. In ABFP
mode the DAC clamp never cuts a value (the scale is the block's max; bf16 rounding of that
max is a format artefact), so ``mask_dac`` is 1; in fixed mode it is ``|X| <= s``.

Noise comes from ``generator``; without one and with ``config.seed``, from the process-wide
stream of that seed (:data:`abfp.noise_keys.FUNCTIONAL_STREAMS`): successive calls draw
different noise, and :func:`reseed` (or ``abfp.reseed()``) restarts the streams, so the same
sequence of calls after it gives the same numbers. Without a seed, from torch's global
generator. (Before numerics of this release a seeded call drew the same noise on every call.)

Fixed mode (SPEC section 2) without ``input_scale``: the one tensor of a call is its own sample
data, so its static scale is max |x| over the whole tensor (every row, batch item and chunk of
the call share it); a converted model instead needs :func:`abfp.calibrate`.
"""

from __future__ import annotations

# The product families live in abfp.ops (one module each); this module is their public door.
from .ops.conv import _IM2COL_ELEMENTS, _channels_last, _conv2d_cols, _conv2d_rows, _im2col, _pair  # noqa: F401
from .ops.conv import conv1d, conv2d
from .ops.conv_nd import conv3d, conv_transpose1d, conv_transpose2d, conv_transpose3d
from .ops.device import (WEIGHT_CACHE, _AnalogProduct, _bf16, _dequantised, _generator_for, _out_dtype,  # noqa: F401
                         _product, _WeightCache, _without_bf16_io, check_finite, clear_cache, reseed)
from .ops.linear import einsum, linear, matmul  # noqa: F401

__all__ = ["linear", "matmul", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
           "einsum", "clear_cache", "check_finite", "reseed"]
