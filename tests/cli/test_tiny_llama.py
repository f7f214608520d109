"""The plain-PyTorch Llama of the demo (cli/tiny_llama.py) against a float64 forward written here from the
definitions (RMSNorm, rotary embeddings on half-split pairs, grouped-query causal attention, SwiGLU)."""

import math

import pytest
import torch

from dam_compile.cli.tiny_llama import TinyLlama, TinyLlamaConfig

CFG = TinyLlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=6,
                      num_kv_heads=2, rope_theta=500.0)


def linear(layer, x):
    return x @ layer.weight.double().T


def rms_norm(norm, x):
    eps = torch.finfo(torch.float32).eps  # nn.RMSNorm's default for float32 inputs
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.weight.double()


def rotate(x, positions, theta):
    """Rotary embedding: each pair (i, i + d/2) turned by ``position * theta ** (-2i / d)``."""
    d = x.shape[-1]
    angle = positions[:, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # [N, d/2]
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)


def attention(attn, x, cfg):
    b, n, _ = x.shape
    d, group = cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    positions = torch.arange(n, dtype=torch.float64)
    q = rotate(linear(attn.q_proj, x).view(b, n, cfg.num_heads, d).transpose(1, 2), positions, cfg.rope_theta)
    k = rotate(linear(attn.k_proj, x).view(b, n, cfg.num_kv_heads, d).transpose(1, 2), positions, cfg.rope_theta)
    v = linear(attn.v_proj, x).view(b, n, cfg.num_kv_heads, d).transpose(1, 2)
    heads = []
    for h in range(cfg.num_heads):  # query head h reads K/V head h // group
        scores = q[:, h] @ k[:, h // group].transpose(-1, -2) / math.sqrt(d)
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        heads.append(scores.softmax(-1) @ v[:, h // group])
    return linear(attn.o_proj, torch.stack(heads, 2).reshape(b, n, -1))


def forward64(model, ids):
    cfg = model.cfg
    x = model.embed.weight.double()[ids]
    for block in model.layers:
        x = x + attention(block.self_attn, rms_norm(block.input_norm, x), cfg)
        h = rms_norm(block.post_norm, x)
        gate = linear(block.gate, h)
        x = x + linear(block.down, gate * torch.sigmoid(gate) * linear(block.up, h))
    return linear(model.lm_head, rms_norm(model.norm, x))


def ids(batch=2, n=37, seed=0):
    return torch.randint(0, CFG.vocab_size, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cfg", [CFG, TinyLlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                                      num_layers=1, num_heads=4, num_kv_heads=4)],
                         ids=["grouped", "one kv head per query head"])
def test_the_model_is_its_float64_definition(cfg):
    torch.manual_seed(0)
    model = TinyLlama(cfg).eval()
    x = ids(n=37) % cfg.vocab_size
    with torch.no_grad():
        logits = model(x)
        expected = forward64(model, x)
    assert logits.shape == (2, 37, cfg.vocab_size) and logits.dtype == torch.float32
    assert float((logits.double() - expected).norm() / expected.norm()) < 1e-5


def test_a_token_changes_only_the_logits_at_and_after_it():
    torch.manual_seed(0)
    model = TinyLlama(CFG).eval()
    x = ids(batch=1, n=30)
    y = x.clone()
    y[0, 20] = (y[0, 20] + 1) % CFG.vocab_size
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :20], b[:, :20], atol=1e-6)
    assert (a[:, 20:] - b[:, 20:]).abs().amax(-1).min() > 1e-4


def test_shapes_and_buffers():
    model = TinyLlama()  # the demo's default shape
    cfg = model.cfg
    assert (cfg.head_dim, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (32, 4, 8, 2)
    attn = model.layers[0].self_attn
    assert attn.k_proj.weight.shape == (cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size)
    assert attn.q_proj.weight.shape == (cfg.hidden_size, cfg.hidden_size)
    assert "inv_freq" not in model.state_dict() and model.inv_freq.shape == (cfg.head_dim // 2,)
    names = [n for n, _ in model.named_modules() if n.endswith("self_attn")]
    assert names == [f"layers.{i}.self_attn" for i in range(4)]  # the module paths the demo's report shows
