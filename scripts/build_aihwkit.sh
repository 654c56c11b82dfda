#!/usr/bin/env bash
# Build IBM aihwkit 1.2.0 (CPU only) from source against torch 2.13.0 in its own venv, for the
# side-by-side in benchmarks/bench_aihwkit.py. aihwkit is a peer tool, not an abfp dependency.
#
#   bash scripts/build_aihwkit.sh [VENV]          (or VENV=/path bash scripts/build_aihwkit.sh)
#
# VENV       the virtual environment to create or reuse (default: $HOME/venv-aihwkit)
# BUILD_DIR  where the sdist is unpacked and the wheel is written (default: $VENV/../aihwkit-build)
# PYTHON     interpreter used to create the venv (default: python3.11)
# JOBS       parallel compile jobs (default: 1; the C++ build takes a few minutes on one core)
#
# Idempotent: when `import aihwkit` already works in VENV the build is skipped, and an existing
# wheel in BUILD_DIR/wheels is reused. Afterwards run, for example:
#   OMP_NUM_THREADS=2 $VENV/bin/python benchmarks/bench_aihwkit.py --threads 2
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd -P)

VENV=${1:-${VENV:-$HOME/venv-aihwkit}}
VENV=$(realpath -m "$VENV")
BUILD_DIR=$(realpath -m "${BUILD_DIR:-$(dirname "$VENV")/aihwkit-build}")
PYTHON=${PYTHON:-python3.11}
JOBS=${JOBS:-1}
AIHWKIT_VERSION=1.2.0
TORCH_VERSION=2.13.0

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating venv $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q)

# Always pin torch: an unpinned torch pulls a multi-GB CUDA build.
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  echo "== installing torch==$TORCH_VERSION"
  "${PIP[@]}" "torch==$TORCH_VERSION"
fi

if "$PY" -c "import aihwkit" 2>/dev/null; then
  echo "== aihwkit $("$PY" -c 'import aihwkit; print(aihwkit.__version__)') already importable in $VENV: build skipped"
else
  # C++ dependency: OpenBLAS (CBLAS headers).
  if [ ! -f /usr/include/x86_64-linux-gnu/cblas.h ] && [ ! -f /usr/include/cblas.h ] \
     && ! ls /usr/include/*/cblas*.h >/dev/null 2>&1; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      echo "== apt-get install libopenblas-dev"
      apt-get install -y -qq libopenblas-dev >/dev/null \
        || { apt-get update -qq && apt-get install -y -qq libopenblas-dev >/dev/null; }
    else
      echo "error: OpenBLAS headers missing; run 'apt-get install -y libopenblas-dev' as root" >&2
      exit 1
    fi
  fi

  echo "== build requirements (no build isolation: the build must see torch $TORCH_VERSION)"
  "${PIP[@]}" "scikit-build>=0.18.1" "pybind11>=3.0.1" "cmake>=4.2.1" ninja mypy \
    "setuptools>=77" wheel numpy

  mkdir -p "$BUILD_DIR/wheels"
  WHEEL=$(ls "$BUILD_DIR"/wheels/aihwkit-"$AIHWKIT_VERSION"-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$WHEEL" ]; then
    SDIST="$BUILD_DIR/aihwkit-$AIHWKIT_VERSION.tar.gz"
    if [ ! -f "$SDIST" ]; then
      echo "== downloading the aihwkit $AIHWKIT_VERSION sdist (PyPI has no wheel for it)"
      "$PY" -m pip download -q --no-deps --no-build-isolation --no-binary :all: \
        "aihwkit==$AIHWKIT_VERSION" -d "$BUILD_DIR"
    fi
    echo "== building the aihwkit wheel with $JOBS job(s) (several minutes; log: $BUILD_DIR/build.log)"
    start=$(date +%s)
    # The venv's bin first on PATH: cmake, ninja and the python that finds torch come from it.
    if ! env PATH="$VENV/bin:$PATH" MAKEFLAGS="-j$JOBS" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
        USE_CUDA=OFF nice -n 10 "$PY" -m pip wheel -v --no-build-isolation --no-deps \
        "$SDIST" -w "$BUILD_DIR/wheels" >"$BUILD_DIR/build.log" 2>&1; then
      tail -n 40 "$BUILD_DIR/build.log" >&2
      echo "error: aihwkit build failed; full log in $BUILD_DIR/build.log" >&2
      exit 1
    fi
    echo "== built in $(( $(date +%s) - start )) s"
    WHEEL=$(ls "$BUILD_DIR"/wheels/aihwkit-"$AIHWKIT_VERSION"-*.whl | head -n1)
  fi
  echo "== installing $WHEEL"
  # --no-deps: aihwkit declares torchvision, which would replace the CPU torch with a CUDA build.
  # What `import aihwkit.nn` and the inference tiles need is installed by hand below.
  "${PIP[@]}" --no-deps "$WHEEL"
fi
# aihwkit's runtime needs for aihwkit.nn and the inference tiles. Its declared torchvision and
# scikit-learn (used only by its experiments / cloud / fusion-converter modules) are left out on
# purpose, so pip reports them as missing dependencies of aihwkit: expected.
if ! "$PY" -c "import numpy, scipy, requests, google.protobuf, tqdm" 2>/dev/null; then
  "${PIP[@]}" numpy scipy "requests>=2.25,<3" "protobuf>=4.21.6" tqdm
fi

# abfp itself, editable and without deps (its torch requirement is already met by the pinned
# CPU build), plus what `import abfp` needs.
if ! "$PY" -c "import sys, abfp, numba; sys.exit(0 if abfp.__file__.startswith('$REPO/') else 1)" 2>/dev/null; then
  echo "== abfp (editable, no deps) and what 'import abfp' needs"
  "${PIP[@]}" numpy "safetensors>=0.4" "tqdm>=4.60" "matplotlib>=3.6" "numba>=0.60"
  "${PIP[@]}" --no-deps -e "$REPO"
fi

"$PY" - <<'EOF'
import torch, aihwkit, abfp
from aihwkit.nn import AnalogLinear  # noqa: F401  (loads the C++ extension)
print(f"ok: torch {torch.__version__}, aihwkit {aihwkit.__version__}, abfp {abfp.__version__ if hasattr(abfp, '__version__') else '?'}")
EOF
