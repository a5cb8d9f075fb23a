"""moe_ops where users already are: one module per framework, each a thin layer over ``torch.ops.moe.*``
(no second implementation of routing or exchange). Importing this package imports no framework; each
module imports its own.

* :mod:`.megatron_core`: Megatron-Core's flex and inference dispatchers, a ``MoELayer`` and ``install()``
  (imports Megatron-Core);
* :mod:`.nemo_automodel`: NeMo Automodel's ``MoEFlexTokenDispatcher``, ``TokenDispatcherConfig`` and
  ``install()`` (imports NeMo only in ``install``);
* :mod:`.torchtitan`: torchtitan's ``MoEOpsTokenDispatcher`` and the ``--override.imports`` overrides
  that put it (and SAC saving the ops) in place (imports torchtitan);
* :mod:`.vllm_ascend`: vllm-ascend's ``MoETokenDispatcher``;
* :mod:`.transformers`: HuggingFace transformers' ``ep_implementation="moe_ops"`` (imports transformers);
* :mod:`.common`: what the adapters share.
"""
