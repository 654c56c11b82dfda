"""Error metrics of SPEC.md section 7, computed in float64."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _as_float64_pair(y: Tensor, y_ref: Tensor) -> tuple[Tensor, Tensor]:
    """``y`` and its reference, detached, in float64 (ValueError if their shapes differ)."""
    if y.shape != y_ref.shape:
        raise ValueError(f"shapes differ: {tuple(y.shape)} vs {tuple(y_ref.shape)}")
    return y.detach().double(), y_ref.detach().double()


def relative_error(y: Tensor, y_ref: Tensor) -> float:
    """``||Y - Y_fp32|| / ||Y_fp32||`` (Frobenius norms); inf when the reference is zero and Y is not."""
    y, r = _as_float64_pair(y, y_ref)
    num = torch.linalg.vector_norm(y - r).item()
    den = torch.linalg.vector_norm(r).item()
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def sqnr_db(y: Tensor, y_ref: Tensor) -> float:
    """``10 log10(sum Y_fp32^2 / sum (Y - Y_fp32)^2)``; inf for an exact result."""
    y, r = _as_float64_pair(y, y_ref)
    noise = ((y - r) ** 2).sum().item()
    signal = (r**2).sum().item()
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def enob(y: Tensor, y_ref: Tensor) -> float:
    """Effective number of bits, ``(SQNR_dB - 1.76) / 6.02``."""
    return (sqnr_db(y, y_ref) - 1.76) / 6.02


def saturated_fraction(saturated: int, conversions: int) -> float:
    """Share of ADC outputs clipped."""
    return saturated / conversions if conversions else 0.0
