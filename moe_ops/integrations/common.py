"""What the framework adapters share (imports no framework): expert placement checks, the unweighted
combine Megatron-style experts need, host-side counts, the one place where per-expert row alignment is
mapped, the transport check, and reversible replacement of the names a framework module looks up."""

from __future__ import annotations

from types import ModuleType
from typing import Any, ClassVar

import torch
from torch import Tensor

import moe_ops
from moe_ops import backends
from moe_ops import quant as moe_quant
from moe_ops.api import DispatchResult, QuantizedDispatchResult
from moe_ops.errors import MoEInputError


def check_contiguous_experts(num_local_experts: int, local_expert_indices: list[int], moe: moe_ops.Dispatcher) -> None:
    """``num_local_experts`` and ``local_expert_indices`` must be this rank's contiguous block of ``moe``."""
    if num_local_experts != moe.num_local_experts:
        raise MoEInputError(
            f"num_local_experts={num_local_experts}, but {moe.num_experts} experts over {moe.world_size} ranks "
            f"give {moe.num_local_experts}"
        )
    expected = list(moe.local_experts)
    if list(local_expert_indices) != expected:
        raise MoEInputError(
            f"local_expert_indices must be this rank's contiguous block {expected}, got {list(local_expert_indices)}; "
            "place experts by a map with moe_ops.dispatch(expert_map=...)"
        )


def unweighted_combine(expert_out: Tensor, dispatched: DispatchResult | QuantizedDispatchResult, group: str) -> Tensor:
    """``moe.combine`` summing each token's rows as they are (Megatron-style experts already applied the
    probabilities): ``[T, H']`` in ``expert_out.dtype``."""
    return moe_ops.combine(expert_out, dispatched._replace(recv_weights=torch.ones_like(dispatched.recv_weights)), group=group)


def host_counts(tokens_per_expert: Tensor) -> Tensor:
    """``[L]`` int64 on the host: what DeepEP's dispatch and Megatron's all-gather dispatcher hand their
    experts (which call ``.tolist()`` on it)."""
    return tokens_per_expert.to("cpu", torch.int64)


def pad_multiple_for(field: str, value: int | None) -> int:
    """The dispatch option ``pad_multiple`` for a framework's per-expert row alignment ``field`` (NeMo's
    ``moe_router_expert_pad_multiple``, Megatron's ``moe_router_padding_for_quantization`` through
    ``get_align_size_for_quantization``): ``None`` or 0 is 1 (no alignment); a negative value or a
    non-integer is refused by the field's name."""
    if value is None or value == 0:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MoEInputError(f"{field}={value!r}: rows per expert are padded to a multiple of a positive integer")
    return value


class Patches:
    """Names replaced in framework modules, restorable: ``set(module, name, value)`` records the old value,
    ``undo()`` puts every one back (last first). Also a context manager that undoes on exit."""

    def __init__(self) -> None:
        self._saved: list[tuple[ModuleType | type, str, Any]] = []

    def set(self, owner: ModuleType | type, name: str, value: Any) -> None:
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def undo(self) -> None:
        while self._saved:
            owner, name, value = self._saved.pop()
            setattr(owner, name, value)

    @property
    def active(self) -> bool:
        return bool(self._saved)

    def __enter__(self) -> Patches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.undo()


def check_transport(backend: str) -> None:
    """``backend`` must be ``"auto"`` or a registered moe_ops transport (``MoEInputError`` otherwise)."""
    if backend != "auto" and backend not in backends.available():
        raise MoEInputError(f"backend={backend!r} is not a moe_ops transport; choose 'auto' or one of: {', '.join(backends.available())}")


class BoundTransport:
    """What an adapter's dispatcher class takes from an install (:func:`bind_transport` sets it): the moe_ops
    backend its dispatches run on, and the rows' format between ranks."""

    #: the moe_ops backend the dispatches run on
    transport: ClassVar[str] = "auto"
    #: ``"fp8_e4m3"`` or ``"int8"`` with a scale per ``quant_block`` columns (0: per token): the rows cross the
    #: group quantized and arrive dequantized, gradients straight through; ``None``: as they are
    quant: ClassVar[str | None] = None
    quant_block: ClassVar[int] = 128

    @classmethod
    def wire_options(cls) -> dict[str, Any]:
        """``moe_ops.Dispatcher``'s keyword arguments for this class's wire format (:func:`wire_options`)."""
        return wire_options(cls.quant, cls.quant_block)


def wire_options(quant: str | None, quant_block: int) -> dict[str, Any]:
    """``moe_ops.Dispatcher``'s keyword arguments for rows that cross the group as ``quant`` (``None``: as
    they are) and arrive dequantized in the tokens' dtype (``dequantize=True``)."""
    return dict(quant=quant, quant_block=quant_block, dequantize=quant is not None)


def bind_transport(cls: type[BoundTransport], backend: str, quant: str | None = None, quant_block: int = 128) -> type:
    """A subclass of ``cls`` bound to the moe_ops backend ``backend`` and the wire format ``quant`` /
    ``quant_block`` (:class:`BoundTransport`): what a framework constructs (with its own constructor
    signature) when an install chose them."""
    check_transport(backend)
    if quant is not None:
        moe_quant.make_spec(quant, quant_block, False)
    attrs = {"transport": backend, "quant": quant, "quant_block": quant_block, "__module__": cls.__module__, "__doc__": cls.__doc__}
    return type(cls.__name__, (cls,), attrs)
