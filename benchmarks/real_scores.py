"""How a variant's answers compare with full attention's on one document: teacher-forced over the second half
of the prompt (perplexity, KL, top-1 agreement) and through greedy ``generate()`` (tokens until the first
divergence from full attention's continuation).

One forward serves both: the prompt's first ``N - 1`` tokens run once with a KV cache (their logits give the
teacher-forced scores: every target of the second half is predicted inside them), and ``generate()`` continues
from that cache (the last prompt token and every answer token are its decode steps). The prompt is prefilled
once per variant instead of twice, which is what makes 8K prompts affordable on a CPU."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Positions scored per chunk of the log-softmax (a [chunk, vocab] float32 block at a time).
SCORE_CHUNK = 2048


@dataclass
class Reference:
    """Full attention on one prompt: log-probabilities of the second half's next tokens (float32 ``[N/2, V]``,
    on the model's device), their targets, and the greedy continuation."""

    log_probs: Tensor
    targets: Tensor
    continuation: Tensor


@torch.no_grad()
def scored_run(model, ids: Tensor, new_tokens: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(log_probs [N/2, V] float32, targets [N/2], continuation [new_tokens])`` for ``ids [1, N]``: the
    next-token distribution at every position of the second half, and greedy ``generate()`` of exactly
    ``new_tokens`` tokens after the whole prompt."""
    from transformers import DynamicCache

    n = ids.shape[1]
    half = n // 2
    cache = DynamicCache()
    logits = model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True, logits_to_keep=n - half).logits
    log_probs = logits[0].float().log_softmax(-1)
    del logits
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=model.config.eos_token_id)
    return log_probs, ids[0, half:], out[0, n:]


def reference(model, ids: Tensor, new_tokens: int) -> Reference:
    return Reference(*scored_run(model, ids, new_tokens))


def compare(log_probs: Tensor, ref: Reference) -> dict:
    """Perplexity of the targets, mean KL(full || variant) per token (nats) and the share of positions whose
    top-1 token equals full attention's."""
    nll = kl = agree = 0.0
    for start in range(0, log_probs.shape[0], SCORE_CHUNK):
        p, r = log_probs[start:start + SCORE_CHUNK], ref.log_probs[start:start + SCORE_CHUNK]
        t = ref.targets[start:start + SCORE_CHUNK]
        nll += float(-p.gather(-1, t[:, None]).sum())
        kl += float((r.exp() * (r - p)).sum())
        agree += float((p.argmax(-1) == r.argmax(-1)).sum())
    count = log_probs.shape[0]
    return {"nll": nll / count, "ppl": math.exp(nll / count), "kl": kl / count, "top1": agree / count,
            "positions": count}


def tokens_until_divergence(tokens: Tensor, ref: Reference) -> int:
    """How many leading tokens of ``tokens`` equal full attention's continuation."""
    same = (tokens.to(ref.continuation.device) == ref.continuation).int()
    return int(same.cumprod(0).sum())
