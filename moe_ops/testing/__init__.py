"""Conformance kit: Hypothesis strategies for routing problems (:mod:`.problems`), checks against
:mod:`moe_ops.reference` (:mod:`.conformance`), a multi-process harness (:mod:`.harness`), and CPU
simulators of the libraries the transports run on (:mod:`.sim`). Any backend runs the same suite."""
