"""``abfp.tune``: gains, repeats and (optionally) finetuning, stage by stage, to a :class:`DevicePlan`.

Stages, each measured by ``metric`` on the evaluation inputs (the calibration inputs when none
are given) and by the energy per inference (:mod:`abfp.energy`):

1. ``single gain``: the base device as given (one gain everywhere);
2. ``gain``: a gain per module (:mod:`.gains`, the error rule by default; ``gain_rule="energy"``:
   gains and repeats together, the least energy that reaches ``target``, :mod:`.allocate`); with
   ``gain_descent``, then ``gain descent``: the gains lowered, most expensive module first,
   while the target is reached on the calibration inputs (:mod:`.descent`);
3. ``repeats``: repeats per module to reach ``target`` at the least energy (:mod:`.repeats`);
4. ``finetune``: label-free finetuning of the weights on the plan, when ``finetune`` is given:
   ``"distil-qat"`` / ``"distil-dnf"`` (:class:`.finetune.DistilStage`, options in
   ``finetune_options``), ``"bias-correct"`` (:class:`.finetune.BiasCorrectStage`: layer-wise
   bias correction, no training) or any callable ``(model, plan, calibration inputs) -> finetuned
   float32 model``. It sees the calibration inputs only.

Each stage records its metric with its standard error over the evaluation samples (when the
metric is a per-sample mean) and the ``extra_metrics`` (e.g. KL and top-1 agreement).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..config import ABFPConfig
from ..energy import EnergyParams, account_rows
from ..nn import summary, to_digital
from ..zoo.base import COSINE, Dataset, Metric
from .finetune import BiasCorrectStage, DistilStage, finetune_stage
from .descent import descend_gains
from .allocate import energy_allocation, repeat_options
from .gains import GainRule, _as_tuple, choose_gains, power_of_two_gains
from .journal import TuneJournal, run_identity
from .plan import DevicePlan
from .refine import check_refine_options
from .repeats import noise_profile, search_repeats

#: the named finetuning stages (journaled; a callable is not)
STAGES = (DistilStage, BiasCorrectStage)

__all__ = ["StageResult", "TuneResult", "tune", "default_target", "evaluate_plan", "plan_outputs"]


@dataclass
class StageResult:
    """One stage: its metric (on the evaluation inputs), energy per inference (pJ), the wall
    time it took (s), its plan and notes."""

    name: str
    metric: float
    energy: float
    seconds: float
    plan: DevicePlan
    note: str = ""
    stderr: float | None = None
    extra: dict[str, float] = field(default_factory=dict)
    extra_stderr: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.name, "metric": self.metric, "stderr": self.stderr, "extra": self.extra,
                "extra_stderr": self.extra_stderr,
                "energy_pj": self.energy, "seconds": self.seconds, "note": self.note}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], plan: DevicePlan) -> "StageResult":
        """The inverse of :meth:`to_dict` (a journal's record), with the stage's ``plan``."""
        return cls(d["stage"], d["metric"], d["energy_pj"], d["seconds"], plan, d["note"], d["stderr"],
                   dict(d["extra"]), dict(d["extra_stderr"]))

    def metric_text(self) -> str:
        """``metric ± stderr`` (4 significant digits)."""
        return f"{self.metric:.4g}" + ("" if self.stderr is None else f" ± {self.stderr:.2g}")


@dataclass
class TuneResult:
    """What :func:`tune` returns: the final ``plan``, the float32 ``model`` (finetuned, or the
    input model), the ``stages`` in order and the metric's float32 value and target."""

    plan: DevicePlan
    model: nn.Module
    stages: list[StageResult]
    metric_name: str
    fp32_metric: float
    target: float | None
    higher_is_better: bool = True
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    #: calibration inputs accounted together for the energy per inference
    energy_samples: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric_name, "fp32": self.fp32_metric, "target": self.target,
                "higher_is_better": self.higher_is_better, "seconds": self.seconds,
                "energy_samples": self.energy_samples,
                "stages": [s.to_dict() for s in self.stages], "details": self.details}

    def table(self) -> str:
        e0 = self.stages[0].energy if self.stages else 0.0
        target = "none" if self.target is None else f"{self.target:.4g}"
        lines = [f"{self.metric_name}: float32 {self.fp32_metric:.4g} on the evaluation inputs, "
                 f"target {target} (on the calibration inputs)",
                 f"  {'stage':<12} {'metric':>18} {'energy/inf (uJ)':>16} {'x single':>9} {'time (s)':>9}"]
        for s in self.stages:
            extra = ", ".join(f"{k} {v:.4g}" for k, v in s.extra.items())
            lines.append(f"  {s.name:<12} {s.metric_text():>18} {s.energy / 1e6:>16.4g} "
                         f"{(s.energy / e0 if e0 else 0):>9.3f} {s.seconds:>9.1f}  "
                         + "; ".join(t for t in (extra, s.note) if t))
        return "\n".join(lines)


def default_target(metric: Metric, fp32_value: float) -> float:
    """The target when none is given: float32 minus 0.3 points for a metric in %, minus 0.005
    otherwise (plus for a lower-is-better metric)."""
    drop = 0.3 if metric.unit == "%" else 0.005
    return fp32_value - drop if metric.higher_is_better else fp32_value + drop


@torch.no_grad()
def _outputs(model: nn.Module, data: Dataset, batch_size: int) -> Tensor:
    from ..evaluate.runner import run_model

    return run_model(model, data, batch_size)


def plan_outputs(model: nn.Module, plan: DevicePlan, data: Dataset, batch_size: int = 64, seed: int = 0) -> Tensor:
    """The outputs of ``model`` converted by ``plan`` (noise seed ``seed``) on ``data``."""
    m = plan.with_seed(seed).convert(model)
    try:
        return _outputs(m.eval(), data, batch_size)
    finally:
        to_digital(m)


def evaluate_plan(model: nn.Module, plan: DevicePlan, data: Dataset, metric: Metric, reference: Tensor,
                  batch_size: int = 64, seed: int = 0) -> float:
    """``metric`` of ``model`` converted by ``plan`` (noise seed ``seed``) on ``data``."""
    return metric(plan_outputs(model, plan, data, batch_size, seed), data.targets, reference)


def _no_worse_than_single_gain(gain_plan: DevicePlan, base_plan: DevicePlan, calib: Dataset, reference: Tensor,
                               metric: Metric, outputs: Callable[[DevicePlan], Tensor]) -> tuple[DevicePlan, dict[str, Any]]:
    """``gain_plan``, or ``base_plan`` where the per-layer gains score worse on the calibration
    inputs than the single gain by more than one standard error of the single gain's score
    (``metric.stderr``; any amount when it has none): the per-layer rules minimise each layer's
    output error or saturation, a proxy that can lose the metric itself (a model whose float32
    classes are near ties). Decided on calibration inputs only, never the evaluation inputs.
    Returns the plan kept and what was compared (``{"single_gain", "per_layer", "stderr", "text"}``)."""
    base_out, gain_out = outputs(base_plan), outputs(gain_plan)
    b, g = metric(base_out, calib.targets, reference), metric(gain_out, calib.targets, reference)
    se = metric.stderr(base_out, calib.targets, reference) or 0.0
    loss = (b - g) if metric.higher_is_better else (g - b)
    worse = loss > se
    text = (f"the per-layer gains scored {g:.4g} on calibration against the single gain's {b:.4g} "
            f"(standard error {se:.2g}): kept the single gain") if worse else ""
    return (base_plan if worse else gain_plan), {"single_gain": b, "per_layer": g, "stderr": se, "text": text}


def _energy(model: nn.Module, plan: DevicePlan, inputs: tuple[Tensor, ...], params: EnergyParams) -> float:
    m = plan.convert(model)
    try:
        rows = summary(m.eval(), inputs, errors=False).rows
    finally:
        to_digital(m)
    return account_rows(rows, int(inputs[0].shape[0]), params, plan.base).totals(True)["energy_total"]


def _product_modules(model: nn.Module, plan: DevicePlan, inputs: tuple[Tensor, ...]) -> list[str]:
    m = plan.convert(model)
    try:
        rows = summary(m.eval(), inputs, errors=False).rows
    finally:
        to_digital(m)
    out: list[str] = []
    for r in rows:
        name = r.site.rsplit(":", 1)[0]
        if r.kind != "digital" and name not in out:
            out.append(name)
    return out


def _finetune_stage(finetune: Any, options: Mapping[str, Any] | None, metric: Metric,
                    seed: int) -> Callable[[nn.Module, DevicePlan, tuple[Tensor, ...]], nn.Module] | None:
    """``finetune`` as a callable: a method name becomes its stage (:func:`.finetune.finetune_stage`)
    of ``options``."""
    if finetune is None or finetune == "none":
        if options:
            raise ValueError("finetune_options given without finetune")
        return None
    if isinstance(finetune, str):
        opts = dict(options or {})
        opts.setdefault("seed", seed)
        return finetune_stage(finetune, opts, metric)
    if not callable(finetune):
        raise TypeError(f"finetune must be a method name or a callable, got {type(finetune).__name__}")
    if options:
        raise ValueError("finetune_options go with a finetune method name, not a callable")
    return finetune


def _refine_note(refined: Mapping[str, Any]) -> str:
    """The gain stage note's account of the refinement (and its fill)."""
    moved = refined.get("moved") or {}
    passes = refined.get("passes", 1)
    margin = f", margin {refined['margin']:g}" if refined.get("margin") else ""
    note = f"; refined on calibration ({passes} pass{'es' if passes != 1 else ''}{margin}): " + (", ".join(
        f"{m} {a[0]:.3g}x{a[1]} -> {b[0]:.3g}x{b[1]}" for m, (a, b) in moved.items()) or "no change")
    fill = refined.get("fill")
    if fill is not None:
        note += ("; fill: nothing left to spend" if not fill["moved"] else
                 f"; fill ({len(fill['moved'])} modules, {fill['metric']:.4g} on calibration): "
                 + ("kept" if fill["kept"] else "not better, dropped"))
    return note


def tune(
    model: nn.Module,
    calibration_inputs: Any,
    config: ABFPConfig | None = None,
    *,
    metric: Metric | None = None,
    target: float | None = None,
    calibration_targets: Tensor | None = None,
    eval_inputs: Any = None,
    eval_targets: Tensor | None = None,
    gain_rule: GainRule = "error",
    gains: Sequence[float] | None = None,
    max_gain: float = 256.0,
    gain_tolerance: float = 0.0,
    gain_samples: int = 32,
    gain_descent: bool = False,
    energy_budget: float | None = None,
    refine: int = 0,
    refine_passes: int | None = 1,
    refine_fill: bool = False,
    refine_margin: float = 0.0,
    repeats: bool = True,
    max_repeats: int = 16,
    repeat_steps: int = 8,
    finetune: str | Callable[[nn.Module, DevicePlan, tuple[Tensor, ...]], nn.Module] | None = None,
    finetune_options: Mapping[str, Any] | None = None,
    extra_metrics: Sequence[Metric] = (),
    exclude: Sequence[str] = (),
    batch_size: int = 64,
    energy_samples: int = 1,
    energy_params: EnergyParams | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    journal: str | Path | None = None,
    resume: bool = False,
) -> TuneResult:
    """Tune a per-layer device plan for the float32 ``model``.

    ``calibration_inputs``: a tensor (or tuple of tensors) of the model's inputs, no labels
    needed (``calibration_targets`` only for a metric that needs labels). Gains are chosen on
    its first ``gain_samples`` samples, repeats on all of it. ``metric`` (default: cosine
    similarity of the outputs to float32) and ``target`` (default :func:`default_target`)
    decide the repeats; stage metrics are reported on ``eval_inputs`` when given.
    ``gains``: the allowed gain values (default powers of two up to ``max_gain``);
    ``gain_tolerance``: accept the smallest gain whose error is within ``(1 + tolerance)`` of
    the least (a gain G costs G times the analog energy).
    ``finetune``: ``"distil-qat"``, ``"distil-dnf"`` (options ``finetune_options``: ``steps``,
    ``lr``, ``batch_size``, ``loss`` (default ``kl`` for a %-metric or KL, else ``cosine``),
    ``temperature``, ``seed``, ``progress``, ``fresh_inputs``: ``(generator, n) -> inputs``, a new
    batch every step instead of the calibration inputs, e.g. ``Task.sample_finetuning_batch``;
    ``abfp tune --task`` passes the task's), ``"bias-correct"`` (options ``samples``, ``seed``: the
    per-channel mean device error of each linear layer and convolution, upstream ones corrected,
    removed from its bias or from the batch norm it feeds; :mod:`abfp.finetune.layerwise`) or a
    callable; it gets the calibration inputs only.
    ``gain_rule="energy"``: gains (from ``gains``) and repeats (powers of two up to
    ``max_repeats``; none when ``repeats`` is false) chosen together, the least energy per
    inference that reaches ``target`` on the calibration inputs (:mod:`.allocate`); the
    repeats stage is then skipped. ``energy_budget`` (with the energy rule): instead, the plan
    of least predicted error whose energy is at most that many times the single-gain energy.
    ``refine`` (with the energy rule): then check the rule's choice for that many modules, those of
    largest predicted loss, on the calibration inputs, each moved to the neighbouring gain (one
    candidate step either way, any repeats) that scores best there within the budget or, without
    a budget, the rule's energy (:mod:`.refine`; at most ``refine * 3 * repeat options``
    calibration forwards per pass). ``refine_passes``: that many passes over those modules at
    most, while the last one moved one (``None``: until a pass moves nothing); ``refine_fill``:
    then the energy left under the budget goes to the rule's next moves of the other modules
    (:func:`.allocate.fill_budget`), kept only when that scores better on calibration;
    ``refine_margin``: a module moves only when that beats the plan on calibration by more than
    this fraction of its metric (default 0: any improvement).
    ``gain_descent``: after the gain stage, lower the gains, most expensive module first, while
    the target is still reached on the calibration inputs (:mod:`.descent`; a stage of its own).
    ``extra_metrics``: reported per stage besides ``metric``.
    ``energy_samples``: the energy per inference is accounted on this many calibration inputs run
    together (weights are converted once per call, so their DAC energy is shared by them);
    default 1, one inference alone, as ``abfp energy`` and ``abfp explore`` count it. The energy
    rule's budget and its ``energy_ratio`` use the same accounting.
    ``journal``: a JSON file where each finished stage is recorded (:mod:`.journal`); with
    ``resume=True`` the finished stages of an earlier run with the same journal, model, data,
    metric, config and options are taken from it (another run's journal is refused), so a
    killed run loses at most the stage it was in (a killed finetuning: its last checkpoint).
    ``seed``: the noise seed of every stage's evaluations, of the gain choice and of the
    finetuning; a ``config`` with its own ``execution.seed`` runs at that one instead (as
    ``abfp.evaluate`` and finetuning do), everywhere.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"tune needs an nn.Module, got {type(model).__name__}")
    config = config or ABFPConfig()
    if not isinstance(config, ABFPConfig):
        raise TypeError(f"config must be an ABFPConfig, got {type(config).__name__}")
    if config.mode != "abfp":
        raise ValueError("tune plans ABFP devices: config.mode must be 'abfp'")
    if config.repeats != 1:
        raise ValueError(f"tune chooses the repeats: give a config with repeats=1, got {config.repeats}")
    if config.seed is not None:  # the device's own seed: the gains already ran at it, the stage metrics did not
        seed = config.seed
    metric = metric or COSINE
    if not isinstance(metric, Metric):
        raise TypeError(f"metric must be an abfp.zoo.base.Metric, got {type(metric).__name__}")
    for name, v in (("gain_samples", gain_samples), ("batch_size", batch_size), ("energy_samples", energy_samples),
                    ("repeat_steps", repeat_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if target is not None and not (isinstance(target, (int, float)) and math.isfinite(target)):
        raise ValueError(f"target must be a finite number, got {target!r}")
    for m_ in extra_metrics:
        if not isinstance(m_, Metric):
            raise TypeError(f"extra_metrics must be abfp.zoo.base.Metric objects, got {type(m_).__name__}")
    if gain_rule not in ("error", "saturation", "energy"):
        raise ValueError(f"gain_rule must be 'error', 'saturation' or 'energy', got {gain_rule!r}")
    if energy_budget is not None:
        if gain_rule != "energy":
            raise ValueError("energy_budget goes with gain_rule='energy'")
        if isinstance(energy_budget, bool) or not isinstance(energy_budget, (int, float)) \
                or not math.isfinite(energy_budget) or energy_budget <= 0:
            raise ValueError(f"energy_budget must be a finite number > 0 (times the single-gain energy), got "
                             f"{energy_budget!r}")
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise ValueError(f"refine must be an integer >= 0 (modules to refine), got {refine!r}")
    if refine and gain_rule != "energy":
        raise ValueError("refine goes with gain_rule='energy' (it checks the energy rule's choice on the model)")
    check_refine_options(refine_passes, refine_margin, prefix="refine_")
    if not isinstance(refine_fill, bool):
        raise TypeError(f"refine_fill must be a bool, got {type(refine_fill).__name__}")
    if (refine_passes != 1 or refine_fill or refine_margin) and not refine:
        raise ValueError("refine_passes, refine_fill and refine_margin go with refine > 0 (modules to refine)")
    if gain_rule == "energy" and (gain_tolerance or gain_descent):
        raise ValueError("the energy rule chooses the gains for the target itself: gain_tolerance and gain_descent "
                         "go with the error rule")
    finetune = _finetune_stage(finetune, finetune_options, metric, seed)
    calib = Dataset(_as_tuple(calibration_inputs), calibration_targets)
    evald = calib if eval_inputs is None else Dataset(_as_tuple(eval_inputs), eval_targets)
    if len(calib) == 0:
        raise ValueError("calibration_inputs is empty")
    fewest = getattr(finetune, "min_inputs", 1)
    if len(calib) < fewest:  # before any stage: not after the gains and repeats, with a journal left behind
        raise ValueError(f"finetuning ({getattr(finetune, 'method', 'the finetune stage')}) needs at least {fewest} "
                         f"calibration inputs, got {len(calib)}")
    for what, data, arg in (("calibration", calib, "calibration_targets"), ("evaluation", evald, "eval_targets")):
        if metric.kind == "accuracy" and data.targets is None:
            raise ValueError(f"metric {metric.name!r} scores against labels, and the {what} data has none: give "
                             f"{arg} (a task: labels in its Dataset), or a fidelity metric")
    say = progress or (lambda s: None)
    params = energy_params or EnergyParams()
    model = model.eval()
    t_all = time.perf_counter()
    ref_cal = _outputs(model, calib, batch_size)
    ref_eval = ref_cal if evald is calib else _outputs(model, evald, batch_size)
    fp32_cal = metric.finite(ref_cal, calib.targets, ref_cal, "the float32 model on the calibration inputs")
    fp32_eval = metric.finite(ref_eval, evald.targets, ref_eval, "the float32 model on the evaluation inputs")
    target_given = target
    if target is None:
        target = default_target(metric, fp32_cal)
    # the journal is started once the float32 pass has passed its checks: bad input leaves none behind
    book = None
    if journal is not None:
        options = dict(target=target_given, gain_rule=gain_rule, gains=None if gains is None else [float(g) for g in gains],
                       max_gain=max_gain, gain_tolerance=gain_tolerance, gain_samples=gain_samples,
                       gain_descent=gain_descent, energy_budget=energy_budget, refine=refine,
                       refine_passes=refine_passes, refine_fill=refine_fill, refine_margin=refine_margin,
                       repeats=repeats, max_repeats=max_repeats,
                       repeat_steps=repeat_steps, exclude=list(exclude), batch_size=batch_size,
                       energy_samples=energy_samples, energy_params=asdict(params), seed=seed,
                       finetune=None if finetune is None else finetune.describe() if isinstance(finetune, STAGES)
                       else "a callable")
        book = TuneJournal(journal, run_identity(model, calib, evald, metric, extra_metrics, config, options), resume)
        if book.resumed:
            say(f"resuming from {journal}: {len(book.records)} finished stage(s)")

    def meets(v: float) -> bool:
        return v >= target if metric.higher_is_better else v <= target

    e_inputs = tuple(t[:energy_samples] for t in calib.inputs)
    stages: list[StageResult] = []
    details: dict[str, Any] = {}

    def restored(name: str) -> StageResult | None:
        """A stage finished by an earlier run of this journal (its details added), or None."""
        rec = None if book is None else book.get(name)
        if rec is None:
            return None
        stages.append(StageResult.from_dict(rec["result"], DevicePlan.from_dict(rec["plan"])))
        details.update(rec["details"])
        say(f"{name}: {metric.name} {stages[-1].metric_text()}, {stages[-1].energy / 1e6:.4g} uJ per inference "
            "(from the journal)")
        return stages[-1]

    def record(name: str, added: Mapping[str, Any], **extra: Any) -> None:
        if book is not None:
            book.put(name, {"result": stages[-1].to_dict(), "plan": stages[-1].plan.to_dict(), "details": dict(added),
                            **extra})

    def stage(name: str, plan: DevicePlan, t0: float, m: nn.Module = model, note: str = "") -> None:
        seconds = time.perf_counter() - t0
        out = plan_outputs(m, plan, evald, batch_size, seed)
        v = metric.finite(out, evald.targets, ref_eval, f"stage {name!r}")
        others = [x for x in extra_metrics if x.name != metric.name]
        stages.append(StageResult(name, v, _energy(m, plan, e_inputs, params), seconds, plan, note,
                                  metric.stderr(out, evald.targets, ref_eval),
                                  {x.name: x(out, evald.targets, ref_eval) for x in others},
                                  {x.name: x.stderr(out, evald.targets, ref_eval) for x in others}))
        say(f"{name}: {metric.name} {stages[-1].metric_text()}, {stages[-1].energy / 1e6:.4g} uJ per inference "
            f"({seconds:.1f} s)")

    # 1. the single-gain device as given
    base_plan = DevicePlan(config, exclude=tuple(exclude))
    if not restored("single gain"):
        stage("single gain", base_plan, time.perf_counter(), note=config.label())
        record("single gain", {})

    # 2. a gain per module
    t0 = time.perf_counter()
    g_inputs = tuple(t[:gain_samples] for t in calib.inputs)
    modules = _product_modules(model, base_plan, e_inputs)

    def calibration_score(p: DevicePlan) -> float:
        return evaluate_plan(model, p, calib, metric, ref_cal, batch_size, seed)

    if restored("gain"):
        gain_plan, chosen = stages[-1].plan, dict(details["gains"])
    elif gain_rule == "energy":
        def with_settings(st: dict[str, tuple[float, int]]) -> DevicePlan:
            return DevicePlan(config, {m: config.replace(gain=g, repeats=k) for m, (g, k) in st.items()},
                              tuple(exclude), {"gain_rule": gain_rule})

        settings, found = energy_allocation(
            model, g_inputs, None if calib.targets is None else calib.targets[:gain_samples], config, metric,
            gains if gains is not None else power_of_two_gains(max_gain),
            repeat_options(max_repeats) if repeats else [1], modules, e_inputs,
            lambda st: calibration_score(with_settings(st)), meets, budget=energy_budget, params=params,
            exclude=exclude, seed=seed, refine=refine, refine_passes=refine_passes,
            refine_fill=refine_fill, refine_margin=refine_margin, progress=say)
        details.update(found)
        chosen = {m: s[0] for m, s in settings.items()}
        gain_plan = with_settings(settings)
        al = details["allocation"]
        miss = "" if al["reached"] else (f" (misses the target {target:.4g})" if energy_budget is not None
                                          or al["base_plan"] else f" (misses the target {target:.4g}: the least-error plan)")
        within = "" if energy_budget is None else f" within {energy_budget:g}x the single-gain energy" + (
            "" if al["energy_ratio"] <= energy_budget * (1 + 1e-9) else
            f" (none fits: the cheapest plan, {al['energy_ratio']:.3g}x)")
        where = (f"no plan on the path beat the single gain on calibration ({al['metric']:.4g}): kept it"
                 if al["base_plan"] else
                 f"plan {al['index']} of {al['path_length']} on the path, {al['metric']:.4g} on calibration")
        refined = "" if not refine or al["base_plan"] else _refine_note(details["refine"])
        stage("gain", gain_plan, t0, note=f"energy rule{within}: {where}{miss}{refined}")
    else:
        chosen = choose_gains(model, g_inputs, config, rule=gain_rule, candidates=gains, max_gain=max_gain,
                              tolerance=gain_tolerance, exclude=exclude, seed=seed)
        gain_plan = DevicePlan(config, {m: config.replace(gain=chosen.get(m, config.gain)) for m in modules},
                               tuple(exclude), {"gain_rule": gain_rule})
        kept, note = _no_worse_than_single_gain(gain_plan, base_plan, calib, ref_cal, metric,
                                                lambda p: plan_outputs(model, p, calib, batch_size, seed))
        if kept is base_plan:  # the per-layer rule scored worse on calibration: every module at the base gain
            chosen = {m: config.gain for m in modules}
            gain_plan = DevicePlan(config, {m: config for m in modules}, tuple(exclude), {"gain_rule": gain_rule})
        details["gain_check"] = note
        stage("gain", gain_plan, t0, note=f"{gain_rule} rule" + (f": {note['text']}" if kept is base_plan else ""))
    if book is not None and book.get("gain") is None:
        details["gains"] = chosen
        record("gain", {k: v for k, v in details.items()})
    details["gains"] = chosen

    def with_gains(g: dict[str, float]) -> DevicePlan:
        return DevicePlan(config, {m: config.replace(gain=g.get(m, config.gain)) for m in modules},
                          tuple(exclude), {"gain_rule": gain_rule})

    # 2b. gain descent (optional)
    if gain_descent and restored("gain descent"):
        gain_plan = stages[-1].plan
    elif gain_descent:
        t0 = time.perf_counter()
        conv = gain_plan.with_seed(seed).convert(model)
        try:
            cost = noise_profile(conv.eval(), e_inputs, params).repeat_energy
        finally:
            to_digital(conv)
        start = {m: chosen.get(m, config.gain) for m in modules}

        def score_gains(g: dict[str, float]) -> float:
            v = calibration_score(with_gains(g))
            say(f"  gain descent: {sum(1 for m in g if g[m] < start[m])} modules lowered: {metric.name} {v:.4g} "
                "on calibration")
            return v

        allowed = gains if gains is not None else power_of_two_gains(max_gain)
        desc = descend_gains(start, allowed, cost, score_gains, meets, calibration_score(gain_plan))
        gain_plan = with_gains(desc.gains)
        details.update(gains=desc.gains, error_rule_gains=start, gain_descent_trials=desc.trials)
        lowered = sum(1 for m in modules if desc.gains[m] < start[m])
        stage("gain descent", gain_plan, t0,
              note=f"{lowered} of {len(modules)} modules lowered, {desc.metric:.4g} on calibration"
              if meets(desc.metric) else f"the gains miss the target {target:.4g} on calibration "
              f"({desc.metric:.4g}): none lowered")
        record("gain descent", dict(gains=desc.gains, error_rule_gains=start, gain_descent_trials=desc.trials))
    plan = gain_plan

    # 3. repeats per module (the energy rule chose them with the gains)
    if repeats and gain_rule != "energy" and restored("repeats"):
        plan = stages[-1].plan
    elif repeats and gain_rule != "energy":
        t0 = time.perf_counter()
        conv = gain_plan.with_seed(seed).convert(model)
        try:
            profile = noise_profile(conv.eval(), tuple(t[:gain_samples] for t in calib.inputs), params)
        finally:
            to_digital(conv)

        def with_repeats(reps: dict[str, int]) -> DevicePlan:
            return DevicePlan(config, {m: c.replace(repeats=reps.get(m, 1)) for m, c in gain_plan.modules.items()},
                              tuple(exclude), dict(gain_plan.info))

        def score(reps: dict[str, int]) -> float:
            v = calibration_score(with_repeats(reps))
            say(f"  repeats: total {sum(reps.values())} over {len(reps)} modules (max {max(reps.values(), default=1)}): "
                f"{metric.name} {v:.4g} on calibration")
            return v

        found = search_repeats(profile, score, meets, max_repeats=max_repeats, steps=repeat_steps)
        plan = with_repeats(found.repeats)
        details.update(repeats=found.repeats, noise_error=profile.noise_error, repeat_trials=found.trials,
                       target_reached_on_calibration=found.reached)
        stage("repeats", plan, t0, note="target reached on calibration" if found.reached
              else f"target {target} not reached even with max_repeats={max_repeats} everywhere "
              f"({found.trials[-1][1]:.4g} on calibration): no repeats kept")
        record("repeats", dict(repeats=found.repeats, noise_error=profile.noise_error, repeat_trials=found.trials,
                               target_reached_on_calibration=found.reached))

    # 4. finetuning (optional)
    out_model = model
    done = None if book is None or not isinstance(finetune, STAGES) else book.get("finetune")
    if done is not None:
        out_model = book.load_weights(copy.deepcopy(model), done["weights_sha256"]).eval()
        restored("finetune")
    elif finetune is not None:
        t0 = time.perf_counter()
        if book is not None and isinstance(finetune, DistilStage):  # step checkpoints beside the journal
            finetune = replace(finetune, checkpoint=str(book.finetune_checkpoint), resume=True)
        out_model = finetune(copy.deepcopy(model), plan, calib.inputs)
        if not isinstance(out_model, nn.Module):
            raise TypeError(f"finetune must return an nn.Module, got {type(out_model).__name__}")
        desc = finetune.describe() if isinstance(finetune, STAGES) else {"callable": repr(finetune)}
        if isinstance(finetune, BiasCorrectStage):
            desc = {**desc, "report": finetune.report}
        details["finetune"] = desc
        stage("finetune", plan, t0, m=out_model.eval(),
              note=finetune.note(len(calib)) if isinstance(finetune, STAGES) else "")
        if book is not None and isinstance(finetune, STAGES):
            record("finetune", {"finetune": desc}, weights_sha256=book.save_weights(out_model))

    plan.info.update({"stages": [s.to_dict() for s in stages], "metric": metric.name, "target": target,
                      "fp32": fp32_eval, "energy_samples": len(e_inputs[0])})
    return TuneResult(plan, out_model, stages, metric.name, fp32_eval, target, metric.higher_is_better,
                      time.perf_counter() - t_all, details, len(e_inputs[0]))
