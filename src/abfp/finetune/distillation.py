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

Feature distillation (``feature_weight`` lambda > 0): the loss above plus
``lambda * sum_l mean((s_l - t_l)^2) / mean(t_l^2)`` over the outputs ``s_l`` (student, on the
device) and ``t_l`` (teacher, float32) of the modules ``l`` chosen by ``feature_modules`` (a
regular expression matched in full against module names; by default the entries of every
``nn.ModuleList``, the model's blocks), on the same batch (:func:`feature_loss`,
:class:`FeatureMatch`). Each term is the layer's squared error relative to the teacher's mean
square, so layers of any scale count alike. The teacher's features are computed at every step
(a float32 forward), not once.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..zoo.base import Dataset

__all__ = ["DISTILLATION_LOSSES", "Distillation", "FeatureMatch", "as_inputs", "cosine_loss", "feature_loss",
           "feature_module_names", "kl_loss", "mse_loss", "teacher_outputs"]

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


def feature_loss(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """``sum_l mean((s_l - t_l)^2) / mean(t_l^2)`` over paired feature tensors (the teacher's detached)."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"feature_loss needs as many student as teacher features, at least one; got "
                         f"{len(student)} and {len(teacher)}")
    total = student[0].new_zeros(())
    for i, (s, t) in enumerate(zip(student, teacher)):
        _check_pair(s, t)
        t = t.detach()
        scale = t.pow(2).mean()
        if not bool(scale > 0):
            raise ValueError(f"feature {i}: the teacher's features are all zero (mean square {float(scale)}): "
                             "their relative error is undefined; choose other feature_modules")
        total = total + (s - t).pow(2).mean() / scale
    return total


def feature_module_names(model: nn.Module, pattern: str | None = None) -> list[str]:
    """The names of ``model``'s modules whose outputs feature distillation matches: those whose
    name matches the regular expression ``pattern`` in full, or (``None``) the entries of every
    ``nn.ModuleList`` (a model's blocks). A ``ValueError`` when there are none."""
    if pattern is None:
        names = [f"{n}.{i}" if n else str(i) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)
                 for i in range(len(m))]
        what = "no nn.ModuleList entries (blocks)"
    else:
        names = [n for n, _ in model.named_modules() if n and re.fullmatch(pattern, n)]
        what = f"no module name matching {pattern!r} in full"
    if not names:
        raise ValueError(f"feature distillation: the model has {what}; pass feature_modules (a regular expression "
                         "over module names, e.g. r'layers\\.\\d+')")
    return names


@dataclass(frozen=True)
class Distillation:
    """The distillation loss ``loss`` (``kl``, ``cosine`` or ``mse``; see the module doc) with
    ``temperature`` (``kl`` only). Called as a loss function ``(student_outputs, teacher_outputs)``.
    ``feature_weight`` lambda > 0 adds ``lambda`` times :func:`feature_loss` over the outputs of
    the modules ``feature_modules`` selects (:func:`feature_module_names`); the training loop does
    that through :class:`FeatureMatch` (calling this object alone gives the output loss)."""

    loss: LossName = "kl"
    temperature: float = 1.0
    feature_weight: float = 0.0
    feature_modules: str | None = None

    def __post_init__(self) -> None:
        if self.loss not in DISTILLATION_LOSSES:
            raise ValueError(f"distillation loss must be one of {', '.join(DISTILLATION_LOSSES)}, got {self.loss!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {t!r}")
        if self.loss != "kl" and t != 1.0:
            raise ValueError(f"temperature only applies to the kl loss, not {self.loss!r}")
        w = self.feature_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"feature_weight must be a finite number >= 0, got {w!r}")
        if self.feature_modules is not None:
            if not isinstance(self.feature_modules, str):
                raise TypeError(f"feature_modules must be a regular expression (str) or None, "
                                f"got {type(self.feature_modules).__name__}")
            if w == 0:
                raise ValueError("feature_modules goes with feature_weight > 0")
            try:
                re.compile(self.feature_modules)
            except re.error as e:
                raise ValueError(f"feature_modules {self.feature_modules!r} is not a regular expression: {e}") from None

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
        d = {"kind": "distillation", "loss": self.loss, "temperature": float(self.temperature),
             "teacher": "frozen float32 copy of the starting model"}
        if self.feature_weight:  # only when set: earlier checkpoints keep their provenance
            d.update(feature_weight=float(self.feature_weight), feature_modules=self.feature_modules)
        return d

    def label(self) -> str:
        features = f", features x {self.feature_weight:g}" if self.feature_weight else ""
        return f"distillation ({self.loss}{f', T={self.temperature:g}' if self.loss == 'kl' else ''}{features})"


class FeatureMatch:
    """One step's loss with feature distillation: forward hooks on the modules named ``names`` of
    the ``student`` (the model being trained) and of the frozen float32 ``teacher`` (the same
    architecture, unconverted) record their outputs; :meth:`loss` runs the teacher (no gradients)
    and the student on the same inputs and returns
    ``distillation(student_outputs, targets) + feature_weight * feature_loss(...)``.
    :meth:`close` removes the hooks."""

    def __init__(self, student: nn.Module, teacher: nn.Module, names: Sequence[str], distillation: Distillation) -> None:
        self.distillation, self.teacher = distillation, teacher
        self._student: dict[str, Tensor] = {}
        self._teacher: dict[str, Tensor] = {}
        self.names = list(names)
        self._handles = [self._hook(student, n, self._student) for n in self.names]
        self._handles += [self._hook(teacher, n, self._teacher) for n in self.names]

    @staticmethod
    def _hook(model: nn.Module, name: str, store: dict[str, Tensor]) -> Any:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"feature distillation: no module {name!r} in {type(model).__name__}") from None

        def record(_m: nn.Module, _inp: Any, out: Any) -> None:
            store[name] = _first(out)

        return module.register_forward_hook(record)

    def loss(self, student: Callable[..., Any], inputs: Sequence[Tensor], targets: Tensor | None = None) -> Tensor:
        """The step's loss on ``inputs`` (``student``: the callable to run, e.g. a DDP wrapper of the
        hooked model; ``targets``: the teacher's outputs on ``inputs`` if computed already, else
        ``None``: those of the teacher's forward here)."""
        self._student.clear()
        self._teacher.clear()
        with torch.no_grad():
            teacher_out = _first(self.teacher(*inputs)).detach()
        out = self.distillation(student(*inputs), teacher_out if targets is None else targets)
        missing = [n for n in self.names if n not in self._student or n not in self._teacher]
        if missing:
            raise ValueError(f"feature distillation: modules {missing} did not run in the forward")
        feats = feature_loss([self._student[n] for n in self.names], [self._teacher[n] for n in self.names])
        self._student.clear()
        self._teacher.clear()
        return out + self.distillation.feature_weight * feats

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


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
