"""abfp: what your neural network does on an analog (ABFP) accelerator, and how to fix it.

Public names: :class:`ABFPConfig`, :class:`ExecutionOptions`, :func:`presets`, :func:`convert`, :func:`to_digital`,
:func:`calibrate`, :func:`summary`, and the modules :mod:`abfp.functional`, :mod:`abfp.metrics`.
"""

import sys as _sys


def _is_the_command() -> bool:
    """Whether this process is the ``abfp`` command: its console script (``argv[0]`` named
    ``abfp``), ``python -m abfp`` or ``torchrun -m abfp`` (``-m abfp`` in the interpreter's own
    arguments)."""
    argv = list(getattr(_sys, "orig_argv", None) or [])
    if argv[1:] and argv[0:1] and any(a == "-mabfp" or (a == "-m" and argv[i + 1:i + 2] == ["abfp"])
                                      for i, a in enumerate(argv[1:], 1)):
        return True
    name = (_sys.argv[0] if _sys.argv else "").replace("\\", "/").rsplit("/", 1)[-1]
    return name in ("abfp", "abfp.exe", "abfp-script.py")


try:  # importing torch takes seconds: Ctrl-C then ends the command as its other interrupts do
    from . import ops  # noqa: I001  (first: the product families, which abfp.functional re-exports)
    from . import functional, metrics
    from .config import ABFPConfig, ExecutionOptions, REFERENCE_NOISE_STD, presets
    from .ops.coverage import Coverage, coverage
    from .nn import analog_state, calibrate, convert, digital, is_converted, reseed, set_config, summary, to_digital
    from . import finetune  # abfp.finetune.distil / qat / dnf, as the README spells them
    from . import tune  # callable: abfp.tune(model, calibration_inputs, config, **options)
    from .tune import DevicePlan
    from . import explore  # callable: abfp.explore(task, **options) designs the device (abfp explore)
except KeyboardInterrupt:
    if not _is_the_command():  # a program that imports abfp decides what its Ctrl-C does
        raise
    print("abfp: interrupted (nothing was written)", file=_sys.stderr)
    raise SystemExit(130) from None

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
