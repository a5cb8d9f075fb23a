"""Capturing a step in a CUDA graph the way the tests and benchmarks do it (CUDA only)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

Out = TypeVar("Out")


def capture(step: Callable[[], Out], warmup: int = 2) -> tuple[torch.cuda.CUDAGraph, Out]:
    """``step()`` captured in a CUDA graph after ``warmup`` eager calls on a side stream (which also agree
    with the peers and make any buffers the captured call needs). Returns the graph and what the captured
    call returned (its outputs' memory, which every replay overwrites)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out
