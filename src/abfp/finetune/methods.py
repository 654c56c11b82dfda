"""The two finetuning methods of SPEC section 4 and their public entry points.

* :func:`qat`: the training forward *is* the device (``abfp.convert``: tiles, quantisation,
  gain, ADC and device noise), with straight-through gradients. Exact; every step pays
  for the simulation.
* :func:`dnf`: the device is measured once (histograms of ``dy = y_device - y_fp32`` per
  product site, from one calibration batch) and the training forward is float32 plus noise
  drawn from those histograms, ``y = y_fp32(x) + xi``. Variants: per-output-channel
  histograms, refreshing them every K steps, noise only at the noisiest fraction of layers.

Both evaluate the model on the full device simulation before and after finetuning.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..config import ABFPConfig
from ..nn import convert
from ..nn.convert import calibrate, needs_calibration
from ..zoo.base import Dataset
from .distillation import Distillation, as_inputs
from .dnf import DNFNoise, build_histograms, select_noisiest
from .histogram import DEFAULT_BINS, DEFAULT_SMOOTHING, Histogram
from .loop import FinetuneResult, TrainSettings, finetune
from .parallel import from_main
from .sampler import SAMPLER_VERSION, Backend, backend_in_use

__all__ = ["DNFOptions", "distil", "dnf", "qat"]


class QATMethod:
    """Quantisation-aware training through the simulator (noise from torch's global generator,
    reseeded per rank and step under torchrun)."""

    name = "qat"

    def __init__(self, config: ABFPConfig, overrides: Mapping[str, ABFPConfig] | None = None) -> None:
        # the device noise must come from the global generator so that checkpoints capture it
        self.config = config.replace(seed=None)
        self.overrides = {k: v.replace(seed=None) for k, v in (overrides or {}).items()} or None

    def options(self) -> dict[str, Any]:
        return {}

    def prepare(self, model: nn.Module, train_data: Dataset, seed: int, exclude: Sequence[str],
                restored: Any) -> nn.Module:
        model = convert(model, self.config, exclude=exclude, overrides=self.overrides, inplace=True)
        if needs_calibration(model):  # fixed point: static scales from the first training samples
            calibrate(model, [tuple(t[:128] for t in train_data.inputs)])
        return model

    def before_step(self, step: int) -> None:
        pass

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {}, {}

    def finish(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class DNFOptions:
    """DNF settings. Defaults are the authors' method (SPEC section 4).

    ``bins``, ``smoothing``: histogram of ``dy`` (100 bins, +0.5 per bin).
    ``calibration_samples``: size of the one calibration batch (128).
    ``per_channel``: one histogram per output channel instead of per layer.
    ``refresh_every``: rebuild the histograms every K steps from the calibration batch with
    the current weights (0: never, the default).
    ``layer_fraction``: inject noise only at the ``ceil(fraction * n)`` sites with the largest
    standard deviation of ``dy`` (1.0: all sites); ``rank_by="relative"`` ranks by
    ``std(dy) / rms(y_fp32)`` instead, which does not favour layers with large outputs.
    ``sampler``: ``"auto"`` (the compiled kernel where it runs, else eager torch), ``"compiled"`` or
    ``"eager"`` (the same draws; :mod:`.sampler`).
    """

    bins: int = DEFAULT_BINS
    smoothing: float = DEFAULT_SMOOTHING
    calibration_samples: int = 128
    per_channel: bool = False
    refresh_every: int = 0
    layer_fraction: float = 1.0
    rank_by: Literal["std", "relative"] = "std"
    sampler: Backend = "auto"

    def __post_init__(self) -> None:
        if not (isinstance(self.bins, int) and self.bins >= 1):
            raise ValueError(f"bins must be a positive integer, got {self.bins!r}")
        if not (math.isfinite(self.smoothing) and self.smoothing >= 0):
            raise ValueError(f"smoothing must be >= 0, got {self.smoothing!r}")
        if not (isinstance(self.calibration_samples, int) and self.calibration_samples >= 1):
            raise ValueError(f"calibration_samples must be >= 1, got {self.calibration_samples!r}")
        if not (isinstance(self.refresh_every, int) and self.refresh_every >= 0):
            raise ValueError(f"refresh_every must be >= 0, got {self.refresh_every!r}")
        if not 0 < self.layer_fraction <= 1:
            raise ValueError(f"layer_fraction must be in (0, 1], got {self.layer_fraction!r}")
        if self.rank_by not in ("std", "relative"):
            raise ValueError(f"rank_by must be 'std' or 'relative', got {self.rank_by!r}")
        if self.sampler not in ("auto", "compiled", "eager"):
            raise ValueError(f"sampler must be 'auto', 'compiled' or 'eager', got {self.sampler!r}")

    def label(self) -> str:
        parts = ["per-channel" if self.per_channel else "per-layer"]
        if self.refresh_every:
            parts.append(f"refresh/{self.refresh_every}")
        if self.layer_fraction < 1:
            parts.append(f"top {self.layer_fraction:g} of sites by {'std(dy)' if self.rank_by == 'std' else 'std(dy)/rms(y)'}")
        return ", ".join(parts)


class DNFMethod:
    """Differential noise finetuning; see :mod:`abfp.finetune.dnf`."""

    name = "dnf"

    def __init__(self, config: ABFPConfig, options: DNFOptions,
                 overrides: Mapping[str, ABFPConfig] | None = None) -> None:
        self.config = config
        self.opts = options
        self.overrides = dict(overrides) if overrides else None
        self.model: nn.Module | None = None
        self.noise: DNFNoise | None = None
        self.calibration: tuple[Tensor, ...] = ()
        self.sites: list[str] = []
        self.all_std: dict[str, float] = {}
        self.all_rms: dict[str, float] = {}
        self.refreshes = 0
        self.histogram_seconds = 0.0

    def options(self) -> dict[str, Any]:
        d = asdict(self.opts)
        d.pop("sampler")  # an implementation choice: resuming with another sampler is allowed
        d["sampler_version"] = SAMPLER_VERSION  # but not with other draws
        return d

    def prepare(self, model: nn.Module, train_data: Dataset, seed: int, exclude: Sequence[str],
                restored: tuple[dict[str, Tensor], dict[str, Any]] | None) -> nn.Module:
        import time

        cfg = self.config if self.config.seed is not None else self.config.replace(seed=seed)
        over = None if self.overrides is None else \
            {k: v if v.seed is not None else v.replace(seed=seed) for k, v in self.overrides.items()}
        self.model = convert(model, cfg, exclude=exclude, overrides=over, inplace=True)
        g = torch.Generator().manual_seed(seed * 1_000_003 + 104_729)
        n = min(self.opts.calibration_samples, len(train_data))
        idx = torch.randperm(len(train_data), generator=g)[:n]
        self.calibration = tuple(t[idx] for t in train_data.inputs)
        if needs_calibration(self.model):  # fixed point: static scales from the calibration batch
            calibrate(self.model, [self.calibration])
        t0 = time.perf_counter()
        if restored is not None and restored[1].get("method_state", {}).get("sites"):
            tensors, meta = restored
            ms = meta["method_state"]
            hists = {s: Histogram.from_tensors(tensors, f"dnf.{s}", m) for s, m in ms["sites"].items()}
            self.all_std = {k: float(v) for k, v in ms.get("all_std", {}).items()}
            self.all_rms = {k: float(v) for k, v in ms.get("all_rms", {}).items()}
            self.refreshes = int(ms.get("refreshes", 0))
            self.sites = list(hists)
        else:
            model = self.model
            # measured on rank 0 and sent to all: every rank samples the same distributions
            all_hists = from_main(lambda: build_histograms(model, self.calibration, bins=self.opts.bins,
                                                           smoothing=self.opts.smoothing,
                                                           per_channel=self.opts.per_channel))
            if not all_hists:
                raise ValueError("the model has no analog product site: nothing for DNF to do")
            self.all_std = {s: h.std for s, h in all_hists.items()}
            self.all_rms = {s: h.signal_rms for s, h in all_hists.items()}
            self.sites = select_noisiest(all_hists, self.opts.layer_fraction, by=self.opts.rank_by)
            hists = {s: all_hists[s] for s in self.sites}
        self.noise = DNFNoise(self.model, hists, backend=self.opts.sampler).attach()
        self.noise.warm_up()
        self.histogram_seconds += time.perf_counter() - t0
        return self.model

    def before_step(self, step: int) -> None:
        k = self.opts.refresh_every
        if k and step > 0 and step % k == 0:
            assert self.noise is not None and self.model is not None
            model = self.model
            self.noise.histograms = from_main(lambda: build_histograms(
                model, self.calibration, bins=self.opts.bins, smoothing=self.opts.smoothing,
                per_channel=self.opts.per_channel, sites=self.sites, seed_offset=step))
            self.refreshes += 1

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        assert self.noise is not None
        tensors: dict[str, Tensor] = {}
        sites: dict[str, Any] = {}
        for s, h in self.noise.histograms.items():
            tensors.update(h.tensors(f"dnf.{s}"))
            sites[s] = h.meta()
        return tensors, {"sites": sites, "all_std": self.all_std, "all_rms": self.all_rms, "refreshes": self.refreshes}

    def finish(self) -> dict[str, Any]:
        if self.noise is not None:
            self.noise.detach()
        return {"dnf": {**asdict(self.opts), "label": self.opts.label(), "sites": list(self.sites),
                        "n_sites": len(self.all_std), "dy_std": self.all_std, "y_rms": self.all_rms,
                        "refreshes": self.refreshes,
                        "histogram_seconds": self.histogram_seconds, "sampler_used": backend_in_use(self.opts.sampler)}}


def _distillation(loss: str | Distillation | None, temperature: float | None) -> Distillation | None:
    """``loss`` (a name, a :class:`Distillation` or ``None`` for the labels' cross entropy) and
    ``temperature`` as one :class:`Distillation`."""
    if loss is None or loss == "ce":
        if temperature is not None:
            raise ValueError("temperature needs a distillation loss (loss='kl')")
        return None
    if isinstance(loss, Distillation):
        if temperature is not None and temperature != loss.temperature:
            raise ValueError("pass the temperature inside the Distillation, not both")
        return loss
    if not isinstance(loss, str):
        raise TypeError(f"loss must be a name ('kl', 'cosine', 'mse', 'ce') or a Distillation, got {type(loss).__name__}")
    return Distillation(loss, 1.0 if temperature is None else temperature)  # type: ignore[arg-type]


def _settings(steps: int, lr: float, batch_size: int, kwargs: dict[str, Any]) -> TrainSettings:
    known = set(TrainSettings.__dataclass_fields__) - {"steps", "lr", "batch_size", "distillation"}
    loss, temperature = kwargs.pop("loss", None), kwargs.pop("temperature", None)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}; known: {sorted(known | {'loss', 'temperature'})}")
    return TrainSettings(steps=steps, lr=lr, batch_size=batch_size, distillation=_distillation(loss, temperature),
                         **kwargs)


def qat(model: nn.Module, train_data: Dataset, config: ABFPConfig | None = None, *, steps: int, lr: float,
        batch_size: int, **kwargs: Any) -> FinetuneResult:
    """Quantisation-aware finetuning of ``model`` on the device ``config`` (default: the
    authors' reference device), AdamW.

    The training forward is the full ABFP simulation, device noise included; gradients are
    straight-through (SPEC section 4). Keyword arguments are the fields of
    :class:`~abfp.finetune.loop.TrainSettings`: ``seed``, ``weight_decay``, ``lr_decay`` (per
    epoch), ``eval_data`` and ``metric`` (evaluation on the device before and after),
    ``eval_batch_size``, ``checkpoint`` (a ``.safetensors`` path), ``checkpoint_every``,
    ``resume``, ``progress``, ``loss_fn``, ``timing_steps``, ``timing_every``, ``exclude``,
    ``callback(step, loss)``, ``inference_layers`` (batch norm and dropout in eval mode while
    training; default: only when distilling), ``overrides`` (per-module devices ``{regex:
    ABFPConfig}``, e.g. ``DevicePlan.overrides()``: a per-layer plan of gains and repeats),
    ``sample_inputs`` (with a distillation loss: ``(generator, n) -> inputs``, a fresh batch every
    step instead of the fixed ``train_data``, e.g. ``Task.sample_finetuning_batch``). Label-free: ``loss="kl"`` (``temperature``),
    ``"cosine"`` or ``"mse"`` distils from a frozen float32 copy of ``model`` on the inputs of
    ``train_data`` (labels unused; see :mod:`abfp.finetune.distillation`). Returns a
    :class:`FinetuneResult` (the model is a finetuned float32 copy; ``model`` itself is not
    changed).
    """
    settings = _settings(steps, lr, batch_size, kwargs)
    return finetune(QATMethod(config or ABFPConfig(), settings.overrides), model, train_data, config or ABFPConfig(),
                    settings)


def dnf(model: nn.Module, train_data: Dataset, config: ABFPConfig | None = None, *, steps: int, lr: float,
        batch_size: int, bins: int = DEFAULT_BINS, smoothing: float = DEFAULT_SMOOTHING,
        calibration_samples: int = 128, per_channel: bool = False, refresh_every: int = 0,
        layer_fraction: float = 1.0, rank_by: Literal["std", "relative"] = "std", sampler: Backend = "auto",
        **kwargs: Any) -> FinetuneResult:
    """Differential noise finetuning of ``model`` for the device ``config`` (SPEC section 4).

    Before training, one calibration batch (``calibration_samples`` training samples) runs
    through the float32 network; at every analog product the device result on the same
    input gives ``dy = y_device - y_fp32``, poured into a histogram per site (``bins`` bins,
    ``smoothing`` added per bin, normalised). Training then uses ``y = y_fp32(x) + xi``, xi
    i.i.d. from the site's histogram, with ordinary float32 gradients. Variants:
    ``per_channel``, ``refresh_every`` (steps), ``layer_fraction`` with ``rank_by`` (see
    :class:`DNFOptions`).
    Other keyword arguments as for :func:`qat`.
    """
    options = DNFOptions(bins=bins, smoothing=smoothing, calibration_samples=calibration_samples,
                         per_channel=per_channel, refresh_every=refresh_every, layer_fraction=layer_fraction,
                         rank_by=rank_by, sampler=sampler)
    settings = _settings(steps, lr, batch_size, kwargs)
    cfg = config or ABFPConfig()
    return finetune(DNFMethod(cfg, options, settings.overrides), model, train_data, cfg, settings)


def distil(model: nn.Module, inputs: Any, config: ABFPConfig | None = None, *,
           method: Literal["qat", "dnf"] = "qat", loss: Literal["kl", "cosine", "mse"] = "kl",
           temperature: float = 1.0, steps: int, lr: float, batch_size: int = 32, feature_weight: float = 0.0,
           feature_modules: str | None = None, **kwargs: Any) -> nn.Module:
    """Label-free finetuning of ``model`` for the device ``config``: returns the finetuned
    float32 model (``model`` itself is not changed).

    ``inputs``: a few hundred unlabelled inputs of the model (a tensor, a tuple of tensors,
    or a Dataset whose labels are ignored). The teacher is a frozen float32 copy of ``model``;
    the student is finetuned through the device (``method="qat"``) or with differential
    noise (``"dnf"``) to minimise ``loss`` against the teacher's outputs: ``kl`` on logits
    (``T^2 KL(softmax(t/T) || softmax(s/T))``, ``temperature`` T), ``cosine``
    (``1 - cos(s, t)``) or ``mse`` on embeddings / outputs; ``feature_weight`` lambda > 0 adds
    ``lambda * sum_l mean((s_l - t_l)^2) / mean(t_l^2)`` over the outputs of the modules
    ``feature_modules`` (a regex; default: every ``nn.ModuleList`` entry) against the teacher's
    (see :class:`Distillation`). Batch norm and dropout stay in
    eval mode while training. Other keyword arguments as for :func:`qat` / :func:`dnf`
    (``eval_data`` evaluates before and after; ``progress`` defaults to False here); use
    those functions with ``loss=`` to get the measured :class:`FinetuneResult` as well.
    """
    if method not in ("qat", "dnf"):
        raise ValueError(f"method must be 'qat' or 'dnf', got {method!r}")
    if "loss_fn" in kwargs:
        raise TypeError("distil takes loss=, not loss_fn=")
    kwargs.setdefault("progress", False)
    data = as_inputs(inputs)
    run = qat if method == "qat" else dnf
    return run(model, data, config, steps=steps, lr=lr, batch_size=batch_size, loss=Distillation(loss, temperature, feature_weight, feature_modules), **kwargs).model
