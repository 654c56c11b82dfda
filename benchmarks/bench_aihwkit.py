"""One linear layer, side by side: float32, abfp and IBM aihwkit 1.2.0 (CPU, inference).

Every case is timed interleaved in the same loop (fp32, abfp, abfp, aihwkit, aihwkit, fp32,
...) so that machine noise hits all of them alike; the figure that matters is the median of
the per-round ratio to float32. All models run in eval mode under ``torch.no_grad()``. Usage:

    OMP_NUM_THREADS=2 python benchmarks/bench_aihwkit.py [--shapes 256x512x512,...]
        [--threads 2] [--repeats 20] [--json out.json]

aihwkit is not an abfp dependency and PyPI has it as source only: ``scripts/build_aihwkit.sh``
builds it (CPU, against torch 2.13.0) in its own venv; run this script with that venv's python.
Without aihwkit the float32 and abfp rows are still printed.

Cases (``M x K x N``: batch M, in_features K, out_features N; weights and bias of a default
``nn.Linear``, input ``randn(M, K)``):

* ``float32``: ``torch.nn.Linear``, the baseline of every ratio.
* ``abfp noise off`` / ``abfp noise 1 LSB``: ``abfp.convert(linear, ABFPConfig(...))`` with
  8-bit input and weight DACs and an 8-bit ADC, tile width 128, gain 8; device noise off, or
  uniform noise of standard deviation one output LSB, drawn anew on every call.
* ``aihwkit InferenceRPUConfig``: ``aihwkit.nn.AnalogLinear.from_digital(linear,
  InferenceRPUConfig())``, the ``InferenceTile`` whose analog MVM runs in aihwkit's C++
  (RPUCuda, CPU build) simulator. What the defaults simulate in an eval-mode forward pass
  (read from the 1.2.0 source, ``simulator/parameters/io.py`` and ``configs/configs.py``):
  per input vector, noise management ``ABS_MAX`` (the input is divided by its absolute
  maximum); an input DAC with ``inp_res = 1/126`` over ``inp_bound = 1`` (about 7 bits,
  signed); additive Gaussian output noise ``out_noise = 0.06`` (in normalised output units,
  fresh on every MVM); an output ADC with ``out_res = 1/510`` over ``out_bound = 12`` (about 9
  bits); ``ITERATIVE`` bound management (the MVM is repeated with a smaller input when an
  output saturates). Weight noise, IR drop, output non-linearity and the other
  non-idealities are off by default. The bias is digital (``digital_bias = True``) and the
  weights are not rescaled (``weight_scaling_omega = 0``). Layers over 512 inputs or outputs
  are split over several 512 x 512 tiles (``TileModuleArray``). The default ``noise_model``
  (``PCMLikeNoiseModel``: PCM programming noise, drift and read noise) and drift compensation
  change the weights only when ``program_analog_weights()`` / ``drift_analog_weights()`` is
  called, which this benchmark does not do; in eval mode the output is multiplied by the
  drift-compensation factor, 1 until then. So this row times the default analog forward
  pass (quantisation, output noise, noise and bound management), not the PCM weight noise.
* ``aihwkit TorchInferenceRPUConfig``: the same defaults (it subclasses
  ``InferenceRPUConfig``) on the ``TorchInferenceTile``, whose MVM is written in plain torch
  (``simulator/tiles/analog_mvm.py``) rather than the C++ library. It supports one-pass MVMs
  with the default noise/bound management, DAC/ADC quantisation and output noise, and raises
  ``ConfigError`` for non-idealities it does not implement (weight noise, IR drop, S-shaped
  non-linearity, slope calibration, voltage offsets, ...). aihwkit 1.2.0 also has
  ``QuantizedTorchInferenceRPUConfig`` and ``TorchInferenceRPUConfigIRDropT`` (torch tiles with
  digital periphery quantisation and time-dependent IR drop); they are not timed here.

``rel err`` is ``||y - y_fp32|| / ||y_fp32||`` of one call (one noise draw): context for what
each row computes, not an accuracy benchmark. The aihwkit rows use the configs exactly as
constructed: the weights of a default ``nn.Linear`` are small (``|w| <= 1/sqrt(K)``) and are
not rescaled, so the default output noise of 0.06 is large next to the signal (checked once
for 256x512x512: rel err about 0.35 with the defaults, 0.08 with ``forward.out_noise = 0``,
0.04 with ``mapping.weight_scaling_omega = 1``). The C++ tile parallelises only inside OpenBLAS,
which reads ``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS`` when it is loaded: this script sets
them to ``--threads`` unless they are already set, and warns when ``OMP_NUM_THREADS``
disagrees.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

from timing import time_interleaved  # benchmarks/timing.py

DEFAULT_SHAPES = [(256, 512, 512)]


def parse_shapes(text: str | None) -> list[tuple[int, int, int]]:
    if not text:
        return list(DEFAULT_SHAPES)
    shapes = []
    for s in text.split(","):
        parts = s.strip().lower().split("x")
        if len(parts) != 3:
            raise SystemExit(f"bad shape {s!r}: expected MxKxN, e.g. 256x512x512")
        shapes.append(tuple(int(v) for v in parts))
    return shapes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help="comma-separated MxKxN (batch x in x out); default 256x512x512")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args()
    shapes = parse_shapes(args.shapes)

    # Before torch / aihwkit (and so OpenBLAS) are loaded: they read these once, at load time.
    omp_env = os.environ.get("OMP_NUM_THREADS")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))

    import torch
    from torch import nn

    import abfp

    torch.set_num_threads(args.threads)
    try:
        import aihwkit
        from aihwkit.nn import AnalogLinear
        from aihwkit.simulator import configs as aihwkit_configs
    except Exception as exc:  # not built here (ImportError), or a broken build
        aihwkit = None
        print(f"aihwkit not importable ({type(exc).__name__}: {exc}); build it with "
              f"'bash scripts/build_aihwkit.sh VENV' and run this script with VENV/bin/python")

    aih_cases: dict[str, Callable[[], object]] = {}
    if aihwkit is not None:
        aih_cases["aihwkit InferenceRPUConfig"] = aihwkit_configs.InferenceRPUConfig
        torch_cfg = getattr(aihwkit_configs, "TorchInferenceRPUConfig", None)
        if torch_cfg is None:
            print(f"aihwkit {aihwkit.__version__} has no TorchInferenceRPUConfig: pure-torch tile not timed")
        else:
            aih_cases["aihwkit TorchInferenceRPUConfig"] = torch_cfg

    print(f"torch {torch.__version__}, abfp {abfp.__version__}, "
          f"aihwkit {aihwkit.__version__ if aihwkit is not None else 'not installed'}, python {platform.python_version()}")
    print(f"threads: --threads {args.threads}, torch.get_num_threads() {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS {os.environ['OMP_NUM_THREADS']}, OPENBLAS_NUM_THREADS {os.environ['OPENBLAS_NUM_THREADS']}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible; repeats {args.repeats}")
    if omp_env is not None and omp_env != str(args.threads):
        print(f"warning: OMP_NUM_THREADS={omp_env} differs from --threads {args.threads}", file=sys.stderr)

    abfp_cases = {
        "abfp noise off": abfp.ABFPConfig(input_bits=8, weight_bits=8, output_bits=8, tile_width=128,
                                          gain=8.0, noise_std=0.0),
        "abfp noise 1 LSB": abfp.ABFPConfig(input_bits=8, weight_bits=8, output_bits=8, tile_width=128,
                                            gain=8.0, noise_std=1.0),
    }

    print(f"{'case':<32} {'M x K x N':<16} {'median ms':>10} {'x fp32':>7} {'rel err':>9}  notes")
    rows = []
    for (m, k, n) in shapes:
        torch.manual_seed(0)
        lin = nn.Linear(k, n).eval()
        x = torch.randn(m, k)
        models: dict[str, nn.Module] = {"float32": lin}
        notes: dict[str, str] = {"float32": "baseline"}
        for name, cfg in abfp_cases.items():
            models[name] = abfp.convert(lin, cfg).eval()
            notes[name] = "8/8/8 bits, n=128, G=8"
        for name, cfg_cls in aih_cases.items():
            try:
                layer = AnalogLinear.from_digital(lin, cfg_cls()).eval()
                with torch.no_grad():
                    layer(x)  # fail here, not in the timing loop, if the config is unsupported
            except Exception as exc:
                print(f"{name:<32} {f'{m}x{k}x{n}':<16} unavailable: {type(exc).__name__}: {exc}")
                continue
            models[name] = layer
            tiles = len(list(layer.analog_tiles()))
            notes[name] = f"{tiles} tile{'s' if tiles != 1 else ''}, {type(next(layer.analog_tiles())).__name__}"

        names = list(models)
        with torch.no_grad():
            y_fp = lin(x)
            errs = {nm: float((models[nm](x) - y_fp).norm() / y_fp.norm()) for nm in names}
            times = time_interleaved([(lambda mod=models[nm]: mod(x)) for nm in names], args.repeats)
        t_fp = times[0]
        for nm, t in zip(names, times):
            ratio = statistics.median(b / a for a, b in zip(t_fp, t))
            row = dict(case=nm, m=m, k=k, n=n, median_ms=1e3 * statistics.median(t), ratio_to_fp32=ratio,
                       rel_err=errs[nm], notes=notes[nm], threads=args.threads, repeats=args.repeats,
                       torch=torch.__version__, aihwkit=getattr(aihwkit, "__version__", None))
            rows.append(row)
            print(f"{nm:<32} {f'{m}x{k}x{n}':<16} {row['median_ms']:>10.2f} {ratio:>7.2f} {errs[nm]:>9.2e}  {notes[nm]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
