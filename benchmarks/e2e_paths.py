"""The ways a user compiles a model with ``backend="dam"``, each a prefill runner for ``bench_e2e.py --paths``.

- ``static``: ``torch.compile(forward, backend="dam")`` called as it is (torch's default: the first compile is
  specialised to the prompt's length; a new length compiles again);
- ``mark_dynamic``: the same after ``torch._dynamo.mark_dynamic(ids, 1)`` (one graph for every length);
- ``dynamic``: ``torch.compile(..., dynamic=True)``;
- ``reduce-overhead``: ``torch.compile(..., mode="reduce-overhead")`` called as it is (CUDA graphs);
- ``generate``: ``model.forward = torch.compile(model.forward, backend="dam")``, then ``model.generate``: the
  prefill is timed as ``generate(max_new_tokens=1)`` (time to first token) and the whole answer as
  ``generate(max_new_tokens=32)``.
"""

from __future__ import annotations

from typing import Callable

import torch

PATHS = ("static", "mark_dynamic", "dynamic", "reduce-overhead", "generate")
PREFILL_PATHS = PATHS[:4]  # the paths of the summary's path_spread (../shared/RESULTS.md)
ANSWER_TOKENS = 32


def mark_dynamic(inputs: dict) -> dict:
    for t in inputs.values():
        torch._dynamo.mark_dynamic(t, 1)
    return inputs


def path_runner(model, path: str) -> tuple[Callable[[dict], object], Callable[[], None]]:
    """``(run(inputs), restore())`` for ``path``: ``run`` computes the prefill the way that path's user would;
    ``restore`` undoes what the path did to ``model`` (the generate path compiles its ``forward``)."""
    def forward(**inputs):
        return model(**inputs, use_cache=False, logits_to_keep=1).logits

    if path == "generate":
        model.forward = torch.compile(model.forward, backend="dam")
        return (lambda inputs: generate(model, inputs, 1)), (lambda: model.__dict__.pop("forward", None))
    options = {"dynamic": True} if path == "dynamic" else {"mode": path} if path == "reduce-overhead" else {}
    compiled = torch.compile(forward, backend="dam", **options)
    if path == "mark_dynamic":
        return (lambda inputs: compiled(**mark_dynamic(inputs))), (lambda: None)
    if path == "reduce-overhead":  # each call a new step: PyTorch's advice for CUDA graphs outside training loops
        return (lambda inputs: (torch.compiler.cudagraph_mark_step_begin(), compiled(**inputs))[1]), (lambda: None)
    return (lambda inputs: compiled(**inputs)), (lambda: None)


def generate(model, inputs: dict, new_tokens: int):
    """Greedy ``generate`` of exactly ``new_tokens`` tokens."""
    return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0)
