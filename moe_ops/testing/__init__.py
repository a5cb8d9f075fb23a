"""Conformance kit: Hypothesis strategies for routing problems, checks against :mod:`moe_ops.reference`,
and a multi-process harness. Any backend runs the same suite. :mod:`moe_ops.testing.npu_sim` simulates
torch_npu's MoE ops on CPU, so that the NPU paths run here too."""
