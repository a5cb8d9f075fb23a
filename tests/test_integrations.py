"""The adapters that need no framework installed (NeMo Automodel's flex dispatcher, vllm-ascend's) on gloo,
W = 1…3: the same results as the ops called directly and as the reference, and fullgraph compilation; plus
their options refused by name. Inside the real frameworks: tests/test_upstream_*.py.

Examples: EXAMPLES Hypothesis problems per adapter and world size; one compiled problem per adapter.
"""

import re
import warnings
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings

import moe_ops
from moe_ops.integrations import nemo_automodel, vllm_ascend
from moe_ops.integrations.common import bind_transport
from moe_ops.testing.adapters import ADAPTERS, check_adapter
from moe_ops.testing.problems import Problem, make_problem, problems

EXAMPLES = 12
# (layouts, pad_multiples, placements, backend) each adapter is driven with: NeMo's
# moe_router_expert_pad_multiple is the dispatch's pad_multiple; vllm-ascend has no such option
SETUPS = {
    "nemo_flex": (("ragged",), (1, 2, 8), ("contiguous",), "auto"),
    "vllm_ascend": (("ragged", "padded"), (1,), ("contiguous", "shuffled", "redundant"), "auto"),
}


@pytest.mark.multiproc
@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("size", [1, 2, 3])
def test_adapter_matches_ops_and_reference(worlds, adapter: str, size: int) -> None:
    layouts, pad_multiples, placements, backend = SETUPS[adapter]

    @settings(max_examples=EXAMPLES)
    @given(problem=problems(world_size=size, max_tokens=48, max_experts=24, hidden_sizes=(8, 40), layouts=layouts, pad_multiples=pad_multiples, placements=placements))
    def check(problem: Problem) -> None:
        check_adapter(worlds(size), problem, adapter, backend)

    check()


@pytest.mark.multiproc
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_adapter_compiles_fullgraph(worlds, adapter: str) -> None:
    layouts, _, placements, backend = SETUPS[adapter]
    kw: dict[str, object] = dict(layout="padded", capacity=8, max_tokens_per_rank=24) if layouts == ("padded",) else {}
    if "shuffled" in placements:  # the per-rank expert_map is gathered by a traced collective
        kw.update(shuffled=True, logical_experts=6)
    check_adapter(worlds(2), make_problem([24, 9], 32, 8, 2, mask_fraction=0.2, seed=4, **kw), adapter, backend, compiled=True)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(moe_deepep_async_dispatch=True), "moe_deepep_async_dispatch=True is not supported"),
        (dict(moe_router_expert_pad_multiple=-16), "moe_router_expert_pad_multiple=-16: rows per expert are padded to a multiple"),
        (dict(moe_flex_dispatcher_backend="nccl"), "moe_flex_dispatcher_backend='nccl': NeMo Automodel takes one of"),
    ],
)
def test_nemo_refuses_by_name(fields: dict, message: str) -> None:
    config = nemo_automodel.TokenDispatcherConfig(num_moe_experts=4, **fields)
    with pytest.raises(moe_ops.MoEInputError, match=re.escape(message)):
        nemo_automodel.MoEFlexTokenDispatcher(4, [0, 1, 2, 3], config, None)


def test_nemo_later_fields_warn_once_and_are_ignored() -> None:
    with pytest.warns(UserWarning, match="field 'moe_future_knob' is not in NeMo Automodel 0.7.0"):
        config = nemo_automodel.TokenDispatcherConfig(moe_router_topk=4, moe_future_knob=3)
    assert config.moe_router_topk == 4 and not hasattr(config, "moe_future_knob")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nemo_automodel.TokenDispatcherConfig(moe_future_knob=5)  # no second warning


def test_nemo_dispatcher_steps_by_hand() -> None:
    """One rank: host int64 counts, fp64 probs when asked, capacity-dropped routes masked, the unweighted
    combine (each token gets one copy of itself per kept route)."""
    config = nemo_automodel.TokenDispatcherConfig(num_moe_experts=4, moe_router_dtype="fp64", moe_expert_capacity_factor=1.0)
    dispatcher = nemo_automodel.MoEFlexTokenDispatcher(4, [0, 1, 2, 3], config, None)
    x = torch.randn(3, 8)
    dense = torch.tensor([[0.6, 0.0, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0]])
    rows, counts, probs = dispatcher.token_permutation(x, 3, dense)
    assert counts.device.type == "cpu" and counts.dtype == torch.int64 and counts.tolist() == [1, 1, 1, 1]
    assert probs.dtype == torch.float64 and torch.equal(probs.sort().values, dense[dense > 0].double().sort().values)
    assert torch.equal(dispatcher.token_unpermutation(rows), x * torch.tensor([[1.0], [2.0], [1.0]]))
    assert dispatcher.get_pipeline_runtime_initializers(hidden_dim=8, dtype=torch.float32) == ()


def test_transport_must_be_a_moe_ops_backend() -> None:
    assert bind_transport(nemo_automodel.MoEFlexTokenDispatcher, "collective").transport == "collective"
    with pytest.raises(moe_ops.MoEInputError, match="backend='uccl_ep' is not a moe_ops transport"):
        bind_transport(nemo_automodel.MoEFlexTokenDispatcher, "uccl_ep")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(shared_experts=object()), "shared_experts is not supported"),
        (dict(pertoken_scale=torch.ones(2)), "pertoken_scale is not supported"),
        (dict(apply_router_weight_on_input=True), "apply_router_weight_on_input needs top-1 routing"),
    ],
)
def test_vllm_rejects_what_it_cannot_honour(kwargs: dict, message: str) -> None:
    dispatcher = vllm_ascend.MoETokenDispatcher(top_k=2, num_experts=4)
    with pytest.raises(ValueError, match=re.escape(message)):
        dispatcher.token_dispatch(torch.randn(2, 8), torch.rand(2, 2), torch.tensor([[0, 1], [2, 3]]), **kwargs)


def test_vllm_router_weight_on_input_and_mask() -> None:
    """Top-1 with the weight applied on the input, and an mc2_mask that drops padding rows: by hand."""
    dispatcher = vllm_ascend.MoETokenDispatcher(top_k=1, num_experts=2)
    x, w = torch.randn(3, 4), torch.tensor([[0.5], [2.0], [3.0]])
    result = dispatcher.token_dispatch(
        x, w, torch.tensor([[1], [0], [1]]), mc2_mask=torch.tensor([True, True, False]), apply_router_weight_on_input=True
    )
    assert result["group_list_type"] == 1 and result["group_list"].tolist() == [1, 1]
    assert torch.equal(result["hidden_states"], torch.stack([x[1] * 2.0, x[0] * 0.5]))
    out = dispatcher.token_combine(result["hidden_states"] * 10, result["context_metadata"])
    assert torch.allclose(out, torch.stack([x[0] * 5.0, x[1] * 20.0, torch.zeros(4)]))


def _quant(quant_type: str, comm_quant_mode: int | None = None) -> SimpleNamespace:
    """A stand-in for vllm-ascend's ``MoEQuantParams`` (vllm_ascend/ops/fused_moe/dataclass/moe_quant.py) of ``quant_type``."""
    return SimpleNamespace(
        quant_type=quant_type, comm_quant_mode=comm_quant_mode, is_int_quant=quant_type in ("W8A8", "W4A8"),
        dispatch_with_quant=quant_type in ("W8A8", "W4A8", "W8A8MXFP", "W4A4MXFP", "W4A8MXFP", "W8A8FP"),
    )


def _dispatch_input(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, quant: object = None, **routing: object) -> SimpleNamespace:
    """A stand-in for vllm-ascend's ``MoETokenDispatchInput`` (vllm_ascend/ops/fused_moe/dataclass/token_dispatcher.py),
    its ``MoeRouterInput`` and ``MoEQuantParams`` (no quantization by default)."""
    fields = dict(expert_map=None, global_redundant_expert_num=0, mc2_mask=None, apply_router_weight_on_input=False, log2phy=None, pertoken_scale=None)
    quant = quant or _quant("NONE")
    return SimpleNamespace(hidden_states=x, topk_weights=w, topk_ids=ids, routing=SimpleNamespace(**(fields | routing)), quant=quant)


def test_vllm_dispatch_input_equals_the_positional_form() -> None:
    """vllm-ascend main passes a ``MoETokenDispatchInput``: the same rows, groups and combine as the
    positional form, returned as ``MoETokenDispatchOutput``'s fields."""
    gen = torch.Generator().manual_seed(0)
    x, w, ids = torch.randn(5, 8, generator=gen), torch.rand(5, 2, generator=gen), torch.tensor([[0, 3], [1, 2], [3, 0], [2, 1], [0, 1]])
    mask, expert_map = torch.tensor([True, True, True, True, False]), torch.tensor([3, 2, 1, 0])
    dispatcher = vllm_ascend.MoETokenDispatcher(top_k=2, num_experts=4)
    old = dispatcher.token_dispatch(x, w, ids, expert_map=expert_map, mc2_mask=mask)
    new = dispatcher.token_dispatch(_dispatch_input(x, w, ids, expert_map=expert_map, mc2_mask=mask))
    assert isinstance(new, vllm_ascend.TokenDispatchOutput) and new.dynamic_scale is None and new.topk_scales is None
    assert torch.equal(new.hidden_states, old["hidden_states"]) and torch.equal(new.group_list, old["group_list"])
    assert new.group_list_type == old["group_list_type"] == 1
    y = new.hidden_states * 3
    assert torch.equal(dispatcher.token_combine(y, new.combine_metadata), dispatcher.token_combine(y, old["context_metadata"]))


@pytest.mark.parametrize(
    "quant, routing, message",
    [
        (_quant("NONE", comm_quant_mode=2), {}, "comm_quant_mode=2 is not supported"),
        (_quant("W8A8MXFP"), {}, "dispatch with quant_type=W8A8MXFP is not supported"),
        (_quant("W8A8FP"), {}, "dispatch with quant_type=W8A8FP is not supported"),
        (None, dict(pertoken_scale=torch.ones(2)), "pertoken_scale is not supported"),
    ],
)
def test_vllm_dispatch_input_rejects_what_it_cannot_honour(quant: object, routing: dict, message: str) -> None:
    dispatcher = vllm_ascend.MoETokenDispatcher(top_k=2, num_experts=4)
    with pytest.raises(ValueError, match=re.escape(message)):
        dispatcher.token_dispatch(_dispatch_input(torch.randn(2, 8), torch.rand(2, 2), torch.tensor([[0, 1], [2, 3]]), quant, **routing))


@pytest.mark.parametrize("layout", ["ragged", "padded"])
def test_vllm_with_quant(layout: str) -> None:
    """``with_quant=True`` (or a W8A8 / W4A8 ``quant``): int8 ``hidden_states [rows, H]`` and float32
    ``dynamic_scale [rows]``, what vllm-ascend's MC2 dispatcher returns (quant_mode 2) and its grouped
    matmuls take as ``per_token_scale``: the rows and scales of ``moe.dispatch_quantized(quant="int8",
    quant_block=0)``, groups as without quantization, and combine of the dequantized rows."""
    gen = torch.Generator().manual_seed(1)
    x, w, ids = torch.randn(5, 8, generator=gen).bfloat16(), torch.rand(5, 2, generator=gen), torch.tensor([[0, 3], [1, 2], [3, 0], [2, 1], [0, 1]])
    kw = dict(layout="padded", capacity=4, max_tokens_per_rank=5) if layout == "padded" else {}
    dispatcher = vllm_ascend.MoETokenDispatcher(top_k=2, num_experts=4, **kw)
    plain = dispatcher.token_dispatch(x, w, ids)
    old = dispatcher.token_dispatch(x, w, ids, with_quant=True)
    new = dispatcher.token_dispatch(_dispatch_input(x, w, ids, _quant("W4A8")))
    d = moe_ops.dispatch(x, ids, w, 4, quant="int8", quant_block=0, **kw)
    rows, scale = old["hidden_states"], old["dynamic_scale"]
    assert rows.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == rows.shape[:1] == plain["hidden_states"].shape[:1]
    assert torch.equal(rows, d.recv_x.flatten(0, -2)) and torch.equal(scale, d.recv_scales.flatten())
    assert torch.equal(new.hidden_states, rows) and torch.equal(new.dynamic_scale, scale) and torch.equal(new.group_list, plain["group_list"])
    assert old["group_list_type"] == new.group_list_type == 1 and torch.equal(old["group_list"], plain["group_list"])
    y = (rows.float() * scale.unsqueeze(1)).bfloat16()
    assert torch.equal(dispatcher.token_combine(y, new.combine_metadata), dispatcher.token_combine(y, plain["context_metadata"]))
