#!/bin/sh
# Run a command inside the project's Python environment, creating it on first use.
#
#   tools/in-env.sh python3 -m pytest
#
# * A machine whose python3 already has a CUDA build of torch 2.11-2.13 (the GPU loaner) reuses it:
#   nothing is installed, moe_ops runs from this checkout through PYTHONPATH.
# * Anywhere else a virtual environment .venv/ is made with the CPU build of torch 2.13.0 (pinned:
#   an open range would pull a multi-GB CUDA build) and this package installed editable with its
#   test and hf extras.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv"

has_cuda_torch() {
    python3 - <<'PY' 2>/dev/null
import sys, torch
major, minor = (int(p) for p in torch.__version__.split(".")[:2])
sys.exit(0 if torch.version.cuda and (2, 11) <= (major, minor) <= (2, 13) else 1)
PY
}

if [ -x "$venv/bin/python3" ] && "$venv/bin/python3" -c "import moe_ops, torch, pytest, hypothesis, transformers, accelerate" 2>/dev/null; then
    PATH="$venv/bin:$PATH"
elif has_cuda_torch; then
    echo "in-env: reusing this machine's CUDA torch ($(python3 -c 'import torch; print(torch.__version__)'))" >&2
    PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONPATH
else
    echo "in-env: creating $venv (torch 2.13.0 CPU build + moe-ops[test,hf])" >&2
    python3 -m venv "$venv"
    "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
    "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check -e "$root[test,hf]"
    PATH="$venv/bin:$PATH"
fi
export PATH
exec "$@"
