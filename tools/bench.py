"""Dispatch / combine on one GPU: moe_ops against plain torch and torch.compile of plain torch,
side by side in one run, with the memory floor measured in the same run.

    python3 tools/bench.py                       # the issue-4 table
    python3 tools/bench.py --config 8192,4096,64,6 --out bench-results
    python3 tools/bench.py --sweep               # also try kernel block shapes
    python3 tools/bench.py --collective          # also the collective backend at W = 1 over NCCL
    python3 tools/bench.py --host [--device cpu] [--world 2]   # host cost per call against plain torch (tools/host_cost.py)
    python3 tools/bench.py --block 8192,2048,768,128,8           # one MoE block's training step against plain torch
    python3 tools/bench.py --quant               # FP8 / INT8 dispatch against bf16 (T = 4096, 16384; decode in a CUDA graph)

The floor of a step is the bytes it must move (each input row read once, each output row written
once) over the copy bandwidth measured here (a large device-to-device copy, bytes read + written).
Times are medians of CUDA-event timings (triton.testing.do_bench, L2 flushed before each run) over
inputs rotated among several sets. Writes bench.json and bench.png into --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from moe_ops.stage.kernels import layout as layout_kernels  # noqa: E402
from moe_ops.stage.kernels import reduce as reduce_kernels  # noqa: E402
from moe_ops.testing import cuda_graph  # noqa: E402

TABLE = [(4096, 7168, 256, 8), (16384, 4096, 128, 8), (128, 7168, 256, 8)]
DECODE_TOKENS = 512  # configs with T <= this are also run as a padded decode round trip in a CUDA graph


def progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def median_ms(fn: Callable[[], object]) -> float:
    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    src = torch.empty(2**30, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3)


# --- the plain-torch baseline (what users write today) ---------------------------------------------


def torch_dispatch(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """argsort of the T*K expert ids + index_select: expert-major rows, all routes kept."""
    order = torch.argsort(idx.reshape(-1), stable=True)
    token = order // idx.shape[1]
    return x.index_select(0, token), w.reshape(-1)[order], token


def torch_combine(expert_out: torch.Tensor, recv_w: torch.Tensor, token: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """index_add of the weighted rows into their tokens."""
    out = torch.zeros(num_tokens, expert_out.shape[1], dtype=expert_out.dtype, device=expert_out.device)
    return out.index_add_(0, token, expert_out * recv_w.unsqueeze(1).to(expert_out.dtype))


# --- inputs --------------------------------------------------------------------------------------


@dataclass
class Inputs:
    x: torch.Tensor
    idx: torch.Tensor
    w: torch.Tensor


def make_inputs(tokens: int, hidden: int, experts: int, top_k: int, dtype: torch.dtype, device: torch.device, l2_bytes: int) -> list[Inputs]:
    """Enough input sets that cycling through them does not fit in L2 (at least 4x its size)."""
    per_set = tokens * hidden * dtype.itemsize
    sets = max(1, min(16, math.ceil(4 * l2_bytes / max(per_set, 1))))
    out = []
    for _ in range(sets):
        scores = torch.rand(tokens, experts, device=device)
        w, idx = torch.topk(scores, top_k, dim=-1)
        out.append(Inputs(torch.randn(tokens, hidden, device=device, dtype=dtype), idx, w / w.sum(-1, keepdim=True)))
    return out


def rotating(fns: list[Callable[[], object]]) -> Callable[[], object]:
    state = {"i": 0}

    def call() -> object:
        state["i"] = (state["i"] + 1) % len(fns)
        return fns[state["i"]]()

    return call


# --- one config ----------------------------------------------------------------------------------


@dataclass
class Row:
    tokens: int
    hidden: int
    experts: int
    top_k: int
    floor_ms: float
    ms: dict[str, float] = field(default_factory=dict)  # "<impl> <step>" -> ms
    notes: dict[str, float] = field(default_factory=dict)


def bench_config(tokens: int, hidden: int, experts: int, top_k: int, dtype: torch.dtype, bw: float, device: torch.device, l2: int, compiled_baseline: bool) -> Row:
    sets = make_inputs(tokens, hidden, experts, top_k, dtype, device, l2)
    row_bytes = hidden * dtype.itemsize
    moved = (tokens + tokens * top_k) * row_bytes  # read x + write T*K rows (combine: the reverse)
    row = Row(tokens, hidden, experts, top_k, floor_ms=moved / bw * 1e3)

    ours = [torch.ops.moe.dispatch(s.x, s.idx, s.w, num_experts=experts) for s in sets]
    row.ms["moe_ops dispatch"] = median_ms(rotating([lambda s=s: torch.ops.moe.dispatch(s.x, s.idx, s.w, num_experts=experts) for s in sets]))
    row.ms["moe_ops combine"] = median_ms(rotating([lambda d=d: torch.ops.moe.combine(d[0], d[1], d[4]) for d in ours]))
    check = torch.ops.moe.combine(ours[0][0], ours[0][1], ours[0][4])
    torch.testing.assert_close(check.float(), (sets[0].x.float() * 1.0), rtol=2e-2, atol=2e-2)  # weights sum to 1

    bounded = dict(max_recv_rows=tokens * top_k, max_tokens_per_rank=tokens)  # every route fits: no drops, no host read
    row.ms["moe_ops dispatch, max_recv_rows"] = median_ms(rotating([lambda s=s: torch.ops.moe.dispatch(
        s.x, s.idx, s.w, num_experts=experts, **bounded) for s in sets]))
    row.ms["moe_ops dispatch, pad_multiple 16"] = median_ms(rotating([lambda s=s: torch.ops.moe.dispatch(
        s.x, s.idx, s.w, num_experts=experts, pad_multiple=16) for s in sets]))
    aligned = dict(max_recv_rows=tokens * top_k + 16 * experts, max_tokens_per_rank=tokens, pad_multiple=16)
    row.ms["moe_ops dispatch, max_recv_rows, pad_multiple 16"] = median_ms(rotating([lambda s=s: torch.ops.moe.dispatch(
        s.x, s.idx, s.w, num_experts=experts, **aligned) for s in sets]))
    capacity = 2 * tokens * top_k // experts  # twice the mean load: no host sync, (almost) no drops
    row.ms["moe_ops padded dispatch (C = 2x mean load)"] = median_ms(rotating([lambda s=s: torch.ops.moe.dispatch(
        s.x, s.idx, s.w, num_experts=experts, layout="padded", capacity=capacity) for s in sets]))

    plain = [torch_dispatch(s.x, s.idx, s.w) for s in sets]
    row.ms["torch dispatch"] = median_ms(rotating([lambda s=s: torch_dispatch(s.x, s.idx, s.w) for s in sets]))
    row.ms["torch combine"] = median_ms(rotating([lambda p=p: torch_combine(p[0], p[1], p[2], tokens) for p in plain]))
    if compiled_baseline:
        cd, cc = torch.compile(torch_dispatch), torch.compile(torch_combine)
        row.ms["torch.compile dispatch"] = median_ms(rotating([lambda s=s: cd(s.x, s.idx, s.w) for s in sets]))
        row.ms["torch.compile combine"] = median_ms(rotating([lambda p=p: cc(p[0], p[1], p[2], tokens) for p in plain]))

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    d = torch.ops.moe.dispatch(sets[0].x, sets[0].idx, sets[0].w, num_experts=experts)
    torch.cuda.synchronize()
    outputs = sum(t.numel() * t.element_size() for t in (d[0], d[1], d[2], d[3], *d[4]))
    row.notes["dispatch peak extra MB beyond outputs"] = (torch.cuda.max_memory_allocated() - base - outputs) / 2**20
    del d

    if tokens <= DECODE_TOKENS:
        row.ms["moe_ops decode round trip (CUDA graph)"] = decode_graph_ms(sets, experts, tokens, moe=True)
        row.ms["torch decode round trip (CUDA graph)"] = decode_graph_ms(sets, experts, tokens, moe=False)
    return row


def graphed(step: Callable[[], object]) -> Callable[[], None]:
    """``step`` captured in a CUDA graph (after two warm-up calls on a side stream); returns its replay."""
    return cuda_graph.capture(step)[0].replay


def decode_graph_ms(sets: list[Inputs], experts: int, tokens: int, moe: bool) -> float:
    """Dispatch (padded, worst-case capacity) + combine, captured once per input set, replays rotated."""
    replays = []
    for s in sets:
        if moe:
            def step(s: Inputs = s) -> torch.Tensor:
                d = torch.ops.moe.dispatch(s.x, s.idx, s.w, num_experts=experts, layout="padded")
                return torch.ops.moe.combine(d[0], d[1], d[4])
        else:
            def step(s: Inputs = s) -> torch.Tensor:
                recv, rw, token = torch_dispatch(s.x, s.idx, s.w)
                return torch_combine(recv, rw, token, tokens)
        replays.append(graphed(step))
    return median_ms(rotating(replays))


def sweep(dtype: torch.dtype, device: torch.device, l2: int) -> list[dict[str, object]]:
    """GPU time only (CUDA-graph replays, no host work) at H=7168, E=256, K=8: kernel block shapes at
    T=4096 (the padded dispatch with capacity twice the mean load, and combine), then the padded decode
    dispatch at T = 64...512 on the one-launch path against the three-launch path."""
    tokens, hidden, experts, top_k = TABLE[0]
    sets = make_inputs(tokens, hidden, experts, top_k, dtype, device, l2)[:4]
    capacity = 2 * tokens * top_k // experts
    ours = [torch.ops.moe.dispatch(s.x, s.idx, s.w, num_experts=experts) for s in sets]
    results = []
    for block in (512, 1024, 2048):
        for warps in (2, 4, 8):
            layout_kernels.SCATTER_H_BLOCK, layout_kernels.SCATTER_WARPS = block, warps
            reduce_kernels.REDUCE_H_BLOCK, reduce_kernels.REDUCE_WARPS = block, warps
            dispatch = median_ms(rotating([graphed(lambda s=s: torch.ops.moe.dispatch(
                s.x, s.idx, s.w, num_experts=experts, layout="padded", capacity=capacity)) for s in sets]))
            combine = median_ms(rotating([graphed(lambda d=d: torch.ops.moe.combine(d[0], d[1], d[4])) for d in ours]))
            results.append({"h_block": block, "warps": warps, "dispatch gpu ms": dispatch, "combine gpu ms": combine})
            progress(f"sweep block={block} warps={warps}: dispatch {dispatch:.3f} ms, combine {combine:.3f} ms (GPU only)")
    layout_kernels.SCATTER_H_BLOCK, layout_kernels.SCATTER_WARPS = 1024, 4
    reduce_kernels.REDUCE_H_BLOCK, reduce_kernels.REDUCE_WARPS = 1024, 4
    small_routes = layout_kernels.SMALL_ROUTES
    for tokens in (64, 128, 256, 512):
        sets = make_inputs(tokens, hidden, experts, top_k, dtype, device, l2)[:4]
        for limit in (small_routes, 0):
            layout_kernels.SMALL_ROUTES = max(limit, tokens * top_k) if limit else 0  # one launch, or three
            dispatch = median_ms(rotating([graphed(lambda s=s: torch.ops.moe.dispatch(
                s.x, s.idx, s.w, num_experts=experts, layout="padded")) for s in sets]))
            launches = "one launch" if limit else "three launches"
            results.append({"tokens": tokens, "dispatch path": launches, "padded dispatch gpu ms": dispatch})
            progress(f"sweep T={tokens} {launches}: padded dispatch {dispatch:.4f} ms (GPU only)")
    layout_kernels.SMALL_ROUTES = small_routes
    return results


def collective_w1(dtype: torch.dtype, device: torch.device, l2: int) -> dict[str, float]:
    """The collective backend over a one-rank NCCL group (the transport runs, nothing crosses a link)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(
            "nccl", init_method="tcp://127.0.0.1:29511", rank=0, world_size=1,
            device_id=torch.device("cuda", torch.cuda.current_device()),
        )
    group = dist.group.WORLD.group_name
    tokens, hidden, experts, top_k = TABLE[0]
    sets = make_inputs(tokens, hidden, experts, top_k, dtype, device, l2)
    out = {}
    for backend in ("local", "collective"):
        kw = dict(num_experts=experts, group_name=group if backend == "collective" else "", backend=backend)
        ds = [torch.ops.moe.dispatch(s.x, s.idx, s.w, **kw) for s in sets]
        out[f"{backend} ragged dispatch ms"] = median_ms(rotating([lambda s=s: torch.ops.moe.dispatch(s.x, s.idx, s.w, **kw) for s in sets]))
        comb = dict(group_name=kw["group_name"], backend=backend)
        out[f"{backend} ragged combine ms"] = median_ms(rotating([lambda d=d: torch.ops.moe.combine(d[0], d[1], d[4], **comb) for d in ds]))
        progress(f"collective W=1: {backend} done")
    return out


QUANT_TABLE = [(4096, 7168, 256, 8), (16384, 7168, 256, 8), (128, 7168, 256, 8)]


def quantized(dtype: torch.dtype, bw: float, device: torch.device, l2: int) -> list[dict[str, float]]:
    """``moe.dispatch_quantized`` against the bf16 dispatch, same inputs, same run: quantized in dispatch
    (FP8 block 128, FP8 UE8M0, INT8 per token) and pre-quantized rows; ragged and ``max_recv_rows``
    (every route fits), each with its floor (bytes it must move over the copy bandwidth); at decode sizes
    the padded round trip (dispatch + combine) in a CUDA graph."""
    from moe_ops import quant

    results = []
    for tokens, hidden, experts, top_k in QUANT_TABLE:
        sets = make_inputs(tokens, hidden, experts, top_k, dtype, device, l2)
        bounded = dict(max_recv_rows=tokens * top_k, max_tokens_per_rank=tokens)
        routes = tokens * top_k
        scale_bytes = 4 * quant.scale_columns(hidden, 128)
        row = {"tokens": tokens, "hidden": hidden, "experts": experts, "top_k": top_k,
               "bf16 floor ms": (tokens + routes) * hidden * dtype.itemsize / bw * 1e3,
               "fp8 quantized in dispatch floor ms": (tokens * hidden * dtype.itemsize + routes * (hidden + scale_bytes)) / bw * 1e3,
               "fp8 pre-quantized floor ms": (tokens + routes) * (hidden + scale_bytes) / bw * 1e3}
        prequantized = [quant.quantize(s.x, quant.QuantSpec("fp8_e4m3")) for s in sets]
        for name, kw in (("ragged", {}), ("max_recv_rows", bounded)):
            row[f"bf16 {name} ms"] = median_ms(rotating([lambda s=s: torch.ops.moe.dispatch(s.x, s.idx, s.w, num_experts=experts, **kw)
                                                         for s in sets]))
            for label, q in (("fp8", dict(quant="fp8_e4m3")), ("fp8 ue8m0", dict(quant="fp8_e4m3", round_scale=True)),
                             ("int8 per token", dict(quant="int8", quant_block=0))):
                row[f"{label} {name} ms"] = median_ms(rotating([lambda s=s: torch.ops.moe.dispatch_quantized(
                    s.x, s.idx, s.w, num_experts=experts, **kw, **q) for s in sets]))
            row[f"fp8 pre-quantized {name} ms"] = median_ms(rotating([lambda s=s, p=p: torch.ops.moe.dispatch_quantized(
                p[0], s.idx, s.w, p[1], num_experts=experts, **kw) for s, p in zip(sets, prequantized, strict=True)]))
        # GPU time alone (CUDA-graph replays of the bounded dispatch: no host work between kernels)
        row["bf16 max_recv_rows GPU ms"] = median_ms(rotating([graphed(lambda s=s: torch.ops.moe.dispatch(
            s.x, s.idx, s.w, num_experts=experts, **bounded)) for s in sets]))
        for label, q in (("fp8", dict(quant="fp8_e4m3")), ("int8 per token", dict(quant="int8", quant_block=0))):
            row[f"{label} max_recv_rows GPU ms"] = median_ms(rotating([graphed(lambda s=s, q=q: torch.ops.moe.dispatch_quantized(
                s.x, s.idx, s.w, num_experts=experts, **bounded, **q)) for s in sets]))
        row["fp8 pre-quantized max_recv_rows GPU ms"] = median_ms(rotating([graphed(lambda s=s, p=p: torch.ops.moe.dispatch_quantized(
            p[0], s.idx, s.w, p[1], num_experts=experts, **bounded)) for s, p in zip(sets, prequantized, strict=True)]))
        # training's straight-through dispatch: fp8 rows, dequantized to bf16 on receipt (one more pass)
        row["fp8 dequantize max_recv_rows GPU ms"] = median_ms(rotating([graphed(lambda s=s: torch.ops.moe.dispatch_quantized(
            s.x, s.idx, s.w, num_experts=experts, **bounded, quant="fp8_e4m3", dequantize=True)) for s in sets]))
        if tokens <= DECODE_TOKENS:
            for label, q in (("bf16", None), ("fp8", dict(quant="fp8_e4m3"))):
                replays = []
                for s in sets:
                    expert_out = torch.zeros(experts, 16, hidden, dtype=dtype, device=device)  # the experts' (bf16) output

                    def step(s: Inputs = s, q: dict | None = q, expert_out: torch.Tensor = expert_out) -> torch.Tensor:
                        kw = dict(num_experts=experts, layout="padded", capacity=16)
                        if q is None:
                            d = torch.ops.moe.dispatch(s.x, s.idx, s.w, **kw)
                            return torch.ops.moe.combine(expert_out, d[1], d[4])
                        d = torch.ops.moe.dispatch_quantized(s.x, s.idx, s.w, **kw, **q)
                        return torch.ops.moe.combine(expert_out, d[2], d[5])
                    replays.append(graphed(step))
                row[f"{label} decode round trip (CUDA graph, C = 16) ms"] = median_ms(rotating(replays))
        for name in ("ragged", "max_recv_rows"):
            row[f"fp8 / bf16 {name}"] = row[f"fp8 {name} ms"] / row[f"bf16 {name} ms"]
        row["fp8 max_recv_rows / its floor"] = row["fp8 max_recv_rows ms"] / row["fp8 quantized in dispatch floor ms"]
        row["fp8 / bf16 max_recv_rows, GPU"] = row["fp8 max_recv_rows GPU ms"] / row["bf16 max_recv_rows GPU ms"]
        row["fp8 max_recv_rows GPU / its floor"] = row["fp8 max_recv_rows GPU ms"] / row["fp8 quantized in dispatch floor ms"]
        progress(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        results.append(row)
    return results


def chart(rows: list[Row], bw: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, step in zip(axes, ("dispatch", "combine"), strict=True):
        labels = [f"T={r.tokens}\nH={r.hidden}\nE={r.experts} K={r.top_k}" for r in rows]
        impls = ["moe_ops", "torch", "torch.compile"]
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            vals = [r.floor_ms / r.ms[f"{impl} {step}"] * bw / 1e9 if f"{impl} {step}" in r.ms else 0 for r in rows]
            ax.bar([x + i * width for x in range(len(rows))], vals, width, label=impl)
        ax.axhline(bw / 1e9, color="k", linestyle="--", label="copy bandwidth (floor)")
        ax.set_xticks([x + width for x in range(len(rows))], labels)
        ax.set_ylabel("achieved GB/s (floor bytes / time)")
        ax.set_title(step)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def host(device: torch.device, world: int) -> int:
    """Host cost per call (``tools/host_cost.py``): CPU ``T=128, H=8``; GPU ``T=128, H=7168``; ``E=256, K=8``."""
    import host_cost  # tools/ is this script's folder

    hidden = 8 if device.type == "cpu" else 7168
    print(f"host cost per call, {device}, torch {torch.__version__}, T=128 H={hidden} E=256 K=8, W = 1")
    host_cost.report(host_cost.op_costs(device, 128, hidden, 256, 8, torch.bfloat16 if device.type == "cuda" else torch.float32))
    host_cost.report(host_cost.block_step_costs(device, 128, 64 if device.type == "cpu" else 1024, 64, 4))
    if world > 1:
        from moe_ops.testing.harness import World

        with World(world) as w:
            host_cost.report(w.run(host_cost.collective_costs, 128, 8, 256, 8)[0])
    return 0


def block(device: torch.device, tokens: int, hidden: int, ffn: int, experts: int, top_k: int) -> int:
    """One MoE block's training step per step (``tools/host_cost.py``), ragged and ``max_recv_rows``, eager
    and compiled, against the same block in plain torch: a layer of the model at its real shape."""
    import host_cost  # tools/ is this script's folder

    print(f"MoE block step, {device}, torch {torch.__version__}, T={tokens} H={hidden} F={ffn} E={experts} K={top_k}, bf16, W = 1")
    host_cost.report(host_cost.block_step_costs(device, tokens, hidden, experts, top_k, ffn, ("ragged", "max_recv_rows"), ("eager", "compiled")))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], help="T,H,E,K (repeatable); default: the issue-4 table")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--collective", action="store_true")
    parser.add_argument("--no-compile-baseline", action="store_true")
    parser.add_argument("--host", action="store_true", help="host cost per call against plain torch, then exit")
    parser.add_argument("--device", default="cuda", help="--host: cpu or cuda")
    parser.add_argument("--world", type=int, default=1, help="--host on cpu: also the collective backend over gloo at this W")
    parser.add_argument("--block", help="T,H,F,E,K: one MoE block's training step (eager, compiled) against plain torch, then exit")
    parser.add_argument("--quant", action="store_true", help="quantized dispatch against bf16 (QUANT_TABLE), then exit")
    args = parser.parse_args(argv)
    if args.host:
        return host(torch.device(args.device), args.world)
    if args.block:
        return block(torch.device(args.device), *(int(v) for v in args.block.split(",")))
    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(device)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    configs = [tuple(int(v) for v in c.split(",")) for c in args.config] or TABLE
    progress(f"{props.name}, torch {torch.__version__}, triton {triton.__version__}")
    bw = copy_bandwidth(device)
    progress(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    if args.quant:
        result = {"date": datetime.date.today().isoformat(), "device": props.name, "torch": torch.__version__,
                  "triton": triton.__version__, "copy_bandwidth_GBps": bw / 1e9, "quantized": quantized(dtype, bw, device, l2),
                  "command": "python3 tools/bench.py --quant"}
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench-quant.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result, indent=1))
        return 0
    rows = []
    for c in configs:
        progress(f"config T,H,E,K = {c}")
        rows.append(bench_config(*c, dtype=dtype, bw=bw, device=device, l2=l2, compiled_baseline=not args.no_compile_baseline))
    result: dict[str, object] = {
        "date": datetime.date.today().isoformat(),
        "device": props.name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": args.dtype,
        "copy_bandwidth_GBps": bw / 1e9,
        "rows": [asdict(r) for r in rows],
        "command": "python3 tools/bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    os.makedirs(args.out, exist_ok=True)

    def save() -> None:  # after each part, so a cut-short run keeps what it measured
        with open(os.path.join(args.out, "bench.json"), "w") as f:
            json.dump(result, f, indent=2)

    save()
    chart(rows, bw, os.path.join(args.out, "bench.png"))
    if args.sweep:
        result["sweep"] = sweep(dtype, device, l2)
        save()
    if args.collective:
        result["collective_w1"] = collective_w1(dtype, device, l2)
        save()
    print(f"{props.name}, torch {torch.__version__}, triton {triton.__version__}, {args.dtype}, copy bandwidth {bw / 1e9:.0f} GB/s")
    for r in rows:
        print(f"\nT={r.tokens} H={r.hidden} E={r.experts} K={r.top_k}: floor {r.floor_ms:.3f} ms per step")
        for name, ms in r.ms.items():
            base = r.ms.get(name.replace("moe_ops", "torch"))
            ratio = f"  {base / ms:5.2f}x faster than torch" if name.startswith("moe_ops") and base else ""
            print(f"  {name:42s} {ms:8.3f} ms  {ms / r.floor_ms:6.2f}x floor{ratio}")
        for name, v in r.notes.items():
            print(f"  {name}: {v:.1f}")
    for key in ("sweep", "collective_w1"):
        if key in result:
            print(f"\n{key}: {json.dumps(result[key], indent=1)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
