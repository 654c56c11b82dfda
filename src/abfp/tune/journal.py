"""The journal of an ``abfp tune`` run: a killed run loses at most the stage it was in.

:func:`abfp.tune` with ``journal=PATH`` records (an :class:`abfp.journal.Journal`), after each
stage, everything a later run needs to skip it: the stage's metric, energy and notes, its
:class:`~.plan.DevicePlan`, the details it added. A run with ``resume=True`` and the same
journal takes the finished stages from it and computes the rest. The finetuning stage keeps its
step checkpoint beside the journal (``<stem>.finetune.safetensors``: a killed finetuning resumes
at its last checkpoint, bit-identical, see :mod:`abfp.finetune.checkpoint`) and, when done, the
finetuned weights (``<stem>.finetuned.safetensors``, their digest in the journal).

**Identity**: fingerprints of the model (every parameter and buffer, the classes' code), the
calibration and evaluation data (inputs and targets), the metric and the extra metrics (their
code), the base device, every option of :func:`abfp.tune`, the energy parameters and the
numerics version; a resume whose identity differs in any field is refused, naming the fields. A
finetuning callable (not a method name) cannot be fingerprinted: its stage is never taken from a
journal (the stages before it are).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor, nn

from ..evaluate.fingerprint import config_key, data_fingerprint, metric_fingerprint, model_fingerprint
from ..journal import AFRESH, Journal, JournalMismatch, remove_journal
from ..numerics import NUMERICS_VERSION

__all__ = ["JournalMismatch", "TuneJournal", "remove_tune_journal", "run_identity"]

_SIDECARS = ("finetune.safetensors", "finetuned.safetensors")


def run_identity(model: nn.Module, calibration: Any, evaluation: Any, metric: Any, extra_metrics: Any,
                 config: Any, options: Mapping[str, Any]) -> dict[str, str]:
    """Fingerprints of everything that decides :func:`abfp.tune`'s stages (see the module)."""
    return {
        "model": model_fingerprint(model),
        "calibration": data_fingerprint(calibration.inputs, calibration.targets),
        "evaluation": data_fingerprint(evaluation.inputs, evaluation.targets),
        "metric": metric_fingerprint(metric),
        "extra_metrics": ",".join(metric_fingerprint(m) for m in extra_metrics),
        "config": json.dumps(config_key(config), sort_keys=True, default=str),
        "options": json.dumps(dict(options), sort_keys=True, default=str),
        "numerics": str(NUMERICS_VERSION),
    }


def remove_tune_journal(path: str | Path) -> None:
    """Remove a tune journal and its finetuning files (after the run's outputs are written)."""
    remove_journal(path, _SIDECARS)


class TuneJournal(Journal):
    """The journal of one :func:`abfp.tune` run: records are stages (see the module)."""

    def __init__(self, path: str | Path, identity: Mapping[str, str], resume: bool) -> None:
        super().__init__(path, identity, resume, kind="tune", sidecars=_SIDECARS)

    @property
    def finetune_checkpoint(self) -> Path:
        """The finetuning stage's step checkpoint."""
        return self.sidecar("finetune.safetensors")

    @property
    def finetuned_weights(self) -> Path:
        """The finetuned weights, once the finetuning stage has finished."""
        return self.sidecar("finetuned.safetensors")

    def save_weights(self, model: nn.Module) -> str:
        """Write the finetuned weights beside the journal; returns their digest."""
        from .provenance import save_weights

        return save_weights(model, self.finetuned_weights)["weights_sha256"]

    def load_weights(self, model: nn.Module, digest: str) -> nn.Module:
        """Load the finetuned weights into ``model``, checking their digest."""
        from safetensors.torch import load_file

        from .provenance import weights_digest

        state: dict[str, Tensor] = load_file(str(self.finetuned_weights))
        if weights_digest(state) != digest:
            raise JournalMismatch(f"{self.finetuned_weights} is not the finetuned weights the journal recorded; "
                                  f"{AFRESH}")
        model.load_state_dict(state)
        return model
