"""Launching the Triton kernels for less host time than ``kernel[grid](...)``.

``JITFunction.run`` does more on every launch than finding the compiled kernel: it reads its knobs, asks
the driver for the device and stream, builds a string key from the arguments' specialization and its
options, checks the globals the kernel read, and builds launch metadata for hooks. On the H200 loaner's
host that was 25–29 µs a launch against 9.5 µs for the compiled kernel's own launcher; through this module
20 µs (the binder is most of the rest; docs/benchmarks.md, "Fourth session of 2026-12-02"). :func:`launch` computes the arguments' specialization with Triton's own binder (the
arguments' types, 16-byte alignment of pointers, divisibility of integers: everything Triton picks a
compiled kernel by), looks the compiled kernel up by it, and calls its launcher. The first launch of each
specialization goes through ``kernel[grid](...)``, which compiles (or loads) and launches it, and so does
every launch where this path is not known to hold: under the interpreter, with a launch hook set (a
profiler such as Proton), or on a Triton whose internals were not checked against this module
(:data:`CHECKED`).
"""

from __future__ import annotations

import functools
from typing import Any

import triton
from triton.compiler import CompiledKernel
from triton.runtime.jit import JITFunction

from moe_ops.stage.kernels import INTERPRETING

#: Triton versions whose ``JITFunction.device_caches`` (``(kernels, keys, target, backend, binder)``) and
#: ``CompiledKernel.run`` (``grid, stream, function, packed metadata, launch metadata, hooks, *arguments``)
#: this module was checked against on a GPU (tests/test_launch.py::test_fast_path_on_cuda)
CHECKED = ("3.6.",)

_compiled: dict[tuple[Any, ...], CompiledKernel] = {}


@functools.cache
def _driver() -> Any:
    return triton.runtime.driver.active


def fast_path() -> bool:
    """Whether :func:`launch` may call compiled kernels directly (see the module docstring)."""
    runtime = triton.knobs.runtime
    return not INTERPRETING and triton.__version__.startswith(CHECKED) and not _hooked(runtime.launch_enter_hook) \
        and not _hooked(runtime.launch_exit_hook)


def _hooked(hook: Any) -> bool:
    """Whether a launch hook is set: Triton 3.6 keeps ``None`` or a function, later ones a chain of them."""
    return hook is not None and getattr(hook, "calls", True) != []


def launch(kernel: JITFunction, grid: tuple[int, ...], *args: Any, **options: Any) -> None:
    """``kernel[grid](*args, **options)``, through the compiled kernel's launcher once it exists."""
    if not fast_path():
        kernel[grid](*args, **options)
        return
    driver = _driver()
    device = driver.get_current_device()
    binder = kernel.device_caches[device][4]
    bound, specialization, _ = binder(*args, **options)
    key = (kernel, device, tuple(specialization), tuple(options.items()))
    compiled = _compiled.get(key)
    if compiled is None:
        compiled = kernel[grid](*args, **options)
        if isinstance(compiled, CompiledKernel):
            _compiled[key] = compiled
        return
    x, y, z = (*grid, 1, 1)[:3]
    compiled.run(x, y, z, driver.get_current_stream(device), compiled.function, compiled.packed_metadata, None, None, None,
                 *bound.values())
