"""The two errors moe_ops raises on purpose."""


class MoEInputError(ValueError):
    """A dispatch/combine argument is malformed, on this rank or on a peer. Raised before any token
    moves, with the same message on every rank of the group."""


class MoECommunicationError(RuntimeError):
    """A collective failed or timed out mid-call (a peer exited, hung, or the group is broken)."""
