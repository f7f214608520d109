"""Tiny random-weight HuggingFace models built from configs (no download)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, attn_implementation="sdpa")


def llama():
    cfg = transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **COMMON)
    return transformers.LlamaForCausalLM(cfg)


def qwen2():
    cfg = transformers.Qwen2Config(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **COMMON)
    return transformers.Qwen2ForCausalLM(cfg)


def mistral():
    cfg = transformers.MistralConfig(
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512, sliding_window=None, **COMMON
    )
    return transformers.MistralForCausalLM(cfg)


def gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=0, eos_token_id=0,
        attn_implementation="sdpa",
    )
    return transformers.GPT2LMHeadModel(cfg)


def bert():
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512, attn_implementation="sdpa",
    )
    return transformers.BertModel(cfg)


CAUSAL_LMS = {"llama": llama, "qwen2": qwen2, "mistral": mistral, "gpt2": gpt2}
ALL_MODELS = {**CAUSAL_LMS, "bert": bert}
LAYERS = 2


def build(name: str):
    torch.manual_seed(0)
    return ALL_MODELS[name]().eval()


def main_output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def ids_for(name: str, batch: int = 1, n: int = 70) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return torch.randint(1, VOCAB, (batch, n), generator=g)
