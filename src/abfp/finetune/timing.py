"""Step-time comparison of float32, DNF and QAT training on the same model and batch.

On a shared or busy machine, timings taken minutes apart are not comparable. Here the
three kinds of step run interleaved (fp32, DNF, QAT, fp32, DNF, QAT, ...) on the same batch,
so each sees the same load, and the medians are compared:

    dnf_ratio = median(DNF step) / median(fp32 step),   qat_ratio = median(QAT) / median(fp32),
    qat_to_dnf = median(QAT step) / median(DNF step).

A step is forward, cross-entropy loss, backward and an AdamW update, in training mode.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ABFPConfig
from ..evaluate.runner import _first_tensor
from ..nn import convert
from ..nn.convert import calibrate, needs_calibration
from ..zoo.base import Dataset
from .dnf import DNFNoise, build_histograms
from .sampler import Backend

__all__ = ["time_steps"]


def time_steps(model: nn.Module, train_data: Dataset, config: ABFPConfig, *, batch_size: int = 64,
               repeats: int = 20, warmup: int = 2, seed: int = 0, calibration_samples: int = 128,
               per_channel: bool = False, sampler: Backend = "auto", lr: float = 1e-4) -> dict[str, Any]:
    """Median and mean seconds of a float32, a DNF and a QAT training step, interleaved.

    Works on copies (``model`` is not changed). Returns ``{"fp32": {...}, "dnf": {...},
    "qat": {...}, "dnf_ratio", "qat_ratio", "qat_to_dnf", "batch_size", "repeats"}`` where
    each method has ``median``, ``mean`` and ``times`` (wall seconds, warm-up steps dropped) and
    ``cpu_median`` (process CPU seconds: less sensitive to other jobs on a shared machine).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    if len(train_data) < max(batch_size, 1):
        raise ValueError(f"the training data has {len(train_data)} samples, fewer than one batch ({batch_size})")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train_data), generator=g)
    inputs = tuple(t[idx[:batch_size]] for t in train_data.inputs)
    targets = train_data.targets[idx[:batch_size]] if train_data.targets is not None else None
    if targets is None:
        raise ValueError("time_steps needs labelled training data (cross-entropy steps)")
    calib = tuple(t[idx[:calibration_samples]] for t in train_data.inputs)
    cfg = config if config.seed is not None else config.replace(seed=seed)

    fp32 = copy.deepcopy(model).float()
    dnf_model = convert(model, cfg, inplace=False).float()
    if needs_calibration(dnf_model):  # fixed point: static scales from the calibration batch
        calibrate(dnf_model, [calib])
    hists = build_histograms(dnf_model, calib, per_channel=per_channel)
    noise = DNFNoise(dnf_model, hists, backend=sampler).attach()
    noise.warm_up()
    qat_model = convert(model, cfg.replace(seed=None), inplace=False).float()
    if needs_calibration(qat_model):
        calibrate(qat_model, [calib])

    models = {"fp32": fp32, "dnf": dnf_model, "qat": qat_model}
    steps: dict[str, Callable[[], None]] = {}
    for name, m in models.items():
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=lr)

        def step(m: nn.Module = m, opt: torch.optim.Optimizer = opt) -> None:
            loss = F.cross_entropy(_first_tensor(m(*inputs)), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        steps[name] = step
    times: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for r in range(warmup + repeats):
            for name, step in steps.items():
                c0, t0 = time.process_time(), time.perf_counter()
                step()
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                if r >= warmup:
                    times[name].append(dt)
                    cpu[name].append(dc)
    noise.detach()
    out: dict[str, Any] = {k: {"median": statistics.median(v), "mean": statistics.fmean(v), "times": v,
                               "cpu_median": statistics.median(cpu[k])} for k, v in times.items()}
    out.update(
        dnf_ratio_cpu=out["dnf"]["cpu_median"] / out["fp32"]["cpu_median"],
        qat_to_dnf_cpu=out["qat"]["cpu_median"] / out["dnf"]["cpu_median"],
        dnf_ratio=out["dnf"]["median"] / out["fp32"]["median"],
        qat_ratio=out["qat"]["median"] / out["fp32"]["median"],
        qat_to_dnf=out["qat"]["median"] / out["dnf"]["median"],
        batch_size=batch_size, repeats=repeats, per_channel=per_channel,
    )
    return out
