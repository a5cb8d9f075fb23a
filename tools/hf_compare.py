"""transformers' ``ep_implementation="moe_ops"`` against its own ``"all_to_all"``: a tiny random Qwen3-MoE
on 2 local processes (gloo), each implementation's error against the single-process model, whether its
experts' forward compiles with ``fullgraph=True``, and its eager / compiled forward time.

    tools/in-env.sh python3 tools/hf_compare.py      # needs the hf extra (the README's set-up installs it)

Exits non-zero if a check fails.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from moe_ops.demo import print_table  # noqa: E402


def main() -> int:
    import tempfile

    from moe_ops.testing import hf
    from moe_ops.testing.harness import World

    with tempfile.TemporaryDirectory() as path:
        hf.save_tiny_model("qwen3_moe", path)
        with World(2) as world:
            results = world.run(hf.compare_task, path, True)
    rows = []
    for impl in hf.IMPLEMENTATIONS:
        logits_err = max((r[f"{impl}_logits"] - r["single_logits"]).abs().max().item() for r in results)
        grad_err = max(
            ((g - r["single_grads"][n]).norm() / r["single_grads"][n].norm()).item()
            for r in results
            for n, g in r[f"{impl}_grads"].items()
        )
        ok, breaks, error = results[0][f"{impl}_compile"]
        eager, compiled = results[0][f"{impl}_ms"]
        failure = "data-dependent guard" if "data-dependent" in error else error[:40]
        rows.append({
            "ep_implementation": impl,
            "max |logits err|": f"{logits_err:.1e}",
            "max grad rel. err": f"{grad_err:.1e}",
            "experts.forward fullgraph": f"yes, {breaks} graph breaks" if ok else f"fails: {failure}",
            "eager ms": f"{eager:.1f}",
            "compiled ms": f"{compiled:.1f}",
            "ok": logits_err < 1e-4 and grad_err < 1e-4 and (ok or impl == "all_to_all"),
        })
    print_table(rows)
    return 0 if all(r["ok"] for r in rows) else 1



if __name__ == "__main__":
    sys.exit(main())
