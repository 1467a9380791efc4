#!/usr/bin/env bash
# Install diffsample (editable) and its test dependencies on a fresh machine.
#
# torch: an installed torch >= 2.4 is kept (e.g. a CUDA build on a GPU machine). Otherwise torch is
# installed from the package index pip is configured with -- pip reads PIP_INDEX_URL and
# PIP_EXTRA_INDEX_URL (and pip.conf); this script names no index itself (README, "Set-up"):
#   * with an NVIDIA GPU (nvidia-smi present): torch >= 2.4, whatever build the index gives;
#   * without one: torch 2.13.0 (DIFFSAMPLE_TORCH overrides the requirement), only as a CPU build.
#     pip first resolves it without installing (pip install --dry-run --report); if the index would
#     bring CUDA libraries (nvidia-* wheels, gigabytes a CPU machine cannot use), the script stops
#     and asks for PIP_INDEX_URL / PIP_EXTRA_INDEX_URL pointing at an index with CPU torch wheels.
# Then: pip install -e ".[test]". PYTHON selects the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
TORCH=${DIFFSAMPLE_TORCH:-torch==2.13.0}

has_torch() {
    $PY -c 'import sys, torch; v = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(0 if v >= (2, 4) else 1)' 2>/dev/null
}

# Exit status 0 when pip's resolution of $TORCH (a --report JSON on stdin) holds no CUDA libraries.
cpu_only() {
    $PY -c '
import json, sys
plan = json.load(sys.stdin).get("install", [])
cuda = [i["metadata"]["name"] + " " + i["metadata"]["version"] for i in plan
        if i["metadata"]["name"].lower().startswith("nvidia-") or "+cu" in i["metadata"]["version"]]
if cuda:
    print("install.sh: the configured index resolves torch to a CUDA build (" + ", ".join(cuda[:3])
          + (", ..." if len(cuda) > 3 else "") + ")", file=sys.stderr)
sys.exit(1 if cuda else 0)'
}

if has_torch; then
    echo "install.sh: keeping installed torch $($PY -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1; then
    $PY -m pip install "torch>=2.4"
elif plan=$($PY -m pip install --dry-run --quiet --ignore-installed --report - "$TORCH" 2>/dev/null); then
    if ! printf '%s' "$plan" | cpu_only; then
        echo "install.sh: this machine has no NVIDIA GPU; set PIP_INDEX_URL (or PIP_EXTRA_INDEX_URL) to a" \
             "package index that serves CPU-only torch wheels and run install.sh again (README, \"Set-up\")." >&2
        exit 1
    fi
    $PY -m pip install "$TORCH"
else
    # pip older than 22.2 has no --dry-run --report: install, then say which build arrived.
    $PY -m pip install "$TORCH"
    if [ "$($PY -c 'import torch; print(torch.version.cuda is not None)')" = "True" ]; then
        echo "install.sh: warning: installed a CUDA build of torch on a machine without an NVIDIA GPU;" \
             "PIP_INDEX_URL pointing at a CPU torch index gives the smaller CPU build (README, \"Set-up\")." >&2
    fi
fi
$PY -m pip install -e ".[test]"
