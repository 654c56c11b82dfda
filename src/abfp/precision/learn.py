"""Learn the energy per MAC of every layer (or channel) of a pretrained, frozen network.

All weights are frozen; the only trainable tensors are the injector's ``log E`` (one per layer,
or one per output channel). Each step draws fresh noise and minimises
``CE + lambda * max(0, log E_mean - log E_target)`` with Adam (SPEC section 5 defaults:
lr 0.01; lambda 2 shot, 4-8 thermal, 8 weight).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor

from ..finetune.loop import cross_entropy
from ..noise import NoiseInjector
from .objective import constrained_loss

__all__ = ["LearnResult", "learn_energies", "shuffled_batches"]


@dataclass
class LearnResult:
    """What :func:`learn_energies` did: steps, seconds, and a history every ``log_every`` steps
    (step, loss, task loss, E_mean)."""

    steps: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def shuffled_batches(inputs: tuple[Tensor, ...], targets: Tensor, batch_size: int, seed: int = 0
                     ) -> Iterator[tuple[tuple[Tensor, ...], Tensor]]:
    """Endless mini-batches of a data set, reshuffled every epoch with a seeded generator."""
    if batch_size <= 0:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    g = torch.Generator().manual_seed(seed)
    n = int(targets.shape[0])
    while True:
        order = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            idx = order[i : i + batch_size]
            yield tuple(t[idx] for t in inputs), targets[idx]


def learn_energies(injector: NoiseInjector, batches: Iterable[tuple[tuple[Tensor, ...], Tensor]], *,
                   target_energy: float, lam: float, steps: int, lr: float = 0.01,
                   loss_fn: Callable[[Any, Tensor], Tensor] = cross_entropy,
                   log_every: int = 25, progress: Callable[[str], Any] | None = None) -> LearnResult:
    """Train the injector's ``log E`` for ``steps`` batches of ``(inputs, targets)``.

    ``loss_fn(outputs, targets)`` gets the model's outputs as it returns them (the default, the
    labels' cross entropy, scores the first tensor of a tuple or dict and refuses regression targets).
    The model runs in eval mode (batch-norm statistics and dropout as at inference) with every
    parameter frozen; the flags are restored afterwards.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not target_energy > 0:
        raise ValueError(f"target energy must be > 0, got {target_energy}")
    if not lr > 0:
        raise ValueError(f"learning rate must be > 0, got {lr}")
    model = injector.model
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    injector.requires_grad_(True)
    opt = torch.optim.Adam(injector.parameters(), lr=lr)
    log_target = math.log(target_energy)
    result = LearnResult(steps=0, seconds=0.0)
    t0 = time.perf_counter()
    it = iter(batches)
    try:
        for step in range(1, steps + 1):
            inputs, targets = next(it)
            out = model(*inputs)
            task = loss_fn(out, targets)
            log_mean = injector.mean_energy().log()
            loss = constrained_loss(task, log_mean, log_target, lam)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % log_every == 0 or step == steps:
                rec = {"step": step, "loss": loss.item(), "task_loss": task.item(),
                       "mean_energy": math.exp(log_mean.item())}
                result.history.append(rec)
                if progress:
                    progress(f"  step {step:>5}/{steps}  loss {rec['loss']:.4f}  CE {rec['task_loss']:.4f}  "
                             f"E_mean {rec['mean_energy']:.4g}")
            result.steps = step
    finally:
        injector.requires_grad_(False)
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
        result.seconds = time.perf_counter() - t0
    return result
