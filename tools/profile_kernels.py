"""Per-kernel GPU time of dispatch and combine (torch.profiler), to see where a step's time goes.

    python3 tools/profile_kernels.py [--config T,H,E,K ...]

For each config: the ragged dispatch and combine run eagerly, and the padded decode round trip
captured in a CUDA graph; prints each kernel's mean device time per step and the step's wall time.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench import graphed  # noqa: E402  (tools/ is this script's folder)

import moe_ops  # noqa: E402,F401

STEPS = 20


def kernel_times(fn, steps: int = STEPS) -> tuple[dict[str, float], float]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = defaultdict(float)
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[evt.name[:60]] += evt.device_time / steps
    return dict(per_kernel), start.elapsed_time(end) * 1e3 / steps


def show(title: str, fn) -> None:
    kernels, wall = kernel_times(fn)
    print(f"  {title}: wall {wall:7.1f} us/step, kernels {sum(kernels.values()):7.1f} us")
    for name, us in sorted(kernels.items(), key=lambda kv: -kv[1]):
        print(f"      {us:7.1f} us  {name}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", action="append", default=[])
    args = parser.parse_args()
    configs = [tuple(int(v) for v in c.split(",")) for c in args.config] or [(4096, 7168, 256, 8), (128, 7168, 256, 8)]
    for tokens, hidden, experts, top_k in configs:
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
        w, idx = torch.topk(torch.rand(tokens, experts, device="cuda"), top_k)
        print(f"T={tokens} H={hidden} E={experts} K={top_k}")
        show("ragged dispatch", lambda: torch.ops.moe.dispatch(x, idx, w, num_experts=experts))
        d = torch.ops.moe.dispatch(x, idx, w, num_experts=experts)
        show("ragged combine", lambda: torch.ops.moe.combine(d[0], d[1], d[4]))
        show("ragged combine, graphed", graphed(lambda: torch.ops.moe.combine(d[0], d[1], d[4])))

        def round_trip() -> torch.Tensor:
            p = torch.ops.moe.dispatch(x, idx, w, num_experts=experts, layout="padded")
            return torch.ops.moe.combine(p[0], p[1], p[4])

        show("padded round trip, graphed", graphed(round_trip))


if __name__ == "__main__":
    main()
