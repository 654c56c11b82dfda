"""The finetuning loop shared by QAT and DNF: AdamW, checkpoints, timing, device evaluation.

One step: ``loss = loss_fn(model(x), t)`` (label-free: ``t`` are the outputs of the frozen
float32 teacher, computed once, and the loss a :class:`~.distillation.Distillation`), backward,
``AdamW`` step with learning rate ``lr * lr_decay ** epoch`` (``epoch = step // (N // batch_size)``; with
``lr_schedule="cosine"`` also times :func:`warmup_cosine` of the step). The batch of step ``k``
is slice ``k mod (N // batch_size)`` of a permutation of the training set seeded by
``(seed, epoch)``, so it depends on the step number only; with ``sample_inputs`` (fresh inputs,
distillation only) it is a new batch drawn from a generator seeded by ``(seed, step)``, the teacher's
outputs on it computed at that step. With feature distillation (``Distillation.feature_weight``
> 0) the step's loss is :class:`~.distillation.FeatureMatch`'s: a frozen float32 copy of the
starting model runs on the same batch and its chosen modules' outputs are matched too (the hooks
are removed before the model is returned). Everything random inside a step
(dropout, device noise in QAT, DNF seeds) comes from torch's global generator, seeded with
``seed`` once and saved in every checkpoint: a run resumed from a checkpoint repeats the
uninterrupted run bit for bit. The torch thread count is held at the caller's for the whole
run (:func:`_pin_threads`) and recorded; a checkpoint also records what produced it
(:func:`produced_by`), and resuming with anything different, or with ``steps`` below the
checkpoint's step, is a ``ValueError`` naming it.

Many processes (``torchrun``; the process group joined by
:func:`abfp.evaluate.distributed.init_from_env` or by the caller): every rank trains a
``DistributedDataParallel`` copy on its equal share of each batch (``batch_size`` stays the
global batch and must be divisible by the number of processes) and reseeds the global
generator at every step from ``(seed, rank, step)`` instead of once; see :mod:`.parallel`.
Rank 0 alone writes checkpoints and shows progress; a checkpoint is read by rank 0 and sent
to all. The device evaluations are shared among the ranks and equal the single-process ones.

Timing: ``seconds_per_step`` is the mean wall time of the training steps run in this
process (the first one excluded as warm-up when there are several); ``fp32_seconds_per_step``
the mean time of a plain float32 AdamW step of a copy of the original model on the same
batch, measured ``timing_steps`` times after the setup and once more every
``timing_every`` training steps (so both see the same machine load). ``seconds_total``
counts setup (conversion, DNF histograms, compiling the sampler), the steps and the
checkpoints, across resumed runs; evaluations and the float32 timing are not counted.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import ABFPConfig, ExecutionOptions, config_key
from ..evaluate.distributed import world
from ..evaluate.runner import _first_tensor, run_all
from ..nn import convert, is_converted, to_digital
from ..nn.convert import calibrate, needs_calibration
from ..zoo.base import AGREEMENT, COSINE, TOP1, Dataset, Metric
from .checkpoint import digest, load_checkpoint, model_state, restore_optimizer, save_checkpoint
from .distillation import Distillation, FeatureMatch, feature_module_names, teacher_outputs
from .parallel import check_divisible, from_main, mean_over_ranks, shard, step_seed, sync_from_main, unwrap, wrap

__all__ = ["FinetuneResult", "Method", "TrainSettings", "callable_name", "device_metric", "finetune", "produced_by",
           "sampler_identity", "warmup_cosine"]

LossFn = Callable[[Tensor, Tensor | None], Tensor]
#: The learning-rate schedules of :class:`TrainSettings`.
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine")


def warmup_cosine(step: int, steps: int, warmup: int = 0) -> float:
    """The learning-rate factor of step ``step`` (counted from 0) of ``steps``: a linear warm-up
    ``(step + 1) / warmup`` over the first ``warmup`` steps, then half a cosine from 1 down towards 0,
    ``(1 + cos(pi * (step - warmup) / (steps - warmup))) / 2`` (1 at step ``warmup``, just above 0 at
    the last step)."""
    for name, v in (("step", step), ("steps", steps), ("warmup", warmup)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"warmup_cosine: {name} must be an integer >= 0, got {v!r}")
    if not warmup < steps:
        raise ValueError(f"warmup_cosine: warmup ({warmup}) must be below steps ({steps})")
    if step >= steps:
        raise ValueError(f"warmup_cosine: step {step} is past the schedule's {steps} steps")
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (steps - warmup)))


def cross_entropy(outputs: Any, targets: Tensor | None) -> Tensor:
    """Default loss: cross entropy of the model's (first) output tensor against the labels."""
    if targets is None:
        raise ValueError("the default loss (cross entropy) needs labelled training data; pass loss_fn")
    logits = _first_tensor(outputs)
    if targets.is_floating_point() and not _class_probabilities(targets, logits):
        raise ValueError(f"the default loss (cross entropy) needs class indices or class probabilities as labels; "
                         f"these are {targets.dtype} {tuple(targets.shape)} values that are not probabilities over the "
                         f"{tuple(logits.shape)} outputs (regression targets?): use a distillation loss ('mse', "
                         "'cosine', 'kl') or pass loss_fn")
    return F.cross_entropy(logits, targets)


def _class_probabilities(targets: Tensor, logits: Tensor) -> bool:
    """Whether floating ``targets`` are class probabilities for ``logits`` (what ``F.cross_entropy``
    takes them for): the same shape, in [0, 1], summing to 1 over the class dimension."""
    if targets.shape != logits.shape or logits.dim() < 1:
        return False
    t = targets.detach().double()
    if not bool(((t >= 0) & (t <= 1)).all()):
        return False
    dim = 1 if t.dim() > 1 else 0
    return bool(torch.allclose(t.sum(dim), torch.ones((), dtype=t.dtype), atol=1e-3))


@dataclass
class TrainSettings:
    """Knobs shared by :func:`abfp.finetune.qat` and :func:`abfp.finetune.dnf`."""

    steps: int
    lr: float
    batch_size: int
    seed: int = 0
    weight_decay: float = 0.0
    lr_decay: float = 1.0
    eval_data: Dataset | None = None
    metric: Metric | None = None
    eval_batch_size: int = 500
    checkpoint: str | Path | None = None
    checkpoint_every: int = 50
    resume: bool = False
    progress: bool = True
    loss_fn: LossFn | None = None
    timing_steps: int = 5
    timing_every: int = 25
    exclude: Sequence[str] = ()
    callback: Callable[[int, float], None] | None = None
    desc: str = ""
    distillation: Distillation | None = None
    inference_layers: bool | None = None
    #: Per-module devices, ``{regex: ABFPConfig}`` as :func:`abfp.convert` takes them (a
    #: :class:`abfp.tune.DevicePlan`'s ``overrides()``); the other products use ``config``.
    overrides: Mapping[str, ABFPConfig] | None = None
    #: Fresh inputs (distillation only): ``(generator, n) -> tuple of input tensors``; the batch of
    #: step ``k`` is ``sample_inputs(Generator().manual_seed(seed * 1_000_003 + k), batch_size)``
    #: with the frozen float32 teacher's outputs on it as targets, instead of a slice of the
    #: fixed training inputs (which still serve DNF's histograms and fixed point's scales).
    #: E.g. :attr:`abfp.zoo.Task.sample_finetuning_batch`.
    sample_inputs: Callable[[torch.Generator, int], Any] | None = None
    #: The learning rate's schedule over the steps: ``"constant"`` (``lr``, times ``lr_decay`` per
    #: epoch) or ``"cosine"``: also times :func:`warmup_cosine` of the step (a linear warm-up over
    #: ``warmup`` steps, then half a cosine down to nearly 0 at the last of ``steps``).
    lr_schedule: str = "constant"
    warmup: int = 0
    #: Held-out training inputs (with labels for cross entropy; the teacher's outputs are added
    #: when distilling), never trained on: the run's loss on them, on the device, is measured
    #: before the first step, every ``validate_every`` steps and after the last, and the weights of the lowest
    #: are returned (:class:`~.selection.BestWeights`; ``None``: the last step's weights).
    validation: Dataset | None = None
    validate_every: int = 50

    @property
    def frozen_layers(self) -> bool:
        """``inference_layers`` resolved: its value, else True when distilling, False otherwise."""
        return self.distillation is not None if self.inference_layers is None else bool(self.inference_layers)

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(isinstance(self.steps, int) and self.steps >= 0, f"steps must be a non-negative integer, got {self.steps!r}")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size!r}")
        need(math.isfinite(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        need(math.isfinite(self.weight_decay) and self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        need(math.isfinite(self.lr_decay) and self.lr_decay > 0, f"lr_decay must be > 0, got {self.lr_decay!r}")
        need(self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size!r}")
        need(self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every!r}")
        need(self.timing_steps >= 0 and self.timing_every >= 0, "timing_steps and timing_every must be >= 0")
        need(isinstance(self.seed, int) and self.seed >= 0, f"seed must be a non-negative integer, got {self.seed!r}")
        need(self.lr_schedule in LR_SCHEDULES,
             f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        need(isinstance(self.warmup, int) and not isinstance(self.warmup, bool) and self.warmup >= 0,
             f"warmup must be a non-negative integer, got {self.warmup!r}")
        need(self.warmup == 0 or self.lr_schedule == "cosine", "warmup goes with lr_schedule='cosine'")
        need(isinstance(self.validate_every, int) and self.validate_every >= 1,
             f"validate_every must be an integer >= 1, got {self.validate_every!r}")
        if self.validation is not None and not isinstance(self.validation, Dataset):
            raise TypeError(f"validation must be an abfp.zoo.Dataset, got {type(self.validation).__name__}")
        need(self.lr_schedule != "cosine" or self.warmup < self.steps,
             f"warmup ({self.warmup}) must be below steps ({self.steps})")
        if self.distillation is not None and not isinstance(self.distillation, Distillation):
            raise TypeError(f"distillation must be an abfp.finetune.Distillation, got {type(self.distillation).__name__}")
        need(self.distillation is None or self.loss_fn is None,
             "pass either a distillation loss or loss_fn, not both (distillation is the loss)")
        if self.sample_inputs is not None:
            if not callable(self.sample_inputs):
                raise TypeError(f"sample_inputs must be a callable (generator, n) -> inputs, "
                                f"got {type(self.sample_inputs).__name__}")
            need(self.distillation is not None,
                 "sample_inputs (fresh unlabelled inputs) needs a distillation loss: they have no labels")
        if self.overrides is not None:
            if not isinstance(self.overrides, Mapping):
                raise TypeError(f"overrides must be a mapping of module pattern -> ABFPConfig, "
                                f"got {type(self.overrides).__name__}")
            for k, v in self.overrides.items():
                if not isinstance(k, str) or not isinstance(v, ABFPConfig):
                    raise TypeError(f"overrides: {k!r} -> {type(v).__name__}; needs str -> ABFPConfig")

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed (``steps`` may change)."""
        d = {"lr": self.lr, "batch_size": self.batch_size, "seed": self.seed, "weight_decay": self.weight_decay,
             "lr_decay": self.lr_decay, "exclude": list(self.exclude), "inference_layers": self.frozen_layers}
        if self.overrides:  # only when set: checkpoints of single-device runs keep their provenance
            # the device, and its execution options where they are not the defaults (a kernel changes
            # the numbers; checkpoints written before with default ones keep their provenance)
            d["overrides"] = {k: v.to_dict(execution=v.execution != ExecutionOptions())
                              for k, v in self.overrides.items()}
        if self.sample_inputs is not None:
            d["sample_inputs"] = sampler_identity(self.sample_inputs)
        if self.lr_schedule != "constant":  # only when set: earlier checkpoints stay valid
            d.update(lr_schedule=self.lr_schedule, warmup=self.warmup, schedule_steps=self.steps)
        if self.validation is not None:  # only when set, as above
            v = self.validation
            d.update(validate_every=self.validate_every,
                     validation=digest([len(v.inputs)], *v.inputs, "targets",
                                       v.targets if v.targets is not None else "none"))
        return d

    def lr_at(self, step: int, epoch: int) -> float:
        """The learning rate of step ``step`` (counted from 0) in epoch ``epoch``."""
        lr = self.lr * self.lr_decay ** epoch
        return lr * warmup_cosine(step, self.steps, self.warmup) if self.lr_schedule == "cosine" else lr


class Method(Protocol):
    """What QAT and DNF plug into :func:`finetune`."""

    name: str

    def options(self) -> dict[str, Any]: ...

    def prepare(self, model: nn.Module, train_data: Dataset, seed: int, exclude: Sequence[str],
                restored: tuple[dict[str, Tensor], dict[str, Any]] | None) -> nn.Module: ...

    def before_step(self, step: int) -> None: ...

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]: ...

    def finish(self) -> dict[str, Any]: ...


@dataclass
class FinetuneResult:
    """What a finetuning run measured. Metrics are on the device (full ABFP simulation) except
    ``fp32_metric``; ``None`` without evaluation data. ``model``: the finetuned float32 model."""

    method: str
    fp32_metric: float | None
    metric_before: float | None
    metric_after: float | None
    steps: int
    seconds_per_step: float | None
    seconds_total: float
    fp32_seconds_per_step: float | None
    model: nn.Module = field(repr=False)
    losses: list[float] = field(default_factory=list, repr=False)
    details: dict[str, Any] = field(default_factory=dict, repr=False)
    #: The metric's direction (a KL divergence, an MSE: lower is better).
    higher_is_better: bool = True

    @property
    def recovered(self) -> float | None:
        """How much better the metric got, positive when it improved: ``metric_after - metric_before``,
        or ``metric_before - metric_after`` for a lower-is-better metric."""
        if self.metric_after is None or self.metric_before is None:
            return None
        change = self.metric_after - self.metric_before
        return change if self.higher_is_better else -change

    @property
    def recovered_fraction(self) -> float | None:
        """Share of the device's loss won back: ``(after - before) / (fp32 - before)`` (the same
        for either direction of the metric)."""
        if self.metric_after is None or self.metric_before is None or self.fp32_metric is None \
                or self.fp32_metric == self.metric_before:
            return None
        return (self.metric_after - self.metric_before) / (self.fp32_metric - self.metric_before)

    @property
    def step_time_ratio(self) -> float | None:
        """``seconds_per_step / fp32_seconds_per_step``."""
        if not self.seconds_per_step or not self.fp32_seconds_per_step:
            return None
        return self.seconds_per_step / self.fp32_seconds_per_step

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready numbers (everything but the model)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("model", "details", "losses")}
        d.update(recovered=self.recovered, recovered_fraction=self.recovered_fraction,
                 step_time_ratio=self.step_time_ratio, final_loss=self.losses[-1] if self.losses else None)
        d.update(self.details)
        return d


# ----------------------------------------------------------------------------- helpers
def set_training(model: nn.Module, *, frozen: bool = False) -> None:
    """Training mode for the steps. ``frozen``: every submodule in eval mode (batch norm with
    its running statistics, not updated; no dropout), as the model will be evaluated; the root
    module alone keeps ``training=True`` (DNF draws its noise in training mode)."""
    model.train()
    if frozen:
        for m in model.modules():
            if m is not model:
                m.training = False


def float_copy(model: nn.Module) -> nn.Module:
    """A float32 deep copy of ``model``, digital (unconverted)."""
    if is_converted(model):
        return to_digital(model, inplace=False).float()
    return copy.deepcopy(model).float()


def device_metric(model: nn.Module, data: Dataset, metric: Metric, config: ABFPConfig, *, batch_size: int = 500,
                  reference: Tensor | None = None, exclude: Sequence[str] = (),
                  overrides: Mapping[str, ABFPConfig] | None = None) -> float:
    """``metric`` of ``model`` run on the device ``config`` (per-module ``overrides``; a converted
    copy, eval mode); the batches are shared among the ranks of the process group, if there is
    one. A fixed-point ``config`` takes its static scales from the first batch of ``data`` (as
    ``abfp eval`` does)."""
    m = convert(model, config, exclude=exclude, overrides=overrides, inplace=False).eval()
    if needs_calibration(m):
        calibrate(m, [tuple(t[:batch_size] for t in data.inputs)])
    out = run_all(m, data, batch_size)
    return metric(out, data.targets, out if reference is None else reference)


class _Batches:
    """The batch of step ``k``: slice ``k mod S`` of the permutation of epoch ``k // S``."""

    def __init__(self, data: Dataset, batch_size: int, seed: int) -> None:
        if len(data) < batch_size:
            raise ValueError(f"the training data has {len(data)} samples, fewer than one batch ({batch_size})")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.per_epoch = len(data) // batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)

    def epoch(self, step: int) -> int:
        return step // self.per_epoch

    def __call__(self, step: int) -> tuple[tuple[Tensor, ...], Tensor | None]:
        e = self.epoch(step)
        if e != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
            self._epoch, self._perm = e, torch.randperm(len(self.data), generator=g)
        j = step % self.per_epoch
        idx = self._perm[j * self.batch_size : (j + 1) * self.batch_size]
        inputs = tuple(t[idx] for t in self.data.inputs)
        return inputs, None if self.data.targets is None else self.data.targets[idx]


def callable_name(fn: Callable[..., Any]) -> str:
    """``module.qualname`` of ``fn``."""
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def sampler_identity(fn: Callable[[torch.Generator, int], Any]) -> str:
    """How checkpoints and journals record a fresh-input sampler, so that a run resumed (or a tune
    stage restored) with another sampler is refused: the sha256 of its code, defaults and closure
    (:func:`abfp.evaluate.fingerprint.callable_fingerprint`), the digest of what it returns for
    ``(Generator().manual_seed(0), 2)`` (catches a change in the code it calls), and its name."""
    from ..evaluate.fingerprint import callable_fingerprint

    probe = fn(torch.Generator().manual_seed(0), 2)
    parts = tuple(probe) if isinstance(probe, (tuple, list)) else (probe,)
    return f"code {callable_fingerprint(fn)[:12]}, probe {digest(*parts)[:12]}: {callable_name(fn)}"


class _FreshBatches(_Batches):
    """The batch of step ``k``: ``sample(Generator().manual_seed(seed * 1_000_003 + k), batch_size)``
    with the frozen ``teacher``'s outputs on it as targets (depends on the step number only)."""

    def __init__(self, data: Dataset, batch_size: int, seed: int, sample: Callable[[torch.Generator, int], Any],
                 teacher: nn.Module) -> None:
        # no minimum size for ``data``: the batches do not come from it (it only sets the epoch length)
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.per_epoch = max(1, len(data) // batch_size)
        self.sample, self.teacher = sample, teacher

    def __call__(self, step: int) -> tuple[tuple[Tensor, ...], Tensor | None]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        raw = self.sample(g, self.batch_size)
        inputs = (raw,) if isinstance(raw, Tensor) else raw
        if not (isinstance(inputs, (tuple, list)) and inputs and all(isinstance(t, Tensor) for t in inputs)):
            raise TypeError(f"sample_inputs must return a Tensor or a tuple of Tensors, got {type(raw).__name__}")
        if any(t.shape[0] != self.batch_size for t in inputs):
            raise ValueError(f"sample_inputs returned {[t.shape[0] for t in inputs]} rows, asked for {self.batch_size}")
        inputs = tuple(inputs)
        return inputs, teacher_outputs(self.teacher, inputs, self.batch_size)


class _Fp32Timer:
    """Times plain float32 AdamW steps of a shadow copy without touching the global RNG."""

    def __init__(self, model: nn.Module, settings: TrainSettings, loss_fn: LossFn) -> None:
        self.model = copy.deepcopy(model)
        set_training(self.model, frozen=settings.frozen_layers)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        self.loss_fn = loss_fn
        self.times: list[float] = []
        self.warm = False

    def step(self, inputs: tuple[Tensor, ...], targets: Tensor | None, repeats: int = 1) -> None:
        with torch.random.fork_rng(devices=[]):
            runs = repeats + (0 if self.warm else 2)
            for r in range(runs):
                t0 = time.perf_counter()
                loss = self.loss_fn(self.model(*inputs), targets)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                dt = time.perf_counter() - t0
                if self.warm or r >= 2:
                    self.times.append(dt)
            self.warm = True

    def mean(self) -> float | None:
        return statistics.fmean(self.times) if self.times else None


def produced_by(method: Method, base: nn.Module, train_data: Dataset, config: ABFPConfig, s: TrainSettings,
                loss_fn: LossFn) -> dict[str, Any]:
    """What a checkpoint records about the run that wrote it, and a resumed run must match:
    the method and its options, the training settings, the device config, fingerprints of the
    starting model (structure and weights) and of the training data, the loss function, and
    the number of torch CPU threads (the order of float sums in a step depends on it, so a
    run resumed with another thread count would no longer be bit-identical). When distilling,
    ``loss`` names the distillation loss and its temperature and ``teacher`` is the digest of
    the teacher's outputs (which are the training targets)."""
    from ..evaluate.fingerprint import callable_fingerprint, is_user_code

    describe = getattr(loss_fn, "describe", None)
    loss = describe() if callable(describe) else callable_name(loss_fn)
    if not callable(describe) and is_user_code(getattr(loss_fn, "__module__", None)):
        loss += f" (code {callable_fingerprint(loss_fn)[:12]})"  # the user's loss edited under the same name
    teacher = None
    if isinstance(loss_fn, Distillation) and train_data.targets is not None:
        teacher = digest(["teacher outputs"], train_data.targets)
    return {"method": method.name, "options": method.options(), "settings": s.fingerprint(),
            "config": config_key(config), "train_samples": len(train_data),
            "model": digest(repr(base), base.state_dict()) + _user_code_print(base),
            "train_data": digest([len(train_data.inputs)], *train_data.inputs,
                                 "targets", train_data.targets if train_data.targets is not None else "none"),
            "loss": loss, "teacher": teacher, "threads": torch.get_num_threads()}


def _user_code_print(model: nn.Module) -> str:
    """``""`` for a model of abfp's, torch's or an installed package's classes (their checkpoints keep
    the provenance they had), else ``" code <print>"``: the user's own forward (and the helpers it
    calls) edited with the weights unchanged is another model."""
    from ..evaluate.fingerprint import is_user_code, model_fingerprint

    if not any(is_user_code(type(m).__module__) for m in model.modules()):
        return ""
    return f" code {model_fingerprint(model)[:12]}"


_HINTS = {"loss": " (another loss: --loss / --temperature)", "teacher": " (another teacher or other training inputs)",
          "threads": " (set the same thread count: torch.set_num_threads / --threads)",
          "model": " (another model, other starting weights or edited model code)", "train_data": " (other training data)",
          "sampler_version": " (written by an abfp whose DNF sampler drew other noise values: finetune anew)",
          "validation": " (other held-out inputs: --validation-samples; 0 for a run written without them)",
          "validate_every": " (--validate-every)"}


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_compatible(meta: dict[str, Any], expected: dict[str, Any], path: Path) -> None:
    diffs = []
    for k, v in expected.items():
        if meta.get(k) == v:
            continue
        if isinstance(v, dict) and isinstance(meta.get(k), dict):  # name the keys that differ
            old = meta[k]
            diffs += [f"{k}.{j}: checkpoint {_short(old.get(j))} vs now {_short(v.get(j))}{_HINTS.get(j, '')}"
                      for j in sorted(set(v) | set(old)) if old.get(j) != v.get(j)]
        else:
            diffs.append(f"{k}: checkpoint {_short(meta.get(k))} vs now {_short(v)}{_HINTS.get(k, '')}")
    if diffs:
        raise ValueError(f"cannot resume from {str(path)!r}: it was written with other settings ({'; '.join(diffs)}); "
                         "rerun with the same settings, or without --resume (or point --checkpoint elsewhere)")


def _pin_threads(n: int | None = None) -> int:
    """Keep torch's CPU thread count at ``n`` (default: the current one; returned).

    The first launch of numba's OpenMP pool (the device simulation's compiled kernels) resets
    the OpenMP thread count that torch shares; the float sums of a training step depend on
    that count, so an uninterrupted run (which evaluates the device before training) and a
    resumed one (which does not) would otherwise train with different thread counts and
    drift apart in the last bits. The pool is launched here first, then the count restored.
    """
    if n is None:
        n = torch.get_num_threads()
        from ..numerics import fused

        if fused.usable():
            fused.set_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def _default_metric(distillation: Distillation | None) -> Metric:
    """Top-1 accuracy; when distilling (no labels): top-1 agreement (kl) or cosine (cosine, mse)."""
    if distillation is None:
        return TOP1
    return AGREEMENT if distillation.loss == "kl" else COSINE


def _best_weights(s: TrainSettings, base: nn.Module, loss_fn: LossFn, config: ABFPConfig) -> Any:
    """The run's :class:`~.selection.BestWeights` (``None`` without ``s.validation``): its targets are
    the labels, or when distilling the frozen float32 teacher's outputs on the validation inputs."""
    from .selection import BestWeights

    v = s.validation
    if v is None:
        return None
    if s.distillation is not None:
        v = Dataset(v.inputs, from_main(lambda: teacher_outputs(base, v.inputs)))
    elif v.targets is None:
        raise ValueError("validation data without targets: the loss needs labels (or a distillation loss)")

    def measure(model: nn.Module, data: Dataset, metric: Metric) -> float:
        return device_metric(model, data, metric, config, batch_size=s.eval_batch_size, exclude=s.exclude,
                             overrides=s.overrides)

    return BestWeights(float_copy(base), v, s.distillation or loss_fn, measure, s.validate_every)


def _json_roundtrip(d: dict[str, Any]) -> dict[str, Any]:
    import json

    return json.loads(json.dumps(d))


# ----------------------------------------------------------------------------- the loop
def finetune(method: Method, model: nn.Module, train_data: Dataset, config: ABFPConfig,
             settings: TrainSettings) -> FinetuneResult:
    """Finetune a copy of ``model`` with ``method``; evaluate before and after on the device."""
    s = settings
    s.validate()
    if not isinstance(config, ABFPConfig):
        raise TypeError(f"config must be an ABFPConfig, got {type(config).__name__}")
    if not isinstance(train_data, Dataset):
        raise TypeError(f"train_data must be an abfp.zoo.Dataset, got {type(train_data).__name__}")
    loss_fn: LossFn = s.distillation or s.loss_fn or cross_entropy
    threads = _pin_threads()
    rank, world_size = world()
    check_divisible(s.batch_size, world_size)
    if s.sample_inputs is None:
        batches = _Batches(train_data, s.batch_size, s.seed)
    eval_cfg = config if config.seed is not None else config.replace(seed=s.seed)
    base = float_copy(model)
    sync_from_main(base)
    if s.distillation is not None:  # the frozen float32 teacher's outputs become the targets
        inputs = train_data.inputs
        train_data = Dataset(inputs, from_main(lambda: teacher_outputs(base, inputs)))
        if s.sample_inputs is None:
            batches = _Batches(train_data, s.batch_size, s.seed)
        else:  # a new batch every step; the teacher stays float32
            batches = _FreshBatches(train_data, s.batch_size, s.seed, s.sample_inputs, copy.deepcopy(base).eval())

    best = _best_weights(s, base, loss_fn, eval_cfg)
    features_teacher = None
    if s.distillation is not None and s.distillation.feature_weight:  # taken before any restore or conversion
        features_teacher = copy.deepcopy(base).eval()
        feature_names = feature_module_names(features_teacher, s.distillation.feature_modules)
    ckpt = Path(s.checkpoint) if s.checkpoint else None
    expected = _json_roundtrip(produced_by(method, base, train_data, eval_cfg, s, loss_fn)) if ckpt else {}
    restored = None
    if s.resume and ckpt is not None:
        restored = from_main(lambda: load_checkpoint(ckpt) if ckpt.exists() else None)
    if restored:
        _check_compatible(restored[1], expected, ckpt)  # type: ignore[arg-type]
        done_before = int(restored[1]["step"])
        if done_before > s.steps:
            raise ValueError(f"cannot resume from {str(ckpt)!r}: it is at step {done_before}, beyond steps={s.steps} "
                             f"(steps counts from the start of the run; pass at least {done_before})")
    prev = restored[1] if restored else {}

    # ---- float32 reference and the device before finetuning
    fp32_metric = metric_before = None
    reference = None
    metric = s.metric or _default_metric(s.distillation)
    if s.eval_data is not None:
        base.eval()
        reference = run_all(base, s.eval_data, s.eval_batch_size)
        fp32_metric = metric(reference, s.eval_data.targets, reference)
        same_eval = prev.get("eval_samples") == len(s.eval_data) and prev.get("metric") == metric.name
        metric_before = prev.get("metric_before") if same_eval else None
        if metric_before is None:
            metric_before = device_metric(base, s.eval_data, metric, eval_cfg, batch_size=s.eval_batch_size,
                                          reference=reference, exclude=s.exclude, overrides=s.overrides)

    # ---- setup
    _pin_threads(threads)
    t_setup = time.perf_counter()
    if restored:
        base.load_state_dict(model_state(restored[0]))
    timer = _Fp32Timer(base, s, loss_fn)  # a copy of the starting point, before any conversion
    torch.manual_seed(s.seed)
    train_model = method.prepare(base, train_data, s.seed, tuple(s.exclude), restored)
    features = None if features_teacher is None else \
        FeatureMatch(train_model, features_teacher, feature_names, s.distillation)  # type: ignore[arg-type]
    net = wrap(train_model)  # DistributedDataParallel under torchrun
    optimizer = torch.optim.AdamW(train_model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    start = 0
    losses: list[float] = []
    if restored:
        restore_optimizer(optimizer, restored[0], prev["optimizer"])
        torch.set_rng_state(restored[0]["rng.torch"])
        start = int(prev["step"])
        losses = [float(v) for v in prev.get("losses", [])]
    if best is not None:
        if restored:
            best.restore(restored[0], prev.get("validation", {}))
        elif s.steps > 0:
            best.measure(train_model, 0)
    elapsed = float(prev.get("seconds_total", 0.0)) + time.perf_counter() - t_setup

    if s.timing_steps and start < s.steps:
        timer.step(*shard(batches(start), rank, world_size), repeats=s.timing_steps)

    # ---- steps
    step_times: list[float] = []
    bar = tqdm(total=s.steps, initial=min(start, s.steps), disable=not s.progress or rank != 0,
               desc=s.desc or method.name, unit="step", dynamic_ncols=True, leave=False)
    set_training(train_model, frozen=s.frozen_layers)
    try:
        for step in range(start, s.steps):
            t0 = time.perf_counter()
            _pin_threads(threads)
            if world_size > 1:
                torch.manual_seed(step_seed(s.seed, rank, step))
            method.before_step(step)
            lr = s.lr_at(step, batches.epoch(step))
            for group in optimizer.param_groups:
                group["lr"] = lr
            inputs, targets = shard(batches(step), rank, world_size)
            loss = loss_fn(net(*inputs), targets) if features is None else features.loss(net, inputs, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = mean_over_ranks(float(loss.detach()))
            dt = time.perf_counter() - t0
            step_times.append(dt)
            elapsed += dt
            losses.append(value)
            done = step + 1
            if not math.isfinite(value):
                raise FloatingPointError(f"{method.name}: loss is {value} at step {done}; lower the learning rate")
            if best is not None and best.due(done):  # on every rank: the device evaluation is shared
                best.measure(train_model, done)
            if ckpt is not None and rank == 0 and (done % s.checkpoint_every == 0 or done == s.steps):
                t1 = time.perf_counter()
                extra, method_meta = method.state()
                validation: dict[str, Any] = {}
                if best is not None:
                    best_tensors, validation = best.state()
                    extra = {**extra, **best_tensors}
                elapsed += time.perf_counter() - t1
                meta = {**expected, "fp32_metric": fp32_metric, "metric_before": metric_before, "losses": losses,
                        "eval_samples": len(s.eval_data) if s.eval_data is not None else None, "metric": metric.name,
                        "method_state": method_meta, "seconds_total": elapsed, "world_size": world_size,
                        **({"validation": validation} if best is not None else {})}
                save_checkpoint(ckpt, train_model, optimizer, done, extra, meta)
                elapsed += time.perf_counter() - t1
            if s.timing_every and done % s.timing_every == 0 and done < s.steps:
                timer.step(inputs, targets)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
            if s.callback is not None:
                s.callback(done, value)
    finally:
        bar.close()
        unwrap(net)
        if features is not None:
            features.close()
    train_model.eval()
    if best is not None and s.steps > 0:
        best.finish(train_model, s.steps)
    details = method.finish()
    if best is not None and best.best_step is not None:
        if best.best_step != s.steps:
            train_model.load_state_dict(best.best_state())
        details = {**details, **best.summary(s.steps)}
    final = to_digital(train_model, inplace=True) if is_converted(train_model) else train_model

    metric_after = None
    if s.eval_data is not None:
        metric_after = device_metric(final, s.eval_data, metric, eval_cfg, batch_size=s.eval_batch_size,
                                     reference=reference, exclude=s.exclude, overrides=s.overrides)
    _pin_threads(threads)
    timed = step_times[1:] if len(step_times) > 1 else step_times
    details = {"config": eval_cfg.to_dict(execution=True), "lr": s.lr, "batch_size": s.batch_size, "seed": s.seed,
               "weight_decay": s.weight_decay, "lr_decay": s.lr_decay, "metric": metric.name if s.eval_data else None,
               "eval_samples": len(s.eval_data) if s.eval_data is not None else None,
               "resumed_from": int(prev["step"]) if restored else None, "world_size": world_size, **details}
    return FinetuneResult(
        method=method.name, fp32_metric=fp32_metric, metric_before=metric_before, metric_after=metric_after,
        steps=s.steps, seconds_per_step=statistics.fmean(timed) if timed else None,
        seconds_total=elapsed, fp32_seconds_per_step=timer.mean(), model=final, losses=losses, details=details,
        higher_is_better=metric.higher_is_better,
    )
