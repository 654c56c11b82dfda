"""Bisection on an integer knob (converter bits): the smallest value that passes a test.

The explorer asks, for one family of designs, "how few ADC (or DAC) bits still meet the
target?". The metric of a model is (nearly) monotone in a converter's bits: more bits, less
quantisation error. :func:`smallest_passing` finds the threshold ``b*`` with
``pred(b*)`` true and ``pred(b* - 1)`` false in ``1 + ceil(log2(hi - lo + 1))`` calls at
most, instead of one call per bit.
"""

from __future__ import annotations

from typing import Callable

__all__ = ["smallest_passing", "max_calls"]


def max_calls(lo: int, hi: int) -> int:
    """Calls of ``pred`` :func:`smallest_passing` makes at most on ``[lo, hi]`` without ``start``:
    one for ``hi``, then ``ceil(log2(hi - lo + 1))`` halvings (``start`` adds at most one)."""
    if hi < lo:
        return 0
    return 1 + (hi - lo).bit_length()


def smallest_passing(lo: int, hi: int, pred: Callable[[int], bool], *, known_pass: int | None = None,
                     start: int | None = None, top_last: bool = False) -> int | None:
    """The smallest integer ``b`` in ``[lo, hi]`` with ``pred(b)`` true, assuming ``pred`` is
    monotone (false below a threshold, true from it on); ``None`` when ``pred(hi)`` is false
    (or ``hi < lo``).

    ``known_pass``: a value in ``[lo, hi]`` already known to pass (e.g. the design the DAC
    search starts from): it is not evaluated again and bounds the search from above.
    ``start``: a first guess in ``[lo, hi]`` (e.g. the base device's 8 bits), tested first: when
    it passes, ``hi`` is never evaluated (one call saved when the answer lies below it).
    ``top_last``: do not test ``hi`` first; bisect over the ``hi - lo + 2`` outcomes (``lo .. hi``
    or none), so ``hi`` is evaluated only when every value below it fails: at most
    ``ceil(log2(hi - lo + 2))`` calls, never more than testing ``hi`` first when the answer lies
    below ``hi`` (often one fewer), but up to that many instead of one when even ``hi`` fails (the caller expects the range to hold the answer: the DAC raise, whose top design
    is the most expensive to evaluate). Ignores ``start``.
    Raises ``ValueError`` for non-integer bounds.
    """
    for name, v in (("lo", lo), ("hi", hi)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"smallest_passing: {name} must be an integer, got {v!r}")
    if hi < lo:
        return None
    if top_last and known_pass is None:
        good, bad = hi + 1, lo - 1  # good = hi + 1: "none passes" until a value passes
    elif known_pass is not None:
        if not lo <= known_pass <= hi:
            raise ValueError(f"smallest_passing: known_pass={known_pass} is outside [{lo}, {hi}]")
        good = known_pass
        bad = lo - 1
    elif start is not None and lo <= start < hi:
        if pred(start):
            good, bad = start, lo - 1
        else:
            if not pred(hi):
                return None
            good, bad = hi, start
    else:
        if not pred(hi):
            return None
        good, bad = hi, lo - 1
    # invariant: pred(good) is true (or good = hi + 1, top_last: none known to pass); pred(bad) is
    # false (bad = lo - 1: nothing known below)
    while good - bad > 1:
        mid = (bad + good) // 2
        if pred(mid):
            good = mid
        else:
            bad = mid
    return good if good <= hi else None
