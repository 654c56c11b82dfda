"""``abfp.tune``: a per-layer device plan (gains, repeats, optional finetuning) for any model.

``abfp.tune(model, calibration_inputs, config, **options)`` (this module is callable: it runs
:func:`abfp.tune.api.tune`) returns a :class:`TuneResult` with ``.plan`` (a :class:`DevicePlan`),
``.model`` and per-stage metrics and energies. See ``docs/tune.md``.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from .api import StageResult, TuneResult, default_target, evaluate_plan, tune
from .gains import choose_gains, power_of_two_gains
from .plan import PLAN_FORMAT, DevicePlan
from .repeats import NoiseProfile, allocate, noise_profile, search_repeats

__all__ = ["DevicePlan", "PLAN_FORMAT", "NoiseProfile", "StageResult", "TuneResult", "allocate", "choose_gains",
           "default_target", "evaluate_plan", "noise_profile", "power_of_two_gains", "search_repeats", "tune"]


class _CallableModule(types.ModuleType):
    """``abfp.tune(...)`` calls :func:`tune`; ``abfp.tune.DevicePlan`` etc. stay attributes."""

    def __call__(self, *args: Any, **kwargs: Any) -> TuneResult:
        return tune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
