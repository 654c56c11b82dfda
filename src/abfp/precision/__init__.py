"""Dynamic precision: learn how much energy (repeats) each layer needs under analog noise.

* :func:`search_min_energy`: the smallest uniform energy reaching a target metric;
* :func:`constrained_loss`, :func:`learn_energies`: train ``log E`` per layer or channel of a
  frozen network;
* :func:`run_precision`: the whole experiment (uniform vs learned at equal accuracy);
* ``abfp precision`` and ``abfp energy`` on the command line (:mod:`abfp.precision.cli`).
"""

from .experiment import AJ_PER_PHOTON, PrecisionSettings, plot_precision, run_precision, summarize, training_data
from .learn import LearnResult, learn_energies, shuffled_batches
from .objective import DEFAULT_LAMBDA, constrained_loss, energy_penalty, mac_weighted_mean
from .search import SearchResult, TargetNotReached, search_min_energy

__all__ = [
    "AJ_PER_PHOTON",
    "DEFAULT_LAMBDA",
    "LearnResult",
    "PrecisionSettings",
    "SearchResult",
    "TargetNotReached",
    "constrained_loss",
    "energy_penalty",
    "learn_energies",
    "mac_weighted_mean",
    "plot_precision",
    "run_precision",
    "search_min_energy",
    "shuffled_batches",
    "summarize",
    "training_data",
]
