"""Two scalar helpers every layer shares, defined once here at the lowest layer (``kernels.common`` re-exports
them for the launchers): ceiling division and SDPA's default score scale.

Plain Python on purpose: both also run on symbolic sizes inside traced planners (``torch.compile``, export), and
host time per call matters in the launchers (Triton's ``cdiv`` is jit-wrapped).
"""

from __future__ import annotations

import math


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ``b > 0``: ints, or symbolic ints (written ``(a + b - 1) // b``, the form the plans'
    fake shapes use, so traced sizes stay one expression)."""
    return (a + b - 1) // b


def softmax_scale(scale: float | None, head_dim: int) -> float:
    """The score scale of an attention call: ``scale``, or SDPA's default ``1 / sqrt(head_dim)`` when ``None``.
    ``scale`` comes back as given (a float, or a symbolic float in a traced planner: converting it would
    specialize the graph on its value); launchers that need a Python float convert it themselves."""
    if scale is not None:
        return scale
    # math.sqrt is SDPA's exact value for an int; a symbolic head dim (make_fx tracing a planner) would be
    # specialized by it, so that one takes a symbolic power.
    return 1.0 / (math.sqrt(head_dim) if isinstance(head_dim, int) else head_dim**0.5)
