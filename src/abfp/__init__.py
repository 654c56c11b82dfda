"""abfp: what your neural network does on an analog (ABFP) accelerator, and how to fix it.

Public names: :class:`ABFPConfig`, :class:`ExecutionOptions`, :func:`presets`, :func:`convert`, :func:`to_digital`,
:func:`calibrate`, :func:`summary`, and the modules :mod:`abfp.functional`, :mod:`abfp.metrics`.
"""

from . import ops  # noqa: I001  (first: the product families, which abfp.functional re-exports)
from . import functional, metrics
from .config import ABFPConfig, ExecutionOptions, REFERENCE_NOISE_STD, presets
from .ops.coverage import Coverage, coverage
from .nn import analog_state, calibrate, convert, digital, is_converted, reseed, set_config, summary, to_digital
from . import finetune  # abfp.finetune.distil / qat / dnf, as the README spells them
from . import tune  # callable: abfp.tune(model, calibration_inputs, config, **options)
from .tune import DevicePlan
from . import explore  # callable: abfp.explore(task, **options) designs the device (abfp explore)

__version__ = "0.1.0"

__all__ = [
    "ABFPConfig",
    "DevicePlan",
    "ExecutionOptions",
    "REFERENCE_NOISE_STD",
    "analog_state",
    "calibrate",
    "convert",
    "Coverage",
    "coverage",
    "digital",
    "explore",
    "finetune",
    "functional",
    "is_converted",
    "metrics",
    "presets",
    "reseed",
    "set_config",
    "summary",
    "to_digital",
    "tune",
]
