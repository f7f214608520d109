"""Model specs (cli/model_specs.py): built-in names from released configs (random weights, nothing downloaded), a
local HF directory with or without weights, and ``module:function``; inputs of a requested length."""

import json

import pytest
import torch

from dam_compile.cli import model_specs
from dam_compile.cli.model_specs import CONFIGS, TINY_CONFIGS, builtin_names, hf_config, random_token_inputs, resolve

transformers = pytest.importorskip("transformers")


def test_builtin_names_are_the_released_and_tiny_configs():
    assert builtin_names() == [*CONFIGS, *TINY_CONFIGS]
    assert {"llama-3.1-8b", "gpt2", "bert-base", "tiny-llama", "tiny-bert"} <= set(builtin_names())


@pytest.mark.parametrize("name", [*CONFIGS, *TINY_CONFIGS])
def test_every_builtin_config_has_whole_heads(name):
    config = hf_config(name)
    hidden = getattr(config, "n_embd", None) or config.hidden_size
    heads = getattr(config, "n_head", None) or config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    assert heads % kv_heads == 0, name
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    assert head_dim * heads == hidden, name
    assert config._attn_implementation == "sdpa"


def test_hf_config_options():
    gpt2 = hf_config("tiny-gpt2", max_positions=300, layers=1)
    assert (type(gpt2).__name__, gpt2.n_layer, gpt2.n_positions) == ("GPT2Config", 1, 300)
    llama = hf_config("tiny-llama", max_positions=300, layers=3, attn="eager")
    assert (llama.num_hidden_layers, llama.max_position_embeddings, llama._attn_implementation) == (3, 300, "eager")
    mistral = hf_config("mistral-7b-v0.3")  # an alias
    assert type(mistral).__name__ == "MistralConfig" and mistral.num_key_value_heads == 8
    assert hf_config("llama-3.1-8b").max_position_embeddings == 131072 + 4096


def test_random_token_inputs_depend_on_seed_and_length_only():
    make = random_token_inputs(50, "cpu", seed=3)
    a, b = make(2, 16)["input_ids"], make(2, 16)["input_ids"]
    assert a.shape == (2, 16) and a.dtype == torch.int64 and torch.equal(a, b)
    assert int(a.min()) >= 1 and int(a.max()) < 50  # never token 0 (padding in the tiny configs)
    assert not torch.equal(make(2, 17)["input_ids"][:, :16], a)
    assert not torch.equal(random_token_inputs(50, "cpu", seed=4)(2, 16)["input_ids"], a)


@pytest.mark.parametrize("name, cls", [("tiny-llama", "LlamaForCausalLM"), ("tiny-gpt2", "GPT2LMHeadModel"),
                                       ("tiny-bert", "BertModel"), ("tiny-qwen2", "Qwen2ForCausalLM")])
def test_a_builtin_name_builds_its_model_with_random_weights(name, cls):
    spec = resolve(name, layers=1)
    assert type(spec.model).__name__ == cls and not spec.model.training and spec.name == name
    assert spec.notes == ["random weights (built from the released config, nothing downloaded)",
                          "first 1 layers only (--layers)"]
    with torch.no_grad():
        out = spec.model(**spec.make_inputs(2, 20))
    main = out.logits if hasattr(out, "logits") else out.last_hidden_state
    assert main.shape[:2] == (2, 20)


def test_build_from_config_is_seeded_and_restores_the_default_dtype():
    config = hf_config("tiny-llama", layers=1)
    built = [model_specs.build_from_config(config, seed=seed) for seed in (1, 1, 2)]
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in built)
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    double = model_specs.build_from_config(config, dtype=torch.float64)
    assert {p.dtype for p in double.parameters()} == {torch.float64} and not double.training
    assert torch.get_default_dtype() == torch.float32


def test_a_local_directory_with_and_without_weights(tmp_path):
    config = hf_config("tiny-llama", layers=1)
    config.save_pretrained(tmp_path / "config_only")
    spec = resolve(str(tmp_path / "config_only"))
    assert spec.notes == [f"random weights ({tmp_path / 'config_only'} has a config but no weights)"]
    saved = model_specs.build_from_config(config, seed=5)
    saved.save_pretrained(tmp_path / "weights")
    spec = resolve(str(tmp_path / "weights"))
    assert spec.notes == [f"weights from {tmp_path / 'weights'}"] and not spec.model.training
    for name, tensor in saved.state_dict().items():
        assert torch.equal(spec.model.state_dict()[name], tensor), name


def test_a_function_spec_with_fixed_or_sized_inputs(tmp_path, monkeypatch):
    (tmp_path / "spec_models.py").write_text(
        "import torch\n"
        "def fixed():\n"
        "    return torch.nn.Linear(4, 4).train(), {'input': torch.ones(1, 4)}\n"
        "def sized():\n"
        "    return torch.nn.Linear(4, 4), lambda batch, length: {'input': torch.ones(batch, length, 4)}\n"
        "def wrong():\n"
        "    return torch.nn.Linear(4, 4)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fixed = resolve("spec_models:fixed")
    assert not fixed.model.training and fixed.make_inputs(3, 9)["input"].shape == (1, 4)
    assert fixed.notes == ["inputs fixed by the function (--seq-len and --batch ignored)"]
    sized = resolve("spec_models:sized")
    assert sized.make_inputs(3, 9)["input"].shape == (3, 9, 4) and sized.notes == []
    with pytest.raises(ValueError, match="wrong\\(\\) must return \\(model, inputs\\)"):
        resolve("spec_models:wrong")
    with pytest.raises(ValueError, match="cannot load 'absent' from 'spec_models'"):
        resolve("spec_models:absent")
    with pytest.raises(ValueError, match="cannot load 'f' from 'no_such_module'"):
        resolve("no_such_module:f")


def test_an_unknown_spec_names_the_choices(tmp_path):
    (tmp_path / "empty").mkdir()
    for spec in ("llama-9", str(tmp_path / "empty")):
        with pytest.raises(ValueError, match="is not a built-in name \\(llama-3.2-1b, .*tiny-bert\\)"):
            resolve(spec)
    (tmp_path / "config.json").write_text(json.dumps({}))  # a file, not a directory
    with pytest.raises(ValueError, match="module:function"):
        resolve(str(tmp_path / "config.json"))
