#!/bin/sh
# Run a command inside the project's Python environment, creating it on first use.
#
#   tools/in-env.sh python3 -m pytest
#
# * A machine whose python3 already has a CUDA build of torch 2.11-2.15 (the GPU loaner) reuses it:
#   nothing is installed, moe_ops runs from this checkout through PYTHONPATH (the upstream-framework
#   tests skip there unless megatron-core / nemo-automodel / torchtitan are installed).
# * Anywhere else a virtual environment .venv/ is made with the CPU build of torch 2.13.0 (pinned:
#   an open range would pull a multi-GB CUDA build), this package installed editable with its test and
#   hf extras, and the frameworks the adapters are tested against: megatron-core 0.19.2,
#   nemo-automodel 0.7.0 and torchtitan 0.3.0 without their dependencies (those pull CUDA stacks or a data
#   stack; their imports need only what the extras bring). megatron-core ships a cp311 wheel that declares Python >= 3.12, hence
#   --ignore-requires-python (so it cannot be an extra).
#
# MOE_OPS_VENV and MOE_OPS_TORCH (a pip requirement) choose another environment and torch: that is how
# tools/with-torch.sh runs the suite on another torch version. Such an environment never reuses the
# machine's torch.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
venv="${MOE_OPS_VENV:-$root/.venv}"
torch_req="${MOE_OPS_TORCH:-torch==2.13.0}"
upstream="megatron-core==0.19.2 nemo-automodel==0.7.0 torchtitan==0.3.0"

has_cuda_torch() {
    [ -z "${MOE_OPS_TORCH:-}" ] || return 1
    python3 - <<'PY' 2>/dev/null
import sys, torch
major, minor = (int(p) for p in torch.__version__.split(".")[:2])
sys.exit(0 if torch.version.cuda and (2, 11) <= (major, minor) <= (2, 15) else 1)
PY
}

# The environment is complete when everything the two steps below install imports.
complete() {
    "$venv/bin/python3" -c "import moe_ops, torch, pytest, hypothesis, transformers, accelerate, megatron.core, nemo_automodel, torchtitan.models.qwen3" 2>/dev/null
}

if [ -x "$venv/bin/python3" ] && complete; then
    PATH="$venv/bin:$PATH"
elif has_cuda_torch; then
    echo "in-env: reusing this machine's CUDA torch ($(python3 -c 'import torch; print(torch.__version__)'))" >&2
    PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONPATH
else
    echo "in-env: creating $venv ($torch_req + moe-ops[test,hf] + $upstream)" >&2
    pip="$venv/bin/python3 -m pip install --quiet --disable-pip-version-check"
    python3 -m venv "$venv"
    $pip "$torch_req"
    $pip -e "$root[test,hf]"
    # shellcheck disable=SC2086  # several requirements
    $pip --no-deps --ignore-requires-python $upstream
    PATH="$venv/bin:$PATH"
fi
export PATH
exec "$@"
