"""``python -m moe_ops.demo``: the MoE block eager and compiled, checked against the reference.

Prints one row per layout (tokens, experts, top-k, eager ms, compiled ms, graph breaks, max error
against :func:`moe_ops.reference.moe_forward`) and exits non-zero if any check fails. (transformers'
``ep_implementation="moe_ops"`` on 2 processes: ``tools/hf_compare.py``.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

import moe_ops
from moe_ops import compile_stats, reference
from moe_ops.layers import MoEBlock

TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 3e-3, torch.float32: 1e-5}


def _median_ms(fn: Callable[[], object], device: torch.device, repeats: int = 10) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_layout(layout: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, object]:
    torch.manual_seed(0)
    kw = {"layout": "padded", "max_tokens_per_rank": args.tokens} if layout == "padded" else {}
    model = MoEBlock(args.hidden, args.ffn, args.top_k, moe_ops.Dispatcher(args.experts, **kw), device=device, dtype=dtype)
    x = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype)
    compile_stats.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    with torch.no_grad():
        eager_out, compiled_out = model(x), compiled(x)
        idx, w = model.route(x)
        ref = reference.moe_forward(x, idx, w, args.experts, model.expert)
        eager_ms = _median_ms(lambda: model(x), device)
        compiled_ms = _median_ms(lambda: compiled(x), device)
    scale = ref.abs().max().clamp(min=1e-6)
    error = max((o.double() - ref).abs().max().item() / scale.item() for o in (eager_out, compiled_out))
    stats = compile_stats.read()
    return {
        "layout": layout,
        "tokens": args.tokens,
        "experts": args.experts,
        "top-k": args.top_k,
        "eager ms": f"{eager_ms:.2f}",
        "compiled ms": f"{compiled_ms:.2f}",
        "graph breaks": stats.graph_breaks,
        "max rel. error": f"{error:.1e}",
        "ok": stats.graph_breaks == 0 and error <= TOLERANCE[dtype],
    }


def print_table(rows: list[dict[str, object]]) -> None:
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    print("  ".join(k.rjust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(str(r[k]).rjust(widths[k]) for k in keys))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(f"moe_ops {moe_ops.__version__}, torch {torch.__version__}, device {device}, {args.dtype}")
    rows = [run_layout(layout, args, device, dtype) for layout in ("ragged", "padded")]
    print_table(rows)
    failed = [r["layout"] for r in rows if not r["ok"]]
    if failed:
        print(f"FAILED: {', '.join(map(str, failed))} (graph breaks or error above {TOLERANCE[dtype]:.0e})")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
