"""``abfp.explore(...)``: the explorer on a zoo task, a user task or a (model, data, metric) triple."""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from ..config import REFERENCE_NOISE_STD, ABFPConfig
from ..energy import EnergyParams
from ..evaluate.runner import EvalSettings
from ..zoo.base import Dataset, Metric, Task
from .search import SearchSpace, explore_model
from .target import Target

__all__ = ["explore", "resolve_task", "task_calibration"]


def resolve_task(task: Any) -> Task:
    """A :class:`Task` from a Task, a zoo name, or ``pkg.mod:fn`` / ``path.py:fn`` (as ``abfp eval``)."""
    if isinstance(task, Task):
        return task
    if isinstance(task, str):
        from ..cli_common import UsageError, resolve_tasks

        if task == "all":
            raise ValueError("explore takes one task; run it once per task")
        try:
            (t,) = resolve_tasks([task])
        except UsageError as e:
            raise ValueError(str(e)) from None
        return t
    raise TypeError(f"task must be a zoo task name, 'pkg.mod:fn', a Task or a (model, data, metric) triple; "
                    f"got {type(task).__name__}")


def explore(
    task: Any,
    data: Dataset | None = None,
    metric: Metric | None = None,
    *,
    target_drop: float | None = 1.0,
    target: float | None = None,
    formats: Sequence[str] = ("fixed", "abfp"),
    tile_widths: Sequence[int] = (8, 32, 128),
    gains: Sequence[float] = (1, 2, 4, 8, 16),
    auto_gain: bool = True,
    fixed_gains: Sequence[float] = (1,),
    adc_bits: tuple[int, int] = (2, 16),
    dac_min_bits: int = 2,
    dac_search: str = "joint",
    dac_max_bits: int | None = None,
    screen: int | None = None,
    screen_z: float = 3.0,
    noise_stds: Sequence[float] = (REFERENCE_NOISE_STD,),
    prune: bool = True,
    global_prune: bool = False,
    early_stop: float | None = None,
    calibration: Dataset | None = None,
    base: ABFPConfig | None = None,
    energy_params: EnergyParams | None = None,
    energy_samples: int = 1,
    runs: int = 3,
    samples: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    fixed_percentile: float = 100.0,
    calibration_samples: int = 256,
    cache_path: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Design the device: for each family (fixed point / ABFP x tile width x gain rule x noise),
    the cheapest design (energy per inference, :mod:`abfp.energy`) whose metric meets the target.

    ``task``: a zoo task name, ``"pkg.mod:fn"`` / ``"path/tasks.py:fn"``, a :class:`abfp.zoo.Task`,
    or a model (then ``data`` and ``metric`` are required). The target is ``target`` (an absolute
    metric value) or, when it is None, ``target_drop`` percent (relative) from float32. ADC bits
    are bisected in ``adc_bits = (lo, hi)``, then the DAC bits of each family's cheapest design
    (``dac_search``: ``"joint"``, ``"separate"`` or ``"none"``) down to ``dac_min_bits``. Noisy
    designs run ``runs`` times (seeds ``seed + r``); ``cache_path`` is :func:`abfp.evaluate.evaluate`'s
    SQLite cache (a rerun resumes). ``early_stop = z``: a noisy design stops averaging once its
    mean is ``z`` standard errors from the target, or once the remaining runs cannot move it
    across the target (the metric's ``bounds``); ``global_prune``: designs costing at least as
    much as one known to meet the target are skipped (see :mod:`abfp.explore.search`).
    ``dac_max_bits``: when no design of a family meets the target at the base DAC bits (even at
    the highest ADC bits), its DACs are raised by bisection up to this many bits. ``screen = k``:
    every design is first evaluated on ``k`` samples spread over the evaluated ones (one run) and evaluated on all of
    them only unless it misses the target there by ``screen_z`` standard errors.
    Fixed-point scales and auto gains come from the task's calibration split when it has one
    (``calibration``: a :class:`Dataset` of inputs, with a model), its first
    ``min(calibration_samples, samples)`` inputs (auto gain runs them once per gain of its ladder,
    9 times, per tile width). Returns the JSON-ready
    result (see :func:`abfp.explore.search.explore_model`).
    """
    # every option checked before the model and data are built
    tgt = Target(drop_percent=None, absolute=target) if target is not None else Target(drop_percent=target_drop)
    space = SearchSpace(formats=tuple(formats), tile_widths=tuple(tile_widths), gains=tuple(float(g) for g in gains),
                        auto_gain=auto_gain, fixed_gains=tuple(float(g) for g in fixed_gains),
                        adc_bits=tuple(adc_bits), dac_min_bits=dac_min_bits,
                        dac_search=dac_search, dac_max_bits=dac_max_bits, screen=screen, screen_z=screen_z,
                        noise_stds=tuple(float(z) for z in noise_stds), prune=prune,
                        global_prune=bool(global_prune), early_stop=early_stop)
    if not isinstance(runs, int) or runs < 1:
        raise ValueError(f"runs must be an integer >= 1, got {runs!r}")
    if not isinstance(calibration_samples, int) or calibration_samples < 1:
        raise ValueError(f"calibration_samples must be an integer >= 1, got {calibration_samples!r}")
    if isinstance(task, nn.Module):
        if data is None or metric is None:
            raise ValueError("explore(model, data, metric): data and metric are required with a model")
        model, task_name, default_batch = task, "model", 256
        if calibration is not None and not isinstance(calibration, Dataset):
            raise TypeError(f"calibration must be an abfp.zoo.Dataset, got {type(calibration).__name__}")
    else:
        if data is not None or metric is not None or calibration is not None:
            raise ValueError("explore: give data, metric and calibration only with a model, not with a task")
        t = resolve_task(task)
        calibration = task_calibration(t, space)
        model, data, metric, task_name, default_batch = (t.build_model(), t.load_data(), t.metric, t.name,
                                                         t.default_batch_size)
        if samples is None:
            samples = t.default_samples
    settings = EvalSettings(runs=runs, batch_size=batch_size or default_batch, samples=samples, device=device,
                            seed=seed, fixed_percentile=fixed_percentile, calibration_samples=calibration_samples,
                            cache_path=cache_path, progress=False)
    return explore_model(model, data, metric, task_name=task_name, target=tgt, space=space, base=base,
                         energy_params=energy_params, energy_samples=energy_samples, settings=settings,
                         progress=progress, calibration=calibration)


def task_calibration(task: Task, space: SearchSpace) -> Dataset | None:
    """The task's calibration split when the search needs calibration (fixed point, auto gain)."""
    needs = "fixed" in space.formats or ("abfp" in space.formats and space.auto_gain)
    return task.load_calibration() if needs and task.load_calibration is not None else None
