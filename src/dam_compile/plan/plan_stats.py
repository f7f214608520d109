"""The measured density of the plans that ``dam::sparse_attention`` actually ran, for benchmarks.

``with PlanStats() as stats: model.generate(...)`` records, per call of the op, the plan's block density
(:func:`plan_density`: kept blocks over the blocks dense attention would visit), split into prefill calls
(several query rows) and decode calls (one row against the cache). A call that takes the dense path counts as
density 1.0. Recording reads the plan's counts (a device sync), so it is for measuring, not for timed runs;
while no recorder is active the op pays one list check. Calls replayed inside a CUDA graph are not seen (no
Python runs then).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .block_plan import BlockSparsePlan
from .reference import plan_density

_active: list["PlanStats"] = []


@dataclass
class PlanStats:
    """Densities of the op calls made while this recorder is active (nested recorders each get every call)."""

    prefill: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)

    def __enter__(self) -> "PlanStats":
        _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _active.remove(self)


def recording() -> bool:
    """Whether some recorder wants the op's plans (the op's only cost when none does)."""
    return bool(_active)


def record(plan: BlockSparsePlan, q_len: int, kv_len: int, is_causal: bool, q_offset: int, dense: bool) -> None:
    """Add one op call's density to every active recorder. A decode row (``q_len == 1``) sees every cached key,
    whatever ``is_causal`` says about SDPA's top-left alignment, so its density is kept blocks over all key
    blocks."""
    decode = q_len == 1
    density = 1.0 if dense else plan_density(plan, q_len, kv_len, is_causal and not decode, 0 if decode else q_offset)
    for stats in _active:
        (stats.decode if decode else stats.prefill).append(density)


__all__ = ["PlanStats", "record", "recording"]
