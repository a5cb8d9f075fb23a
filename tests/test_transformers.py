"""moe_ops as HuggingFace transformers' ep_implementation: tiny random Qwen3-MoE and OLMoE on gloo,
W = 2 and 4. Logits and a training step's gradients match the single-process model and transformers' own
"all_to_all"; experts.forward compiles with fullgraph=True and no graph break, where "all_to_all" does
not (both facts are asserted, so a transformers release that fixes theirs is noticed)."""

import pytest
import torch

pytest.importorskip("transformers.distributed.expert_parallel", reason="needs transformers >= 5.23 (the hf extra)")
pytest.importorskip("accelerate", reason="transformers' distributed loading needs accelerate (the hf extra)")

from moe_ops.testing import cuda_graph, hf  # noqa: E402
from moe_ops.testing.conformance import assert_relative_close  # noqa: E402

pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module", params=hf.MODELS)
def model_path(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp(request.param))
    hf.save_tiny_model(request.param, path)
    return path


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert_relative_close(ours, ref, 1e-5, what, norm="fro")


@pytest.mark.parametrize("size", [2, 4])
def test_matches_single_process_and_all_to_all(worlds, model_path: str, size: int) -> None:
    for rank, result in enumerate(worlds(size).run(hf.compare_task, model_path)):
        for impl in hf.IMPLEMENTATIONS:
            assert_close(result[f"{impl}_logits"], result["single_logits"], f"rank {rank} {impl} logits")
            grads, single = result[f"{impl}_grads"], result["single_grads"]
            assert grads.keys() == single.keys(), f"rank {rank} {impl}: gradients of {set(grads) ^ set(single)}"
            for name in grads:
                assert_close(grads[name], single[name], f"rank {rank} {impl} grad {name}")
        for impl in ("moe_ops", "moe_ops_padded"):
            ok, breaks, error = result[f"{impl}_compile"]
            assert ok and breaks == 0, f"rank {rank}: {impl} experts.forward did not compile fullgraph: {error}"
        ok, _, error = result["all_to_all_compile"]
        assert not ok, "transformers' all_to_all now compiles with fullgraph=True: update docs/integrations/transformers.md"
        assert "data-dependent" in error or "guard" in error, error


def test_padded_variant_needs_a_bound() -> None:
    from moe_ops.integrations import transformers as integration

    integration.register()
    with pytest.raises(ValueError, match="needs a static bound"):
        integration.MoeOpsPaddedEP.bound()
    integration.register(max_tokens_per_rank=64)
    assert integration.MoeOpsPaddedEP.bound() == 64


@pytest.mark.cuda
def test_padded_variant_captures_decode_in_cuda_graph(tmp_path) -> None:
    """W = 1 on one GPU: the padded implementation's decode step replays in a CUDA graph."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM

    from moe_ops.integrations import transformers as integration
    from moe_ops.testing.harness import free_port

    bucket = 16
    hf.save_tiny_model("qwen3_moe", str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), experts_implementation="grouped_mm", dtype=torch.bfloat16).cuda()
    experts = model.model.layers[0].mlp.experts
    experts._is_expert_parallel = True  # the experts skip the sentinel id of padding rows
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cuda", (1,))
        integration.register(max_tokens_per_rank=bucket)
        step = integration.MoeOpsPaddedEP(experts, mesh, mesh)
        hidden = torch.randn(bucket, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
        idx = torch.randint(0, model.config.num_experts, (bucket, 2), device="cuda")
        weights = torch.rand(bucket, 2, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            graph, out = cuda_graph.capture(lambda: step(hidden, idx, weights))
            for seed in range(3):
                gen = torch.Generator(device="cuda").manual_seed(seed)
                hidden.copy_(torch.randn(hidden.shape, generator=gen, device="cuda", dtype=torch.bfloat16))
                idx.copy_(torch.randint(0, model.config.num_experts, idx.shape, generator=gen, device="cuda"))
                graph.replay()
                assert_relative_close(out, step(hidden, idx, weights), 2e-2, f"graph replay {seed} vs eager")
    finally:
        integration.register()
        if started:
            dist.destroy_process_group()
