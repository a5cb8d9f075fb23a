#!/bin/sh
# One call on the GPU loaner: versions, the test suite (single-process first, then the multi-process
# part), the kernel profile and the benchmark. Usage: tools/gpu_session.sh OUTDIR [bench args...]
# Each stage has its own time limit so the whole stays inside one 10-minute call.
out=${1:?outdir}; shift
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
stage() { name=$1; limit=$2; shift 2; start=$(date +%s); timeout "$limit" "$@" > "$out/$name.log" 2>&1; rc=$?; echo "== $name: rc=$rc in $(( $(date +%s) - start )) s"; tail -n "${TAIL:-15}" "$out/$name.log"; }
TIMEOUT="-p timeout --timeout=150 -rf --tb=short"
stage tests-single 170 tools/in-env.sh python3 -m pytest -q -n 4 -m "not multiproc" -p no:cacheprovider $TIMEOUT --durations=8
TAIL=40 stage profile 25 python3 tools/profile_kernels.py
TAIL=70 stage bench 70 python3 tools/bench.py --out "$out/bench" "$@"
TAIL=60 stage tests-multiproc 140 tools/in-env.sh python3 -m pytest -v -s -m multiproc -p no:cacheprovider $TIMEOUT --durations=10 tests/test_collective.py::test_compiled_equals_eager tests/test_kernels.py tests/test_collective.py
