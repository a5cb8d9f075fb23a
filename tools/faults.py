"""The reliability table of docs/reliability.md: every backend that runs on CPU (the simulated ones through
their simulators), at every group size it takes from 1 to 4, over gloo:

1. bad metadata on one rank (``moe_ops.testing.faults.MUTATIONS``): every rank raises the same
   ``MoEInputError`` naming that rank, and the group still works afterwards;
2. a rank that dies before, inside (after the agreement) and between dispatch and combine: the survivors
   raise ``MoECommunicationError``; the slowest time to that error is reported;
3. hostile routing values (extreme, out-of-range, negative and repeated ids; NaN and infinite weights; a
   rank without tokens), int32 and int64 ids, value checks off (``tokens_per_expert + dropped`` counts the
   valid routes exactly) and on (the same clear error on every rank);
4. 20 reruns of dispatch + combine + backward, bitwise identical.

    tools/in-env.sh python3 tools/faults.py [--peer-timeout 5] [--runs 20] [--backends collective,symm]

Prints one Markdown row per backend and group size (cases tried / failures) and the failures found.

``--cuda-hostile`` instead runs case 3 on one GPU (W = 1: ``local`` with the Triton kernels and with
plain torch, ``collective`` on a one-rank NCCL group, ``symm`` on real symmetric memory), for
``compute-sanitizer --tool memcheck`` (``tools/gpu_session.sh``, stage ``sanitize``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch  # noqa: E402

from moe_ops.testing import conformance, faults  # noqa: E402
from moe_ops.testing.harness import World, interpreter_fault  # noqa: E402


def _bad_metadata(world: World, backend: str, layout: str, failures: list[str]) -> int:
    size, tried = world.world_size, 0
    p = faults.problem(backend, size, layout)
    for mutation in faults.MUTATIONS:
        if mutation in faults.DISAGREEMENTS and size == 1:
            continue
        tried += 1
        outcomes = world.outcomes(faults.bad_metadata_task, p, backend, size - 1, mutation, timeout=120)
        ok = all(o.error_type == "MoEInputError" for o in outcomes) and len({o.message for o in outcomes}) == 1
        if not ok or (size > 1 and f"rank {size - 1}" not in outcomes[0].message):
            failures.append(f"{backend} W={size} {layout} bad {mutation}: {[(o.error_type, o.message[:120]) for o in outcomes]}")
    try:
        conformance.check_world(world, p, backend)
    except Exception as e:  # noqa: BLE001 - reported
        failures.append(f"{backend} W={size} {layout}: the group did not work after the bad inputs: {e!r}"[:300])
    return tried


def _hostile(world: World, backend: str, layout: str, failures: list[str]) -> int:
    tried = 0
    for id_dtype in (torch.int32, torch.int64):
        p = faults.hostile_problem(backend, world.world_size, layout, id_dtype)
        tried += 2
        for rank, (counts, message) in enumerate(world.run(faults.hostile_task, p, backend, False)):
            if message or counts != faults.expected_counts(p, rank, backend == "mc2"):
                failures.append(f"{backend} W={world.world_size} {layout} hostile {id_dtype} rank {rank}: {counts} {message[:120]}")
        messages = [m for _, m in world.run(faults.hostile_task, p, backend, True)]
        if len(set(messages)) != 1 or not re.search("topk_idx holds id|topk_weights holds NaN", messages[0]):
            failures.append(f"{backend} W={world.world_size} {layout} hostile {id_dtype} checked: {messages}")
    return tried


def _reruns(world: World, backend: str, layout: str, runs: int, failures: list[str]) -> int:
    differ = world.run(faults.rerun_task, faults.problem(backend, world.world_size, layout), backend, runs)
    if any(differ):
        failures.append(f"{backend} W={world.world_size} {layout}: reruns differing from the first: {differ}")
    return runs


def _dead_ranks(backend: str, size: int, layout: str, env: dict[str, str], peer_timeout: float, failures: list[str]) -> tuple[int, float]:
    """Kill a rank at each point; ``(cases, slowest seconds to the survivors' error)``."""
    slowest, tried = 0.0, 0
    p = faults.problem(backend, size, layout)
    for when in ("before", "inside", "between"):
        tried += 1
        with World(size, pg_timeout=10 * peer_timeout, env=env) as world:
            world.run(faults.install, backend)
            world.run(faults.set_peer_timeout, peer_timeout)
            outcomes = world.outcomes(faults.die_task, p, backend, size - 1, when, timeout=30 * peer_timeout)
        survivors = outcomes[:-1]
        if not all(o.ok for o in survivors):
            failures.append(f"{backend} W={size} {layout} dies {when}: {[(o.error_type, o.message[:120]) for o in survivors]}")
            continue
        slowest = max(slowest, *(o.value for o in survivors))
    return tried, slowest


def cuda_hostile() -> int:
    """Hostile values through every CUDA path at W = 1; prints one line per case, returns the failures."""
    import torch.distributed as dist

    from moe_ops import config
    from moe_ops.testing.harness import free_port

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            device_id=torch.device("cuda", torch.cuda.current_device()))
    failed = 0
    for backend, kernels in (("local", "auto"), ("local", "torch"), ("collective", "auto"), ("symm", "auto")):
        config.kernels = kernels
        for layout in faults.SETUPS[backend].layouts:
            for id_dtype in (torch.int32, torch.int64):
                for tokens in (12, 1100):  # one launch; past SMALL_ROUTES routes, the four launches (PDL on sm_90+)
                    p = faults.hostile_problem(backend, 1, layout, id_dtype, tokens=[tokens])
                    counts, message = faults.hostile_task(0, p, backend, False, "cuda")
                    ok = not message and counts == faults.expected_counts(p, 0, False)
                    failed += not ok
                    print(f"{backend} kernels={kernels} {layout} {id_dtype} T={tokens}: {'ok' if ok else f'FAILED {counts} {message}'}",
                          flush=True)
    torch.cuda.synchronize()
    dist.destroy_process_group()
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-timeout", type=float, default=5.0, help="moe_ops.config.peer_timeout_s in the dead-rank cases")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--backends", default=",".join(faults.SETUPS))
    parser.add_argument("--cuda-hostile", action="store_true", help="hostile values on one GPU (for compute-sanitizer)")
    args = parser.parse_args(argv)
    if args.cuda_hostile:
        return 1 if cuda_hostile() else 0
    failures: list[str] = []
    print("| backend | W | bad metadata on one rank | a rank dies (slowest survivor error) | hostile values | reruns bitwise equal |")
    print("|---|---|---|---|---|---|")
    for backend in args.backends.split(","):
        setup = faults.SETUPS[backend]
        env = dict(setup.env)
        for size in setup.worlds:
            start = time.monotonic()
            counts = {"bad": 0, "hostile": 0, "runs": 0, "dead": 0}
            slowest = 0.0
            before = len(failures)
            with World(size, env=env) as world:
                if env and (fault := world.run(interpreter_fault)[0]):
                    print(f"| {backend} | {size} | skipped: {fault} | | | |")
                    continue
                world.run(faults.install, backend)
                for layout in setup.layouts:
                    counts["bad"] += _bad_metadata(world, backend, layout, failures)
                    counts["hostile"] += _hostile(world, backend, layout, failures)
                    counts["runs"] += _reruns(world, backend, layout, args.runs, failures)
            if size > 1:
                for layout in setup.layouts:
                    tried, seconds = _dead_ranks(backend, size, layout, env, args.peer_timeout, failures)
                    counts["dead"] += tried
                    slowest = max(slowest, seconds)
            failed = len(failures) - before
            dead = f"{counts['dead']} ({slowest:.1f} s)" if size > 1 else "n/a (one rank)"
            print(f"| {backend} | {size} | {counts['bad']} | {dead} | {counts['hostile']} | {counts['runs']} |"
                  f"{'' if not failed else f' **{failed} failed**'}", flush=True)
            print(f"<!-- {backend} W={size}: {time.monotonic() - start:.0f} s -->", flush=True)
    print(f"\n{len(failures)} failures" + "".join(f"\n- {f}" for f in failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
