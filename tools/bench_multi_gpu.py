"""The multi-rank CUDA backends on every GPU of one machine (issue 7): conformance, then the benchmark.

    python3 tools/bench_multi_gpu.py --out DIR [--world W] [--skip-checks]

One process per GPU (``--world``, default all of them) over NCCL, with ``NCCL_NVLS_ENABLE=0`` and
``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` (NVLink multicast stays off).

1. Conformance of ``collective``, ``allgather`` and ``symm`` against moe_ops.reference: ragged and
   padded (allgather: padded), forward and backward, eager and compiled (``fullgraph=True``), uneven
   token counts across ranks; and a padded decode step captured in a CUDA graph and replayed with new
   inputs, against the same step run eagerly.
2. Benchmark, side by side: per-rank algorithm bandwidth (bytes of ``recv_x`` / time, DeepEP's
   definition) of dispatch and combine at T = 4096, H = 7168, E = 256, K = 8, bf16, and the latency of
   each op at T = 128 (padded, replayed from CUDA graphs), for ``symm``, ``collective`` (NCCL
   all-to-all-v), ``allgather`` and, as a transport-only baseline, ``torch.ops.symm_mem.all_to_all_vdev_2d``
   (rows pre-sorted by destination; no routing or permute is timed for it). Times: CUDA events,
   median of the iterations, the slowest rank.

Writes ``multi_gpu.json``, ``multi_gpu.md`` (the tables for docs/benchmarks.md) and ``multi_gpu.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench import graphed  # noqa: E402  (tools/ is this script's folder)

import moe_ops  # noqa: E402
from moe_ops.testing import conformance  # noqa: E402
from moe_ops.testing.harness import free_port  # noqa: E402
from moe_ops.testing.problems import make_problem  # noqa: E402

BANDWIDTH = (4096, 7168, 256, 8)
DECODE = (128, 7168, 256, 8)
BACKENDS = {"symm": ("ragged", "padded"), "collective": ("ragged", "padded"), "allgather": ("padded",)}
ITERS, WARMUP = 20, 5


def _attempt(fn: Callable[[], object]) -> object:
    """``fn()``, or the error it raised as a string (one failing case does not stop the run)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - recorded in the report
        return f"FAILED: {type(e).__name__}: {e}".splitlines()[0][:300] + "\n" + traceback.format_exc(limit=-3)


# --- 1. conformance -----------------------------------------------------------------------------


def _problem(world: int, layout: str, seed: int):  # type: ignore[no-untyped-def]
    tokens = [40 + 7 * r for r in range(world)]
    tokens[-1] = 0 if world > 2 else tokens[-1]  # a rank with no tokens
    kw = dict(layout="padded", max_tokens_per_rank=64, capacity=12) if layout == "padded" else {}
    return make_problem(tokens, 256, 8 * world, 4, mask_fraction=0.1, dtype=torch.bfloat16, seed=seed, **kw)


def _check(rank: int, world: int, group: str, backend: str, layout: str, compiled: bool) -> str:
    problem = _problem(world, layout, seed=11)
    step = conformance.pipeline(problem, rank, group=group, backend=backend)
    if compiled:
        torch._dynamo.reset()
        step = torch.compile(step, fullgraph=True, dynamic=True)
    ours = conformance.run_rank(problem, rank, group=group, backend=backend, device="cuda", step=step)
    ref, mag = conformance.expected(problem)
    conformance.assert_rank_matches(problem, rank, ours, ref[rank], mag[rank])
    return "pass"


def _graph_check(rank: int, world: int, group: str, backend: str) -> str:
    problem = _problem(world, "padded", seed=12)
    x, idx, w = (t[rank].cuda() for t in (problem.xs, problem.topk_idx, problem.topk_weights))
    kw = dict(num_experts=problem.num_experts, group_name=group, backend=backend, layout="padded",
              max_tokens_per_rank=64, capacity=12)

    def step() -> torch.Tensor:
        recv_x, recv_w, _, _, handle = torch.ops.moe.dispatch(x, idx, w, **kw)
        return torch.ops.moe.combine(recv_x * 2, recv_w, handle, group_name=group, backend=backend)

    with torch.no_grad():
        step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        for seed in range(3):
            other = _problem(world, "padded", seed=100 + seed)
            x.copy_(other.xs[rank])
            idx.copy_(other.topk_idx[rank])
            w.copy_(other.topk_weights[rank])
            graph.replay()
            torch.testing.assert_close(out.float(), step().float(), rtol=0, atol=0)
    return "pass"


def conformance_part(rank: int, world: int, group: str) -> dict[str, object]:
    results: dict[str, object] = {}
    for backend, layouts in BACKENDS.items():
        for layout in layouts:
            for compiled in (False, True):
                name = f"{backend} {layout} {'compiled' if compiled else 'eager'}"
                results[name] = _attempt(lambda: _check(rank, world, group, backend, layout, compiled))
        results[f"{backend} padded decode in a CUDA graph"] = _attempt(lambda: _graph_check(rank, world, group, backend))
        dist.barrier()
    return results


# --- 2. benchmark ----------------------------------------------------------------------------------


def _slowest_median_ms(fn: Callable[[], object], graph: bool = False) -> float:
    """Median over ITERS timed calls of ``fn`` (replays of a CUDA graph of it with ``graph``), the
    slowest rank's."""
    if graph:
        fn = graphed(fn)
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(ITERS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    mine = torch.tensor([statistics.median(times)], device="cuda")
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)
    return float(mine)


def _inputs(shape: tuple[int, int, int, int], rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens, hidden, experts, top_k = shape
    gen = torch.Generator(device="cuda").manual_seed(rank)
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
    w, idx = torch.topk(torch.rand(tokens, experts, device="cuda", generator=gen), top_k)
    return x, idx, w


def _ours(shape: tuple[int, int, int, int], rank: int, group: str, backend: str, layout: str, graph: bool) -> dict[str, float]:
    tokens, hidden, experts, top_k = shape
    x, idx, w = _inputs(shape, rank)
    kw: dict[str, object] = dict(num_experts=experts, group_name=group, backend=backend, layout=layout)
    if layout == "padded":
        world = dist.get_world_size()
        kw |= dict(max_tokens_per_rank=tokens, capacity=2 * tokens * top_k * world // experts)  # twice the mean load
    with torch.no_grad():
        d = torch.ops.moe.dispatch(x, idx, w, **kw)
        rows = int(d[2].sum())  # routes this rank received (kept)
        dispatch_ms = _slowest_median_ms(lambda: torch.ops.moe.dispatch(x, idx, w, **kw), graph)
        combine_ms = _slowest_median_ms(lambda: torch.ops.moe.combine(d[0], d[1], d[4], group_name=group, backend=backend), graph)
    recv_bytes = rows * hidden * x.element_size()
    return {"dispatch ms": dispatch_ms, "combine ms": combine_ms,
            "dispatch GB/s": recv_bytes / dispatch_ms / 1e6, "combine GB/s": recv_bytes / combine_ms / 1e6}


def _vdev_2d(shape: tuple[int, int, int, int], rank: int, group: str) -> dict[str, float]:
    """torch.ops.symm_mem.all_to_all_vdev_2d (NVSHMEM) moving one row per route, pre-sorted by
    (destination rank, expert); combine direction: all_to_all_vdev_2d_offset back. The op takes at most
    16 splits per rank, so neighbouring experts share a split (the bytes moved are the same)."""
    from torch.distributed import _symmetric_memory as symm_mem

    tokens, hidden, experts, top_k = shape
    symm_mem.set_backend("NVSHMEM")  # first symmetric allocation of this process (a run of its own)
    _, idx, _ = _inputs(shape, rank)
    per_split = max(1, experts // dist.get_world_size() // 16)
    splits = torch.bincount(idx.reshape(-1) // per_split, minlength=experts // per_split)
    rows = tokens * top_k
    device = torch.device("cuda", torch.cuda.current_device())  # with its index: NVSHMEM's team manager
    # took a bare "cuda" for a second device
    cap = 2 * rows  # receive room: twice the mean
    inp = symm_mem.empty(rows, hidden, dtype=torch.bfloat16, device=device).normal_()
    out = symm_mem.empty(cap, hidden, dtype=torch.bfloat16, device=device)
    in_splits = symm_mem.empty(splits.numel(), dtype=torch.int64, device=device).copy_(splits)
    out_splits_offsets = symm_mem.empty(2, splits.numel(), dtype=torch.int64, device=device)
    back = symm_mem.empty(rows, hidden, dtype=torch.bfloat16, device=device)
    back_splits_offsets = symm_mem.empty(2, splits.numel(), dtype=torch.int64, device=device)
    for t in (inp, out, in_splits, out_splits_offsets, back, back_splits_offsets):
        symm_mem.rendezvous(t, group)
    dispatch = lambda: torch.ops.symm_mem.all_to_all_vdev_2d(inp, out, in_splits, out_splits_offsets, group)  # noqa: E731
    dispatch()
    torch.cuda.synchronize()
    received = int(out_splits_offsets[0].sum())
    dispatch_ms = _slowest_median_ms(dispatch)
    combine = lambda: torch.ops.symm_mem.all_to_all_vdev_2d_offset(out, back, out_splits_offsets, back_splits_offsets, group)  # noqa: E731
    combine_ms = _slowest_median_ms(combine)
    recv_bytes = received * hidden * 2
    return {"dispatch ms": dispatch_ms, "combine ms": combine_ms,
            "dispatch GB/s": recv_bytes / dispatch_ms / 1e6, "combine GB/s": recv_bytes / combine_ms / 1e6}


def bench_part(rank: int, group: str) -> dict[str, object]:
    results: dict[str, object] = {}
    for backend, layouts in BACKENDS.items():
        for layout in layouts:
            results[f"bandwidth {backend} {layout}"] = _attempt(lambda: _ours(BANDWIDTH, rank, group, backend, layout, False))
        results[f"decode {backend} padded (CUDA graph)"] = _attempt(lambda: _ours(DECODE, rank, group, backend, "padded", True))
        dist.barrier()
    return results


# --- driver ----------------------------------------------------------------------------------------


def _init(rank: int, world: int, port: int) -> str:
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=180), device_id=torch.device("cuda", rank))
    return dist.group.WORLD.group_name


def baseline_worker(rank: int, world: int, port: int, out: str) -> None:
    """all_to_all_vdev_2d in processes of its own: it needs the NVSHMEM backend from the first allocation."""
    group = _init(rank, world, port)
    result = _attempt(lambda: _vdev_2d(BANDWIDTH, rank, group))
    if rank == 0:
        with open(os.path.join(out, "vdev_2d.json"), "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def worker(rank: int, world: int, port: int, out: str, skip_checks: bool) -> None:
    group = _init(rank, world, port)
    report: dict[str, object] = {
        "date": datetime.date.today().isoformat(), "world": world, "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "moe_ops symm_num_sms": moe_ops.config.symm_num_sms,
        "command": "python3 tools/bench_multi_gpu.py " + " ".join(sys.argv[1:]),
    }
    if not skip_checks:
        report["conformance"] = conformance_part(rank, world, group)
    report["bench"] = bench_part(rank, group)
    everyone: list[object] = [None] * world
    dist.all_gather_object(everyone, report.get("conformance"))
    if rank == 0:
        report["conformance, every rank"] = everyone
        with open(os.path.join(out, "vdev_2d.json")) as f:
            report["bench"]["bandwidth all_to_all_vdev_2d (transport only)"] = json.load(f)  # type: ignore[index]
        write(report, out)
    dist.destroy_process_group()


def write(report: dict[str, object], out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "multi_gpu.json"), "w") as f:
        json.dump(report, f, indent=2)
    lines = [f"{report['device']} x {report['world']}, torch {report['torch']}, {report['date']}", ""]
    for rank, checks in enumerate(report["conformance, every rank"] or []):  # type: ignore[union-attr]
        failed = {k: v for k, v in checks.items() if v != "pass"}
        lines.append(f"rank {rank}: {len(checks) - len(failed)} of {len(checks)} checks pass" + "".join(f"\n  {k}: {v}" for k, v in failed.items()))
    lines += ["", "| case | dispatch ms | combine ms | dispatch GB/s | combine GB/s |", "|---|---|---|---|---|"]
    for name, value in report["bench"].items():  # type: ignore[union-attr]
        if isinstance(value, dict):
            lines.append(f"| {name} | {value['dispatch ms']:.4f} | {value['combine ms']:.4f} | {value['dispatch GB/s']:.0f} | {value['combine GB/s']:.0f} |")
        else:
            lines.append(f"| {name} | {str(value).splitlines()[0]} | | | |")
    text = "\n".join(lines)
    with open(os.path.join(out, "multi_gpu.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    _chart(report, os.path.join(out, "multi_gpu.png"))


def _chart(report: dict[str, object], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    bench = {k: v for k, v in report["bench"].items() if k.startswith("bandwidth") and isinstance(v, dict)}  # type: ignore[union-attr]
    fig, ax = plt.subplots(figsize=(9, 4))
    names = [k.removeprefix("bandwidth ") for k in bench]
    for i, op in enumerate(("dispatch", "combine")):
        ax.bar([x + 0.4 * i for x in range(len(names))], [v[f"{op} GB/s"] for v in bench.values()], 0.4, label=op)
    ax.set_xticks([x + 0.2 for x in range(len(names))], names, fontsize=8)
    ax.set_ylabel("per-rank algorithm bandwidth, GB/s")
    ax.set_title(f"T, H, E, K = {BANDWIDTH}, {report['world']} x {report['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--world", type=int, default=torch.cuda.device_count())
    parser.add_argument("--skip-checks", action="store_true")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    mp.spawn(baseline_worker, args=(args.world, free_port(), args.out), nprocs=args.world)
    mp.spawn(worker, args=(args.world, free_port(), args.out, args.skip_checks), nprocs=args.world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
