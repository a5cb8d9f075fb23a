"""moe_ops inside the real NeMo Automodel 0.7.0 (``nemo-automodel``, installed by tools/in-env.sh): its
``MoE`` layer on CPU over gloo, moe_ops swapped in as docs/integrations/nemo-automodel.md says
(``install(backend)``, then ``dispatcher="deepep"``), against NeMo's own ``dispatcher="torch"``: output,
input gradient and every parameter gradient, exactly (fp32; with ``moe_router_expert_pad_multiple`` to the last
bits, the padding changing the grouped GEMMs' shapes). At W = 1 NeMo builds no flex dispatcher (it
falls back to ``GroupedExperts``), so there its ``GroupedExpertsDeepEP`` is put in by hand. Plus the
interface: every public member of NeMo's classes exists in ours with a compatible signature, its config's
fields and defaults, and ``install`` undone. (What needs no NeMo: tests/test_integrations.py.)"""

import dataclasses

import pytest
import torch

pytest.importorskip("nemo_automodel.components.moe.experts", reason="needs nemo-automodel 0.7.0 (tools/in-env.sh installs it)")

from nemo_automodel.components.moe import experts as upstream_experts  # noqa: E402
from nemo_automodel.components.moe.megatron import token_dispatcher as upstream  # noqa: E402

from moe_ops.integrations import nemo_automodel  # noqa: E402
from moe_ops.testing import nemo_automodel as tasks  # noqa: E402
from moe_ops.testing.interfaces import assert_interface  # noqa: E402


@pytest.mark.multiproc
@pytest.mark.parametrize(("size", "backend", "pad_multiple"), [(1, "auto", None), (2, "collective", None), (2, "collective", 8)])
def test_layer_matches_nemo_torch_dispatcher(worlds, size: int, backend: str, pad_multiple: int | None) -> None:
    for rank, result in enumerate(worlds(size).run(tasks.compare_task, backend, pad_multiple)):
        assert result["moe_ops dispatcher"] and result["transport"] == backend, result
        if pad_multiple:  # each expert's group padded (an idle expert's too); the results unchanged
            assert (result["counts"] % pad_multiple == 0).all() and (result["counts"] > 0).all(), result["counts"]
        assert result["ours"].keys() == result["reference"].keys()
        for name, ref in result["reference"].items():
            message = f"rank {rank}: {name} differs from NeMo's dispatcher='torch'"
            if pad_multiple:  # the padding rows change the grouped GEMMs' shapes, so their blocking: last bits
                torch.testing.assert_close(result["ours"][name], ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()), msg=message)
            else:
                assert torch.equal(result["ours"][name], ref), message


@pytest.mark.multiproc
@pytest.mark.parametrize(("size", "backend"), [(1, "auto"), (2, "collective")])
def test_quantized_wire(worlds, size: int, backend: str) -> None:
    """``install(quant="fp8_e4m3")``: the rows cross the group in FP8 and reach NeMo's experts dequantized:
    output and every gradient within FP8's rounding of NeMo's ``dispatcher="torch"`` layer (at most 10 % of
    the largest value), not equal to it, and the input's gradient arrives (straight through)."""
    for rank, result in enumerate(worlds(size).run(tasks.compare_task, backend, None, "fp8_e4m3")):
        assert result["moe_ops dispatcher"], result
        for name, ref in result["reference"].items():
            diff, scale = (result["ours"][name] - ref).abs().max().item(), ref.abs().max().item()
            assert diff <= 0.1 * scale, f"rank {rank}: {name} differs by {diff} (largest {scale})"
        assert not torch.equal(result["ours"]["out"], result["reference"]["out"]), f"rank {rank}: rows not quantized"
        assert result["ours"]["grad x"].abs().sum() > 0, f"rank {rank}: no gradient reached the input"


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (nemo_automodel.MoEFlexTokenDispatcher, upstream.MoEFlexTokenDispatcher),
        (nemo_automodel.TokenDispatcherConfig, upstream.TokenDispatcherConfig),
    ],
)
def test_interface(ours: type, theirs: type) -> None:
    assert_interface(ours, theirs)


def test_config_fields_and_defaults_are_nemos() -> None:
    def fields(cls: type) -> list[tuple[str, object]]:
        return [(f.name, f.default) for f in dataclasses.fields(cls)]

    assert fields(nemo_automodel.TokenDispatcherConfig) == fields(upstream.TokenDispatcherConfig)


def test_install_is_reversible() -> None:
    def names() -> tuple[object, ...]:
        deepep_experts = upstream_experts.GroupedExpertsDeepEP
        return upstream_experts.TokenDispatcherConfig, upstream_experts.MoEFlexTokenDispatcher, deepep_experts._init_deepep_buffer

    before = names()
    patches = nemo_automodel.install("collective")
    assert upstream_experts.MoEFlexTokenDispatcher.transport == "collective"
    assert upstream_experts.TokenDispatcherConfig is nemo_automodel.TokenDispatcherConfig
    nemo_automodel.install("auto")  # replaces the first
    assert upstream_experts.MoEFlexTokenDispatcher.transport == "auto"
    patches.undo()
    assert names() == before
