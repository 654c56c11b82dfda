"""What a zoo entry is: a model, its data and its metric.

Every zoo family (one file each) registers :class:`Task` objects. The evaluation tools
only see this interface, so a user's own model plugs in the same way: a function that
returns a ``Task`` (or a ``(model, data, metric)`` triple) is all ``abfp eval --task
package.module:function`` needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn

MetricFn = Callable[[Tensor, "Tensor | None", Tensor], float]


@dataclass(frozen=True)
class Metric:
    """A scalar quality measure of a model's outputs.

    ``fn(outputs, targets, reference)`` gets the concatenated outputs of the model under
    test, the labels (``None`` for unlabelled data) and the concatenated outputs of the
    float32 model on the same inputs; it returns one float.

    ``kind`` is ``"accuracy"`` when the metric scores against ground-truth labels and
    ``"fidelity"`` when it scores agreement with the float32 model (no labels available).
    """

    name: str
    kind: Literal["accuracy", "fidelity"]
    fn: MetricFn
    higher_is_better: bool = True
    unit: str = ""
    #: Per-sample values whose mean is the metric (``None``: not a per-sample mean); gives
    #: :meth:`stderr`.
    per_sample: Callable[[Tensor, "Tensor | None", Tensor], Tensor] | None = None
    #: ``(lowest, highest)`` value the metric can take (``None``: unknown). Not part of what
    #: a cached result is keyed on (it never changes a value): the explorer's early stop uses it
    #: to stop averaging runs once no remaining run can move the mean across the target.
    bounds: tuple[float, float] | None = None

    def __call__(self, outputs: Tensor, targets: Tensor | None, reference: Tensor) -> float:
        return float(self.fn(outputs, targets, reference))

    def finite(self, outputs: Tensor, targets: Tensor | None, reference: Tensor, where: str) -> float:
        """The metric, refused with a ``FloatingPointError`` naming ``where`` (e.g. "the float32
        model") when it is NaN or infinite: a NaN score would pass every comparison silently (a
        table row, a tuning target that no plan meets)."""
        value = self(outputs, targets, reference)
        if not math.isfinite(value):
            bad = int((~torch.isfinite(outputs)).sum()) if outputs.is_floating_point() else 0
            why = (f"{bad} of the {outputs.numel()} outputs are NaN or infinite" if bad else
                   "the outputs are finite: the metric function returned it")
            raise FloatingPointError(f"metric {self.name!r} of {where} is {value} ({why})")
        return value

    def stderr(self, outputs: Tensor, targets: Tensor | None, reference: Tensor) -> float | None:
        """Standard error of the metric over the samples, ``std(v_i, ddof=1) / sqrt(N)`` of the
        per-sample values ``v_i`` (for an agreement percentage ``100 sqrt(p (1 - p) / (N - 1))``);
        ``None`` without :attr:`per_sample` or with fewer than two samples."""
        if self.per_sample is None:
            return None
        v = self.per_sample(outputs, targets, reference).double().flatten()
        if v.numel() < 2:
            return None
        return float(v.std(unbiased=True) / v.numel() ** 0.5)


def _check_rows(t: object, what: str) -> None:
    """``t`` must be a tensor of at least one dimension (its rows are the samples)."""
    if isinstance(t, (list, tuple)) and all(isinstance(v, Tensor) for v in t):
        raise ValueError(f"{what} is a {type(t).__name__} of tensors; give one tensor whose dim 0 is the samples "
                         "(pad variable-length samples to one length, with a mask as a second input)")
    if not isinstance(t, Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(t).__module__}.{type(t).__qualname__}"
                         + (" (torch.from_numpy converts it)" if type(t).__module__ == "numpy" else ""))
    if t.dim() == 0:
        raise ValueError(f"{what} is a 0-d tensor; its dim 0 must be the samples")


@dataclass
class Dataset:
    """Inputs (a tuple of tensors, each sliced along dim 0 into batches) and optional targets.

    The model is called as ``model(*inputs_batch)``.
    """

    inputs: tuple[Tensor, ...]
    targets: Tensor | None = None

    def __post_init__(self) -> None:
        if isinstance(self.inputs, Tensor):
            self.inputs = (self.inputs,)
        if isinstance(self.inputs, list):
            self.inputs = tuple(self.inputs)
        if not isinstance(self.inputs, tuple) or not self.inputs:
            raise ValueError("Dataset.inputs must be a tensor or a tuple of at least one tensor, got "
                             f"{type(self.inputs).__name__}")
        for i, t in enumerate(self.inputs):
            _check_rows(t, f"Dataset.inputs[{i}]")
        if self.targets is not None:
            _check_rows(self.targets, "Dataset.targets")
        n = self.inputs[0].shape[0]
        for t in self.inputs[1:]:
            if t.shape[0] != n:
                raise ValueError("all Dataset.inputs must have the same length along dim 0")
        if self.targets is not None and self.targets.shape[0] != n:
            raise ValueError("Dataset.targets must have as many rows as the inputs")

    def __len__(self) -> int:
        return int(self.inputs[0].shape[0])

    def take(self, n: int | None) -> "Dataset":
        """The first ``n`` samples (all of them when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise ValueError(f"number of samples must be positive, got {n}")
        return Dataset(tuple(t[:n] for t in self.inputs), None if self.targets is None else self.targets[:n])

    @classmethod
    def from_batches(cls, batches: Any) -> "Dataset":
        """The batches of a ``torch.utils.data.DataLoader`` (or of any iterable of batches, such as a
        generator) concatenated along dim 0, read once.

        A batch is a tensor of inputs, a one-item list or tuple of it, or an ``(inputs, targets)``
        pair (the default collate's ``[x, y]`` of a ``TensorDataset(x, y)``), whose ``inputs`` is a
        tensor or a tuple/list of tensors (a model of several inputs). A batch of three or more
        items (inputs or targets?), a dict, or batches of differing structure are refused."""
        inputs: list[list[Tensor]] = []
        targets: list[Tensor] = []
        shape: tuple[int, bool] | None = None
        for k, batch in enumerate(batches):
            xs, y = _split_batch(batch, k)
            if shape is None:
                shape = (len(xs), y is not None)
                inputs = [[] for _ in xs]
            elif shape != (len(xs), y is not None):
                raise ValueError(f"batch {k} has {len(xs)} inputs and {'a' if y is not None else 'no'} target; the first "
                                 f"had {shape[0]} and {'a' if shape[1] else 'no'} target")
            for acc, x in zip(inputs, xs):
                acc.append(x)
            if y is not None:
                targets.append(y)
        if shape is None:
            raise ValueError("the data loader yielded no batches")
        return cls(tuple(torch.cat(acc) for acc in inputs), torch.cat(targets) if shape[1] else None)

    def batches(self, batch_size: int):
        """Yield ``(inputs_tuple, targets_or_None)`` batches in order."""
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        for i in range(0, len(self), batch_size):
            yield (
                tuple(t[i : i + batch_size] for t in self.inputs),
                None if self.targets is None else self.targets[i : i + batch_size],
            )


def _split_batch(batch: Any, k: int) -> tuple[list[Tensor], Tensor | None]:
    """``(inputs, targets or None)`` of one batch of :meth:`Dataset.from_batches` (``k``: its index)."""
    def tensors(v: Any) -> list[Tensor] | None:
        if isinstance(v, Tensor):
            return [v]
        if isinstance(v, (tuple, list)) and v and all(isinstance(t, Tensor) for t in v):
            return list(v)
        return None

    if isinstance(batch, Tensor):
        return [batch], None
    if isinstance(batch, (tuple, list)) and len(batch) == 1 and isinstance(batch[0], Tensor):
        return [batch[0]], None
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], Tensor):
        xs = tensors(batch[0])
        if xs is not None:
            return xs, batch[1]
    what = (f"a {type(batch).__name__} of {len(batch)} items" if isinstance(batch, (tuple, list, dict))
            else type(batch).__name__)
    raise ValueError(f"batch {k} of the data loader is {what}; a batch must be a tensor of inputs or an "
                     "(inputs, targets) pair, inputs a tensor or a tuple of tensors (several model inputs)")


@dataclass(frozen=True)
class Task:
    """One zoo entry: how to build the float32 model, load its data, and score it."""

    name: str
    description: str
    build_model: Callable[[], nn.Module]
    load_data: Callable[[], Dataset]
    metric: Metric
    default_samples: int | None = None
    default_batch_size: int = 256
    requires: tuple[str, ...] = field(default_factory=tuple)
    #: Inputs for calibration and label-free finetuning, disjoint from ``load_data``'s
    #: (``None``: the task has no separate split).
    load_calibration: Callable[[], Dataset] | None = None
    #: Fresh label-free finetuning inputs: ``(generator, n) -> tuple of input tensors`` (``n``
    #: rows each), drawn only from ``generator`` (the same seed gives the same batch) and never
    #: from ``load_data``'s inputs; e.g. random crops of the calibration photos. When set,
    #: ``abfp tune``'s distillation stages draw a new batch every step instead of cycling through
    #: the fixed calibration inputs (``None``: the task has none).
    sample_finetuning_batch: Callable[[torch.Generator, int], tuple[Tensor, ...]] | None = None
    #: ``abfp tune``'s finetuning batch size for this task when the user gives no
    #: ``--finetune-batch-size`` (``None``: the general default, 32); for a model whose training
    #: step through the device is slow (EfficientNet-Lite0: 8)
    finetune_batch_size: int | None = None

    def __post_init__(self) -> None:
        b = self.finetune_batch_size
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ValueError(f"Task {self.name!r}: finetune_batch_size must be an integer >= 1 or None, got {b!r}")


def _scores(outputs: Tensor, metric: str) -> Tensor:
    """``outputs`` when their last dimension holds at least two scores (classes, features);
    else a ``ValueError``: an arg-max, a softmax or a cosine of one number per sample is the
    same for every model (100 %, 0 nats, its sign), a silent constant instead of a score."""
    if outputs.dim() < 2 or outputs.shape[-1] < 2:
        raise ValueError(f"{metric} needs outputs with at least two entries in their last dimension, got shape "
                         f"{tuple(outputs.shape)}; a model with one output per sample (regression) needs a metric "
                         "of its own, e.g. a mean squared error")
    return outputs


def _top1_hits(outputs: Tensor, targets: Tensor | None, reference: Tensor) -> Tensor:
    if targets is None:
        raise ValueError("top-1 accuracy needs labels")
    predicted = _scores(outputs, "top-1 accuracy").argmax(-1)
    if targets.shape != predicted.shape:
        hint = " (one-hot or probability labels? pass labels.argmax(-1))" if targets.shape == outputs.shape else \
            " (compared element by element they would broadcast)"
        raise ValueError(f"top-1 accuracy needs one class index per sample, labels of shape {tuple(predicted.shape)}; "
                         f"got {tuple(targets.shape)}{hint}")
    _check_class_indices(targets, outputs.shape[-1])
    return 100.0 * (predicted == targets).double()


def _check_class_indices(targets: Tensor, classes: int) -> None:
    """``ValueError`` unless every label is a class index ``0 <= y < classes`` (an integral value, of
    any dtype): a float label such as 0.37 (a regression target, a probability) or one outside the
    model's classes (-100, an ignore index; a label set larger than the output) never equals an
    arg-max, and the accuracy came out as a silent 0 % (or too low) instead of an error."""
    if targets.dtype == torch.bool or targets.is_complex():
        raise ValueError(f"top-1 accuracy needs integer class indices as labels, got {targets.dtype}")
    if targets.is_floating_point():
        bad = targets[~(torch.isfinite(targets) & (targets == targets.round()))]
        if bad.numel():
            raise ValueError(f"top-1 accuracy needs class indices as labels, got {targets.dtype} values such as "
                             f"{bad.flatten()[0].item():.6g} (regression targets or probabilities need a metric of "
                             "their own)")
    out = targets[(targets < 0) | (targets >= classes)]
    if out.numel():
        raise ValueError(f"top-1 accuracy: label {out.flatten()[0].item():g} is not a class of the model's {classes} "
                         f"outputs (labels are indices 0..{classes - 1})")


def top1_accuracy(outputs: Tensor, targets: Tensor | None, reference: Tensor) -> float:
    """Percentage of samples whose arg-max class equals the label."""
    return _top1_hits(outputs, targets, reference).mean().item()


def _agreements(outputs: Tensor, targets: Tensor | None, reference: Tensor) -> Tensor:
    return 100.0 * (_scores(outputs, "top-1 agreement").argmax(-1) == reference.argmax(-1)).double()


def top1_agreement(outputs: Tensor, targets: Tensor | None, reference: Tensor) -> float:
    """Percentage of samples whose arg-max class equals the float32 model's arg-max."""
    return _agreements(outputs, targets, reference).mean().item()


def _kl_per_sample(outputs: Tensor, targets: Tensor | None, reference: Tensor) -> Tensor:
    logp_ref = torch.log_softmax(reference.double(), -1)
    logp = torch.log_softmax(_scores(outputs, "KL divergence").double(), -1)
    return (logp_ref.exp() * (logp_ref - logp)).sum(-1).flatten()


def kl_divergence(outputs: Tensor, targets: Tensor | None, reference: Tensor) -> float:
    """Mean KL(p_fp32 || p_model) of the softmax distributions, in nats."""
    return _kl_per_sample(outputs, targets, reference).mean().item()


def _cosines(outputs: Tensor, targets: Tensor | None, reference: Tensor) -> Tensor:
    return torch.nn.functional.cosine_similarity(_scores(outputs, "cosine similarity").double(), reference.double(),
                                                 dim=-1).flatten()


def mean_cosine(outputs: Tensor, targets: Tensor | None, reference: Tensor) -> float:
    """Mean cosine similarity between each output vector and the float32 one."""
    return _cosines(outputs, targets, reference).mean().item()


TOP1 = Metric("top-1 accuracy", "accuracy", top1_accuracy, unit="%", per_sample=_top1_hits, bounds=(0.0, 100.0))
AGREEMENT = Metric("top-1 agreement with fp32", "fidelity", top1_agreement, unit="%", per_sample=_agreements,
                   bounds=(0.0, 100.0))
KL = Metric("KL divergence to fp32", "fidelity", kl_divergence, higher_is_better=False, unit="nats",
            per_sample=_kl_per_sample)
COSINE = Metric("cosine similarity to fp32", "fidelity", mean_cosine, per_sample=_cosines)
