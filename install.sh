#!/usr/bin/env bash
# Install diffsample (editable) and its test/runtime dependencies on a fresh machine.
# Keeps any installed torch >= 2.4 (e.g. a CUDA build on a GPU machine); otherwise installs
# torch 2.13.0, as the CPU build where no NVIDIA GPU is present, so pip never pulls gigabytes of
# CUDA wheels onto a CPU-only machine.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

if $PY -c 'import sys, torch; v = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(0 if v >= (2, 4) else 1)' 2>/dev/null; then
    echo "install.sh: keeping installed torch $($PY -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1; then
    $PY -m pip install "torch>=2.4"
elif curl -s -o /dev/null --max-time 5 https://download.pytorch.org/whl/cpu/torch/; then
    $PY -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
else
    # Package mirrors here serve the CPU build for torch==2.13.0.
    $PY -m pip install torch==2.13.0
fi
$PY -m pip install -e ".[test]"
