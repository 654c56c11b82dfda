"""In-memory memo of the work that repeats between :func:`abfp.evaluate.evaluate` calls of one search.

The explorer (:mod:`abfp.explore`) calls ``evaluate`` once per design, on the same model and
data. Without a memo every call would run the float32 model again (the reference of fidelity
metrics), re-record the fixed-point scales and re-choose the auto gains (one noise-free pass
over the calibration inputs per power of two, 9 passes). An :class:`EvalMemo` passed to every
call keeps, for the lifetime of the search:

* the float32 **reference outputs**, keyed on the evaluation's cache context (fingerprints of
  the model, the data and the metrics, the device) and the batch size;
* the fixed-point **activation scales** (:func:`abfp.nn.calibrate`: a digital pass, the same
  for every device), keyed on the model, the calibration inputs and the percentile;
* the **auto gains** (:func:`abfp.evaluate.autogain.choose_gains`), keyed on everything that
  decides them (model, calibration inputs, the device they are chosen on, the threshold).

Keys are fingerprints, not object identities: a model changed in place, other data or another
rule is recomputed, never served stale. ``forwards`` counts the passes the memo could not
save (tests use it: a search whose designs all come from the disk cache runs one float32
pass and no other evaluation pass; the explorer's energy recording is outside the memo).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

__all__ = ["EvalMemo"]

T = TypeVar("T")


@dataclass
class EvalMemo:
    """Reference outputs, fixed-point scales and auto gains of one search, by key."""

    references: dict[str, Any] = field(default_factory=dict)
    scales: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    gains: dict[str, dict[str, float]] = field(default_factory=dict)
    #: what the memo could not save: ``"fp32"``, ``"scales"``, ``"gains"`` and ``"runs"`` passes
    forwards: dict[str, int] = field(default_factory=lambda: {"fp32": 0, "scales": 0, "gains": 0, "runs": 0})

    def count(self, kind: str) -> None:
        self.forwards[kind] = self.forwards.get(kind, 0) + 1

    def lookup(self, table: str, key: str, compute: Callable[[], T], kind: str) -> T:
        """``table[key]``, computed (and counted as a ``kind`` pass) the first time."""
        store: dict[str, Any] = getattr(self, table)
        if key not in store:
            store[key] = compute()
            self.count(kind)
        return store[key]
