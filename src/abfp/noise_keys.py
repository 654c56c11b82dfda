"""Where a product's device noise comes from: the one generator policy of the package.

Every analog product draws its device noise from one ``torch.Generator``, its *stream*: under
the default counter noise (uniform) it draws one 63-bit key per product from it
(:func:`abfp.numerics.counter_noise.noise_key`); Gaussian noise draws its samples from it.
:func:`product_generator` decides which stream, in this order:

1. an explicit ``generator=`` (functional calls, ``ProductCall.analog`` of interceptors): that one;
2. no noise (``noise_std == 0``) or no seed (``config.execution.seed is None``): ``None``, i.e. torch's
   global generator (finetuning strips the seed and reseeds the global generator per step);
3. otherwise the caller's :class:`NoiseStreams`: one generator per ``(device, seed)``, started
   at ``start(seed, offset)`` on first use and *continued* by every later product, so
   successive products (layers, batches, calls) get different noise, and the same sequence of
   products after a restart gets the same numbers.

The owners of streams (see ``docs/noise-keys.md``):

- a converted model: its :class:`~abfp.nn.state.AnalogState` (``abfp.reseed(model, offset)``
  restarts it at ``stream_start(seed, offset)``);
- seeded :mod:`abfp.functional` calls: the process-wide :data:`FUNCTIONAL_STREAMS` with the same
  start rule (``abfp.reseed()`` without a model restarts them), so a sequence of functional
  calls draws what a converted model making the same products draws;
- :class:`abfp.noise.NoiseInjector`: its own streams, started at the injector's seed itself
  (:func:`injector_start`).
"""

from __future__ import annotations

import threading
from typing import Callable

import torch

from .config import ABFPConfig

__all__ = ["NoiseStreams", "FUNCTIONAL_STREAMS", "stream_start", "injector_start", "product_generator"]

_SEED_STRIDE = 1_000_003  # a prime: streams of neighbouring seeds and offsets do not overlap in start


def stream_start(seed: int, offset: int = 0) -> int:
    """Start value of a stream: ``(seed * 1_000_003 + offset) mod 2^63``."""
    return (int(seed) * _SEED_STRIDE + int(offset)) % (2**63)


def injector_start(seed: int, offset: int = 0) -> int:
    """Start value of a :class:`~abfp.noise.NoiseInjector` stream: the seed itself (``offset``
    is not used: an injector restarts from a new seed instead)."""
    return int(seed)


class NoiseStreams:
    """Generators keyed by ``(device, seed)``, each started at ``start(seed, offset)`` on first use.

    Thread-safe creation; :meth:`restart` forgets them all (the next draws repeat from the start).
    """

    def __init__(self, offset: int = 0, *, start: Callable[[int, int], int] = stream_start) -> None:
        self.offset = int(offset)
        self._start = start
        self._generators: dict[str, torch.Generator] = {}
        self._lock = threading.Lock()

    def get(self, seed: int, device: torch.device | str) -> torch.Generator:
        """The stream of ``seed`` on ``device`` (created, started, on first use). Refused
        (``RuntimeError``) inside a backward pass, where a forward runs when
        ``torch.utils.checkpoint`` recomputes it: the stream has moved on since that forward, so
        the recomputation would draw other noise than the forward did and the gradients would
        belong to another forward (torch's global generator, used without a seed, is restored by
        the checkpoint: the same noise)."""
        if torch._C._current_graph_task_id() != -1:
            raise RuntimeError(
                f"abfp: a seeded noise stream (seed={seed}) is drawn inside a backward pass, as a "
                "torch.utils.checkpoint recomputation does: the stream has moved on since the forward, so the "
                "recomputation would see other noise than the forward and the gradients would be another forward's; "
                "checkpoint with seed=None (noise from torch's global generator, which checkpoint restores: the same "
                "noise) or without noise")
        key = f"{device}:{seed}"
        g = self._generators.get(key)
        if g is None:
            with self._lock:
                g = self._generators.get(key)
                if g is None:
                    g = torch.Generator(device=device)
                    g.manual_seed(self._start(seed, self.offset))
                    self._generators[key] = g
        return g

    def restart(self, offset: int = 0) -> None:
        """Restart every stream at ``start(seed, offset)``."""
        with self._lock:
            self.offset = int(offset)
            self._generators.clear()

    def __getstate__(self) -> dict:
        """Pickled without its lock and generators: it loads as :meth:`fresh` streams."""
        return {"offset": self.offset, "start": self._start}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["offset"], start=state["start"])  # type: ignore[misc]

    def fresh(self) -> "NoiseStreams":
        """New streams with the same start rule and offset (none drawn yet): for a copied model."""
        return NoiseStreams(self.offset, start=self._start)


#: The streams of seeded :mod:`abfp.functional` calls made without a ``generator``.
FUNCTIONAL_STREAMS = NoiseStreams()


def product_generator(cfg: ABFPConfig, streams: NoiseStreams, device: torch.device | str,
                      generator: torch.Generator | None = None) -> torch.Generator | None:
    """The generator one product with ``cfg`` draws its noise from (see the module docstring);
    a seeded stream is refused inside a backward pass (:meth:`NoiseStreams.get`)."""
    if generator is not None:
        return generator
    seed = cfg.execution.seed
    if cfg.noise_std == 0 or seed is None:
        return None
    return streams.get(seed, device)
