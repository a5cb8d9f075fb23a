"""moe_ops where users already are: one module per framework, each a thin layer over ``torch.ops.moe.*``
(no second implementation of routing or exchange). Importing this package imports no framework; each
module imports its own.

* :mod:`.megatron`: Megatron-Core / NeMo Automodel ``MoEFlexTokenDispatcher`` and ``TokenDispatcherConfig``,
  and Megatron-Core's inference all-gather dispatcher;
* :mod:`.vllm_ascend`: vllm-ascend's ``MoETokenDispatcher``;
* :mod:`.transformers`: HuggingFace transformers' ``ep_implementation="moe_ops"`` (imports transformers).
"""
