"""``evaluate``: a model's metric on the device, for every point of a grid, against float32.

The float32 pass runs once; its outputs are the reference for fidelity metrics. Each
device point converts one working copy of the model (hooks only, no re-copy per point),
calibrates fixed-point scales or per-layer gains where asked, and runs ``runs`` times with
seeds ``seed + run`` when the device is noisy (once when it is not; ``seed`` is the point's own
``config.execution.seed`` when it has one, else ``EvalSettings.seed``). Finished runs are
cached on disk (:mod:`abfp.evaluate.cache`), keyed on fingerprints of the model, the data
and the metrics (:mod:`abfp.evaluate.fingerprint`) and on everything else that decides a
run (device config, seed, batch size of noisy runs, calibration, numerics version); a rerun
skips them.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import ABFPConfig, config_key
from ..nn import analog_state, calibrate, convert, is_converted, reseed, set_config, summary, to_digital
from ..zoo.base import Dataset, Metric
from .autogain import choose_gains, gain_overrides
from .cache import RunCache, run_key
from .distributed import broadcast_from_main, gather_outputs
from .distributed import world as dist_world
from .fingerprint import data_fingerprint, metric_fingerprint, model_fingerprint
from .grid import Point
from .memo import EvalMemo

#: The largest per-layer gain auto gain tries (powers of two from 1).
AUTOGAIN_MAX = 256.0


def _first_tensor(out: Any) -> Tensor:
    """The output a metric scores: the tensor itself; a tuple's or list's first item; a model
    output's or dict's ``logits`` or ``last_hidden_state``; else a dict's first value or a
    dataclass's first field, when it is a tensor."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    for name in ("logits", "last_hidden_state"):
        if isinstance(out, Mapping) and isinstance(out.get(name), Tensor):
            return out[name]
        if isinstance(getattr(out, name, None), Tensor):  # an output dataclass may hold None there
            return getattr(out, name)
    if isinstance(out, Mapping) and out:
        first = next(iter(out.values()))
    elif dataclasses.is_dataclass(out) and not isinstance(out, type) and dataclasses.fields(out):
        first = getattr(out, dataclasses.fields(out)[0].name)
    else:
        first = None
    if isinstance(first, Tensor):
        return first
    raise TypeError(f"the model returned {type(out).__name__}; evaluate needs a tensor, a tuple or dict whose first "
                    "item is one, or an output with 'logits' or 'last_hidden_state'")


def _warn_not_float32(model: nn.Module, task_name: str) -> None:
    """A warning when ``model`` holds floating parameters or buffers that are not float32: the
    reference row is labelled fp32, and it is this model in its own precision (a task given as a
    ``(model, data, metric)`` triple is made float32; a :class:`Task` is taken as it is)."""
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in (*model.parameters(), *model.buffers())
                     if t.is_floating_point() and t.dtype != torch.float32})
    if dtypes:
        warnings.warn(f"{task_name}: the model holds {', '.join(dtypes)} weights: the 'fp32' reference is this model "
                      f"in its own precision, not float32 (model.float() makes it float32)", stacklevel=3)


def _refuse_nan(y: Tensor, inputs: tuple[Tensor, ...], start: int, converted: bool) -> None:
    """A ``FloatingPointError`` when the outputs ``y`` of the samples from ``start`` hold a NaN
    (a metric would score it silently: an arg-max of NaN is a class), naming the first such sample
    and whether its inputs hold NaN or infinity themselves. Infinite outputs pass (masked logits)."""
    if not y.is_floating_point() or not bool(torch.isnan(y).any()):
        return
    rows = torch.isnan(y.reshape(y.shape[0], -1)).any(1) if y.dim() else torch.ones(1, dtype=torch.bool)
    first = int(rows.nonzero()[0, 0])
    bad_in = [k for k, t in enumerate(inputs) if t.is_floating_point() and t.shape[0] > first
              and not bool(torch.isfinite(t[first]).all())]
    why = (f"its input {bad_in[0]} holds NaN or infinity" if bad_in else
           "its inputs are finite: the model made it" + (" on the device" if converted else ""))
    raise FloatingPointError(f"the {'converted' if converted else 'float32'} model's output for sample "
                             f"{start + first} is NaN ({int(rows.sum())} samples of this batch): {why}")


@torch.no_grad()
def run_model(model: nn.Module, data: Dataset, batch_size: int, device: torch.device | str = "cpu",
              progress: Callable[[int], None] | None = None, *, shard: tuple[int, int] = (0, 1)) -> Tensor:
    """Outputs of ``model`` on every batch of ``data``, concatenated on the CPU (float32).

    A converted model's noise generators restart at every batch from ``(seed, batch index)``,
    so batch ``i`` sees the same noise whatever ran before it: results do not depend on which
    process evaluates which batch. ``shard=(rank, world)`` runs only batches ``i % world ==
    rank`` and returns ``(batch index, outputs)`` pairs gathered by the caller (see
    :mod:`abfp.evaluate.distributed`).
    """
    converted = is_converted(model)
    rank, world = shard
    outs = []
    for i, (inputs, _) in enumerate(data.batches(batch_size)):
        if i % world != rank:
            continue
        if converted:
            reseed(model, i)
        y = _first_tensor(model(*(t.to(device) for t in inputs)))
        _refuse_nan(y, inputs, i * batch_size, converted)
        outs.append((i, y.detach().float().cpu()))
        if progress:
            progress(inputs[0].shape[0])
    if world > 1:
        return outs  # type: ignore[return-value]
    return torch.cat([o for _, o in outs]) if outs else torch.zeros(0)


def run_all(model: nn.Module, data: Dataset, batch_size: int, device: torch.device | str = "cpu",
            progress: Callable[[int], None] | None = None) -> Tensor:
    """:func:`run_model` on every batch, shared among the ranks of the process group when
    there is one (batches ``i % world == rank``, gathered in batch order on every rank): the
    same outputs as one process."""
    rank, world_size = dist_world()
    if world_size == 1:
        return run_model(model, data, batch_size, device, progress)
    pairs = run_model(model, data, batch_size, device, progress, shard=(rank, world_size))
    return gather_outputs(pairs)  # type: ignore[arg-type]


@dataclass
class EvalSettings:
    """Knobs of :func:`evaluate` that are not the grid."""

    runs: int = 3
    batch_size: int = 256
    samples: int | None = None
    device: str = "cpu"
    seed: int = 0
    fixed_percentile: float = 100.0
    calibration_samples: int = 256
    #: how many calibration inputs decide fixed-point scales and auto gains: ``min(calibration_count,
    #: len(calibration))``; None: ``min(calibration_samples, samples evaluated)`` (a screen on a few
    #: samples sets it to calibrate the same device as the full evaluation)
    calibration_count: int | None = None
    autogain_threshold: float = 1e-4
    #: ``(weight, input, ADC)`` bits at which auto gains are chosen, once per device (the point's
    #: format, tile width and every other field kept, noise off) and reused at every bit setting;
    #: ``None``: chosen at each point's own bits. Part of the cache key when set.
    autogain_bits: tuple[int, int, int] | None = None
    layer_stats: bool = True
    progress: bool = True
    #: the SQLite cache file of finished runs (None: no cache); see :mod:`abfp.evaluate.cache`
    cache_path: str | None = None
    extra_metrics: Sequence[Metric] = field(default_factory=tuple)


def cache_context(model: nn.Module, data: Dataset, metric: Metric, eval_settings: EvalSettings) -> dict[str, Any]:
    """What every cached run of this evaluation shares in its key: fingerprints of the model,
    the data actually evaluated and the metrics, plus the settings that change results."""
    return {
        "model": model_fingerprint(model),
        "data": data_fingerprint(data.inputs, data.targets),
        "samples": len(data),
        "metric": metric_fingerprint(metric),
        "extra_metrics": [metric_fingerprint(m) for m in eval_settings.extra_metrics],
        "calibration_samples": eval_settings.calibration_samples,
        "device": torch.device(eval_settings.device).type,
        "torch": torch.__version__.split("+")[0],
    }


def _gain_choice_config(cfg: ABFPConfig, bits: tuple[int, int, int] | None) -> ABFPConfig:
    """The device auto gains are chosen on: ``cfg`` itself, or ``cfg`` at ``bits`` (w, x, y) without noise."""
    if bits is None:
        return cfg
    wb, xb, yb = bits
    return cfg.replace(weight_bits=wb, input_bits=xb, output_bits=yb, noise_std=0.0)


def _aggregate(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _mean_or_none(values: list[float | None]) -> float | None:
    """Mean of per-run standard errors (``None`` when a run has none, e.g. an old cache entry)."""
    return None if not values or any(v is None for v in values) else statistics.fmean(values)  # type: ignore[arg-type]


def evaluate(
    model: nn.Module,
    data: Dataset,
    metric: Metric,
    points: Sequence[Point | ABFPConfig],
    *,
    task_name: str = "model",
    settings: EvalSettings | None = None,
    overrides: dict[str, ABFPConfig] | None = None,
    calibration: Dataset | None = None,
    memo: EvalMemo | None = None,
    enough: Callable[[list[float], list[float | None]], bool] | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Evaluate ``model`` at every point; returns one record per (model, point).

    ``calibration``: inputs for the fixed-point scales and auto gains, disjoint from ``data`` (a
    task's ``load_calibration``); without it they come from ``data`` itself. Either way the first
    ``min(calibration_samples, samples evaluated)`` are used, so a quick evaluation calibrates
    quickly too.

    ``points``: :class:`Point` objects or bare :class:`ABFPConfig` (taken as ABFP or fixed by
    their mode). Keyword arguments override :class:`EvalSettings` fields. Each record holds
    ``model, format, tile_width, input_bits, weight_bits, output_bits, gain, noise_std,
    metric, value, std, runs, values, delta_vs_fp32, seconds``, for a noisy point the ``seeds`` of
    its runs and its ``batch_size`` (they decide its noise), ``stderr`` (standard error of
    ``value`` over the samples, mean over runs; ``extra_stderr`` for the extra metrics) and, per point, ``layers``
    (per-product saturation and error on the first batch) and ``gains`` for auto gain.
    ``overrides``: per-module configs (as :func:`abfp.convert` takes them, e.g. a
    :class:`abfp.tune.DevicePlan`'s) applied at every ABFP point; each run sets their seed.

    ``memo``: an :class:`abfp.evaluate.memo.EvalMemo` shared by calls on the same model (the
    explorer's): the float32 outputs, fixed-point scales and auto gains are computed once per
    memo, so a point whose runs are all in the cache runs no forward pass. ``enough``: a
    stopping rule for the runs of a point, called after each run but the last with the values
    so far and their per-sample standard errors; ``True`` stops (``runs`` then counts the
    runs made, ``early_stopped`` says so). It is applied alike to cached and computed runs.
    """
    eval_settings = settings or EvalSettings()
    if kwargs:
        eval_settings = EvalSettings(**{**eval_settings.__dict__, **kwargs})
    if eval_settings.runs < 1:
        raise ValueError(f"runs must be >= 1, got {eval_settings.runs}")
    if eval_settings.autogain_bits is not None and (len(eval_settings.autogain_bits) != 3 or any(
            type(b) is not int or not 2 <= b <= 24 for b in eval_settings.autogain_bits)):
        raise ValueError(f"autogain_bits must be three integers in [2, 24] (w, x, y), got {eval_settings.autogain_bits!r}")
    memo = memo if memo is not None else EvalMemo()
    pts = [p if isinstance(p, Point) else Point(p.mode, p) for p in points]
    data = data.take(eval_settings.samples)
    if len(data) == 0:
        raise ValueError("no data to evaluate")
    device = torch.device(eval_settings.device)
    model = model.to(device).eval()
    _warn_not_float32(model, task_name)
    rank = dist_world()[0]
    # rank 0 alone reads and writes the cache and tells the other ranks what it found
    cache = RunCache(eval_settings.cache_path if rank == 0 else None)
    context = cache_context(model, data, metric, eval_settings)
    n_samples = len(data)
    noisy_overrides = any(c.noise_std > 0 for c in (overrides or {}).values())

    def is_noisy(p: Point) -> bool:
        """Whether ``p``'s runs draw device noise: its own device, or a noisy per-module override
        (applied at ABFP points) on a noise-free base; such a point runs ``runs`` seeded times."""
        return p.noisy or (p.format == "abfp" and noisy_overrides)

    total = sum((eval_settings.runs if is_noisy(p) else 1) for p in pts if p.format != "fp32") + 1
    bar = tqdm(total=total * n_samples, unit="img", disable=not eval_settings.progress or dist_world()[0] != 0,
               desc=task_name, leave=False,
               dynamic_ncols=True)
    tick = bar.update if eval_settings.progress else None

    def run(m: nn.Module) -> Tensor:
        return run_all(m, data, eval_settings.batch_size, device, tick)

    def reference() -> tuple[Tensor, float]:
        t0 = time.perf_counter()
        out = run(model)
        return out, time.perf_counter() - t0

    ref, fp32_seconds = memo.lookup("references", run_key({**context, "kind": "fp32-outputs",
                                                           "batch": eval_settings.batch_size}), reference, "fp32")
    targets = data.targets
    fp32_value = metric.finite(ref, targets, ref, f"{task_name} in float32")
    extra_fp32 = {m.name: m.finite(ref, targets, ref, f"{task_name} in float32") for m in eval_settings.extra_metrics}

    def stderrs(out: Tensor) -> dict[str, float | None]:  # standard errors over the samples
        return {m.name: m.stderr(out, targets, ref) for m in (metric, *eval_settings.extra_metrics)}

    stderrs_keys = [metric.name, *(m.name for m in eval_settings.extra_metrics)]

    records: list[dict[str, Any]] = []

    def base_record(p: Point) -> dict[str, Any]:
        c = p.config
        return {
            "model": task_name,
            "format": p.format,
            "tile_width": c.tile_width if c else None,
            "input_bits": c.input_bits if c else None,
            "weight_bits": c.weight_bits if c else None,
            "output_bits": c.output_bits if c else None,
            "gain": ("auto" if p.auto_gain else c.gain) if c else None,
            "noise_std": c.noise_std if c else None,
            "noise_dist": c.noise_dist if c else None,
            "metric": metric.name,
            "metric_kind": metric.kind,
            "higher_is_better": metric.higher_is_better,
            "samples": n_samples,
            "label": p.label(),
        }

    if any(p.format == "fp32" for p in pts):
        bar.set_postfix_str("fp32")
        fp32_se = stderrs(ref)
        records.append({**base_record(Point("fp32")), "value": fp32_value, "std": 0.0, "runs": 1,
                        "values": [fp32_value], "delta_vs_fp32": 0.0, "seconds": fp32_seconds,
                        "extra": extra_fp32, "stderr": fp32_se[metric.name],
                        "extra_stderr": {m.name: fp32_se[m.name] for m in eval_settings.extra_metrics}})

    if eval_settings.calibration_count is not None:
        n_calib = min(eval_settings.calibration_count, len(calibration if calibration is not None else data))
        context = {**context, "n_calib": n_calib}  # decides the scales and gains: in every key
    else:
        n_calib = min(eval_settings.calibration_samples, len(data))
    calib_source = calibration.inputs if calibration is not None else data.inputs
    calib_inputs = tuple(t[:n_calib].to(device) for t in calib_source)
    fingerprints: list[str] = []  # the calibration inputs' fingerprint, computed once, when first needed

    def calib_fp() -> str:
        if not fingerprints:
            fingerprints.append(data_fingerprint(calib_inputs, None))
        return fingerprints[0]

    if calibration is not None:  # the calibration inputs decide fixed-point scales and auto gains
        context = {**context, "calibration": calib_fp()}
    plan_overrides = dict(overrides or {})
    if plan_overrides:
        context = {**context, "overrides": {k: config_key(v) for k, v in sorted(plan_overrides.items())}}
    # what decides fixed-point scales and auto gains: the model (and a plan's overrides), the
    # calibration inputs themselves, where and with which torch they run; not the evaluated data, the
    # metric or the sample count, so a screen on a few samples and the full evaluation share them
    def calib_context() -> dict[str, object]:
        return {"model": context["model"], "calibration_inputs": calib_fp(),
                "device": context["device"], "torch": context["torch"],
                **({"overrides": context["overrides"]} if "overrides" in context else {})}
    work: list[nn.Module] = []  # the converted working copy, made at the first run not in the cache

    def analog() -> nn.Module:
        if not work:
            work.append(convert(copy.deepcopy(model), ABFPConfig(), inplace=True))
        return work[0]

    def point_gains(p: Point) -> dict[str, float]:
        """The auto gains of ``p``: chosen on the point's own bits, or once per device at
        ``eval_settings.autogain_bits`` (memo, then the disk cache, then :func:`choose_gains`)."""
        assert p.config is not None
        at = _gain_choice_config(p.config, eval_settings.autogain_bits)
        gkey = run_key({**calib_context(), "kind": "autogain-choice", "config": config_key(at),
                        "threshold": eval_settings.autogain_threshold, "max_gain": AUTOGAIN_MAX})

        def choose() -> dict[str, float]:
            if eval_settings.autogain_bits is not None:
                hit = broadcast_from_main(cache.get(gkey) if rank == 0 else None)
                if hit is not None and isinstance(hit.get("gains"), dict):
                    return {str(k): float(v) for k, v in hit["gains"].items()}
            t1 = time.perf_counter()
            m = analog()
            set_config(m, at)
            g = choose_gains(m, calib_inputs, at, threshold=eval_settings.autogain_threshold, max_gain=AUTOGAIN_MAX)
            if eval_settings.autogain_bits is not None and rank == 0:  # value: the entry format's number, unused here
                cache.put(gkey, {"value": 0.0, "seconds": time.perf_counter() - t1, "gains": g},
                          info=f"{task_name} auto gains at {Point(p.format, at, auto_gain=True).label()}")
            return g

        return memo.lookup("gains", gkey, choose, "gains")

    def fixed_scales() -> dict[str, list[float]]:
        """Fixed-point activation scales: a digital pass, the same for every device."""
        skey = run_key({**calib_context(), "kind": "fixed-scales", "pct": eval_settings.fixed_percentile})

        def record() -> dict[str, list[float]]:
            return {k: list(v) for k, v in calibrate(analog(), [calib_inputs], percentile=eval_settings.fixed_percentile).items()}

        return memo.lookup("scales", skey, record, "scales")

    try:
        for p in pts:
            if p.format == "fp32":
                continue
            assert p.config is not None
            bar.set_postfix_str(p.label())
            overrides: dict[str, ABFPConfig] = dict(plan_overrides) if p.format == "abfp" else {}
            gains: dict[str, float] | None = None
            prepared = False
            cfg = p.config
            rule = ({"autogain_at": list(eval_settings.autogain_bits), "autogain_max": AUTOGAIN_MAX}
                    if p.auto_gain and eval_settings.autogain_bits is not None else {})
            noisy = is_noisy(p)
            n_runs = eval_settings.runs if noisy else 1
            values, seconds, extras, layers, ses, seeds = [], [], [], None, [], []
            coverages: list[dict[str, Any] | None] = []
            stopped = False
            for r in range(n_runs):
                # run r's noise seed: the point's own seed (its config's execution.seed) + r, else settings.seed + r
                rcfg = cfg.replace(seed=(eval_settings.seed if cfg.seed is None else cfg.seed) + r) if noisy else cfg
                # the batch size decides how noise draws fall on samples: part of the key
                key = run_key({**context, "format": p.format, "config": config_key(rcfg), "run": r,
                               "auto_gain": p.auto_gain,
                               "autogain_threshold": eval_settings.autogain_threshold if p.auto_gain else None,
                               "pct": eval_settings.fixed_percentile if p.format == "fixed" else None,
                               "batch": eval_settings.batch_size if noisy else None, **rule})
                seeds.append(rcfg.seed)
                hit = broadcast_from_main(cache.get(key) if rank == 0 else None)
                if hit is not None and eval_settings.layer_stats and r == 0 and hit.get("layers") is None:
                    hit = None  # written without per-layer statistics (e.g. by abfp explore): measure them
                if hit is not None:
                    values.append(hit["value"])
                    coverages.append(hit.get("coverage"))
                    seconds.append(hit["seconds"])
                    extras.append(hit.get("extra", {}))
                    ses.append(hit.get("stderr", {}))
                    layers = (layers or hit.get("layers")) if eval_settings.layer_stats else None
                    gains = gains or hit.get("gains")
                    bar.update(n_samples)
                else:
                    analog_model = analog()
                    if not prepared:  # the point's gains, only when a run has to be computed
                        if p.auto_gain:
                            gains = point_gains(p)
                            overrides = {**overrides, **gain_overrides(gains, cfg)}
                        prepared = True
                    run_overrides = {k: v.replace(seed=rcfg.seed) for k, v in overrides.items()}
                    set_config(analog_model, rcfg, overrides=run_overrides)
                    if p.format == "fixed":
                        analog_state(analog_model).input_scales = {k: list(v) for k, v in fixed_scales().items()}
                    analog_state(analog_model).coverage.reset()
                    t1 = time.perf_counter()
                    out = run(analog_model)
                    memo.count("runs")
                    dt = time.perf_counter() - t1
                    cov = analog_state(analog_model).coverage.as_dict()  # this run's device MAC share
                    v = metric.finite(out, targets, ref, f"{task_name} at {p.label()}")
                    ex = {m.name: m.finite(out, targets, ref, f"{task_name} at {p.label()}")
                          for m in eval_settings.extra_metrics}
                    se = stderrs(out)
                    lay = None
                    if eval_settings.layer_stats and r == 0 and rank == 0:
                        first = tuple(t[: eval_settings.batch_size].to(device) for t in data.inputs)
                        lay = summary(analog_model, first).as_dicts()
                        layers = lay
                    if rank == 0:
                        cache.put(key, {"value": v, "seconds": dt, "extra": ex, "layers": lay, "gains": gains,
                                        "coverage": cov, "stderr": se},
                                  info=f"{task_name} {p.label()} run {r}")
                    values.append(v)
                    coverages.append(cov)
                    seconds.append(dt)
                    extras.append(ex)
                    ses.append(se)
                # the same rule on cached and computed runs: the result never depends on the cache
                if enough is not None and r + 1 < n_runs and enough(list(values), [e.get(metric.name) for e in ses]):
                    stopped = True
                    break
            mean, std = _aggregate(values)
            se_mean = {k: _mean_or_none([e.get(k) for e in ses]) for k in stderrs_keys}
            extra = {k: statistics.fmean(e[k] for e in extras) for k in (extras[0] if extras else {})}
            rec = {**base_record(p), "value": mean, "std": std, "runs": len(values), "values": values,
                   "delta_vs_fp32": mean - fp32_value, "seconds": statistics.fmean(seconds),
                   "extra": extra, "layers": layers, "stderr": se_mean[metric.name],
                   "extra_stderr": {k: se_mean[k] for k in stderrs_keys[1:]}}
            if noisy:  # what decides the noise of each run: its seed, and how batches fall on samples
                rec["seeds"], rec["batch_size"] = seeds[:len(values)], eval_settings.batch_size
            if enough is not None and noisy:
                rec["early_stopped"] = stopped
            if gains is not None:
                rec["gains"] = gains
            known = [c for c in coverages if c is not None]
            if known:  # share of the model's MACs computed on the device, per run
                rec["device_mac_share"] = statistics.fmean(c["share"] for c in known)
                rec["device_mac_shares"] = [c["share"] for c in known]
                rec["digital_ops"] = known[0]["digital_ops"]
            records.append(rec)
    finally:
        if work:
            to_digital(work[0])
        bar.close()
        cache.close()
    return records


def coverage_line(records: Sequence[dict[str, Any]]) -> str:
    """One line: the share of the model's MACs the device computed (lowest over its points) and the
    products that stayed float32 (SPEC 3.1: no product is digital without saying so)."""
    shares = [r["device_mac_share"] for r in records if "device_mac_share" in r]
    if not shares:
        return "device MAC share: not measured"
    ops: dict[str, int] = {}
    for r in records:
        for k, v in (r.get("digital_ops") or {}).items():
            ops[k] = max(ops.get(k, 0), v)
    line = f"device MAC share: {100 * min(shares):.2f}%"
    if ops:
        line += " (float32: " + ", ".join(sorted(ops)) + ")"
    return line


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """The result table as aligned text: one line per record, loss against float32."""
    lines = []
    by_model: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_model.setdefault(r["model"], []).append(r)
    for model, recs in by_model.items():
        m0 = recs[0]
        kind = "accuracy" if m0.get("metric_kind") == "accuracy" else "fidelity to fp32"
        lines.append(f"{model}: {m0['metric']} ({kind}), {m0.get('samples')} samples")
        lines.append(f"  {'format':<7} {'n':>4} {'bits w/x/y':>10} {'gain':>5} {'noise':>6} {'value':>16} {'vs fp32':>8} {'s/run':>7}")
        for r in recs:
            if r["format"] == "fp32":
                lines.append(f"  {'fp32':<7} {'':>4} {'':>10} {'':>5} {'':>6} {r['value']:>16.3f} {'':>8} {r['seconds']:>7.2f}")
                continue
            bits = f"{r['weight_bits']}/{r['input_bits']}/{r['output_bits']}"
            val = f"{r['value']:.3f}" + (f" ± {r['std']:.3f}" if r["runs"] > 1 else "")
            gain = r["gain"] if isinstance(r["gain"], str) else f"{r['gain']:g}"
            lines.append(f"  {r['format']:<7} {r['tile_width']:>4} {bits:>10} {gain:>5} {r['noise_std']:>6.3f} {val:>16} "
                         f"{r['delta_vs_fp32']:>+8.3f} {r['seconds']:>7.2f}")
    return "\n".join(lines)
