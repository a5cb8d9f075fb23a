#!/bin/sh
# One call on the GPU loaner: versions, the CUDA tests, the transformers CUDA-graph test (with wheels
# carried in .gpu-wheels/ when the loaner's transformers predates the EP interface), the kernel profile,
# the benchmark, then the CPU part of the suite on the loaner's torch.
#
#   tools/gpu_session.sh OUTDIR [bench args...]
#
# STAGES (default "cuda hf profile bench multi cpu multiproc") picks stages ("torchtitan": the training step of
# tools/bench_torchtitan.py, with torchtitan 0.3.0 and what its imports need carried in .gpu-torchtitan/, made here by
#   pip install --no-deps --target .gpu-torchtitan torchtitan==0.3.0 tyro spmd_types==0.2.3 docstring-parser \
#       typeguard shtab rich markdown-it-py mdurl pygments
# and passed with carry; "sanitize": the hostile-values
# run under compute-sanitizer's memcheck, tools/faults.py --cuda-hostile; memory errors only: NCCL's
# start-up probes kernel images for other GPUs and fails CUDA API calls on purpose); each has its own time limit (env
# CUDA_LIMIT, MULTI_LIMIT, CPU_LIMIT, MULTIPROC_LIMIT; TEST_TIMEOUT per test) so the
# whole stays inside one 10-minute call. Logs land in OUTDIR/<stage>.log. "multi" runs
# tools/bench_multi_gpu.py on every GPU of the machine (one GPU: W = 1, a smoke test).
out=${1:?outdir}; shift
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, triton, sys; print('torch', torch.__version__, 'triton', triton.__version__, 'python', sys.version.split()[0])"
stage() { name=$1; limit=$2; shift 2; start=$(date +%s); timeout -k 5 "$limit" "$@" > "$out/$name.log" 2>&1; rc=$?; echo "== $name: rc=$rc in $(( $(date +%s) - start )) s"; tail -n "${TAIL:-25}" "$out/$name.log"; }
wants() { case " ${STAGES:-cuda hf profile bench multi cpu multiproc} " in *" $1 "*) return 0;; esac; return 1; }
PYTEST="tools/in-env.sh python3 -m pytest -p no:cacheprovider -p timeout --timeout=${TEST_TIMEOUT:-120} -rfE --tb=short -v"
# -v with xdist names each result as it comes (passes filtered out), so a stage cut short still says
# what failed (grep --line-buffered: a killed stage keeps its lines); pytest-timeout names a test that hangs.
pytest_stage() { name=$1; limit=$2; workers=$3; marks=$4; shift 4; stage "$name" "$limit" sh -c "$PYTEST -n $workers -m '$marks' --durations=8 $* | grep --line-buffered -v 'PASSED\|PytestBenchmarkWarning\|warner('"; }

# The one-rank NCCL group of tests/test_symm_gpu.py runs in a process of its own, before the others.
wants cuda && pytest_stage tests-symm-gpu 120 0 "cuda" tests/test_symm_gpu.py
wants cuda && pytest_stage tests-cuda "${CUDA_LIMIT:-200}" 4 "cuda and not multiproc" --ignore=tests/test_symm_gpu.py
if wants hf; then
    if [ -d .gpu-wheels ]; then
        python3 -m pip install -q --no-deps --target /tmp/hf-site .gpu-wheels/*.whl > "$out/hf-install.log" 2>&1
        hf_path=/tmp/hf-site
    fi
    TAIL=15 stage tests-hf-cuda 150 env PYTHONPATH="${hf_path:-}" $PYTEST -v -k cuda_graph tests/test_transformers.py
fi
wants sanitize && TAIL=30 stage sanitize "${SANITIZE_LIMIT:-300}" compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 1 \
    --target-processes all python3 tools/faults.py --cuda-hostile
wants profile && TAIL=40 stage profile 30 python3 tools/profile_kernels.py
wants bench && TAIL=70 stage bench 120 python3 tools/bench.py --out "$out/bench" "$@"
wants torchtitan && TAIL=12 stage torchtitan "${TORCHTITAN_LIMIT:-360}" env PYTHONPATH=.gpu-torchtitan:. python3 tools/bench_torchtitan.py --out "$out/torchtitan.json"
wants multi && TAIL=40 stage multi-gpu "${MULTI_LIMIT:-150}" python3 tools/bench_multi_gpu.py --out "$out/multi"
wants cpu && pytest_stage tests-cpu "${CPU_LIMIT:-150}" 8 "not cuda and not multiproc"
wants multiproc && pytest_stage tests-multiproc "${MULTIPROC_LIMIT:-200}" 12 "multiproc and not cuda"
true
