"""Launching the Triton kernels through their compiled launcher (moe_ops/stage/kernels/launch.py): when the
fast path applies (CPU), and on a GPU that it picks the compiled kernel Triton itself would, one per
specialization, and falls back to ``kernel[grid]`` where it must."""

import pytest
import torch
import triton
import triton.language as tl

from moe_ops.stage.kernels import launch as launching


class _Chain:
    """Triton 3.7+'s ``HookChain``: a list of hooks, empty when none is set."""

    def __init__(self, calls: list) -> None:
        self.calls = calls


@pytest.mark.parametrize(
    "version, interpreting, enter, exit_, expected",
    [
        ("3.6.0", False, None, None, True),
        ("3.6.0", False, _Chain([]), _Chain([]), True),
        ("3.6.0", False, print, None, False),  # a profiler's hook must see every launch
        ("3.6.0", False, None, _Chain([print]), False),
        ("3.6.0", True, None, None, False),  # the interpreter launches its own way
        ("3.9.0", False, None, None, False),  # internals not checked on a GPU
    ],
)
def test_when_the_fast_path_applies(monkeypatch: pytest.MonkeyPatch, version: str, interpreting: bool, enter: object,
                                    exit_: object, expected: bool) -> None:
    monkeypatch.setattr(triton, "__version__", version)
    monkeypatch.setattr(launching, "INTERPRETING", interpreting)
    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", enter)
    monkeypatch.setattr(triton.knobs.runtime, "launch_exit_hook", exit_)
    assert launching.fast_path() is expected


@triton.jit
def _scaled_copy(src_ptr, dst_ptr, n, scale, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=offs < n) * scale, mask=offs < n)


@pytest.mark.cuda
def test_fast_path_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each specialization (a 16-byte-aligned pointer or not, a size divisible by 16 or not, another
    constexpr) compiles once through ``kernel[grid]`` and is launched directly after that, with results
    equal to the plain launch; with a launch hook set every launch goes through Triton (the hook sees it)."""
    if not launching.fast_path():
        pytest.skip(f"the fast path is off for Triton {triton.__version__} (launching.CHECKED: {launching.CHECKED})")
    monkeypatch.setattr(launching, "_compiled", {})
    src = torch.randn(4096, device="cuda")
    cases = [(src, 4096, 1024), (src[1:], 4000, 1024), (src, 1000, 1024), (src, 4096, 256)]
    for i, (x, n, block) in enumerate(cases):
        for scale in (2.0, 3.0):
            dst = torch.zeros(n, device="cuda")
            launching.launch(_scaled_copy, (triton.cdiv(n, block),), x, dst, n, scale, BLOCK=block)
            torch.testing.assert_close(dst, x[:n] * scale, rtol=0, atol=0)
        assert len(launching._compiled) == i + 1, "one compiled kernel per specialization"
    # the same specialization again: launched directly, the cache unchanged
    dst = torch.zeros(4096, device="cuda")
    launching.launch(_scaled_copy, (4,), src, dst, 4096, 0.5, BLOCK=1024)
    assert len(launching._compiled) == len(cases) and torch.equal(dst, src * 0.5)

    seen: list[object] = []
    chain = getattr(triton.knobs, "HookChain", None)  # Triton 3.7+ keeps a chain of hooks
    hook = seen.append if chain is None else chain()
    if chain is not None:
        hook.add(seen.append)
    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", hook)
    launching.launch(_scaled_copy, (4,), src, dst, 4096, 0.25, BLOCK=1024)
    torch.cuda.synchronize()
    assert len(seen) == 1 and torch.equal(dst, src * 0.25)
