"""torchtitan's own MoE models (tested against torchtitan 0.3.0) trained with its ``AllToAllTokenDispatcher``
and with moe_ops put in the documented way: torchtitan's ``apply_overrides`` with the
``--override.imports`` entries of ``moe_ops.integrations.torchtitan``. Used by
tests/test_upstream_torchtitan.py (CPU, gloo, EP = 2) and tools/bench_torchtitan.py (one GPU, EP = 1).

What CPU needs, and no GPU run does (set here, never in the library): torchtitan falls back to ``"cuda"``
as its device type where it finds no accelerator, so its meshes are put on ``"cpu"``; FSDP reduces
gradients with a plain sum, then divides (gloo has no pre-multiplied sum).
torchtitan's trainer imports its data stack (``datasets``, ``torchdata``, tensorboard), so the step here is
its ``train_step`` without it: forward, cross-entropy, backward, AdamW. Its FlexAttention takes the
block-causal masks that stack builds (and compiles only for an accelerator), so on every device each
layer's inner attention becomes ``ScaledDotProductAttention``, causal: one document per sequence, which is
what those masks give here.
"""

from __future__ import annotations

import importlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

FLAVORS = {"qwen3": "debugmodel_moe", "deepseek_v3": "debugmodel"}  #: torchtitan's smallest MoE model of each family
LAYERS = 2  #: the models cut to this many layers (deepseek_v3's first is dense)
ADAPTER = "moe_ops.integrations.torchtitan"
DISPATCHER = f"{ADAPTER}.moe_ops_dispatcher"
SELECTIVE_AC = f"{ADAPTER}.moe_ops_selective_ac"
SPMD_BACKEND = "partial_dtensor"  #: DTensor on the model-parallel axes (the default "spmd_types" makes no DTensors on CPU)
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Setup:
    """One way of running a model: ``overrides`` (``--override.imports`` entries: ``"module.function"`` or
    ``("module.function", {kwargs})``), ``sac`` (torchtitan's ``SelectiveAC``, the debug configs' default,
    or no activation checkpointing), ``compile`` (torchtitan's per-block ``fullgraph=True`` compile with
    this backend; ``None``: eager)."""

    overrides: tuple[str | tuple[str, dict[str, Any]], ...] = ()
    sac: bool = True
    compile: str | None = None


def ours(sac: bool = True, **options: Any) -> Setup:
    """moe_ops' dispatcher with ``options`` (its override's keyword arguments) and, with ``sac``, our SAC."""
    dispatcher = (DISPATCHER, options) if options else DISPATCHER
    return Setup(overrides=(dispatcher, SELECTIVE_AC) if sac else (dispatcher,), sac=sac)


def on_cpu() -> None:
    """Meshes on ``"cpu"`` (torchtitan falls back to ``"cuda"`` where it finds no accelerator)."""
    from torchtitan.distributed import parallel_dims

    parallel_dims.device_type = "cpu"


def _job_class() -> type:
    """A config root holding what the overrides replace: the model and the activation checkpointing
    (torchtitan's ``Trainer.Config`` without the data stack)."""
    from torchtitan.config import Configurable
    from torchtitan.distributed.activation_checkpoint import SelectiveAC
    from torchtitan.models.common.decoder import Decoder

    @dataclass(kw_only=True, slots=True)
    class Job(Configurable.Config):
        model: Decoder.Config
        activation_checkpoint: SelectiveAC.Config | None

    return Job


def build(
    family: str,
    setup: Setup,
    ep: int,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    flavor: str | None = None,
    layers: int = LAYERS,
) -> tuple[torch.nn.Module, Any]:
    """torchtitan's ``family`` model (``flavor``, default its debug MoE flavor, cut to ``layers`` layers),
    overridden as ``setup`` says, parallelized by the family's own ``parallelize_fn`` (EP = ``ep``, FSDP
    over the whole world), parameters in ``dtype`` (torchtitan's ``training.dtype``), initialized from
    seed 0. Returns ``(model, the job config after the overrides)``."""
    from torch.distributed.fsdp import FSDPModule
    from torchtitan.config import CompileConfig, OverrideConfig, ParallelismConfig, TrainingConfig, apply_overrides
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed import utils as dist_utils
    from torchtitan.distributed.activation_checkpoint import SelectiveAC
    from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention

    spec = importlib.import_module(f"torchtitan.models.{family}").model_registry(flavor or FLAVORS[family])
    model_config = spec.model
    model_config.layers = model_config.layers[:layers]
    for _, _, parent, attr in list(model_config.traverse(FlexAttention.Config)):  # see the module docstring
        setattr(parent, attr, ScaledDotProductAttention.Config())
    parallelism = ParallelismConfig(expert_parallel_degree=ep, spmd_backend=SPMD_BACKEND)
    dist_utils.set_spmd_backend(SPMD_BACKEND)  # as the trainer does
    # what the trainer's update_from_config does for these models (the trainer imports the data stack)
    sharding = importlib.import_module(f"torchtitan.models.{family}.sharding")
    getattr(sharding, f"set_{family}_sharding_config")(model_config, enable_sp=False, enable_ep=ep > 1)
    job = _job_class()(model=model_config, activation_checkpoint=SelectiveAC.Config() if setup.sac else None)
    apply_overrides(OverrideConfig(imports=list(setup.overrides)), job)

    world = torch.distributed.get_world_size()
    dims = ParallelDims(dp_replicate=1, dp_shard=-1, cp=1, tp=1, pp=1, ep=ep, world_size=world, spmd_backend=SPMD_BACKEND)
    dims.build_mesh()
    with torch.device("meta"), _default_dtype(dtype):
        model = job.model.build()
    model = spec.parallelize_fn(
        model,
        parallel_dims=dims,
        training=TrainingConfig(mixed_precision_param=str(dtype).removeprefix("torch.")),
        parallelism=parallelism,
        compile_config=CompileConfig(enable=setup.compile is not None, backend=setup.compile or "inductor"),
        ac_config=job.activation_checkpoint,
        dump_folder="",
    )
    if device == "cpu":  # gloo has no pre-multiplied sum: reduce-scatter with SUM, then divide
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)
    model.to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    model.train()
    return model, job


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def batches(rank: int, steps: int, batch: int, seq: int, vocab: int, device: str = "cpu") -> list[Batch]:
    """``steps`` (tokens, labels) pairs, ``[batch, seq]`` int64, different on every rank (data parallel)."""
    generator = torch.Generator().manual_seed(1000 + rank)
    tokens = torch.randint(0, vocab, (steps, batch, seq + 1), generator=generator).to(device)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def loss_of(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over this rank's tokens (FSDP's gradient reduction averages it over the ranks)."""
    return F.cross_entropy(model(tokens).flatten(0, 1).float(), labels.flatten())


def global_mean(value: torch.Tensor) -> float:
    total = value.detach().clone()
    torch.distributed.all_reduce(total)
    return total.item() / torch.distributed.get_world_size()


def train(model: torch.nn.Module, data: list[Batch], lr: float = 3e-4, step_done: Callable[[], None] | None = None) -> list[float]:
    """torchtitan's step without its trainer, once per batch: forward, loss, backward, AdamW, then
    ``step_done`` (a timer). The global mean loss of each step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for tokens, labels in data:
        loss = loss_of(model, tokens, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(global_mean(loss))
        if step_done is not None:
            step_done()
    return losses


@contextmanager
def kernel_calls() -> Iterator[Counter[str]]:
    """Counts the executions of every moe_ops backend's ``"dispatch"`` and ``"combine"`` kernels: a call
    whose output selective activation checkpointing saved is not executed again in backward."""
    from moe_ops import backends

    counts: Counter[str] = Counter()
    patched = []
    for name in backends.available():
        backend = backends._REGISTRY[name]
        for kernel in ("dispatch", "combine"):
            original = getattr(backend, kernel)

            def counting(*args: Any, _original: Callable[..., Any] = original, _kernel: str = kernel, **kwargs: Any) -> Any:
                counts[_kernel] += 1
                return _original(*args, **kwargs)

            setattr(backend, kernel, counting)
            patched.append((backend, kernel))
    try:
        yield counts
    finally:
        for backend, kernel in patched:
            delattr(backend, kernel)


def _dispatchers(model: torch.nn.Module) -> list[Any]:
    return [m.token_dispatcher for m in model.modules() if hasattr(m, "token_dispatcher")]


def train_task(rank: int, family: str, setups: dict[str, Setup], steps: int, batch: int = 2, seq: int = 32) -> dict[str, Any]:
    """World task: ``family``'s model at EP = world size trained ``steps`` AdamW steps in each of ``setups``.
    Per setup: the global losses, our kernels' executions, the dispatcher and checkpointing classes, the
    MoE layers, the graph breaks and graphs dynamo made, the seconds to build and to train."""
    from torch._dynamo.utils import counters

    on_cpu()
    result: dict[str, Any] = {}
    for name, setup in setups.items():
        with torch._dynamo.config.patch({}):  # restores what torchtitan's apply_compile sets globally
            counters.clear()
            start = time.perf_counter()
            model, job = build(family, setup, ep=torch.distributed.get_world_size())
            data = batches(rank, steps, batch, seq, job.model.vocab_size)
            built = time.perf_counter()
            with kernel_calls() as calls:
                losses = train(model, data)
            result[name] = {
                "losses": losses,
                "calls": dict(calls),
                "dispatchers": sorted({type(d).__qualname__ for d in _dispatchers(model)}),
                "moe layers": len(_dispatchers(model)),
                "ac": type(job.activation_checkpoint).__qualname__,
                "graph breaks": sum(counters["graph_break"].values()),
                "graphs": counters["stats"]["unique_graphs"],
                "seconds": (built - start, time.perf_counter() - built),
            }
        torch._dynamo.reset()
    return result


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def grads_task(rank: int, family: str, setups: dict[str, Setup], batch: int = 2, seq: int = 32) -> dict[str, Any]:
    """World task: one forward and backward of ``family``'s model (EP = world size) per setup, same weights
    and batch, each compared here with the first setup's (the gradients are too large to send back). Per
    setup: the largest difference of the logits and of each parameter's gradient (this rank's shard) from
    the first setup's, with the first's largest magnitude (``(diff, scale)``), and the row counts each MoE
    layer handed its grouped experts (``[L]`` int32 each)."""
    on_cpu()
    result: dict[str, Any] = {}
    reference: dict[str, torch.Tensor] = {}
    for name, setup in setups.items():
        model, job = build(family, setup, ep=torch.distributed.get_world_size())
        ((tokens, labels),) = batches(rank, 1, batch, seq, job.model.vocab_size)
        counts: list[torch.Tensor] = []
        hooks = [
            d.register_forward_pre_hook(lambda _m, args: counts.append(args[1].detach().clone()))
            for d in (m.inner_experts for m in model.modules() if hasattr(m, "token_dispatcher"))
        ]
        logits = model(tokens)
        F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()).backward()
        for hook in hooks:
            hook.remove()
        outputs = {"logits": logits.detach(), **{n: _local(p.grad) for n, p in model.named_parameters()}}
        reference = reference or outputs
        diffs = {k: ((v - reference[k]).abs().max().item(), reference[k].abs().max().item()) for k, v in outputs.items()}
        result[name] = {"diffs": diffs, "counts": counts, "dispatchers": sorted({type(d).__qualname__ for d in _dispatchers(model)})}
    return result
