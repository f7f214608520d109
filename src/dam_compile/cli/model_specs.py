"""Models by name, for the CLI and the benchmarks: released HuggingFace shapes built from their configs (random
weights, no download), tiny versions of them for the CPU, a local HF directory, or ``module:function``.

A spec resolves to a :class:`ModelSpec`: the model (eval mode) and inputs of a requested length.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

LLAMA3_ROPE = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)

# (config class, keyword arguments) of each released model's config.json, rope scaling included.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-3.2-1b": ("LlamaConfig", dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        head_dim=64, vocab_size=128256, rope_theta=500000.0, rope_scaling={**LLAMA3_ROPE, "factor": 32.0},
        tie_word_embeddings=True)),
    "llama-3.2-3b": ("LlamaConfig", dict(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
        head_dim=128, vocab_size=128256, rope_theta=500000.0, rope_scaling={**LLAMA3_ROPE, "factor": 32.0},
        tie_word_embeddings=True)),
    "llama-3.1-8b": ("LlamaConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=128256, rope_theta=500000.0, rope_scaling={**LLAMA3_ROPE, "factor": 8.0})),
    "qwen2-7b": ("Qwen2Config", dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        vocab_size=152064, rope_theta=1000000.0)),
    "mistral-7b": ("MistralConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=32768, rope_theta=1000000.0, sliding_window=None)),
    "gpt2": ("GPT2Config", dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257)),
    "bert-base": ("BertConfig", dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=30522)),
}
ALIASES = {"mistral-7b-v0.3": "mistral-7b"}
_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=512)
TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-llama": ("LlamaConfig", dict(_TINY, num_key_value_heads=2)),
    "tiny-qwen2": ("Qwen2Config", dict(_TINY, num_key_value_heads=2)),
    "tiny-gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=512, bos_token_id=0, eos_token_id=0)),
    "tiny-bert": ("BertConfig", dict(_TINY)),
}
ENCODERS = ("BertConfig",)


@dataclass
class ModelSpec:
    """A model and a way to make its inputs. ``make_inputs(batch, length)`` -> keyword arguments."""

    name: str
    model: torch.nn.Module
    make_inputs: Callable[[int, int], dict[str, Any]]
    notes: list[str] = field(default_factory=list)


def builtin_names() -> list[str]:
    return [*CONFIGS, *TINY_CONFIGS]


def hf_config(name: str, *, max_positions: int = 131072 + 4096, layers: int | None = None, attn: str = "sdpa"):
    """The ``transformers`` config of a built-in name."""
    import transformers

    name = ALIASES.get(name, name)
    cls, kwargs = {**CONFIGS, **TINY_CONFIGS}[name]
    kwargs = dict(kwargs)
    if layers is not None:
        kwargs["n_layer" if cls == "GPT2Config" else "num_hidden_layers"] = layers
    positions = "n_positions" if cls == "GPT2Config" else "max_position_embeddings"
    return getattr(transformers, cls)(**kwargs, **{positions: max_positions}, attn_implementation=attn)


def build_from_config(config, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A random-weight model for ``config`` (a causal LM, or the bare encoder for BERT), in eval mode."""
    import transformers

    torch.manual_seed(seed)
    kind = type(config).__name__.replace("Config", "")
    cls = f"{kind}Model" if type(config).__name__ in ENCODERS else (
        "GPT2LMHeadModel" if kind == "GPT2" else f"{kind}ForCausalLM")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = getattr(transformers, cls)(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def random_token_inputs(vocab: int, device: Any, seed: int = 0) -> Callable[[int, int], dict[str, Any]]:
    def make(batch: int, length: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed + length)
        return {"input_ids": torch.randint(1, vocab, (batch, length), generator=g).to(device)}

    return make


def resolve(spec: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
            layers: int | None = None) -> ModelSpec:
    """A built-in name, a local HuggingFace directory (its weights when present, else random), or
    ``package.module:function`` returning ``(model, inputs)`` where inputs is a dict or a callable
    ``(batch, length) -> dict``. Raises ``ValueError`` naming the spec when none of these fits."""
    if ALIASES.get(spec, spec) in CONFIGS or spec in TINY_CONFIGS:
        config = hf_config(spec, layers=layers)
        model = build_from_config(config, device=device, dtype=dtype)
        notes = ["random weights (built from the released config, nothing downloaded)"]
        if layers is not None:
            notes.append(f"first {layers} layers only (--layers)")
        return ModelSpec(spec, model, random_token_inputs(config.vocab_size, device), notes)
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        return _local_directory(path, device, dtype)
    if ":" in spec and not path.exists():
        return _function_spec(spec, device)
    raise ValueError(
        f"model spec {spec!r} is not a built-in name ({', '.join(builtin_names())}), a directory with a "
        "config.json, or module:function"
    )


def _local_directory(path: Path, device, dtype) -> ModelSpec:
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, attn_implementation="sdpa")
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    auto = transformers.AutoModel if type(config).__name__ in ENCODERS else transformers.AutoModelForCausalLM
    if has_weights:
        model = auto.from_pretrained(path, attn_implementation="sdpa", torch_dtype=dtype).to(device).eval()
        notes = [f"weights from {path}"]
    else:
        model = build_from_config(config, device=device, dtype=dtype)
        notes = [f"random weights ({path} has a config but no weights)"]
    return ModelSpec(str(path), model, random_token_inputs(config.vocab_size, device), notes)


def _function_spec(spec: str, device) -> ModelSpec:
    module_name, _, function = spec.partition(":")
    try:
        made = getattr(importlib.import_module(module_name), function)()
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"model spec {spec!r}: cannot load {function!r} from {module_name!r} ({exc})") from None
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module)):
        raise ValueError(f"model spec {spec!r}: {function}() must return (model, inputs)")
    model, inputs = made
    make = inputs if callable(inputs) else (lambda batch, length: inputs)
    notes = [] if callable(inputs) else ["inputs fixed by the function (--seq-len and --batch ignored)"]
    return ModelSpec(spec, model.eval(), make, notes)
