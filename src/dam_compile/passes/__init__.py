"""FX graph passes, one step per module: find SDPA, decide, keep a decode step that runs dense as SDPA
(``decode_path``), read a causal mask as ``is_causal`` (``causal_mask``) and its key padding once per mask
(``key_padding``), read K/V before ``repeat_kv`` (``gqa``), insert mask generation, rewrite, verify;
``pipeline`` chains them. They take plain data (``MaskOptions``, a ``SiteProfile``), never the face's config.
"""

from .causal_mask import read_causal_mask
from .decide import Decision, decide
from .find_sdpa import SDPASite, find_sdpa_sites, is_sdpa, module_path, normalize_module_path
from .insert_mask import insert_mask_generation
from .pipeline import RewriteResult, SiteReport, copy_graph_module, rewrite_attention
from .plan_call import MASK_GENERATORS, PlanCall, plan_call
from .rewrite import SPARSE_ATTENTION, replace_with_sparse_attention
from .profile_protocol import ProfileMismatchError, SiteProfile, profile_entry
from .verify import RewriteCheckError, check_rewrite, fx_to_digraph

__all__ = [
    "MASK_GENERATORS",
    "SPARSE_ATTENTION",
    "Decision",
    "PlanCall",
    "ProfileMismatchError",
    "RewriteCheckError",
    "RewriteResult",
    "SDPASite",
    "SiteProfile",
    "SiteReport",
    "check_rewrite",
    "copy_graph_module",
    "decide",
    "find_sdpa_sites",
    "fx_to_digraph",
    "insert_mask_generation",
    "is_sdpa",
    "module_path",
    "normalize_module_path",
    "plan_call",
    "profile_entry",
    "read_causal_mask",
    "replace_with_sparse_attention",
    "rewrite_attention",
]
