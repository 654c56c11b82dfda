"""The constrained objective of learned precision (SPEC section 5).

``loss = task_loss + lambda * max(0, log E_mean - log E_target)``

with ``E_mean = sum_l MACs_l E_l / sum_l MACs_l`` (per channel: a layer's E is the mean over
its channels, each doing the same MACs). Below the target the penalty is zero and only the
task loss acts (it always asks for more energy); above it, ``lambda`` pulls the mean back.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["DEFAULT_LAMBDA", "constrained_loss", "energy_penalty", "mac_weighted_mean"]

#: lambda per noise type: 2 for shot noise, 4-8 for thermal (6 here), 8 for weight noise.
DEFAULT_LAMBDA = {"shot": 2.0, "thermal": 6.0, "weight": 8.0}


def mac_weighted_mean(energies: Tensor, macs: Tensor) -> Tensor:
    """``sum_l MACs_l E_l / sum_l MACs_l`` (differentiable in ``energies``)."""
    macs = macs.to(energies.dtype)
    return (macs * energies).sum() / macs.sum()


def energy_penalty(log_mean_energy: Tensor, log_target: float | Tensor) -> Tensor:
    """``max(0, log E_mean - log E_target)``."""
    return torch.clamp(log_mean_energy - log_target, min=0.0)


def constrained_loss(task_loss: Tensor, log_mean_energy: Tensor, log_target: float | Tensor, lam: float) -> Tensor:
    """``task_loss + lam * max(0, log E_mean - log E_target)``."""
    if lam < 0 or not math.isfinite(lam):
        raise ValueError(f"lambda must be a finite number >= 0, got {lam}")
    return task_loss + lam * energy_penalty(log_mean_energy, log_target).to(task_loss.dtype)
