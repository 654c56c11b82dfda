"""Counting the compiled kernels' calls in tests that compare them with the torch path."""

from __future__ import annotations

from typing import Callable

import pytest

from abfp import functional as AF
from abfp.numerics import fused


def spied_kernels(monkeypatch: pytest.MonkeyPatch, kernels: dict[str, str]) -> Callable[[bool], dict[str, int]]:
    """Wrap each kernel of :mod:`abfp.numerics.fused` named in ``kernels`` (kernel name -> counter
    name) so that its calls are counted; returns ``set_mode(on)``, which turns the compiled kernels
    on or off (clearing the weight cache) and returns the counters."""
    calls = {counter: 0 for counter in kernels.values()}
    for name, counter in kernels.items():
        real = getattr(fused, name)

        def spy(*a, _real=real, _counter=counter):
            calls[_counter] += 1
            return _real(*a)

        monkeypatch.setattr(fused, name, spy)

    def set_mode(on: bool) -> dict[str, int]:
        monkeypatch.setattr(fused, "AVAILABLE", on)
        AF.clear_cache()
        return calls

    return set_mode
