"""moe_ops inside the real torchtitan 0.3.0 (``torchtitan``, installed by tools/in-env.sh): its qwen3
``debugmodel_moe`` and deepseek_v3 ``debugmodel`` cut to 2 layers, on CPU over gloo at EP = 2 with FSDP,
moe_ops put in as docs/integrations/torchtitan.md says (torchtitan's own ``apply_overrides`` with the
``--override.imports`` entries), against torchtitan's ``AllToAllTokenDispatcher`` (and once at EP = 1):

* AdamW training: the losses of every step agree; with our SAC override each MoE layer runs our dispatch
  and combine kernels once per forward (none again in backward), without it they run again;
* per-block ``fullgraph=True`` compile with our dispatcher: no graph break, the eager losses;
* ``pad_multiple=16`` and the padded layout against the plain ragged layout: logits and every gradient
  equal, every group handed to the experts a multiple of 16 (padded: the capacity);
* the overrides: the FP8/MXFP8 converters' dispatcher replaced at its ``pad_multiple``, bad options
  refused with ``MoEInputError`` when the override runs.

The session's gloo worlds run it (``worlds(2)``, and ``worlds(1)`` for EP = 1); the file takes about a
minute on 2 cores.
"""

import pytest
import torch

pytest.importorskip("torchtitan", reason="needs torchtitan 0.3.0 (tools/in-env.sh installs it)")

from torchtitan.components.quantization.utils import swap_token_dispatcher  # noqa: E402
from torchtitan.config import OverrideConfig, apply_overrides  # noqa: E402
from torchtitan.models.common.moe import RoutedExperts  # noqa: E402
from torchtitan.models.qwen3 import model_registry  # noqa: E402

from moe_ops.errors import MoEInputError  # noqa: E402
from moe_ops.integrations import torchtitan as adapter  # noqa: E402
from moe_ops.testing import torchtitan as tasks  # noqa: E402

STEPS = 2
# Our combine sums each token's K weighted rows in float32 in route order; torchtitan's scales the rows,
# rounds them and scatter-adds them in expert order. Same sums, other rounding: the losses (~8) agree to
# ~1e-7 at the first step and 5e-6 at the second (AdamW's normalised update amplifies tiny gradient
# differences in its first steps); 2e-5 leaves room for that.
LOSS_RTOL = 2e-5


@pytest.fixture(scope="module")
def training(worlds) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    """Rank 0's results per family (both ranks' losses are global means, equal on every rank)."""
    setups = {"torchtitan": tasks.Setup(), "moe_ops": tasks.ours()}
    return {family: worlds(2).run(tasks.train_task, family, setups, STEPS)[0] for family in tasks.FLAVORS}


@pytest.mark.multiproc
@pytest.mark.parametrize("family", list(tasks.FLAVORS))
def test_losses_match_torchtitans_dispatcher(training, family: str) -> None:
    result = training[family]
    assert result["torchtitan"]["dispatchers"] == ["AllToAllTokenDispatcher"]
    assert result["moe_ops"]["dispatchers"] == ["MoEOpsTokenDispatcher"]
    assert result["moe_ops"]["ac"] == "MoEOpsSelectiveAC.Config"
    assert result["torchtitan"]["calls"] == {}
    torch.testing.assert_close(result["moe_ops"]["losses"], result["torchtitan"]["losses"], rtol=LOSS_RTOL, atol=0)


@pytest.mark.multiproc
def test_one_rank(worlds) -> None:
    """EP = 1 (a one-rank world, no EP mesh: torchtitan never wires one): our override still replaces its
    dispatcher, runs on this rank alone (here with ``max_recv_rows``; EP = 2 runs the plain ragged layout)
    and trains with its losses."""
    tokens, top_k = 2 * 32, 8  # batch x seq of train_task; qwen3's top 8
    setups = {"torchtitan": tasks.Setup(), "moe_ops": tasks.ours(max_recv_rows=tokens * top_k, max_tokens_per_rank=tokens)}
    result = worlds(1).run(tasks.train_task, "qwen3", setups, STEPS)[0]
    assert result["moe_ops"]["dispatchers"] == ["MoEOpsTokenDispatcher"]
    assert result["moe_ops"]["calls"]["dispatch"] > 0, result["moe_ops"]["calls"]
    torch.testing.assert_close(result["moe_ops"]["losses"], result["torchtitan"]["losses"], rtol=LOSS_RTOL, atol=0)


@pytest.mark.multiproc
@pytest.mark.parametrize("size", [1, 2])
def test_quantized_wire(worlds, size: int) -> None:
    """``quant``: the rows cross the EP group in FP8 (block scales) or INT8 (per token) and arrive in the
    model's dtype; training follows torchtitan's losses to the rounding (measured: 7e-5 FP8, 4e-5 INT8),
    and our SAC saves the quantized dispatch too (one call per layer and step); EP = 1 (no mesh: this rank
    alone, still quantized and dequantized) and EP = 2 over gloo."""
    setups = {"torchtitan": tasks.Setup(), "fp8": tasks.ours(quant="fp8_e4m3"), "int8": tasks.ours(quant="int8", quant_block=0)}
    result = worlds(size).run(tasks.train_task, "qwen3", setups, STEPS)[0]
    for name in ("fp8", "int8"):
        once = STEPS * result[name]["moe layers"]
        assert result[name]["calls"] == {"dispatch": once, "combine": once}, (name, result[name]["calls"])
        torch.testing.assert_close(result[name]["losses"], result["torchtitan"]["losses"], rtol=1e-3, atol=0)
        assert result[name]["losses"] != result["torchtitan"]["losses"], f"{name}: the rows were not quantized"


@pytest.mark.multiproc
def test_selective_ac_saves_our_ops(worlds, training) -> None:
    """Each MoE layer runs dispatch and combine once per forward with our SAC override; torchtitan's own
    SAC (which saves only its all-to-alls) runs them again in the backward recompute."""
    for family, result in training.items():
        once = STEPS * result["moe_ops"]["moe layers"]
        assert result["moe_ops"]["calls"] == {"dispatch": once, "combine": once}, family
    setups = {"torchtitan's SAC": tasks.Setup(overrides=(tasks.DISPATCHER,))}
    result = worlds(2).run(tasks.train_task, "qwen3", setups, 1)[0]["torchtitan's SAC"]
    assert result["ac"] == "SelectiveAC.Config"
    once = result["moe layers"]
    assert result["calls"]["dispatch"] > once and result["calls"]["combine"] > once, result["calls"]


@pytest.mark.multiproc
def test_fullgraph_compile(worlds, training) -> None:
    """torchtitan's per-block compile (``fullgraph=True``; ``aot_eager``: the autograd graphs without CPU
    codegen) with our dispatcher: no graph break, the eager losses. Without SAC: under SAC, compiled
    blocks fail on CPU with torchtitan's own dispatcher too (docs/integrations/torchtitan.md)."""
    setups = {"compiled": tasks.Setup(overrides=(tasks.DISPATCHER,), sac=False, compile="aot_eager")}
    result = worlds(2).run(tasks.train_task, "qwen3", setups, STEPS)[0]["compiled"]
    assert result["dispatchers"] == ["MoEOpsTokenDispatcher"]
    assert result["graph breaks"] == 0 and result["graphs"] >= 1, result
    torch.testing.assert_close(result["losses"], training["qwen3"]["moe_ops"]["losses"], rtol=LOSS_RTOL, atol=0)


@pytest.mark.multiproc
def test_pad_multiple_and_padded_layout(worlds) -> None:
    """``pad_multiple=16`` (the FP8 converter's) and the padded layout give the plain ragged layout's
    logits and gradients: the padding rows are zero and weigh 0. To bfloat16 rounding, not bit for bit:
    torchtitan's grouped GEMM runs in bfloat16, the experts' GEMMs see other row counts, and the CPU's BLAS
    may block their sums differently for them, which moves bfloat16 roundings (bit-equal on one machine, up
    to 0.9 % of the largest expert-weight gradient on another)."""
    tokens = 2 * 32  # batch x seq per rank
    setups = {
        "ragged": tasks.ours(sac=False),
        "pad_multiple=16": tasks.ours(sac=False, pad_multiple=16),
        "padded": tasks.ours(sac=False, layout="padded", max_tokens_per_rank=tokens),
    }
    for rank, result in enumerate(worlds(2).run(tasks.grads_task, "qwen3", setups)):
        for name, ours in result.items():
            assert ours["dispatchers"] == ["MoEOpsTokenDispatcher"], name
            for key, (diff, scale) in ours["diffs"].items():
                assert diff <= 2e-2 * scale and scale > 0, f"rank {rank}, {name}: {key} differs by {diff} (largest {scale})"
        for counts in result["pad_multiple=16"]["counts"]:
            assert (counts % 16 == 0).all() and (counts > 0).all(), counts
        capacity = 2 * tokens  # the padded layout's default: the worst case W * max_tokens_per_rank
        assert all((counts == capacity).all() for counts in result["padded"]["counts"])
        assert any((counts % 16 != 0).any() for counts in result["ragged"]["counts"])  # so the padding is ours


def test_aligned_override_takes_the_converters_pad_multiple() -> None:
    """torchtitan's FP8/MXFP8 converters run ``swap_token_dispatcher`` while the model config is made,
    before the trainer applies overrides: ``moe_ops_aligned_dispatcher`` replaces what they put in, at
    their ``pad_multiple``; ``moe_ops_dispatcher`` (exactly ``AllToAllTokenDispatcher``) leaves it."""
    config = model_registry("debugmodel_moe").model
    for _, routed, _, _ in config.traverse(RoutedExperts.Config):
        swap_token_dispatcher(routed, 32)  # MXFP8's default
    apply_overrides(OverrideConfig(imports=[tasks.DISPATCHER]), config)
    assert {type(layer.moe.routed_experts.token_dispatcher).__qualname__ for layer in config.layers} == {"TorchAOTokenDispatcher.Config"}
    apply_overrides(OverrideConfig(imports=[(f"{tasks.ADAPTER}.moe_ops_aligned_dispatcher", {"backend": "collective"})]), config)
    for layer in config.layers:
        dispatcher = layer.moe.routed_experts.token_dispatcher
        assert isinstance(dispatcher, adapter.MoEOpsTokenDispatcher.Config)
        assert (dispatcher.pad_multiple, dispatcher.backend, dispatcher.num_experts, dispatcher.top_k) == (32, "collective", 64, 8)
    with pytest.raises(ValueError, match="supports padding"):  # a converter after our override: torchtitan refuses ours
        swap_token_dispatcher(config.layers[0].moe.routed_experts, 16)


@pytest.mark.parametrize(
    "options",
    [
        {"pad_multiple": 0},
        {"pad_multiple": 2.0},
        {"pad_multiple": "16"},
        {"backend": "nccl"},
        {"layout": "padded"},
        {"layout": "sparse"},
        {"capacity": 8},
    ],
)
def test_bad_options_refused_when_the_override_runs(options: dict) -> None:
    config = model_registry("debugmodel_moe").model
    with pytest.raises(MoEInputError):
        apply_overrides(OverrideConfig(imports=[(tasks.DISPATCHER, options)]), config)
