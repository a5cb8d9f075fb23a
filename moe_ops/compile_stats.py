"""Graph breaks and (re)compiles of torch.compile, read from ``torch._dynamo.utils.counters``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch._dynamo.utils import counters


@dataclass(frozen=True)
class CompileStats:
    graph_breaks: int  #: graph breaks dynamo recorded
    graphs: int  #: distinct graphs compiled (1 + recompiles, for one compiled function)

    @property
    def recompiles(self) -> int:
        return max(0, self.graphs - 1)


def reset() -> None:
    """Forget compiled code and zero the counters."""
    torch._dynamo.reset()
    counters.clear()


def read() -> CompileStats:
    return CompileStats(
        graph_breaks=sum(counters["graph_break"].values()),
        graphs=counters["stats"]["unique_graphs"],
    )
