"""Finetuning a model for an ABFP device (SPEC section 4): QAT and DNF.

>>> import abfp, abfp.finetune as ft                          # doctest: +SKIP
>>> from abfp import zoo
>>> task = zoo.get("fashion-cnn")
>>> train = ft.training_data("fashion-cnn")
>>> cfg = abfp.ABFPConfig(tile_width=128, gain=2.0)
>>> r = ft.dnf(task.build_model(), train, cfg, steps=200, lr=1e-4, batch_size=64,
...            eval_data=task.load_data().take(2000))
>>> r.metric_before, r.metric_after, r.seconds_per_step / r.fp32_seconds_per_step

Label-free (any pretrained model, a few hundred unlabelled inputs, distilled from its frozen
float32 copy)::

    model = ft.distil(model, inputs, cfg, method="qat", loss="kl", steps=100, lr=1e-5)

``qat`` trains through the full device simulation (straight-through gradients, noise
included); ``dnf`` trains the float32 network with noise sampled from per-layer histograms
of the device's error, measured once. See ``docs/finetune.md``.

Without training (:mod:`.layerwise`): ``ft.bias_correct(model, inputs, cfg).model`` subtracts each
layer's per-channel mean device error, measured on calibration inputs, from its bias.
"""

from .data import TRAINABLE_TASKS, training_data
from .distillation import DISTILLATION_LOSSES, Distillation
from .dnf import DNFNoise, build_histograms, record_differentials, select_noisiest
from .histogram import Histogram
from .layerwise import BiasCorrection, bias_correct, channel_mean_errors
from .loop import FinetuneResult, TrainSettings, device_metric
from .methods import DNFOptions, distil, dnf, qat
from .sampler import add_noise
from .timing import time_steps

__all__ = [
    "BiasCorrection", "DISTILLATION_LOSSES", "DNFNoise", "DNFOptions", "Distillation", "FinetuneResult", "Histogram", "TRAINABLE_TASKS", "TrainSettings", "add_noise",
    "bias_correct", "build_histograms", "channel_mean_errors", "device_metric", "distil", "dnf", "qat", "record_differentials", "select_noisiest", "time_steps",
    "training_data",
]  # fmt: skip
