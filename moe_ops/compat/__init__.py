"""Drop-in adapters for the dispatcher interfaces our users already call, each a thin layer over
``torch.ops.moe.*`` (no second implementation of routing or exchange):

* :mod:`moe_ops.compat.megatron` — Megatron-Core / NeMo Automodel ``MoEFlexTokenDispatcher`` and
  ``TokenDispatcherConfig``, and Megatron-Core's inference all-gather dispatcher;
* :mod:`moe_ops.compat.vllm_ascend` — vllm-ascend's ``MoETokenDispatcher``.

Importing them imports neither Megatron nor vllm.
"""
