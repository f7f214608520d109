"""Constants the kernels, their launchers and the graph pass share, defined once.

``LOG2E`` and ``LN2`` are ``tl.constexpr`` so ``@triton.jit`` code can read them as module globals (the kernels
work in base 2: ``exp2`` is the fast path); host code reads ``.value``.
"""

from __future__ import annotations

import torch
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the fused kernels compute in
MAX_HEAD_DIM = 256  # the largest head dim the kernels' tiles hold
ALWAYS_DENSE = 2**62  # a site's min_seq_len that no key length reaches: its op always takes the dense path
LOG2E = tl.constexpr(1.4426950408889634)  # natural-log scores -> base 2
LN2 = tl.constexpr(0.6931471805599453)  # base-2 log-sum-exp -> natural
