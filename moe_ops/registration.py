"""How the ops meet the dispatcher, cheaply: each op is defined once by its schema in a
``torch.library.Library``, its real kernel registered for every device (``CompositeExplicitAutograd``), its
fake kernel with ``torch.library.register_fake``, and a small Python ``Autograd`` kernel of our own.

That ``Autograd`` kernel is where a call's cost is decided. Called on plain tensors with no dispatch mode
active (eager code, or a compiled graph calling the op at run time), it calls the real kernel directly,
where a redispatch would cross back into C++ only to land in the same Python function; anything that
must see the call below autograd (fake or functional tensors, tensor subclasses, dispatch modes:
tracing, ``torch.compile``, ``opcheck``) gets the redispatch. Where a gradient is needed it runs the op's
``torch.autograd.Function``, whose forward does the same and whose backward calls the backward op.
(``torch.library.custom_op`` wraps every call in several more Python layers: docs/benchmarks.md.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

LIBRARY = torch.library.Library("moe", "DEF")

Kernel = Callable[..., Any]
#: each op's real kernel (what ``CompositeExplicitAutograd`` runs), by overload
KERNELS: dict[torch._ops.OpOverload, Kernel] = {}


def _plain(args: Sequence[object]) -> bool:
    """Whether nothing below autograd needs to see a call on ``args``: every tensor (also inside lists) a
    plain ``torch.Tensor``, and no dispatch mode active."""
    if _get_current_dispatch_mode() is not None:
        return False
    for arg in args:
        if isinstance(arg, (list, tuple)):
            if not all(type(t) is Tensor for t in arg):
                return False
        elif arg is not None and type(arg) is not Tensor and isinstance(arg, Tensor):
            return False
    return True


def below_autograd(op: torch._ops.OpOverload, kernel: Kernel, args: Sequence[object], options: dict[str, Any]) -> Any:
    """``op(*args, **options)`` below autograd: the real ``kernel`` directly where nothing else must see the
    call, else a redispatch."""
    if _plain(args):
        return kernel(*args, **options)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args, **options)


def define(schema: str, kernel: Kernel, fake: Kernel, autograd: Kernel) -> torch._ops.OpOverload:
    """Define ``moe::<schema>`` with its real, fake and ``Autograd`` kernels; returns its overload."""
    name = schema.split("(", 1)[0]
    LIBRARY.define(schema)
    LIBRARY.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"moe::{name}", fake, lib=LIBRARY)
    LIBRARY.impl(name, autograd, "Autograd")
    op = getattr(torch.ops.moe, name).default
    KERNELS[op] = kernel
    return op


def needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
