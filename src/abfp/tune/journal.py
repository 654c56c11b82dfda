"""A journal of finished ``abfp tune`` stages: a killed run loses at most the stage it was in.

:func:`abfp.tune` with ``journal=PATH`` writes, after each stage, everything a later run needs
to skip it (the stage's metric, energy and notes, its :class:`~.plan.DevicePlan`, the details it
added), atomically, to ``PATH`` (JSON). A run with ``resume=True`` and the same journal takes the
finished stages from it and computes the rest. The finetuning stage writes its own step
checkpoint beside the journal (``<PATH stem>.finetune.safetensors``: a killed finetuning resumes
at its last checkpoint, bit-identical, see :mod:`abfp.finetune.checkpoint`) and, when done, the
finetuned weights (``<PATH stem>.finetuned.safetensors``, their digest in the journal).

**Identity.** A journal is used only by the run that wrote it: it records the fingerprints of
everything that decides a stage's result -- the model (every parameter and buffer, the classes'
code), the calibration and evaluation data (inputs and targets), the metric and the extra
metrics (their code), the base device, every option of :func:`abfp.tune`, the energy parameters
and the numerics version -- and a resume whose identity differs in any field is refused, naming
the fields. A finetuning callable (not a method name) cannot be fingerprinted: its stage is
never taken from a journal (the stages before it are).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor, nn

from ..evaluate.fingerprint import config_key, data_fingerprint, metric_fingerprint, model_fingerprint
from ..numerics import NUMERICS_VERSION
from ..outputs import atomic_write_text

__all__ = ["FORMAT", "JournalMismatch", "TuneJournal", "journal_files", "remove_journal", "run_identity"]

#: The journal's format tag.
FORMAT = "abfp-tune-journal/1"


class JournalMismatch(ValueError):
    """``resume=True`` with a journal written by another run (fields named in the message)."""


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


class TuneJournal:
    """The journal file of one :func:`abfp.tune` run (see the module).

    ``resume=False`` starts afresh (an existing journal and its finetuning files are replaced);
    ``resume=True`` continues an existing journal of the same identity (none: starts afresh) and
    raises :class:`JournalMismatch` for another's."""

    def __init__(self, path: str | Path, identity: Mapping[str, str], resume: bool) -> None:
        self.path = Path(path)
        self.identity = dict(identity)
        self.stages: dict[str, dict[str, Any]] = {}
        self.resumed = False
        if resume and self.path.is_file():
            try:
                blob = json.loads(self.path.read_text())
                if blob.get("format") != FORMAT:
                    raise ValueError(f"format {blob.get('format')!r}, not {FORMAT!r}")
                old = dict(blob["identity"])
                stages = dict(blob["stages"])
            except (ValueError, KeyError, TypeError) as e:
                raise JournalMismatch(f"tune journal {self.path} is damaged ({e}); start afresh without resume") from None
            differ = sorted(k for k in set(old) | set(self.identity) if old.get(k) != self.identity.get(k))
            if differ:
                raise JournalMismatch(f"tune journal {self.path} was written by another run: its {', '.join(differ)} "
                                      "differ from this one's; start afresh without resume")
            self.stages, self.resumed = stages, True
        else:
            remove_journal(self.path)
            self._write()

    @property
    def finetune_checkpoint(self) -> Path:
        """The finetuning stage's step checkpoint."""
        return journal_files(self.path)[1]

    @property
    def finetuned_weights(self) -> Path:
        """The finetuned weights, once the finetuning stage has finished."""
        return journal_files(self.path)[2]

    def get(self, stage: str) -> dict[str, Any] | None:
        """The record of a finished stage, or None."""
        return self.stages.get(stage)

    def put(self, stage: str, record: Mapping[str, Any]) -> None:
        """Record a finished stage (written atomically before this returns)."""
        self.stages[stage] = json.loads(json.dumps(dict(record), default=_jsonable))
        self._write()

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
                                  "start afresh without resume")
        model.load_state_dict(state)
        return model

    def finish(self) -> None:
        """Remove the journal and its files (the run's outputs are written)."""
        remove_journal(self.path)

    def _write(self) -> None:
        atomic_write_text(self.path, json.dumps({"format": FORMAT, "identity": self.identity, "stages": self.stages},
                                                indent=1, sort_keys=True, allow_nan=True) + "\n")


def journal_files(path: str | Path) -> tuple[Path, Path, Path]:
    """The journal, its finetuning checkpoint and its finetuned weights."""
    p = Path(path)
    return p, p.with_name(p.stem + ".finetune.safetensors"), p.with_name(p.stem + ".finetuned.safetensors")


def remove_journal(path: str | Path) -> None:
    """Remove a journal and its files (after the run's outputs are written)."""
    for p in journal_files(path):
        p.unlink(missing_ok=True)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (set, frozenset)):
        return sorted(v)
    if hasattr(v, "item"):
        return v.item()
    return str(v)
