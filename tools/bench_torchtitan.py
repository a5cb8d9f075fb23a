"""torchtitan's qwen3 on one GPU: a training step with torchtitan's own token dispatcher against moe_ops'
(put in by torchtitan's ``apply_overrides``, as docs/integrations/torchtitan.md says), eager and with
torchtitan's per-block compile. Needs only torch and torchtitan (0.3.0; e.g. an extracted wheel on
PYTHONPATH) besides this checkout.

    PYTHONPATH=/path/to/torchtitan:. python3 tools/bench_torchtitan.py --out bench-torchtitan.json
    python3 tools/bench_torchtitan.py --quick --out /tmp/bench-torchtitan.json   # CPU, debug model, 2 steps

Default: the 30B-A3B flavor (dim 2048, 128 experts, top 8, expert hidden 768, vocab 151936) cut to 4
layers (about 3.0 B parameters: fits one H200 with AdamW in bf16), bf16 parameters (torchtitan's
``training.dtype``), batch 2 x 4096 tokens, no activation checkpointing, on a one-rank process group
(EP = 1: torchtitan's ``AllToAllTokenDispatcher`` dispatches locally without a mesh; ours, the same
override, runs moe_ops' ``local`` transport), and ours with ``max_recv_rows`` (every route fits: the
ragged rows in a static buffer, no host read). Times: median of ``--steps`` steps after ``--warmup``,
each ending in a device synchronize. Prints a markdown table and writes the JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist


def _placeholder_for_torch_2_11() -> bool:
    """torchtitan 0.3.0's FSDP module imports ``DataParallelMeshDims`` from ``torch.distributed.fsdp``,
    which torch 2.11 (the GPU loaner's only CUDA torch) lacks. This benchmark runs one rank without FSDP,
    where the name only annotates signatures, so an empty class stands in for it there; the report says
    so (``"torch_2_11_placeholder"``). Returns whether it was needed."""
    import torch.distributed.fsdp as fsdp

    if hasattr(fsdp, "DataParallelMeshDims"):
        return False
    fsdp.DataParallelMeshDims = type("DataParallelMeshDims", (), {"__doc__": "placeholder: FSDP is not applied here"})
    return True


PLACEHOLDER = _placeholder_for_torch_2_11()
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from moe_ops.testing import torchtitan as tt  # noqa: E402
from moe_ops.testing.harness import free_port  # noqa: E402

# bf16 losses of two dispatchers that round their sums differently drift apart by about this much
LOSS_RTOL = {torch.bfloat16: 2e-2, torch.float32: 1e-4}
TOP_K = 8  #: routes per token in every qwen3 MoE flavor


def run(setup: tt.Setup, args: argparse.Namespace, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """One model built as ``setup`` says, trained ``warmup + steps`` steps: step times, losses, dispatcher."""
    model, job = tt.build("qwen3", setup, ep=1, device=device, dtype=dtype, flavor=args.flavor, layers=args.layers)
    data = tt.batches(0, args.warmup + args.steps, args.batch, args.seq, job.model.vocab_size, device)
    stamps = [time.perf_counter()]

    def step_done() -> None:
        if device == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    losses = tt.train(model, data, step_done=step_done)
    times = [b - a for a, b in zip(stamps, stamps[1:])][args.warmup :]
    dispatchers = sorted({type(m.token_dispatcher).__qualname__ for m in model.modules() if hasattr(m, "token_dispatcher")})
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    median = statistics.median(times)
    return {"dispatcher": dispatchers, "median_step_s": median, "tokens_per_s": args.batch * args.seq / median, "step_s": times, "losses": losses}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--quick", action="store_true", help="CPU, qwen3 debugmodel_moe, 2 layers, 2 steps: the script end to end")
    parser.add_argument("--flavor", default="30B-A3B")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    if args.quick:
        args.flavor, args.layers, args.batch, args.seq, args.warmup, args.steps = tt.FLAVORS["qwen3"], tt.LAYERS, 2, 32, 1, 1
    device = "cpu" if args.quick else "cuda"
    dtype = torch.float32 if args.quick else torch.bfloat16
    compiler = "aot_eager" if args.quick else "inductor"  # CPU: the autograd graphs without C++ codegen

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo" if args.quick else "nccl", rank=0, world_size=1)
    if args.quick:
        tt.on_cpu()
    else:
        torch.cuda.set_device(0)
    tokens = args.batch * args.seq
    # every route of the step fits (EP = 1: this rank's tokens times qwen3's top 8): no drops, no host read
    bounded = dict(max_recv_rows=tokens * TOP_K, max_tokens_per_rank=tokens)
    dispatchers = {"torchtitan": tt.Setup(sac=False), "moe_ops": tt.ours(sac=False), "moe_ops/max_recv_rows": tt.ours(sac=False, **bounded)}
    results: dict[str, Any] = {}
    for mode in ("eager", "compiled"):
        for dispatcher, setup in dispatchers.items():
            print(f"running {dispatcher} {mode} ...", file=sys.stderr, flush=True)
            setup = setup if mode == "eager" else dataclasses.replace(setup, compile=compiler)
            result = results[f"{dispatcher} {mode}"] = run(setup, args, device, dtype)
            print(f"  median step {1e3 * result['median_step_s']:.1f} ms, losses {result['losses']}", file=sys.stderr, flush=True)
    rtol = LOSS_RTOL[dtype]
    checks = {}
    for name, result in results.items():
        dispatcher, mode = name.split()
        ref = results[f"torchtitan {mode}"]["losses"]
        worst = max(abs(a - b) / abs(a) for a, b in zip(ref, result["losses"]))
        checks[name] = {"max_rel_loss_diff": worst, "rtol": rtol, "equal": worst <= rtol}
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "torch_2_11_placeholder": PLACEHOLDER,
        "config": {k: getattr(args, k) for k in ("flavor", "layers", "batch", "seq", "warmup", "steps")} | {"dtype": str(dtype), "ep": 1, "compile": compiler},
        "runs": results,
        "losses": checks,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"qwen3 {args.flavor}, {args.layers} layers, {args.batch} x {args.seq} tokens, {dtype}, EP = 1, {report['device']}\n")
    print("| dispatcher | mode | median step (ms) | tokens/s | losses equal (rtol) |\n|---|---|---|---|---|")
    for name, r in results.items():
        dispatcher, mode = name.split()
        check = checks[name]
        print(f"| {dispatcher} ({', '.join(r['dispatcher'])}) | {mode} | {1e3 * r['median_step_s']:.1f} | {r['tokens_per_s']:.0f} "
              f"| {check['equal']} ({check['max_rel_loss_diff']:.1e} <= {rtol}) |")  # fmt: skip
    dist.destroy_process_group()
    return 0 if all(c["equal"] for c in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
