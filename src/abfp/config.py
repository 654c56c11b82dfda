"""The device description: :class:`ABFPConfig`, validated, JSON round-trip, named presets;
and how the simulator runs it: :class:`ExecutionOptions` (``kernel``, noise ``seed``).

The two are kept apart: ``ABFPConfig.to_dict()`` is the device alone (what a chip is),
``to_dict(execution=True)`` adds ``"execution": {"kernel": ..., "seed": ...}``. A config
carries its execution options in ``ABFPConfig.execution``; ``config.kernel`` and
``config.seed`` read them. JSON written before the split (``kernel`` and ``seed`` beside the
device fields) still loads. Caches and checkpoints key on :func:`config_key`.

Notation (SPEC.md): ``L(b) = 2**(b-1) - 1`` is the largest code of a signed symmetric
b-bit converter; ``n`` the tile width; ``G`` the gain.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, Optional

from . import jsonio

Mode = Literal["abfp", "fixed"]
NoiseDist = Literal["uniform", "gaussian"]
ScaleDtype = Literal["bfloat16", "float32", "pow2"]
Kernel = Literal["auto", "reference", "chunked"]

#: The authors' reference noise: uniform, one ADC bin wide (+-0.5 LSB).
REFERENCE_NOISE_STD = 1.0 / math.sqrt(12.0)

_MAX_BITS = 24

#: The largest tile product ``n L(b_x) L(b_w)`` accepted: the integer dot product of a tile
#: is computed exactly (SPEC step 4) while it stays within 2**53 (a float64 GEMM, the
#: float64 reference). The fast path picks, per configuration (``abfp.numerics.adc.AdcPlan``):
#: int8 GEMMs with int32 sums (both DACs at most 8 bits, ``n L(b_x) L(b_w) < 2**31``,
#: ``kernel="auto"``), float32 GEMMs (``n L(b_x) L(b_w) <= 2**24``), else float64 GEMMs;
#: beyond 2**53 no exact path exists and the configuration is refused.
MAX_EXACT_TILE_PRODUCT = 1 << 53


def max_code(bits: int) -> int:
    """``L(b) = 2**(b-1) - 1``: the largest code of a signed symmetric b-bit converter."""
    return 2 ** (bits - 1) - 1


@dataclass(frozen=True)
class ExecutionOptions:
    """How the simulator runs a device (not a property of the device).

    Invalid values raise ``ValueError`` naming the field and its allowed range.
    """

    kernel: Kernel = "auto"
    """Implementation. ``"reference"`` follows SPEC line by line in float64; ``"chunked"`` is
    the fast path with float32 GEMMs on the codes; ``"auto"`` (default) is the fast path with
    int8 GEMMs on the codes (``torch._int_mm``, exact int32 sums) where the DACs have at most
    8 bits, the tiles are at least 32 wide and the GEMM is large enough to gain (on CPU; on
    x86 with AVX-512 VNNI several times faster than float32). Pick ``"chunked"`` on a CPU
    whose int8 GEMM is slow. Both fast paths run their element-wise work as compiled kernels
    (:mod:`abfp.numerics.fused`, numba) where numba is installed and the ADC arithmetic is
    float32 (uniform or no noise, no bfloat16 tile outputs), else as torch operations.

    The two fast paths give the same numbers as each other, noise included. The reference
    gives the same numbers without noise, and with uniform noise draws the same counter-based
    samples from the same generator state (outputs may still differ by one code where the
    float32 sum ``r + e`` rounds across an ADC boundary that float64 does not); with Gaussian
    noise it draws its own samples, so it agrees in distribution only (see the tests)."""

    seed: Optional[int] = None
    """Seed of the device noise: each model's (or the functional calls') noise stream starts at
    ``seed * 1_000_003 + offset`` (:mod:`abfp.noise_keys`). ``None``: draw from torch's global
    generator."""

    def __post_init__(self) -> None:
        if self.kernel not in ("auto", "reference", "chunked"):
            raise ValueError(f"ExecutionOptions.kernel={self.kernel!r} is invalid: must be 'auto', 'reference' or 'chunked'")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"ExecutionOptions.seed={self.seed!r} is invalid: must be None or a non-negative integer")

    def replace(self, **changes: Any) -> "ExecutionOptions":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: Any) -> "ExecutionOptions":
        if isinstance(d, ExecutionOptions):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"ExecutionOptions need a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(EXECUTION_FIELDS))
        if unknown:
            raise ValueError(f"unknown ExecutionOptions field(s) {unknown}; known: {list(EXECUTION_FIELDS)}")
        return cls(**d)


#: The fields of :class:`ExecutionOptions`, which configs written before the split kept at the top level.
EXECUTION_FIELDS = ("kernel", "seed")


@dataclass(frozen=True)
class ABFPConfig:
    """One analog device, as SPEC.md section 1 defines it.

    Every field documents the formula it controls. Invalid values raise ``ValueError``
    naming the field and its allowed range.
    """

    mode: Mode = "abfp"
    """``"abfp"``: per-block scales along the reduction axis, found from the data at run time
    (``sx[m,t] = max|X[m, tile t]|``). ``"fixed"``: one static scale per tensor (SPEC section 2)."""

    tile_width: int = 128
    """``n``: values per block along the reduction axis; the analog dot product of one tile,
    and the ADC full scale (``|u| <= n``). K is zero-padded to a multiple of ``n``.
    At most 2**20, and ``n L(b_x) L(b_w) <= 2**53`` (:data:`MAX_EXACT_TILE_PRODUCT`: the
    tile products are exact integers; larger configurations are refused)."""

    input_bits: int = 8
    """``b_x``: input DAC, codes ``qx = round(clamp(X/sx, -1, 1) * L(b_x))``. 2 to 24 bits,
    within the exactness limit of ``tile_width``."""

    weight_bits: int = 8
    """``b_w``: weight DAC, codes ``qw = round(clamp(W/sw, -1, 1) * L(b_w))``."""

    output_bits: int = 8
    """``b_y``: output ADC, ``qy = round(clamp(a, -1, 1) * L(b_y))``; one bin is ``n / L(b_y)``."""

    gain: float = 8.0
    """``G``: analog gain before the ADC, ``a = G * u / n + e / L(b_y)``. Outputs beyond ``n/G``
    saturate; each doubling gains one low bit and gives up one high bit."""

    noise_std: float = REFERENCE_NOISE_STD
    """Standard deviation of the device noise ``e``, in output LSBs, added after the gain and
    before the ADC. Uniform noise has width ``w = sqrt(12) * noise_std``. Default: one bin wide."""

    noise_dist: NoiseDist = "uniform"
    """Distribution of ``e``: ``"uniform"`` on ``[-w/2, w/2]`` or ``"gaussian"``."""

    scale_dtype: ScaleDtype = "bfloat16"
    """Format of the block scales: ``"bfloat16"`` (round to nearest, the authors' choice),
    ``"float32"`` (exact max) or ``"pow2"`` (rounded up to a power of two, ``2**ceil(log2 max)``)."""

    bf16_tile_outputs: bool = False
    """Round each tile's rescaled output ``y[m,j,t]`` to bfloat16 before the float32 sum
    (the authors' simulation did)."""

    bf16_io: bool = False
    """Keep layer inputs and outputs in bfloat16 (the authors' simulation did)."""

    recurrent_concat: bool = False
    """Recurrent layers (LSTM, GRU, RNN and their cells): ``False`` (default) computes each
    step's gates from two products, ``x_t W_ih^T`` and ``h_{t-1} W_hh^T``, each tiled along
    its own reduction axis (K = input size, K = hidden size). ``True`` computes them as one
    product over the concatenation, ``[x_t, h_{t-1}] [W_ih W_hh]^T`` (K = input + hidden
    size; a tile may hold both), as a crossbar holding ``[W_ih W_hh]`` would. GRU: only the
    reset and update gates concatenate; the candidate gate keeps its two products, since
    ``n = tanh(x W_in^T + b_in + r * (h W_hn^T + b_hn))`` scales the hidden part alone."""

    repeats: int = 1
    """``k``: each analog product is repeated ``k`` times and averaged (SPEC section 5): the
    device noise acts with standard deviation ``noise_std / sqrt(k)`` (the simulator draws one
    noise sample of that deviation), and energy accounting (:mod:`abfp.energy`) counts ``k``
    analog passes, ``k`` input DAC conversions and ``k`` ADC conversions. An integer >= 1."""

    execution: ExecutionOptions = ExecutionOptions()
    """How the simulator runs this device (:class:`ExecutionOptions`: ``kernel``, noise
    ``seed``); not part of the device description (:meth:`to_dict` leaves it out unless asked).
    ``ABFPConfig(kernel=..., seed=...)`` and ``replace(kernel=..., seed=...)`` set it too."""

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"ABFPConfig.{name}={getattr(self, name)!r} is invalid: {allowed}")

        if self.mode not in ("abfp", "fixed"):
            raise bad("mode", "must be 'abfp' or 'fixed'")
        for name in ("tile_width", "input_bits", "weight_bits", "output_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(name, "must be an integer")
        if not 1 <= self.tile_width <= 1 << 20:
            raise bad("tile_width", "must be an integer in [1, 1048576]")
        for name in ("input_bits", "weight_bits", "output_bits"):
            if not 2 <= getattr(self, name) <= _MAX_BITS:
                raise bad(name, f"must be an integer in [2, {_MAX_BITS}]")
        largest = self.tile_width * self.input_max_code * self.weight_max_code
        if largest > MAX_EXACT_TILE_PRODUCT:
            raise ValueError(
                f"ABFPConfig: tile_width * L(input_bits) * L(weight_bits) = {self.tile_width} * "
                f"{self.input_max_code} * {self.weight_max_code} = {largest} exceeds 2**53, the largest tile "
                f"product a float64 GEMM sums exactly; use fewer DAC bits or narrower tiles")
        for name in ("gain", "noise_std"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(name, "must be a finite number")
            object.__setattr__(self, name, float(v))
        if not self.gain > 0:
            raise bad("gain", "must be > 0")
        if self.noise_std < 0:
            raise bad("noise_std", "must be >= 0")
        if self.noise_dist not in ("uniform", "gaussian"):
            raise bad("noise_dist", "must be 'uniform' or 'gaussian'")
        if self.scale_dtype not in ("bfloat16", "float32", "pow2"):
            raise bad("scale_dtype", "must be 'bfloat16', 'float32' or 'pow2'")
        for name in ("bf16_tile_outputs", "bf16_io", "recurrent_concat"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            raise bad("repeats", "must be an integer >= 1")
        if not isinstance(self.execution, ExecutionOptions):
            raise bad("execution", "must be an ExecutionOptions")
        # the same device without the bfloat16 output rounding (a layer with a bias rounds after
        # adding it), made here, where the config is made: a tracer (torch.compile, strict
        # torch.export) that built it inside a traced forward would hand the custom operators a
        # config it cannot reconstruct (the operators got the default device's JSON)
        object.__setattr__(self, "_without_bf16_io", dataclasses.replace(self, bf16_io=False) if self.bf16_io else self)

    @property
    def without_bf16_io(self) -> "ABFPConfig":
        """This device without the bfloat16 rounding of layer outputs (``bf16_io=False``)."""
        twin = self.__dict__.get("_without_bf16_io")
        if twin is None:  # a config unpickled from an abfp that did not make the twin
            twin = dataclasses.replace(self, bf16_io=False) if self.bf16_io else self
            object.__setattr__(self, "_without_bf16_io", twin)
        return twin

    # ----------------------------------------------------------------- derived values
    @property
    def input_max_code(self) -> int:
        """``L(b_x)``."""
        return max_code(self.input_bits)

    @property
    def weight_max_code(self) -> int:
        """``L(b_w)``."""
        return max_code(self.weight_bits)

    @property
    def output_max_code(self) -> int:
        """``L(b_y)``."""
        return max_code(self.output_bits)

    @property
    def noisy(self) -> bool:
        return self.noise_std > 0

    @property
    def kernel(self) -> Kernel:
        """``execution.kernel`` (:attr:`ExecutionOptions.kernel`)."""
        return self.execution.kernel

    @property
    def seed(self) -> Optional[int]:
        """``execution.seed`` (:attr:`ExecutionOptions.seed`)."""
        return self.execution.seed

    def replace(self, **changes: Any) -> "ABFPConfig":
        """A copy with some fields changed (validated); ``kernel=`` and ``seed=`` change
        :attr:`execution`."""
        return dataclasses.replace(self, **changes)

    def with_execution(self, execution: ExecutionOptions | None) -> "ABFPConfig":
        """The same device run with ``execution`` (``None``: this config unchanged)."""
        if execution is None:
            return self
        if not isinstance(execution, ExecutionOptions):
            raise TypeError(f"execution must be an ExecutionOptions, got {type(execution).__name__}")
        return self if execution == self.execution else dataclasses.replace(self, execution=execution)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # configs pickled before the split carry ``kernel`` and ``seed`` among the fields
        state = dict(state)
        legacy = {k: state.pop(k) for k in EXECUTION_FIELDS if k in state}
        if "execution" not in state:
            state["execution"] = ExecutionOptions(**legacy)
        for k, v in state.items():
            object.__setattr__(self, k, v)

    # ----------------------------------------------------------------------- JSON
    def to_dict(self, *, execution: bool = False) -> dict[str, Any]:
        """The device fields; with ``execution=True`` also ``"execution": {"kernel", "seed"}``.

        Keys of caches and checkpoints use :func:`config_key` (device and execution)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "execution"}
        if execution:
            d["execution"] = self.execution.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ABFPConfig":
        """The config of :meth:`to_dict`'s JSON object. Older JSON with ``kernel`` and ``seed``
        beside the device fields loads too (those keys win over an ``"execution"`` object)."""
        if not isinstance(d, dict):
            raise ValueError(f"an ABFPConfig needs a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)} | set(EXECUTION_FIELDS)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ABFPConfig field(s) {unknown}; known: {sorted(known)}")
        d = dict(d)
        execution = ExecutionOptions.from_dict(d.pop("execution", {}))
        legacy = {k: d.pop(k) for k in EXECUTION_FIELDS if k in d}
        return cls(**d, execution=execution.replace(**legacy) if legacy else execution)

    def to_json(self, path: str | Path | None = None, *, indent: int | None = 2, execution: bool = False) -> str:
        """JSON of :meth:`to_dict` (the execution options too with ``execution=True``)."""
        return jsonio.dump(self.to_dict(execution=execution), path, indent=indent)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "ABFPConfig":
        """Parse a JSON string, or read a ``.json`` file when given a path that exists."""
        return cls.from_dict(jsonio.load(text_or_path, "an ABFPConfig"))

    @classmethod
    def preset(cls, name: str) -> "ABFPConfig":
        """A named preset (see :func:`presets`)."""
        table = presets()
        if name not in table:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(table))}")
        return table[name]

    def label(self) -> str:
        """A short human-readable description, e.g. ``abfp n=128 8/8/8 G=8 noise=0.289``."""
        bits = f"{self.weight_bits}/{self.input_bits}/{self.output_bits}"
        k = f" k={self.repeats}" if self.repeats > 1 else ""
        if self.mode == "fixed":
            return f"fixed n={self.tile_width} {bits} G={self.gain:g} noise={self.noise_std:.3g}{k}"
        return f"abfp n={self.tile_width} {bits} G={self.gain:g} noise={self.noise_std:.3g}{k}"


_dataclass_init = ABFPConfig.__init__


@functools.wraps(_dataclass_init)
def _init(self: ABFPConfig, *args: Any, **kwargs: Any) -> None:
    # ``kernel=`` and ``seed=`` (the fields before the split) set ``execution``; they win over it
    legacy = {k: kwargs.pop(k) for k in EXECUTION_FIELDS if k in kwargs}
    if legacy:
        execution = kwargs.get("execution", ExecutionOptions())
        if not isinstance(execution, ExecutionOptions):
            raise ValueError(f"ABFPConfig.execution={execution!r} is invalid: must be an ExecutionOptions")
        kwargs["execution"] = execution.replace(**legacy)
    _dataclass_init(self, *args, **kwargs)


ABFPConfig.__init__ = _init  # type: ignore[method-assign]


def config_key(config: ABFPConfig) -> dict[str, Any]:
    """Everything that decides a config's numbers, device and execution options, as one flat
    JSON-able dict: the same keys and values ``ABFPConfig.to_dict()`` gave before the split (the
    device fields, ``seed``, ``kernel``), so cache keys and checkpoint metadata written then
    still match, and two configs that differ in any field never share a key."""
    return {**config.to_dict(), **config.execution.to_dict()}


#: The gain the authors found best per tile width on their models (SPEC.md table).
_PRESET_GAIN = {8: 1.0, 32: 2.0, 128: 8.0}


def presets() -> dict[str, ABFPConfig]:
    """Named configurations.

    - ``default``: the authors' reference setting (8/8/8, n = 128, G = 8, noise one bin wide).
    - ``abfp-{888,668}-n{8,32,128}``: the authors' grid, bits as weights/inputs/ADC
      ("668": 6-bit weights and inputs, 8-bit ADC), gain at the value that served their
      models best for that tile width (n=8: 1, n=32: 2, n=128: 8).
    - ``fixed-888-n{8,32,128}``: the fixed-point baseline at the same bits, gain 1.
    - ``ideal``: 16-bit DACs, a 24-bit ADC, gain 1, no noise (tends to float32; a sanity check).
    """
    out: dict[str, ABFPConfig] = {"default": ABFPConfig()}
    for bits, (wb, ib, ob) in {"888": (8, 8, 8), "668": (6, 6, 8)}.items():
        for n, g in _PRESET_GAIN.items():
            out[f"abfp-{bits}-n{n}"] = ABFPConfig(
                tile_width=n, weight_bits=wb, input_bits=ib, output_bits=ob, gain=g
            )
    for n in _PRESET_GAIN:
        out[f"fixed-888-n{n}"] = ABFPConfig(mode="fixed", tile_width=n, gain=1.0)
    out["ideal"] = ABFPConfig(input_bits=16, weight_bits=16, output_bits=24, gain=1.0, noise_std=0.0, scale_dtype="float32")
    return out
