"""Label-free finetuning: distil the device model from its own float32 copy.

A pretrained model usually comes without its training set and labels; what it has is a few
hundred of its inputs. The teacher is a frozen float32 copy of the input model (eval mode, no
gradients); its outputs on the unlabelled training inputs are computed once, before the
first step, and serve as the targets. The student (the same model, finetuned through the
device with QAT or with DNF) minimises one of:

* ``kl`` (logits ``s``, ``t``; temperature ``T``):
  ``T^2 * mean_i sum_c softmax(t_i/T)_c (log softmax(t_i/T)_c - log softmax(s_i/T)_c)``
* ``cosine`` (embeddings / outputs along the last dimension): ``mean_i (1 - cos(s_i, t_i))``
* ``mse``: ``mean over all elements of (s - t)^2``

Since the teacher is frozen, computing its outputs once is the same as computing them at
every step, and it makes them part of the training data: their digest is part of a
checkpoint's provenance, as are the loss and its temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..zoo.base import Dataset

__all__ = ["DISTILLATION_LOSSES", "Distillation", "as_inputs", "cosine_loss", "kl_loss", "mse_loss",
           "teacher_outputs"]

LossName = Literal["kl", "cosine", "mse"]
#: The distillation losses by name.
DISTILLATION_LOSSES: tuple[str, ...] = ("kl", "cosine", "mse")


def _first(outputs: Any) -> Tensor:
    from ..evaluate.runner import _first_tensor

    return _first_tensor(outputs)


def _check_pair(student: Tensor, teacher: Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"student and teacher outputs differ in shape: {tuple(student.shape)} vs {tuple(teacher.shape)}")


def kl_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """``T^2 * mean_i KL(softmax(t_i / T) || softmax(s_i / T))`` over the last dimension."""
    _check_pair(student, teacher)
    log_p_t = torch.log_softmax(teacher.detach() / temperature, -1)
    log_p_s = torch.log_softmax(student / temperature, -1)
    per = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return per.mean() * temperature**2


def cosine_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """``mean_i (1 - cos(s_i, t_i))`` over the last dimension."""
    _check_pair(student, teacher)
    return (1.0 - F.cosine_similarity(student, teacher.detach(), dim=-1)).mean()


def mse_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """``mean((s - t)^2)`` over all elements."""
    _check_pair(student, teacher)
    return F.mse_loss(student, teacher.detach())


@dataclass(frozen=True)
class Distillation:
    """The distillation loss ``loss`` (``kl``, ``cosine`` or ``mse``; see the module doc) with
    ``temperature`` (``kl`` only). Called as a loss function ``(student_outputs, teacher_outputs)``."""

    loss: LossName = "kl"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.loss not in DISTILLATION_LOSSES:
            raise ValueError(f"distillation loss must be one of {', '.join(DISTILLATION_LOSSES)}, got {self.loss!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {t!r}")
        if self.loss != "kl" and t != 1.0:
            raise ValueError(f"temperature only applies to the kl loss, not {self.loss!r}")

    def __call__(self, outputs: Any, targets: Tensor | None) -> Tensor:
        if targets is None:
            raise ValueError("distillation needs the teacher's outputs as targets (see abfp.finetune.distil)")
        s = _first(outputs)
        if self.loss == "kl":
            return kl_loss(s, targets, self.temperature)
        if self.loss == "cosine":
            return cosine_loss(s, targets)
        return mse_loss(s, targets)

    def describe(self) -> dict[str, Any]:
        """What a checkpoint records (and a resumed run must match)."""
        return {"kind": "distillation", "loss": self.loss, "temperature": float(self.temperature),
                "teacher": "frozen float32 copy of the starting model"}

    def label(self) -> str:
        return f"distillation ({self.loss}{f', T={self.temperature:g}' if self.loss == 'kl' else ''})"


def as_inputs(inputs: Any) -> Dataset:
    """Unlabelled training inputs as a :class:`Dataset`: a tensor, a tuple/list of tensors (the
    model's positional arguments, equal length along dim 0) or a Dataset (its labels are not used)."""
    if isinstance(inputs, Dataset):
        return Dataset(inputs.inputs)
    if isinstance(inputs, Tensor):
        return Dataset((inputs,))
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(t, Tensor) for t in inputs):
        return Dataset(tuple(inputs))
    raise TypeError(f"inputs must be a Tensor, a tuple of Tensors or an abfp.zoo.Dataset, got {type(inputs).__name__}")


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, inputs: Sequence[Tensor], batch_size: int = 64) -> Tensor:
    """The frozen teacher's (first) output tensor on ``inputs``, in eval mode, float32, batch by batch."""
    was = teacher.training
    teacher.eval()
    try:
        n = int(inputs[0].shape[0])
        outs = [_first(teacher(*(t[i : i + batch_size] for t in inputs))).detach().float()
                for i in range(0, n, batch_size)]
    finally:
        teacher.train(was)
    out = torch.cat(outs)
    if not torch.isfinite(out).all():
        raise FloatingPointError("the teacher (float32 model) gives non-finite outputs on the training inputs")
    return out
