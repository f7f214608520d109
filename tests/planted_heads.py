"""A one-layer causal model whose four attention heads are built, not learned, so their kind is known:

- head 0, a sink: every query attends to key 0;
- head 1, local: every query attends to itself (diagonal 0);
- head 2, previous token: every query attends to the key before it (diagonal 1);
- head 3, retrieval: every query attends to the ``NEEDLE`` token, wherever it sits (uniformly over its prefix
  while none is visible).

Positions are coded as fixed random unit vectors, so ``q . k`` is ``SHARP`` on the intended key and about
``SHARP / sqrt(HEAD_DIM)`` elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VOCAB, NEEDLE, HEADS, HEAD_DIM, MAX_LEN, SHARP = 64, 1, 4, 64, 8192, 24.0
RETRIEVAL_HEAD = 3


class PlantedAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("codes", F.normalize(torch.randn(MAX_LEN, HEAD_DIM, generator=g), dim=-1))
        self.register_buffer("unit", F.normalize(torch.randn(HEAD_DIM, generator=g), dim=0))
        self.value = nn.Embedding(VOCAB, HEADS * HEAD_DIM)
        self.out = nn.Linear(HEADS * HEAD_DIM, VOCAB)

    def forward(self, ids: Tensor) -> Tensor:
        b, n = ids.shape
        pos = torch.arange(n, device=ids.device)
        code, unit = self.codes[:n], self.unit.expand(n, HEAD_DIM)
        first = (pos == 0).to(code.dtype)[:, None] * unit
        needle = (ids == NEEDLE).to(code.dtype)[..., None] * unit  # [B, N, D]
        previous = self.codes[(pos - 1).clamp(min=0)]
        queries = [SHARP * unit, SHARP * code, SHARP * previous]
        keys = [first, code, code]
        q = torch.stack([t.expand(b, n, HEAD_DIM) for t in queries] + [(SHARP * unit).expand(b, n, HEAD_DIM)], 1)
        k = torch.stack([t.expand(b, n, HEAD_DIM) for t in keys] + [needle], 1)
        v = self.value(ids).view(b, n, HEADS, HEAD_DIM).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
        return out.transpose(1, 2).reshape(b, n, -1)


class PlantedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = PlantedAttention()

    def forward(self, ids: Tensor) -> Tensor:
        return self.attn.out(self.attn(ids))


def needle_samples(count: int, length: int, *, after: int, seed: int = 0) -> list[Tensor]:
    """``count`` samples ``[1, length]`` of random tokens with one needle at a random position ``>= after``."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(count):
        ids = torch.randint(2, VOCAB, (1, length), generator=g)
        ids[0, int(torch.randint(after, length, (1,), generator=g))] = NEEDLE
        samples.append(ids)
    return samples


def make() -> tuple[PlantedModel, dict[str, Tensor]]:
    """``module:function`` model spec for ``dam-compile inspect``: the model and a 96-token input."""
    return PlantedModel().eval(), {"ids": needle_samples(1, 96, after=40, seed=11)[0]}
