"""Integrations with model libraries; each submodule imports its library, ``import moe_ops`` imports none."""
