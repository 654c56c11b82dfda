"""The finetuning stage of ``abfp tune``: label-free distillation on the tuned plan.

``distil-qat`` trains through the plan's devices (every module at its own gain and repeats,
straight-through gradients, :func:`abfp.finetune.qat`); ``distil-dnf`` trains float32 with
noise drawn from per-site histograms of ``dy = y_plan - y_fp32`` measured once on the plan
(:func:`abfp.finetune.dnf`). Either way the targets are the frozen float32 model's outputs on
the *calibration* inputs (no labels, never the evaluation inputs), and the loss is one of
:mod:`abfp.finetune.distillation`: ``kl`` on logits (``T^2 KL(softmax(t/T) || softmax(s/T))``),
``cosine`` (``1 - cos(s, t)``) or ``mse`` on embeddings. The stage returns the finetuned
float32 model; the plan (gains, repeats) is kept.

``bias-correct`` (:class:`BiasCorrectStage`) trains nothing: label-free layer-wise bias correction
(:func:`abfp.finetune.layerwise.bias_correct`), the per-channel mean device error of every
converted linear layer and convolution on the plan, measured on calibration inputs with the
upstream modules on the device and already corrected, subtracted from its bias (or added to the
running mean of the batch norm it feeds).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal

from torch import Generator, Tensor, nn

from ..zoo.base import Metric
from .plan import DevicePlan

__all__ = ["FINETUNE_METHODS", "BiasCorrectStage", "DistilStage", "default_loss", "finetune_stage"]

#: The distillation stages.
DISTIL_METHODS: tuple[str, ...] = ("distil-qat", "distil-dnf")
#: The finetuning stages ``abfp tune --finetune`` knows.
FINETUNE_METHODS: tuple[str, ...] = (*DISTIL_METHODS, "bias-correct")


def default_loss(metric: Metric) -> str:
    """``kl`` for a classifier's metric (a percentage, or the KL divergence), else ``cosine``."""
    return "kl" if metric.unit == "%" or metric.name.startswith("KL") else "cosine"


@dataclass
class DistilStage:
    """A callable ``(model, plan, calibration_inputs) -> finetuned float32 model`` for
    :func:`abfp.tune` (``finetune=``): ``steps`` AdamW steps of learning rate ``lr`` on batches
    of ``batch_size`` calibration inputs (fewer if there are fewer inputs), ``loss`` against the
    frozen float32 model (``temperature`` for ``kl``), ``seed`` for batch order and noise."""

    #: The fewest calibration inputs it trains on (checked by :func:`abfp.tune` before any stage).
    min_inputs: ClassVar[int] = 2

    method: Literal["distil-qat", "distil-dnf"] = "distil-qat"
    steps: int = 100
    lr: float = 1e-5
    batch_size: int = 32
    loss: Literal["kl", "cosine", "mse"] = "kl"
    temperature: float = 1.0
    seed: int = 0
    progress: bool = False
    #: a step checkpoint (``.safetensors``) and whether to continue from it (results unchanged:
    #: a resumed run ends bit-identical to an uninterrupted one)
    checkpoint: str | None = None
    resume: bool = False
    #: fresh inputs, ``(generator, n) -> inputs`` (e.g. :attr:`abfp.zoo.Task.sample_finetuning_batch`):
    #: a new batch of ``batch_size`` every step (seeded by ``seed`` and the step) instead of the
    #: calibration inputs (see :class:`abfp.finetune.loop.TrainSettings`); ``None``: the calibration inputs
    fresh_inputs: Callable[[Generator, int], Any] | None = field(default=None, repr=False)
    #: the learning rate over the steps: ``"constant"``, or ``"cosine"`` (a linear warm-up over
    #: ``warmup`` steps, then half a cosine to nearly 0: :func:`abfp.finetune.loop.warmup_cosine`)
    schedule: Literal["constant", "cosine"] = "constant"
    warmup: int = 0
    #: feature distillation: ``lambda`` of ``lambda * sum_l mean((s_l - t_l)^2) / mean(t_l^2)`` over the
    #: outputs of the modules ``feature_modules`` selects (a regex; default every ``nn.ModuleList``
    #: entry); 0 (the default): the output loss alone (:class:`abfp.finetune.Distillation`)
    feature_weight: float = 0.0
    feature_modules: str | None = None
    #: the training losses of the last call
    losses: list[float] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        from ..finetune.distillation import Distillation
        from ..finetune.loop import LR_SCHEDULES

        if self.method not in DISTIL_METHODS:
            raise ValueError(f"finetune method must be one of {', '.join(DISTIL_METHODS)}, got {self.method!r}")
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"finetune {name} must be an integer >= 1, got {v!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) \
                or self.lr <= 0:
            raise ValueError(f"finetune lr must be a finite number > 0, got {self.lr!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"finetune seed must be an integer >= 0, got {self.seed!r}")
        self.distillation()  # validates loss, temperature and the feature options
        if self.schedule not in LR_SCHEDULES:
            raise ValueError(f"finetune schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.schedule!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"finetune warmup must be an integer >= 0, got {self.warmup!r}")
        if self.warmup and self.schedule != "cosine":
            raise ValueError("finetune warmup goes with schedule='cosine'")
        if self.schedule == "cosine" and self.warmup >= self.steps:
            raise ValueError(f"finetune warmup ({self.warmup}) must be below steps ({self.steps})")
        if self.fresh_inputs is not None and not callable(self.fresh_inputs):
            raise TypeError(f"finetune fresh_inputs must be a callable (generator, n) -> inputs, "
                            f"got {type(self.fresh_inputs).__name__}")

    def describe(self) -> dict[str, Any]:
        skip = ("progress", "losses", "checkpoint", "resume", "fresh_inputs", "schedule", "warmup", "feature_weight",
                "feature_modules")
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in skip}
        if self.schedule != "constant":  # only when set: earlier journals stay valid
            d.update(schedule=self.schedule, warmup=self.warmup)
        if self.feature_weight:  # only when set: earlier journals stay valid
            d.update(feature_weight=self.feature_weight, feature_modules=self.feature_modules)
        if self.fresh_inputs is not None:  # only when set: earlier journals stay valid
            from ..finetune.loop import sampler_identity

            d["fresh_inputs"] = sampler_identity(self.fresh_inputs)
        return d

    def note(self, n_inputs: int) -> str:
        sched = "" if self.schedule == "constant" else f", cosine lr schedule ({self.warmup} warm-up steps)"
        if self.loss == "kl" and self.temperature != 1.0:
            sched += f", temperature {self.temperature:g}"
        if self.feature_weight:
            sched += f", feature distillation x {self.feature_weight:g}"
        if self.fresh_inputs is not None:
            return (f"{self.method}, {self.loss} loss, {self.steps} steps of {self.batch_size} fresh inputs "
                    f"(a new batch every step){sched}")
        return (f"{self.method}, {self.loss} loss, {self.steps} steps of {min(self.batch_size, n_inputs)} "
                f"on {n_inputs} calibration inputs{sched}")

    def distillation(self) -> Any:
        """The stage's loss as an :class:`abfp.finetune.Distillation`."""
        from ..finetune.distillation import Distillation

        return Distillation(self.loss, self.temperature, self.feature_weight, self.feature_modules)

    def __call__(self, model: nn.Module, plan: DevicePlan, inputs: tuple[Tensor, ...]) -> nn.Module:
        from ..finetune.distillation import as_inputs
        from ..finetune.methods import dnf, qat

        data = as_inputs(inputs)
        if len(data) < self.min_inputs:
            raise ValueError(f"finetuning needs at least {self.min_inputs} calibration inputs")
        run = qat if self.method == "distil-qat" else dnf
        fresh = {} if self.fresh_inputs is None else {"sample_inputs": self.fresh_inputs}
        batch = self.batch_size if fresh else min(self.batch_size, len(data))
        res = run(model, data, plan.base, steps=self.steps, lr=self.lr, batch_size=batch, **fresh,
                  loss=self.distillation(), overrides=plan.overrides() or None,
                  exclude=[re.escape(e) for e in plan.exclude], seed=self.seed, progress=self.progress, timing_steps=0, timing_every=0,
                  checkpoint=self.checkpoint, resume=self.resume, lr_schedule=self.schedule, warmup=self.warmup)
        self.losses = list(res.losses)
        return res.model


@dataclass
class BiasCorrectStage:
    """A callable ``(model, plan, calibration_inputs) -> corrected float32 model`` for
    :func:`abfp.tune` (``finetune="bias-correct"``): :func:`abfp.finetune.layerwise.bias_correct`
    on the plan's devices, on the first ``samples`` calibration inputs (one batch), noise ``seed``."""

    method: Literal["bias-correct"] = "bias-correct"
    samples: int = 64
    seed: int = 0
    #: ``"float32"``: match the float32 model's outputs; ``"local"``: each module's own error
    target: Literal["float32", "local"] = "float32"
    #: what the last call corrected and skipped (:meth:`BiasCorrection.describe`)
    report: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.method != "bias-correct":
            raise ValueError(f"BiasCorrectStage's method is 'bias-correct', got {self.method!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"finetune samples must be an integer >= 1, got {self.samples!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"finetune seed must be an integer >= 0, got {self.seed!r}")
        if self.target not in ("float32", "local"):
            raise ValueError(f"finetune target must be 'float32' or 'local', got {self.target!r}")

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "samples": self.samples, "seed": self.seed, "target": self.target}

    def note(self, n_inputs: int) -> str:
        r = self.report
        skipped = f", {len(r['skipped'])} skipped" if r.get("skipped") else ""
        return (f"bias-correct: {r.get('corrected', 0)} modules corrected{skipped}, on "
                f"{min(self.samples, n_inputs)} calibration inputs")

    def __call__(self, model: nn.Module, plan: DevicePlan, inputs: tuple[Tensor, ...]) -> nn.Module:
        from ..finetune.layerwise import bias_correct

        res = bias_correct(model, inputs, plan.base, overrides=plan.overrides() or None,
                           exclude=[re.escape(e) for e in plan.exclude], samples=self.samples, seed=self.seed,
                           target=self.target)
        self.report = res.describe()
        return res.model


def finetune_stage(method: str, options: dict[str, Any], metric: Metric) -> DistilStage | BiasCorrectStage:
    """The stage of ``method`` (one of :data:`FINETUNE_METHODS`) with ``options`` (its fields;
    unknown ones are refused; a distillation's loss defaults to :func:`default_loss`)."""
    if method not in FINETUNE_METHODS:
        raise ValueError(f"finetune must be one of {', '.join(FINETUNE_METHODS)} or a callable, got {method!r}")
    cls = BiasCorrectStage if method == "bias-correct" else DistilStage
    hidden = {"method", "losses", "report"}
    unknown = sorted(set(options) - (set(cls.__dataclass_fields__) - hidden))
    if unknown:
        raise ValueError(f"unknown finetune option(s) {unknown} for {method}")
    if cls is DistilStage:
        options.setdefault("loss", default_loss(metric))
    return cls(method, **options)  # type: ignore[arg-type]
