"""Conformance kit: Hypothesis strategies for routing problems, checks against :mod:`moe_ops.reference`,
and a multi-process harness. Any backend runs the same suite."""
