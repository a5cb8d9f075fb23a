"""What one call of the ops does, counted without timing anything: the aten ops (allocations, host
reads) and Triton launches that the ops' real kernels make. tests/test_kernels.py checks the counts on
CPU with the kernels interpreted, so a regression in a call's structure (an extra launch, a host read
on a path that promises none, a whole-buffer fill) fails CI; docs/benchmarks.md has the timings.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from moe_ops import registration

ALLOCATIONS = frozenset({"aten.empty", "aten.empty_strided", "aten.empty_like", "aten.new_empty", "aten.zeros",
                         "aten.zeros_like", "aten.new_zeros", "aten.full", "aten.full_like", "aten.new_full"})
HOST_READS = frozenset({"aten.item", "aten._local_scalar_dense"})  #: ``.item()``, ``.tolist()``: the host waits for the device


class OpCounter(TorchDispatchMode):
    """Counts the aten ops below the ``moe.*`` ops' real kernels (``ops``) and the ``moe.*`` ops themselves
    (``ops["moe.dispatch"]``...): a ``moe.*`` op reaching this mode runs its real kernel with the mode on."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func.overloadpacket)
        self.ops[name] += 1
        kernel = registration.KERNELS.get(func)
        if kernel is not None:
            with self:
                return kernel(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@contextmanager
def counting_launches() -> Iterator[Counter[str]]:
    """Counts Triton launches by kernel name; a launch runs with every dispatch mode off (the interpreter's
    own tensor work is not the call's)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launches: Counter[str] = Counter()
    originals = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def run(self: Any, *args: Any, **kwargs: Any) -> Any:
            launches[self.fn.__name__] += 1
            with _disable_current_modes():
                return original(self, *args, **kwargs)

        return run

    for cls, original in originals.items():
        cls.run = wrap(original)  # type: ignore[method-assign]
    try:
        yield launches
    finally:
        for cls, original in originals.items():
            cls.run = original  # type: ignore[method-assign]


def count(fn: Callable[[], object]) -> dict[str, int]:
    """One call of ``fn`` (after one untimed warm-up call): ``{"launches", "allocations", "host_reads",
    "other_ops"}`` plus each ``moe.*`` op's count, summed over the ops ``fn`` calls."""
    fn()
    with counting_launches() as launches, OpCounter() as counter:
        fn()
    ops = counter.ops
    moe = {name: n for name, n in ops.items() if name.startswith("moe.")}
    allocations = sum(n for name, n in ops.items() if name in ALLOCATIONS)
    reads = sum(n for name, n in ops.items() if name in HOST_READS)
    other = sum(ops.values()) - allocations - reads - sum(moe.values())
    return {"launches": sum(launches.values()), "allocations": allocations, "host_reads": reads, "other_ops": other, **moe}


def structure_task(rank: int, tokens: int = 12, hidden: int = 8, experts: int = 8, top_k: int = 2) -> dict[str, dict[str, int]]:
    """World task (W = 1): :func:`count` of each layout's dispatch and of combine (no gradient), and of a
    whole step (dispatch, combine, both backward ops) on the ragged layout and on ``max_recv_rows``."""
    import moe_ops

    torch.manual_seed(rank)
    x = torch.randn(tokens, hidden, requires_grad=True)
    weights, ids = torch.topk(torch.rand(tokens, experts), top_k)
    weights.requires_grad_()
    layouts: dict[str, dict[str, Any]] = {
        "ragged": {},
        "ragged, pad_multiple": dict(pad_multiple=8),
        "bounded": dict(max_recv_rows=tokens * top_k, max_tokens_per_rank=tokens),
        "padded": dict(layout="padded", max_tokens_per_rank=tokens),
    }

    def step(**options: Any) -> object:
        out = moe_ops.dispatch(x, ids, weights, experts, **options)
        return torch.autograd.grad(moe_ops.combine(out.recv_x, out).sum(), (x, weights))

    counts = {}
    with torch.no_grad():
        for name, options in layouts.items():
            counts[f"dispatch, {name}"] = count(lambda options=options: moe_ops.dispatch(x, ids, weights, experts, **options))
        out = moe_ops.dispatch(x, ids, weights, experts)
        counts["combine"] = count(lambda: moe_ops.combine(out.recv_x, out))
    for name in ("ragged", "bounded"):
        counts[f"step, {name}"] = count(lambda name=name: step(**layouts[name]))
    return counts
