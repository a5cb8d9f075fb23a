"""moe_ops inside the real Megatron-Core 0.19.2 (``megatron-core``, installed by tools/in-env.sh): its
``MoELayer`` on CPU over gloo at W = 1 and 2, moe_ops swapped in as docs/integrations/megatron.md says,
compared with Megatron's own CPU-capable paths, exactly (fp32):

* training: the all-gather dispatcher against our flex dispatcher through ``install()`` and through the
  ``MoELayer`` subclass: output, input gradient and every parameter gradient; also with
  ``moe_router_padding_for_quantization`` (FP8 alignment), where our experts get padded groups;
* inference: Megatron's ``NCCLAllGatherDispatcher`` (graph path: equal token counts; AllGather-V path:
  unequal) against ours for ``"nccl"`` and ``"nvls"``: the rows, probs, routing map and valid-token count
  handed to the experts, and the bf16 output (``NVLSAllGatherVDispatcher`` itself needs NVLink multicast);
* the interface: every public member of Megatron's dispatchers exists in ours with a compatible signature.
"""

import re

import pytest
import torch

pytest.importorskip("megatron.core", reason="needs megatron-core 0.19.2 (tools/in-env.sh installs it)")

from megatron.core.transformer.moe import moe_layer as upstream_layer  # noqa: E402
from megatron.core.transformer.moe import token_dispatcher as upstream  # noqa: E402
from megatron.core.transformer.moe import token_dispatcher_inference as upstream_inference  # noqa: E402

from moe_ops.errors import MoEInputError  # noqa: E402
from moe_ops.integrations import megatron_core  # noqa: E402
from moe_ops.testing import megatron_core as tasks  # noqa: E402
from moe_ops.testing.interfaces import assert_interface  # noqa: E402


@pytest.mark.multiproc
@pytest.mark.parametrize("size", [1, 2])
def test_training_matches_megatron_allgather(worlds, size: int) -> None:
    for rank, result in enumerate(worlds(size).run(tasks.training_task)):
        assert result["megatron dispatcher"].endswith("MoEAllGatherTokenDispatcher")
        for way in ("install", "subclass"):
            assert result[f"{way} dispatcher"] == "moe_ops.integrations.megatron_core.MoEFlexTokenDispatcher", way
            assert result[way].keys() == result["megatron"].keys()
            for name, ref in result["megatron"].items():
                assert torch.equal(result[way][name], ref), f"rank {rank}, {way}: {name} differs from Megatron's"


@pytest.mark.multiproc
def test_padding_for_quantization(worlds) -> None:
    """``moe_router_padding_for_quantization`` with FP8 (align 16): our experts get each expert's rows
    padded to a multiple of 16 (zero rows, probability 0) and the layer's results equal Megatron's
    all-gather layer's with the same config (its SequentialMLP pads per expert itself)."""
    fields = dict(moe_router_padding_for_quantization=True, fp8="hybrid")
    for rank, result in enumerate(worlds(2).run(tasks.training_task, 16, fields)):
        routed = result["megatron counts"]
        for way in ("install", "subclass"):
            counts = result[f"{way} counts"]
            assert torch.equal(counts, (routed + 15) // 16 * 16 + 16 * (routed == 0)), f"rank {rank}, {way}: {counts} for {routed}"
            for name, ref in result["megatron"].items():
                assert torch.equal(result[way][name], ref), f"rank {rank}, {way}: {name} differs from Megatron's"


@pytest.mark.multiproc
@pytest.mark.parametrize("size", [1, 2])
def test_quantized_wire(worlds, size: int) -> None:
    """``install(quant="fp8_e4m3")`` and ``MoELayer(quant=...)`` (Megatron-Core has no FP8 dispatch of its
    own): the rows cross the group in FP8 and reach Megatron's experts dequantized, so the layer's output and
    every gradient follow its all-gather layer's to FP8's rounding (measured: at most 5 % of the largest
    value) without equalling them, and the input's gradient arrives (straight through)."""
    for rank, result in enumerate(worlds(size).run(tasks.training_task, tasks.TOKENS, None, "fp8_e4m3")):
        for way in ("install", "subclass"):
            assert result[way].keys() == result["megatron"].keys()
            for name, ref in result["megatron"].items():
                diff, scale = (result[way][name] - ref).abs().max().item(), ref.abs().max().item()
                assert diff <= 0.1 * scale, f"rank {rank}, {way}: {name} differs by {diff} (largest {scale})"
            assert not torch.equal(result[way]["out"], result["megatron"]["out"]), f"rank {rank}, {way}: rows not quantized"
            assert result[way]["grad x"].abs().sum() > 0, f"rank {rank}, {way}: no gradient reached the input"


@pytest.mark.multiproc
@pytest.mark.parametrize(("tokens", "allgather_v"), [([5], False), ([5, 5], False), ([5, 3], True)])
def test_inference_matches_megatron_nccl(worlds, tokens: list[int], allgather_v: bool) -> None:
    for rank, result in enumerate(worlds(len(tokens)).run(tasks.inference_task, tokens, allgather_v)):
        ref = result["megatron"]
        assert ref["dispatcher"] == "NCCLAllGatherDispatcher" and ref["out"].dtype == torch.bfloat16
        assert ref["valid"] == sum(tokens) == ref["hidden"].shape[0]
        for name, dispatcher in (("ours nccl", "InferenceAllGatherDispatcher"), ("ours nvls", "InferenceAllGatherVDispatcher")):
            ours = result[name]
            assert ours["dispatcher"] == dispatcher and ours["valid"] == ref["valid"], name
            # "nccl" hands over exactly Megatron's rows; "nvls" W * max(tokens) rows, the valid ones first
            rows = ref["hidden"].shape[0] if name == "ours nccl" else len(tokens) * max(tokens)
            for key in ("hidden", "probs", "routing_map"):
                assert ours[key].shape[0] == rows, f"rank {rank}, {name}: {key} has {ours[key].shape[0]} rows"
                assert torch.equal(ours[key][: ref["valid"]], ref[key]), f"rank {rank}, {name}: {key} differs"
            assert torch.equal(ours["out"], ref["out"]), f"rank {rank}, {name}: output differs"


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (megatron_core.MoEFlexTokenDispatcher, upstream.MoEFlexTokenDispatcher),
        (megatron_core.InferenceAllGatherDispatcher, upstream_inference.NCCLAllGatherDispatcher),
        (megatron_core.InferenceAllGatherVDispatcher, upstream_inference.NVLSAllGatherVDispatcher),
        (megatron_core.MoELayer, upstream_layer.MoELayer),
    ],
)
def test_interface(ours: type, theirs: type) -> None:
    assert_interface(ours, theirs)
    if theirs is not upstream_layer.MoELayer:
        assert issubclass(ours, upstream.MoETokenDispatcher)
    if "Inference" in ours.__name__:
        assert issubclass(ours, upstream_inference.InferenceAllGatherDispatcherBase)


def test_install_is_reversible() -> None:
    names = ("MoEFlexTokenDispatcher", "NCCLAllGatherDispatcher", "NVLSAllGatherVDispatcher")
    before = [getattr(upstream_layer, n) for n in names]
    with megatron_core.install("collective"):
        assert upstream_layer.MoEFlexTokenDispatcher.transport == "collective"
        assert issubclass(upstream_layer.MoEFlexTokenDispatcher, megatron_core.MoEFlexTokenDispatcher)
        assert upstream_layer.NCCLAllGatherDispatcher is megatron_core.InferenceAllGatherDispatcher
    assert [getattr(upstream_layer, n) for n in names] == before
    with pytest.raises(MoEInputError, match="backend='nccl' is not a moe_ops transport"):
        megatron_core.install("nccl")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(moe_flex_dispatcher_backend="uccl_ep"), "moe_flex_dispatcher_backend='uccl_ep': Megatron-Core takes one of"),
        (dict(moe_pad_expert_input_to_capacity=True), "moe_pad_expert_input_to_capacity=True is not supported"),
        (dict(moe_ncclep_static_shape=True), "moe_ncclep_static_shape=True is not supported"),
        (dict(overlap_moe_expert_parallel_comm=True), "overlap_moe_expert_parallel_comm=True is not supported"),
    ],
)
def test_flex_refuses_by_name(fields: dict, message: str) -> None:
    """Values moe_ops cannot honour raise ``MoEInputError`` naming the field (set after the config's own
    validation, which would otherwise reject some combinations first)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, num_moe_experts=4, moe_token_dispatcher_type="flex")
    for key, value in fields.items():
        object.__setattr__(config, key, value)
    with pytest.raises(MoEInputError, match=re.escape(message)):
        megatron_core._check_flex_config(config, tp_size=1)
    with pytest.raises(MoEInputError, match="expert_tensor_parallel_size=2 is not supported"):
        megatron_core._check_flex_config(TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, num_moe_experts=4), tp_size=2)
