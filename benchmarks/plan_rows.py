"""Shared by the plan benchmarks (bench_decompose, bench_layerwise, bench_distil_curve, bench_distil_aug,
bench_distil_step): loading a task and a plan, a distillation step, and evaluating a plan into JSON rows
(metric and extras with standard errors, wall and process CPU time since the start, the load average)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from abfp import zoo
from abfp.tune import DevicePlan
from abfp.tune.api import _outputs, plan_outputs
from abfp.tune.cli import split_data


def load_plan(spec: str) -> DevicePlan:
    """``RESULT.json:STAGE`` (a bench_tune.py result's stage) or a plan JSON written by ``abfp tune``."""
    if ":" in spec and not Path(spec).exists():
        path, stage = spec.rsplit(":", 1)
        found = [r["plan"] for r in json.load(open(path))["rows"] if r["stage"] == stage]
        if not found:
            raise SystemExit(f"no stage {stage!r} in {path}")
        return DevicePlan.from_dict(found[0])
    return DevicePlan.from_json(spec)


def distil_update(student: torch.nn.Module, teacher: torch.nn.Module, opt: torch.optim.Optimizer,
                  x: torch.Tensor, temperature: float = 1.0, features=None) -> float:
    """One distillation step on the batch ``x``: the frozen ``teacher``'s logits, the KL of the
    ``student``'s against them (at ``temperature``, times its square), backward and ``opt``'s update;
    returns the loss. ``features``: an :class:`abfp.finetune.distillation.FeatureMatch` hooked on
    ``student`` and ``teacher`` (its loss, with ``temperature`` in its Distillation, adds the weighted
    feature term)."""
    from abfp.finetune.distillation import kl_loss

    if features is None:
        with torch.no_grad():
            t = teacher(x)
        loss = kl_loss(student(x), t, temperature)
    else:  # the teacher's forward inside records its features too
        loss = features.loss(student, (x,))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def paired(metric, before: torch.Tensor, after: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """``metric``'s paired difference ``after - before`` on the same inputs (outputs of two models;
    ``ref``: float32's): the mean of the per-sample differences and its standard error."""
    d = (metric.per_sample(after, None, ref) - metric.per_sample(before, None, ref)).double().flatten()
    return float(d.mean()), float(d.std(unbiased=True) / d.numel() ** 0.5)


def setup(task_name: str, calibration: int, eval_samples: int):
    """One thread; the task's float32 model, calibration and evaluation splits, and metrics."""
    torch.set_num_threads(1)
    task = zoo.get(task_name)
    model = task.build_model().eval()
    cal, ev, _ = split_data(task, calibration, eval_samples)
    return model, cal, ev, [task.metric, *zoo.extra_metrics(task_name)]


class Rows:
    """Evaluated rows, written to ``out`` (with ``header``) after each; ``resume`` keeps the rows
    already there and skips their stages."""

    def __init__(self, out: str, model: torch.nn.Module, ev, metrics, batch_size: int, resume: bool = False,
                 **header: Any) -> None:
        self.out, self.ev, self.metrics, self.batch_size, self.header = out, ev, metrics, batch_size, header
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        self.ref = _outputs(model, ev, batch_size)
        self.rows: list[dict] = json.load(open(out))["rows"] if resume and Path(out).exists() else []

    def evaluate(self, name: str, model: torch.nn.Module, plan: DevicePlan, **extra: Any) -> None:
        if any(r["stage"] == name for r in self.rows):
            return
        out, ev, ref = plan_outputs(model, plan, self.ev, self.batch_size, 0), self.ev, self.ref
        self.rows.append({"stage": name, **extra, "wall": time.perf_counter() - self.t0,
                          "cpu": time.process_time() - self.c0,
                          **{x.name: x(out, ev.targets, ref) for x in self.metrics},
                          **{x.name + "_se": x.stderr(out, ev.targets, ref) for x in self.metrics}})
        print(self.rows[-1], flush=True)
        with open(self.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "load": open("/proc/loadavg").read().split()[:3],
                       **self.header, "rows": self.rows}, f, indent=1)
