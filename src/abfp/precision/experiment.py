"""The learned-precision experiment: uniform energy versus a learned allocation at equal accuracy.

1. ``target = metric_fp32 - target_drop`` (or an absolute ``target``).
2. Uniform: the smallest single ``E`` for every layer that reaches the target
   (:func:`~abfp.precision.search.search_min_energy`, metric on the evaluation data with fixed
   noise seeds: the mean over ``search_seeds`` seeds, the same seeds at every energy).
3. Learned: start every layer at ``E_learn = learn_ratio * E_uniform``, freeze the weights and
   train ``log E`` per layer (or per channel) on training data with
   ``CE + lambda * max(0, log E_mean - log E_learn)`` (:func:`~abfp.precision.learn.learn_energies`).
4. The learned allocation at the same target: its shape kept, scaled by one factor, the
   smallest MAC-weighted mean energy that reaches the target (same search, same seed).
5. ``energy_saving = 1 - E_mean(learned) / E_uniform``; attojoules per MAC
   ``= E * aj_per_photon`` (0.128 aJ per photon at 1550 nm, meaningful for shot noise of an
   optical device).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..evaluate.runner import run_model
from ..journal import Journal, JournalMismatch
from ..noise import NOISE_NAMES, NoiseInjector
from ..zoo.base import Dataset, Task
from .learn import LearnResult, learn_energies, shuffled_batches
from .objective import DEFAULT_LAMBDA
from .search import search_min_energy

__all__ = ["AJ_PER_PHOTON", "PrecisionSettings", "plot_precision", "precision_data", "run_precision", "summarize",
           "training_data"]

#: Optical energy of one photon at 1550 nm, in attojoules (h c / lambda = 1.28e-19 J).
AJ_PER_PHOTON = 0.128


@dataclass
class PrecisionSettings:
    """Knobs of :func:`run_precision` (defaults: the CLI's)."""

    noise: str = "shot"
    per_channel: bool = False
    target_drop: float = 2.0
    target: float | None = None
    lam: float | None = None
    lr: float = 0.01
    steps: int = 300
    batch_size: int = 128
    learn_ratio: float = 1.0
    eval_samples: int | None = None
    eval_batch_size: int = 500
    profile_samples: int = 512
    seed: int = 0
    rel_tol: float = 0.02
    start_energy: float = 100.0
    final_seeds: int = 3
    search_seeds: int = 1
    aj_per_photon: float = AJ_PER_PHOTON

    def __post_init__(self) -> None:
        if self.noise not in NOISE_NAMES:
            raise ValueError(f"noise must be one of {', '.join(NOISE_NAMES)}, got {self.noise!r}")
        checks = {
            "target_drop": self.target_drop >= 0, "lr": self.lr > 0, "steps": self.steps >= 1,
            "batch_size": self.batch_size >= 1, "learn_ratio": self.learn_ratio > 0,
            "eval_batch_size": self.eval_batch_size >= 1, "profile_samples": self.profile_samples >= 1,
            "rel_tol": self.rel_tol > 0, "start_energy": self.start_energy > 0, "final_seeds": self.final_seeds >= 1,
            "search_seeds": self.search_seeds >= 1,
            "aj_per_photon": self.aj_per_photon > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range")
        if self.lam is not None and not (self.lam >= 0 and math.isfinite(self.lam)):
            raise ValueError(f"lambda must be >= 0, got {self.lam}")
        if self.eval_samples is not None and self.eval_samples < 1:
            raise ValueError(f"eval_samples must be >= 1, got {self.eval_samples}")

    @property
    def lambda_(self) -> float:
        return DEFAULT_LAMBDA[self.noise] if self.lam is None else float(self.lam)


def precision_data(task: Task, eval_samples: int | None = None) -> tuple[Dataset, Dataset, str]:
    """``(evaluation data, training data, where the training data came from)``, never overlapping
    (:func:`abfp.finetune.data.split_task_data`, as ``abfp finetune`` and ``abfp tune`` split):
    a zoo task with a training split learns on it (Fashion-MNIST's 60,000 training images, the
    generated training volumes and clicks of ``unet3d`` and ``dlrm``) and is scored on its
    evaluation data; a task without one (a user's) learns on the first half of its data and is
    scored on the rest (its first ``eval_samples``).
    """
    from ..finetune.data import split_task_data

    train, data, source = split_task_data(task, None, eval_samples)
    return data, train, source


def training_data(task: Task) -> tuple[Dataset, str]:
    """The training data of :func:`precision_data` and where it came from."""
    _, train, source = precision_data(task)
    return train, source


def _identity(model: Any, data: Dataset, train: Dataset, task: Task, settings: PrecisionSettings) -> dict[str, str]:
    """Fingerprints of everything that decides the experiment's numbers (its journal's identity)."""
    from ..evaluate.fingerprint import data_fingerprint, metric_fingerprint, model_fingerprint
    from ..numerics import NUMERICS_VERSION

    return {"model": model_fingerprint(model), "evaluation": data_fingerprint(data.inputs, data.targets),
            "training": data_fingerprint(train.inputs, train.targets), "metric": metric_fingerprint(task.metric),
            "settings": json.dumps(asdict(settings), sort_keys=True), "numerics": str(NUMERICS_VERSION)}


def _check_labels(task: Task, model: Any, data: Dataset, train: Dataset) -> None:
    """``ValueError`` before any work when the metric needs labels the evaluation data lacks, the
    training data has no labels, or its labels do not suit the learning loss (the labels' cross
    entropy, tried on two training samples: regression targets, an output it cannot score)."""
    from ..finetune.loop import cross_entropy

    if data.targets is None and task.metric.kind == "accuracy":
        raise ValueError(f"{task.name}: the metric needs labels")
    if train.targets is None:
        raise ValueError(f"{task.name}: learning the energies needs labelled training data")
    with torch.no_grad():
        outputs = model(*(t[:2] for t in train.inputs))
    try:
        cross_entropy(outputs, train.targets[:2])
    except ValueError as e:  # its advice (a distillation loss, loss_fn) is finetuning's, not ours
        t = train.targets
        raise ValueError(f"{task.name}: learning the energies minimises the labels' cross entropy, so the training "
                         f"labels must be class indices or class probabilities over the model's outputs; got "
                         f"{t.dtype} labels of shape {tuple(t.shape)} (regression targets? abfp precision cannot "
                         f"learn from them)") from e


def run_precision(task: Task, settings: PrecisionSettings | None = None, *,
                  progress: Callable[[str], Any] | None = None, journal: str | Path | None = None,
                  resume: bool = False) -> dict[str, Any]:
    """Run the experiment on ``task``; returns the JSON-ready result (see the module docstring).

    ``journal``: a JSON file (:class:`abfp.journal.Journal`) recording every metric evaluation of
    the searches and the learned energies (``<stem>.learned.safetensors`` beside it) as they
    finish; with ``resume=True`` a killed run with the same journal, model, data, metric and
    settings takes them from it (the searches replay without evaluating, the learning is not
    repeated), so it loses at most the evaluation, or the learning, it was in. Another run's
    journal is refused, naming what differs."""
    settings = settings or PrecisionSettings()
    say = progress or (lambda s: None)
    t_start = time.perf_counter()
    model = task.build_model().eval()
    data, train, train_source = precision_data(task, settings.eval_samples)
    _check_labels(task, model, data, train)  # bad input is refused before a journal is started
    book = None
    if journal is not None:
        book = Journal(journal, _identity(model, data, train, task, settings), resume, kind="precision",
                       sidecars=("learned.safetensors",))
        if book.resumed:
            say(f"resuming from {journal}: {len(book.records)} finished record(s)")

    def memo(name: str, fn: Callable[[], float]) -> float:
        """``fn()``, or its value from the journal."""
        if book is not None and book.get(name) is not None:
            return float(book.get(name))
        v = fn()
        if book is not None:
            book.put(name, v)
        return v

    sign = 1.0 if task.metric.higher_is_better else -1.0
    ref = run_model(model, data, settings.eval_batch_size)
    fp32 = task.metric.finite(ref, data.targets, ref, f"{task.name} in float32")
    target = settings.target if settings.target is not None else fp32 - sign * settings.target_drop
    say(f"{task.name}: float32 {task.metric.name} {fp32:.3f}; target {target:.3f}; noise {settings.noise}"
        f"{' per channel' if settings.per_channel else ''}")
    say(f"learning on {len(train)} inputs ({train_source}); scored on {len(data)} others")

    inj = NoiseInjector(model, settings.noise, per_channel=settings.per_channel, seed=settings.seed)
    inj.profile([tuple(t[: settings.profile_samples] for t in train.inputs)])
    sites = inj.sites

    def metric_once(seed: int) -> float:
        inj.reseed(seed)
        out = run_model(inj.model, data, settings.eval_batch_size)
        return task.metric(out, data.targets, ref)

    def metric_now(seed: int | None = None) -> float:
        if seed is not None:
            return metric_once(seed)
        # the searches: mean over search_seeds fixed seeds (common random numbers across energies)
        return statistics.fmean(metric_once(settings.seed + i) for i in range(settings.search_seeds))

    def score(value: float) -> float:
        return sign * value

    # 2. uniform energy
    t0 = time.perf_counter()

    def uniform_at(e: float) -> float:
        def run() -> float:
            inj.set_energy(e)
            return metric_now()

        v = memo(f"uniform E={e!r}", run)
        say(f"  uniform E {e:>10.4g}: {v:.3f}")
        return score(v)

    uni = search_min_energy(uniform_at, score(target), start=settings.start_energy, rel_tol=settings.rel_tol)
    e_uniform = uni.energy
    inj.set_energy(e_uniform)
    uniform_bits = inj.effective_bits()
    uniform_seeds = [memo(f"uniform seed={settings.seed + 1000 + i}", lambda i=i: metric_now(settings.seed + 1000 + i))
                     for i in range(settings.final_seeds)]
    t_uniform = time.perf_counter() - t0
    say(f"uniform: E = {e_uniform:.4g} ({len(uni.evaluations)} evaluations, {t_uniform:.0f} s)")

    # 3. learn
    e_learn = settings.learn_ratio * e_uniform
    inj.set_energy(e_learn)
    batches = shuffled_batches(train.inputs, train.targets, settings.batch_size, seed=settings.seed)
    say(f"learning log E ({'per channel' if settings.per_channel else 'per layer'}) for {settings.steps} batches of "
        f"{settings.batch_size}: lambda {settings.lambda_:g}, lr {settings.lr:g}, E_target {e_learn:.4g}")
    done = None if book is None else book.get("learned")
    if done is not None:  # learned by the run that wrote the journal
        from safetensors.torch import load_file

        shape = load_file(str(book.sidecar("learned.safetensors")))
        if sorted(shape) != sorted(sites):
            raise JournalMismatch(f"{book.sidecar('learned.safetensors')} does not hold this model's sites")
        learned = LearnResult(done["steps"], done["seconds"], done["history"])
        say(f"learned energies from the journal ({learned.steps} steps)")
    else:
        learned = learn_energies(inj, batches, target_energy=e_learn, lam=settings.lambda_, steps=settings.steps,
                                 lr=settings.lr, progress=say)
        shape = {s: inj.energy(s).detach().clone().contiguous() for s in sites}
        if book is not None:
            from safetensors.torch import save_file

            from ..outputs import atomic_path

            with atomic_path(book.sidecar("learned.safetensors"), suffix=".tmp.safetensors") as tmp:
                save_file(shape, str(tmp))
            book.put("learned", asdict(learned))
    inj.set_energy({s: shape[s].clone() for s in sites})
    shape_mean = float(inj.mean_energy())

    # 4. the learned allocation at the target
    t0 = time.perf_counter()

    def learned_at(e_mean: float) -> float:
        def run() -> float:
            inj.set_energy({s: shape[s] * (e_mean / shape_mean) for s in sites})
            return metric_now()

        v = memo(f"learned E_mean={e_mean!r}", run)
        say(f"  learned E_mean {e_mean:>10.4g}: {v:.3f}")
        return score(v)

    lrn = search_min_energy(learned_at, score(target), start=e_uniform, rel_tol=settings.rel_tol)
    e_learned = lrn.energy
    inj.set_energy({s: shape[s] * (e_learned / shape_mean) for s in sites})
    learned_bits = inj.effective_bits()
    learned_seeds = [memo(f"learned seed={settings.seed + 1000 + i}", lambda i=i: metric_now(settings.seed + 1000 + i))
                     for i in range(settings.final_seeds)]
    saving = 1.0 - e_learned / e_uniform
    say(f"learned: E_mean = {e_learned:.4g}; energy saving {100 * saving:.1f} %")

    min_layer = min(inj.layer_energy(s) for s in sites)
    repeats = inj.repeats(min_layer)
    layers = []
    for s in sites:
        p = inj.profiles[s]
        row = {
            "site": s, "kind": p.kind, "macs_per_sample": p.macs_per_sample, "fan_in": p.fan_in,
            "uniform_energy": e_uniform, "learned_energy": inj.layer_energy(s),
            "b_eff_uniform": uniform_bits[s], "b_eff_learned": learned_bits[s],
            "repeats_of_smallest": max(repeats[s]) if not settings.per_channel else repeats[s],
        }
        if settings.per_channel:
            row["learned_energy_channels"] = [float(v) for v in inj.energy(s)]
        layers.append(row)
    inj.remove()
    return {
        "task": task.name,
        "metric": task.metric.name,
        "noise": settings.noise,
        "per_channel": settings.per_channel,
        "fp32_metric": fp32,
        "target_drop": settings.target_drop if settings.target is None else None,
        "target_metric": target,
        "uniform_energy": e_uniform,
        "uniform_metric": sign * uni.metric,
        "uniform_metric_other_seeds": uniform_seeds,
        "learned_energy": e_learned,
        "learned_metric": sign * lrn.metric,
        "learned_metric_other_seeds": learned_seeds,
        "energy_saving": saving,
        "aj_per_mac_uniform": e_uniform * settings.aj_per_photon,
        "aj_per_mac_learned": e_learned * settings.aj_per_photon,
        "aj_per_photon": settings.aj_per_photon,
        "energy_unit": "photons per MAC" if settings.noise == "shot" else "energy per MAC (noise-model units)",
        "layers": layers,
        "learning": {"steps": learned.steps, "batch_size": min(settings.batch_size, len(train)),  # as used "lambda": settings.lambda_, "lr": settings.lr,
                     "target_energy": e_learn, "seconds": learned.seconds, "data": train_source,
                     "history": learned.history},
        "search": {"uniform": uni.evaluations, "learned": lrn.evaluations, "rel_tol": settings.rel_tol,
                   "seed": settings.seed, "eval_samples": len(data)},
        "settings": asdict(settings),
        "seconds": time.perf_counter() - t_start,
    }


def plot_precision(result: dict[str, Any], path: str | Path) -> Path:
    """A PNG: per-layer energy (uniform and learned, log scale) and effective bits."""
    from ..plotting import new_figure, save_figure

    layers = result["layers"]
    names = [r["site"].replace(":", "\n") for r in layers]
    x = range(len(layers))
    fig = new_figure(max(6.0, 0.55 * len(layers) + 2), 7)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    ax1.bar([i - 0.2 for i in x], [r["uniform_energy"] for r in layers], 0.4, label="uniform")
    ax1.bar([i + 0.2 for i in x], [r["learned_energy"] for r in layers], 0.4, label="learned")
    ax1.set_yscale("log")
    ax1.set_ylabel(f"E per MAC ({'photons' if result['noise'] == 'shot' else 'units'})")
    ax1.set_title(f"{result['task']}, {result['noise']} noise{' (per channel)' if result['per_channel'] else ''}: "
                  f"energy saving {100 * result['energy_saving']:.1f} %\n"
                  f"at {result['metric']} >= {result['target_metric']:.2f} (float32 {result['fp32_metric']:.2f})",
                  fontsize=10)
    ax1.legend()
    ax2.plot(list(x), [r["b_eff_uniform"] for r in layers], "o-", label="uniform")
    ax2.plot(list(x), [r["b_eff_learned"] for r in layers], "s-", label="learned")
    ax2.set_ylabel("b_eff (bits)")
    ax2.set_xticks(list(x))
    ax2.set_xticklabels(names, rotation=90, fontsize=7)
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def summarize(result: dict[str, Any]) -> str:
    """The result as a short text table."""
    uni_other = statistics.fmean(result["uniform_metric_other_seeds"])
    lrn_other = statistics.fmean(result["learned_metric_other_seeds"])
    lines = [
        f"{result['task']} / {result['noise']} noise{' per channel' if result['per_channel'] else ''}: "
        f"{result['metric']} fp32 {result['fp32_metric']:.2f}, target {result['target_metric']:.2f}",
        f"  uniform  E = {result['uniform_energy']:>9.4g} ({result['aj_per_mac_uniform']:.3g} aJ/MAC)  "
        f"metric {result['uniform_metric']:.2f} (other seeds {uni_other:.2f})",
        f"  learned  E = {result['learned_energy']:>9.4g} ({result['aj_per_mac_learned']:.3g} aJ/MAC)  "
        f"metric {result['learned_metric']:.2f} (other seeds {lrn_other:.2f})",
        f"  energy saving {100 * result['energy_saving']:.1f} %",
        f"  {'site':<30} {'MACs/sample':>12} {'E learned':>10} {'b_eff uni':>9} {'b_eff lrn':>9}",
    ]
    for r in result["layers"]:
        lines.append(f"  {r['site'][-30:]:<30} {r['macs_per_sample']:>12,.0f} {r['learned_energy']:>10.4g} "
                     f"{r['b_eff_uniform']:>9.2f} {r['b_eff_learned']:>9.2f}")
    return "\n".join(lines)
