#!/bin/sh
# Run a command against another torch release, in its own environment under /tmp (never .venv/, never CI):
#
#   tools/with-torch.sh 2.15.0 python3 -m pytest -q -m "not multiproc"
#   make test-torch TORCH=2.15.0 ARGS="-q tests/test_multirank.py"
#
# The environment /tmp/moe-ops-torch-VERSION is made on first use by tools/in-env.sh with torch==VERSION
# from the package registry, ignoring this machine's pip configuration (PIP_CONFIG_FILE=/dev/null): the
# registry's torch 2.14 / 2.15 is the multi-GB CUDA build, which runs on the CPU too.
set -eu
[ $# -ge 2 ] || { echo "usage: $0 TORCH_VERSION COMMAND..." >&2; exit 2; }
version=$1
shift
MOE_OPS_VENV="/tmp/moe-ops-torch-$version" MOE_OPS_TORCH="torch==$version" PIP_CONFIG_FILE=/dev/null \
    exec "$(dirname "$0")/in-env.sh" "$@"
