"""The architecture switches (model.py, config.py's ARCHES): post-norm blocks, GPT-2's tanh GELU,
the --arch presets, and activation checkpointing. Tiny models on CPU, fp32 throughout."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from minilm.config import Config, ModelConfig, config_from_saved
from minilm.model import CAUSAL, MLP, Block, EncoderDecoder, KVCache, Transformer, decoding_mask, padding_mask

V, S = 97, 32  # vocab and context window of the tiny test models

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_cfg(**overrides) -> ModelConfig:
    base = dict(vocab_size=V, seq_len=S, n_layer=2, n_head=2, n_embd=32)
    base.update(overrides)
    return ModelConfig(**base)


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Larger random weights than the init's (norm weights and biases included), so that a
    misplaced norm or a missing term changes the output by far more than the tolerance."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    return module


def make_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return randomize_(Transformer(tiny_cfg(**overrides)), seed).eval()


def random_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


POST = dict(norm_placement="post", norm="layernorm", bias=True, position="learned")   # BERT's block


# ----------------------------------------------------------------------------- post-norm
def layer_norm(x, norm):
    """(x - mean) / sqrt(var + eps) * weight + bias, written out."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def attention_closed_form(attn, x, source, allowed):
    """softmax(q k^T / sqrt(D), where allowed) v through attn's weights, head by head."""
    C, H = x.shape[-1], attn.n_head
    w_q, w_k, w_v = attn.qkv.weight.split(C)
    b_q, b_k, b_v = attn.qkv.bias.split(C)
    heads = []
    for h in range(H):
        cols = slice(h * C // H, (h + 1) * C // H)
        q = x @ w_q[cols].T + b_q[cols]
        k = source @ w_k[cols].T + b_k[cols]
        v = source @ w_v[cols].T + b_v[cols]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(C // H)
        heads.append(torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v)
    return torch.cat(heads, -1) @ attn.proj.weight.T + attn.proj.bias


@torch.no_grad()
def test_post_norm_block_is_the_closed_form_norm_after_each_residual_sum():
    """x1 = LN1(x + attn(x)), out = LN2(x1 + mlp(x1)): BERT's block, from its weights by hand;
    with a source (queries at some positions) the source is read as it is, un-normed."""
    torch.manual_seed(0)
    block = randomize_(Block(tiny_cfg(**POST))).eval()
    x = torch.randn(2, 6, 32)
    allowed = torch.ones(6, 6, dtype=torch.bool).tril()
    x1 = layer_norm(x + attention_closed_form(block.attn, x, x, allowed), block.norm1)
    mlp = F.gelu(x1 @ block.mlp.up.weight.T + block.mlp.up.bias) @ block.mlp.down.weight.T + block.mlp.down.bias
    want = layer_norm(x1 + mlp, block.norm2)
    torch.testing.assert_close(block(x, mask=CAUSAL), want, atol=1e-5, rtol=1e-5)
    # queries at positions 1 and 4 reading the whole row as their source: those rows of the full output
    rows = torch.tensor([1, 4])
    got = block(x[:, rows], x, mask=allowed[rows], positions=rows)
    torch.testing.assert_close(got, want[:, rows], atol=1e-5, rtol=1e-5)
    # the same block pre-norm is another function (the test can tell them apart)
    block.post_norm = False
    assert (block(x, mask=CAUSAL) - want).abs().max() > 1e-2


def test_post_norm_model_has_no_final_norm_and_default_keys_are_unchanged():
    post = Transformer(tiny_cfg(**POST, n_layer=1))
    assert not any(key.startswith("norm.") for key in post.state_dict())
    assert sorted(post.state_dict()) == sorted([
        "tok_emb.weight", "pos_emb.weight", "blocks.0.norm1.weight", "blocks.0.norm1.bias",
        "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias",
        "blocks.0.norm2.weight", "blocks.0.norm2.bias", "blocks.0.mlp.up.weight", "blocks.0.mlp.up.bias",
        "blocks.0.mlp.down.weight", "blocks.0.mlp.down.bias"])
    # the default model (a pre-norm decoder) keeps exactly the keys old checkpoints hold
    default = Transformer(ModelConfig(vocab_size=V, n_layer=1))
    assert list(default.state_dict()) == [
        "tok_emb.weight", "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
        "blocks.0.norm2.weight", "blocks.0.mlp.up.weight", "blocks.0.mlp.down.weight", "norm.weight"]
    # and an old checkpoint's config, which has no norm_placement, is that pre-norm model
    saved = Config().to_dict()
    del saved["model"]["norm_placement"]
    assert config_from_saved(saved).model.norm_placement == "pre"


@pytest.mark.parametrize("position", ["rope", "learned"])
@torch.no_grad()
def test_post_norm_decoder_is_causal_and_its_kv_cache_equals_the_full_pass(position):
    model = make_model(**{**POST, "position": position})
    T = 24
    ids = random_ids(2, T, seed=1)
    full = model.logits(model(ids))
    for t in (0, 7, T - 2):
        later = ids.clone()
        later[:, t + 1:] = (ids[:, t + 1:] + 1) % V
        changed = model.logits(model(later))
        torch.testing.assert_close(changed[:, :t + 1], full[:, :t + 1], atol=1e-5, rtol=0)
        assert (changed[:, t + 1:] - full[:, t + 1:]).abs().amax() > 1e-3
    cache = KVCache(model.cfg, batch_size=2, device="cpu", dtype=torch.float32)
    bounds = [0, 7, 13, 14, T]           # a prefill, a chunk, one token, the rest
    for start, end in zip(bounds, bounds[1:]):
        mask = CAUSAL if not start else decoding_mask(end - start, start)
        hidden = model(ids[:, start:end], cache=cache, mask=mask)
        torch.testing.assert_close(model.logits(hidden), full[:, start:end], atol=1e-5, rtol=0)


def test_post_norm_outputs_at_is_the_full_output_there():
    model = make_model(**POST, n_segment=2)
    B, T = 3, 16
    ids = random_ids(B, T, seed=2)
    mask = padding_mask(torch.tensor([T, 11, 5]), T)
    keep = torch.nonzero((torch.rand(B, T, generator=torch.Generator().manual_seed(3)) < 0.3).flatten()).squeeze(1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask=mask, outputs_at=keep), model(ids, mask=mask).flatten(0, 1)[keep],
                                   atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_post_norm_encoder_decoder_decodes_the_same_with_and_without_a_cache():
    torch.manual_seed(0)
    model = randomize_(EncoderDecoder(tiny_cfg(**POST, n_decoder_layer=2))).eval()
    assert not any(".norm." in key or key.startswith(("encoder.norm.", "decoder.norm.")) for key in model.state_dict())
    src, tgt = random_ids(2, 10, seed=4), random_ids(2, 8, seed=5)
    src_mask = padding_mask(torch.tensor([10, 6]), 10)
    enc = model.encode(src, src_mask)
    full = model.logits(model.decode(tgt, enc, src_mask))
    cache = KVCache(model.decoder.cfg, batch_size=2, device="cpu", dtype=torch.float32)
    steps = [model.logits(model.decode(tgt[:, :3], enc, src_mask, cache=cache))]
    for t in range(3, 8):
        steps.append(model.logits(model.decode(tgt[:, t:t + 1], enc, src_mask, mask=None, cache=cache)))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- GELU, tanh form
@torch.no_grad()
def test_gelu_tanh_is_gpt2s_formula():
    torch.manual_seed(0)
    cfg = tiny_cfg(mlp="gelu_tanh", bias=True)
    mlp = randomize_(MLP(cfg))
    x = 3 * torch.randn(4, 32)
    h = x @ mlp.up.weight.T + mlp.up.bias
    gelu_tanh = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    want = gelu_tanh @ mlp.down.weight.T + mlp.down.bias
    torch.testing.assert_close(mlp(x), want, atol=1e-5, rtol=1e-5)
    # the exact GELU is another function (the formula above tells them apart)
    mlp.kind = "gelu"
    assert (mlp(x) - want).abs().max() > 1e-4
    assert cfg.mlp_hidden == 4 * 32   # a GELU MLP's width
