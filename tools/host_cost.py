"""Host cost per call of each op against the plain-torch code it replaces, side by side in one run
(``python3 tools/bench.py --host``; docs/benchmarks.md, "Host cost per call").

On the CPU (``H = 8``: the work is negligible, what shows is what a call costs) and on a GPU (``T = 128``,
``H = 7168``: the kernels take less than the host, so back-to-back calls measure the host), at W = 1:
dispatch (ragged, bounded, padded), combine and both backward ops, each against the plain-torch code a
user would write (``argsort`` + ``bincount`` + ``index_select``; ``index_add``; ...); a compiled MoE block
per step against the same block written in plain torch. ``--world 2`` (CPU, gloo): the ``collective``
backend's ragged dispatch against the plain-torch all-to-all dispatch it replaces (count exchange, host
read of the splits, all-to-all, permute).

A per-call time is the median over repeats of (wall time of ``calls`` back-to-back calls) / ``calls``,
starting each repeat from an idle device. Never asserted in a test: measured here, recorded in the docs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

import moe_ops
from moe_ops.layers import MoEBlock


def per_call_us(fn: Callable[[], object], device: torch.device, calls: int = 200, repeats: int = 7) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return statistics.median(times)


# --- the plain-torch code each op replaces (W = 1) -------------------------------------------------


def plain_dispatch(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, ...]:
    """Expert-major rows: argsort of the routes, per-expert counts, the rows and their weights."""
    order = torch.argsort(idx.reshape(-1), stable=True)
    token = order // idx.shape[1]
    counts = torch.bincount(idx.reshape(-1), minlength=num_experts)
    return x.index_select(0, token), w.reshape(-1)[order], counts, order, token


def plain_combine(rows: torch.Tensor, row_w: torch.Tensor, token: torch.Tensor, num_tokens: int) -> torch.Tensor:
    out = torch.zeros(num_tokens, rows.shape[1], dtype=torch.float32, device=rows.device)
    return out.index_add_(0, token, rows.float() * row_w.unsqueeze(1)).to(rows.dtype)


def plain_dispatch_backward(grad_rows: torch.Tensor, grad_w: torch.Tensor, order: torch.Tensor, token: torch.Tensor,
                            num_tokens: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    grad_x = torch.zeros(num_tokens, grad_rows.shape[1], dtype=grad_rows.dtype, device=grad_rows.device).index_add_(0, token, grad_rows)
    return grad_x, torch.zeros(num_tokens * top_k, dtype=grad_w.dtype, device=grad_w.device).index_copy_(0, order, grad_w).view(num_tokens, top_k)


def plain_combine_backward(grad_out: torch.Tensor, rows: torch.Tensor, row_w: torch.Tensor, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g = grad_out.index_select(0, token)
    return g * row_w.unsqueeze(1).to(g.dtype), (g.float() * rows.float()).sum(-1)


def op_costs(
    device: torch.device, tokens: int, hidden: int, experts: int, top_k: int, dtype: torch.dtype, bounded: bool = True
) -> dict[str, tuple[float, float]]:
    """``{op: (moe_ops us, plain torch us)}`` per call at W = 1 (``bounded=False``: without the
    ``max_recv_rows`` row, for a moe_ops that predates it)."""
    torch.manual_seed(0)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    w, idx = torch.topk(torch.rand(tokens, experts, device=device), top_k)
    rows, row_w, _, order, token = plain_dispatch(x, idx, w, experts)
    d = moe_ops.dispatch(x, idx, w, experts)
    grad_rows, grad_w, grad_out = torch.randn_like(d.recv_x), torch.randn_like(d.recv_weights), torch.randn_like(x)
    plain = per_call_us(lambda: plain_dispatch(x, idx, w, experts), device)
    bound = dict(max_recv_rows=tokens * top_k, max_tokens_per_rank=tokens)
    costs = {"dispatch, ragged": (per_call_us(lambda: moe_ops.dispatch(x, idx, w, experts), device), plain)}
    if bounded:
        costs["dispatch, ragged with max_recv_rows"] = (per_call_us(lambda: moe_ops.dispatch(x, idx, w, experts, **bound), device), plain)
    return costs | {
        "dispatch, padded": (per_call_us(lambda: moe_ops.dispatch(x, idx, w, experts, layout="padded", max_tokens_per_rank=tokens), device), plain),
        "combine": (per_call_us(lambda: moe_ops.combine(d.recv_x, d), device),
                    per_call_us(lambda: plain_combine(rows, row_w, token, tokens), device)),
        "dispatch backward": (per_call_us(lambda: torch.ops.moe.dispatch_backward(grad_rows, grad_w, d.handle), device),
                              per_call_us(lambda: plain_dispatch_backward(grad_rows, grad_w, order, token, tokens, top_k), device)),
        "combine backward": (per_call_us(lambda: torch.ops.moe.combine_backward(grad_out, d.recv_x, d.recv_weights, d.handle), device),
                             per_call_us(lambda: plain_combine_backward(grad_out, rows, row_w, token), device)),
    }


class PlainMoEBlock(MoEBlock):
    """The same block, dispatch and combine in plain torch (argsort, grouped GEMM, index_add)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_idx, topk_weights = self.route(x)
        rows, row_w, counts, _, token = plain_dispatch(x, topk_idx, topk_weights, self.dispatcher.num_experts)
        out = self.experts(rows, counts.to(torch.int32))
        return plain_combine(out, row_w, token, x.shape[0])


def block_step_costs(
    device: torch.device, tokens: int, hidden: int, experts: int, top_k: int, ffn: int | None = None,
    layouts: tuple[str, ...] = ("max_recv_rows",), modes: tuple[str, ...] = ("compiled",),
) -> dict[str, tuple[float, float]]:
    """``{"<mode> MoE block, forward + backward, <layout>": (moe_ops us, plain torch us)}`` per training
    step (back-to-back steps) of one block (expert hidden ``ffn``, default ``2 * hidden``): moe_ops in the
    ragged layout (``"ragged"``: a host read per step) or with ``max_recv_rows`` (no host read), eager or
    compiled (``fullgraph=True``), against the same block in plain torch (argsort, grouped GEMM,
    ``index_add``) in the same mode. The input carries a gradient, as inside a model."""
    torch.manual_seed(0)
    dtype = torch.bfloat16
    ffn = ffn or 2 * hidden
    options = {"ragged": {}, "max_recv_rows": dict(max_recv_rows=tokens * top_k, max_tokens_per_rank=tokens)}
    blocks = {layout: MoEBlock(hidden, ffn, top_k, moe_ops.Dispatcher(experts, **options[layout]), device=device, dtype=dtype)
              for layout in layouts}
    plain = PlainMoEBlock(hidden, ffn, top_k, moe_ops.Dispatcher(experts), device=device, dtype=dtype)
    for block in blocks.values():
        block.load_state_dict(plain.state_dict())
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)

    def step_us(block: torch.nn.Module, mode: str) -> float:
        def loss(x: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(block(x).float(), x.detach().float())

        fn = torch.compile(loss, fullgraph=True) if mode == "compiled" else loss
        return per_call_us(lambda: fn(x).backward(), device, calls=20)

    costs = {}
    for mode in modes:
        baseline = step_us(plain, mode)
        for layout, block in blocks.items():
            costs[f"{mode} MoE block, forward + backward, {layout}"] = (step_us(block, mode), baseline)
    return costs


def collective_costs(rank: int, tokens: int, hidden: int, experts: int, top_k: int) -> dict[str, tuple[float, float]]:
    """World task (gloo, CPU): the ``collective`` ragged dispatch against the plain-torch all-to-all dispatch."""
    group = dist.group.WORLD
    world = dist.get_world_size()
    torch.manual_seed(rank)
    x = torch.randn(tokens, hidden)
    w, idx = torch.topk(torch.rand(tokens, experts), top_k)
    device = torch.device("cpu")

    def plain_a2a() -> tuple[torch.Tensor, ...]:
        order = torch.argsort(idx.reshape(-1), stable=True)  # routes by destination rank (experts are contiguous)
        send_counts = torch.bincount(idx.reshape(-1) // (experts // world), minlength=world)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        rows = torch.empty(sum(recv), hidden)
        dist.all_to_all_single(rows, x.index_select(0, order // top_k), recv, send, group=group)
        ids = torch.empty(sum(recv), dtype=idx.dtype)
        dist.all_to_all_single(ids, idx.reshape(-1)[order], recv, send, group=group)
        local = torch.argsort(ids, stable=True)  # expert-major on the receiver
        return rows.index_select(0, local), ids[local]

    ours = per_call_us(lambda: moe_ops.dispatch(x, idx, w, experts, group=group, backend="collective"), device, calls=50)
    return {f"collective ragged dispatch, W = {world}": (ours, per_call_us(plain_a2a, device, calls=50))}


def report(costs: dict[str, tuple[float, float]]) -> None:
    for name, (ours, plain) in costs.items():
        print(f"  {name:52s} moe_ops {ours:8.1f} us   plain torch {plain:8.1f} us   ratio {ours / plain:5.2f}x", flush=True)


if __name__ == "__main__":  # the moe_ops on sys.path (e.g. an older checkout through PYTHONPATH), ops only
    import argparse

    parser = argparse.ArgumentParser(description="host cost per call of the ops (see tools/bench.py --host)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--legacy", action="store_true", help="a moe_ops without max_recv_rows")
    args = parser.parse_args()
    device = torch.device(args.device)
    hidden = 8 if device.type == "cpu" else 7168
    print(f"host cost per call, {device}, moe_ops from {moe_ops.__file__}, T=128 H={hidden} E=256 K=8")
    report(op_costs(device, 128, hidden, 256, 8, torch.bfloat16 if device.type == "cuda" else torch.float32, bounded=not args.legacy))
