"""The plain values that the mask-generation ops and the rewrite read, in one frozen dataclass.

The graph pass inserts ``torch.ops.dam.*`` plan calls; their scalar arguments are all floats, ints and strings
in a long row (``tau``, ``mu``, ``density`` and ``mass_target`` are all floats), so they are built here *by
name*: a reordering can never bind a wrong value silently. The face package's ``DAMConfig.mask_options()``
makes one; nothing here knows about ``DAMConfig`` or ``DAMProfile``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MASK_SOURCES = ("dynamic", "calibrated", "dense", "streaming")


@dataclass(frozen=True)
class MaskOptions:
    """What a site's plan and its sparse op are built from (meanings and defaults: ``DAMConfig``'s, whose
    ``mask_options()`` is the usual way to get one; here every value is required, so there is one set of defaults).

    ``density``: the dynamic prefill plan's cap (1.0: none); ``decode_density``: the share of its blocks a
    dynamic decode step keeps at least (``DAMConfig.mask_options`` resolves both from ``density`` and the
    estimator's registered ``density``). ``dense_layers``: sites of the model's first this many layers run dense
    at every length (the pass gives them ``min_seq_len=ALWAYS_DENSE``). ``corner_len``: the calibrated source's
    pattern capture length (its decode plan keeps every key before the row while the row is inside it); 0 for
    the other sources. ``scale`` arguments below are the site's SDPA scale: ``None``, a float, or an FX node of
    a symbolic float.
    """

    source: str
    block_size: int
    min_seq_len: int
    kernel: str
    tau: float
    box_cox_lambda: float
    mu: float
    density: float
    decode_density: float
    mass_target: float
    sink_blocks: int
    local_blocks: int
    estimator: str
    dense_layers: int
    corner_len: int = 0

    def __post_init__(self) -> None:
        if self.source not in MASK_SOURCES:
            raise ValueError(f"source must be one of {', '.join(map(repr, MASK_SOURCES))}, got {self.source!r}")
        if self.source == "calibrated" and not (isinstance(self.corner_len, int) and self.corner_len >= 1):
            raise ValueError(f"corner_len must be the profile's PCL (an int >= 1) for the calibrated source, "
                             f"got {self.corner_len!r}")

    def _common(self, is_causal: bool) -> dict[str, Any]:
        return dict(block_size=self.block_size, is_causal=is_causal, min_seq_len=self.min_seq_len, kernel=self.kernel)

    def dense_plan_kwargs(self, is_causal: bool) -> dict[str, Any]:
        """``dam::dense_plan`` / ``dam::pattern_plan`` arguments after their tensors."""
        return self._common(is_causal)

    def streaming_plan_kwargs(self, is_causal: bool) -> dict[str, Any]:
        """``dam::streaming_plan`` arguments after ``(query, key)``."""
        return {**self._common(is_causal), "sink_blocks": self.sink_blocks, "local_blocks": self.local_blocks}

    def dynamic_plan_kwargs(self, is_causal: bool, scale: Any) -> dict[str, Any]:
        """``dam::dynamic_plan`` arguments after ``(query, key)`` (also ``dam::hybrid_plan``'s after its tensors)."""
        return {
            **self._common(is_causal), "scale": scale, "tau": self.tau, "box_cox_lambda": self.box_cox_lambda,
            "mu": self.mu, "density": self.density, "mass_target": self.mass_target,
            "sink_blocks": self.sink_blocks, "local_blocks": self.local_blocks, "estimator": self.estimator,
        }

    def prefill_plan_kwargs(self, is_causal: bool, scale: Any) -> dict[str, Any]:
        """The arguments after the tensors of ``source``'s prefill plan op."""
        if self.source == "dynamic":
            return self.dynamic_plan_kwargs(is_causal, scale)
        if self.source == "streaming":
            return self.streaming_plan_kwargs(is_causal)
        return self.dense_plan_kwargs(is_causal)

    def decode_plan_kwargs(self, scale: Any) -> dict[str, Any]:
        """``dam::decode_plan`` arguments after ``(query, key, attn_mask, diagonals, columns)``."""
        return dict(
            source=self.source, block_size=self.block_size, min_seq_len=self.min_seq_len, kernel=self.kernel,
            sink_blocks=self.sink_blocks, local_blocks=self.local_blocks, density=self.decode_density, scale=scale,
            corner_len=self.corner_len,
        )

    def attention_kwargs(self, is_causal: bool, enable_gqa: bool) -> dict[str, Any]:
        """``dam::sparse_attention`` arguments after ``scale``."""
        return dict(is_causal=is_causal, enable_gqa=enable_gqa, block_size=self.block_size,
                    min_seq_len=self.min_seq_len, kernel=self.kernel)
