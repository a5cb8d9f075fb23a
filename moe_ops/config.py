"""Run-time switches of moe_ops, read by the op kernels each time they run.

``check_values``: validate *values* of the routing inputs before any communication (expert ids in
``[0, num_experts)``, no duplicate id within a row, no NaN router weight). Off by default because it
needs a device-to-host sync per call and cannot run inside a CUDA-graph capture. With it off, ids
outside the range behave as masked (``-1``) routes; no kernel reads or writes out of bounds whatever
the values. The environment variable ``MOE_OPS_CHECK_VALUES=1`` turns it on at import.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

check_values: bool = os.environ.get("MOE_OPS_CHECK_VALUES", "0") == "1"


@contextlib.contextmanager
def value_checks(enabled: bool = True) -> Iterator[None]:
    """Temporarily switch :data:`check_values`."""
    global check_values
    previous, check_values = check_values, enabled
    try:
        yield
    finally:
        check_values = previous
