"""Keeping the best weights of a finetuning run by a held-out validation loss on the device.

A finetuning run of a fixed number of steps at a fixed learning rate can end worse than it
started: on a small training set the labels are over-fitted (cross entropy on 300 Fashion-MNIST
images lost 1.7 to 3 points of held-out top-1 at lr 3e-4, docs/finetune.md), and no one
learning rate suits every model. :class:`BestWeights` measures the run's own loss on inputs it
never trains on (a slice of the training split, never the evaluation data), on the full device
simulation, before the first step, every ``every`` steps and after the last:

    L_val(w_k) = loss(device(w_k; x_val), t_val)

with ``t_val`` the labels (cross entropy) or the frozen float32 teacher's outputs (distillation),
and keeps ``w* = w_k`` of the lowest ``L_val`` (the earliest on a tie: a step that does not
help on held-out inputs is not taken). At the end the run returns ``w*``; with ``k* = 0`` that is
the model it was given. The history and the kept weights go into the checkpoint
(``best.<name>`` tensors), so a resumed run chooses exactly as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from ..zoo.base import Dataset, Metric

__all__ = ["BestWeights", "split_validation"]

_PREFIX = "best."


class BestWeights:
    """The lowest validation loss seen so far and the weights that gave it (see the module docstring).

    ``template``: a float32 (digital) model of the same architecture, into which the weights to
    measure are loaded; ``data``: validation inputs with their targets; ``loss_fn(outputs,
    targets)``: the training loss; ``measure_fn(model, data, metric)``: the metric of ``model`` on
    the device (:func:`abfp.finetune.loop.device_metric` with the run's device).
    """

    def __init__(self, template: nn.Module, data: Dataset, loss_fn: Callable[[Any, Any], Tensor],
                 measure_fn: Callable[[nn.Module, Dataset, Metric], float], every: int) -> None:
        if every < 1:
            raise ValueError(f"validation every must be >= 1 steps, got {every}")
        if data.targets is None:
            raise ValueError("the validation inputs need targets (labels, or the teacher's outputs when distilling)")
        self.template, self.data, self.every = template, data, every
        self._measure = measure_fn
        self.metric = Metric("validation loss", "fidelity", lambda out, t, ref: float(loss_fn(out, t)),
                             higher_is_better=False)
        self.history: list[tuple[int, float]] = []
        self.best_step: int | None = None
        self.best_value = float("inf")
        self._best: dict[str, Tensor] = {}

    def due(self, step: int) -> bool:
        """Whether the weights after ``step`` finished steps are measured during the run (every
        ``every``); the run's last step is measured by :meth:`finish`, after its last checkpoint."""
        return step % self.every == 0

    def finish(self, model: nn.Module, last: int) -> None:
        """Measure the last step's weights unless :meth:`due` did. This comes after the run's last
        checkpoint, so a checkpoint holds only the measurements of multiples of ``every``: a run of
        2 steps continued to 4 with ``--resume`` chooses among the same steps as a run of 4."""
        if last not in dict(self.history):
            self.measure(model, last)

    def measure(self, model: nn.Module, step: int) -> float:
        """Measure ``model``'s weights after ``step`` steps; keep them when strictly the best so far.

        Torch's global generator is left as it was (the training's dropout and noise draws do not
        depend on whether validation ran)."""
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.template.load_state_dict(state)
        with torch.random.fork_rng(devices=[]):
            value = float(self._measure(self.template, self.data, self.metric))
        if value != value:  # NaN
            raise FloatingPointError(f"the validation loss is NaN after step {step}")
        self.history.append((step, value))
        if value < self.best_value:
            self.best_step, self.best_value, self._best = step, value, state
        return value

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Checkpoint tensors (``best.<name>``) and JSON metadata."""
        return ({_PREFIX + k: v.contiguous() for k, v in self._best.items()},
                {"history": [[s, v] for s, v in self.history], "best_step": self.best_step})

    def restore(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Continue from :meth:`state` as a checkpoint holds it."""
        self.history = [(int(s), float(v)) for s, v in meta.get("history", [])]
        self.best_step = meta.get("best_step")
        self._best = {k[len(_PREFIX):]: v for k, v in tensors.items() if k.startswith(_PREFIX)}
        self.best_value = dict(self.history).get(self.best_step, float("inf")) if self.best_step is not None \
            else float("inf")

    def best_state(self) -> dict[str, Tensor]:
        """The kept weights (a state dict)."""
        if self.best_step is None:
            raise RuntimeError("no validation measured yet")
        return self._best

    def summary(self, last: int) -> dict[str, Any]:
        """What the result records: the step kept, its loss, the last step's, the history."""
        final = dict(self.history).get(last)
        return {"selected_step": self.best_step, "validation_loss": self.best_value, "validation_loss_last": final,
                "validation_samples": len(self.data), "validation_history": [[s, v] for s, v in self.history]}


def split_validation(data: Dataset, samples: int) -> tuple[Dataset, Dataset]:
    """``(training, validation)``: the last ``samples`` rows of ``data`` held out for validation."""
    n = len(data)
    if not 1 <= samples < n:
        raise ValueError(f"cannot hold out {samples} of {n} training samples for validation")
    cut = n - samples

    def part(lo: int, hi: int) -> Dataset:
        return Dataset(tuple(t[lo:hi] for t in data.inputs), None if data.targets is None else data.targets[lo:hi])

    return part(0, cut), part(cut, n)

