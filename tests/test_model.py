"""minilm/model.py: causality, encoder masks, the KV cache, parameter counts, tying, init, and
checkpoints of compiled models. Tiny models on CPU, fp32 throughout."""
from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from minilm.checkpoint import save_checkpoint
from minilm.config import PRESETS, ModelConfig
from minilm import model as model_module
from minilm.model import (CAUSAL, KVCache, Pooler, Transformer, attention, attention_math, decoding_mask,
                          padding_mask)

V, S = 97, 32  # vocab and context window of the tiny test models


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_cfg(**overrides) -> ModelConfig:
    base = dict(vocab_size=V, seq_len=S, n_layer=2, n_head=2, n_embd=32)
    base.update(overrides)
    return ModelConfig(**base)


def randomize_(model: torch.nn.Module, seed: int = 0, norm_spread: float = 0.1) -> torch.nn.Module:
    """Replace the (very small, std 0.02) initial weights by larger random ones, including norm
    weights (1 +- norm_spread) and biases: at init every position's output is almost the same
    whatever the context, which would make "the output changes" checks weak, and a misplaced norm
    or a missing term would change the output by less than the tolerance. Weights ~ 1/sqrt(fan_in)
    keep it stable."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:  # norm weights
                p.copy_(1.0 + norm_spread * torch.randn(p.shape, generator=g))
    return model


def make_model(seed: int = 0, norm_spread: float = 0.1, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return randomize_(Transformer(tiny_cfg(**overrides)), seed, norm_spread).eval()


def random_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def different_tokens(ids: torch.Tensor, seed: int) -> torch.Tensor:
    """Same shape, every entry a different token than in `ids`."""
    shift = torch.randint(1, V, ids.shape, generator=torch.Generator().manual_seed(seed))
    return (ids + shift) % V


# ----------------------------------------------------------------------------- causality
ARCHS = [dict(position=p, norm=n, mlp=m, bias=b) for p, n, m, b in
         itertools.product(("rope", "learned"), ("rmsnorm", "layernorm"), ("gelu", "swiglu"), (True, False))]
ARCHS += [dict(position=p, qk_norm=True, mlp="relu2", logit_softcap=15.0) for p in ("rope", "learned")]  # speedrun


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: "-".join(str(v) for v in a.values()))
@torch.no_grad()
def test_decoder_is_causal(arch):
    model = make_model(**arch)
    T = 24
    ids = random_ids(2, T, seed=1)
    hidden = model(ids)
    logits = model.logits(hidden)
    for t in (0, 1, 7, T - 2):
        # every token after t replaced: positions 0..t are unchanged
        later = ids.clone()
        later[:, t + 1:] = different_tokens(ids[:, t + 1:], seed=t)
        h2 = model(later)
        torch.testing.assert_close(h2[:, :t + 1], hidden[:, :t + 1], atol=1e-6, rtol=0)
        torch.testing.assert_close(model.logits(h2)[:, :t + 1], logits[:, :t + 1], atol=1e-6, rtol=0)
        # ... and the check can fail: positions after t did change
        assert (h2[:, t + 1:] - hidden[:, t + 1:]).abs().amax() > 1e-3
    for t in (1, 7, T - 1):
        # one token before t changed: position t changes (the model does look back)
        earlier = ids.clone()
        earlier[:, t - 1] = different_tokens(ids[:, t - 1], seed=100 + t)
        h3 = model(earlier)
        assert (h3[:, t] - hidden[:, t]).abs().amax(dim=-1).min() > 1e-3  # in every batch row
    # the first token reaches the last position too (through attention, not just adjacency)
    first = ids.clone()
    first[:, 0] = different_tokens(ids[:, 0], seed=7)
    assert (model(first)[:, -1] - hidden[:, -1]).abs().amax(dim=-1).min() > 1e-4


# ----------------------------------------------------------------------------- rotary positions
def rotary_closed_form(x: torch.Tensor, positions, base: float) -> torch.Tensor:
    """RoPE written out from its definition, in float64 and one pair at a time: the pair
    (x[i], x[i + D/2]) ("rotate half" layout, as minilm/model.py documents) is the complex number
    x[i] + j x[i + D/2], multiplied by exp(j pos theta_i), theta_i = base^(-2i/D).
    x (..., T, D), positions: T integers."""
    D = x.shape[-1]
    out = torch.empty(x.shape, dtype=torch.float64)
    x = x.double()
    for t, pos in enumerate(positions):
        for i in range(D // 2):
            angle = pos * base ** (-2 * i / D)
            a, b = x[..., t, i], x[..., t, i + D // 2]
            out[..., t, i] = a * math.cos(angle) - b * math.sin(angle)
            out[..., t, i + D // 2] = a * math.sin(angle) + b * math.cos(angle)
    return out


@pytest.mark.parametrize("head_dim,base", [(8, 10000.0), (16, 100.0)])
def test_rotary_is_the_closed_form_rotation(head_dim, base):
    from minilm.model import Rotary
    rotary = Rotary(head_dim, max_len=64, base=base)
    x = torch.randn(2, 3, 10, head_dim, generator=torch.Generator().manual_seed(0))   # (B, H, T, D)
    for start in (0, 7, 54):
        want = rotary_closed_form(x, range(start, start + 10), base)
        torch.testing.assert_close(rotary(x, torch.arange(start, start + 10)).double(), want, atol=1e-4, rtol=0)
    # per-row positions (B, T) (the sparse last layer's queries, outputs_at) are the same map
    positions = torch.tensor([[3, 9, 0, 63, 17, 5, 5, 40, 2, 1], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
    got = rotary(x, positions)
    for row in range(2):
        want = rotary_closed_form(x[row], positions[row].tolist(), base)
        torch.testing.assert_close(got[row].double(), want, atol=1e-4, rtol=0)
    # a rotation: lengths of every pair are kept
    def pair_lengths(y):
        return y[..., :head_dim // 2] ** 2 + y[..., head_dim // 2:] ** 2
    torch.testing.assert_close(pair_lengths(rotary(x, torch.arange(5, 15))), pair_lengths(x), atol=1e-5, rtol=1e-5)


def test_rotary_equals_the_rotate_half_formula():
    """Rotary's roll-and-signed-sin form is the textbook x * cos + rotate_half(x) * sin, where
    rotate_half(x) = cat(-x2, x1), to fp32 rounding, gradient included, and in bf16 within bf16's."""
    from minilm.model import Rotary
    D, T = 16, 40
    rotary = Rotary(D, max_len=T, base=10000.0)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    angles = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq).repeat(1, 2)     # (T, D)

    def textbook(x):
        rotated = torch.cat([-x[..., D // 2:], x[..., :D // 2]], dim=-1)
        return x * angles.cos().to(x.dtype) + rotated * angles.sin().to(x.dtype)

    x = torch.randn(2, 3, T, D, generator=torch.Generator().manual_seed(2), requires_grad=True)
    grad = torch.randn(2, 3, T, D, generator=torch.Generator().manual_seed(3))
    ours, = torch.autograd.grad(rotary(x), x, grad)
    want, = torch.autograd.grad(textbook(x), x, grad)
    torch.testing.assert_close(rotary(x), textbook(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours, want, atol=1e-6, rtol=1e-6)
    xb = x.detach().bfloat16()
    torch.testing.assert_close(rotary(xb).float(), textbook(xb.float()), atol=3e-2, rtol=1e-2)


def test_rotary_scores_depend_only_on_the_distance():
    """q·k after RoPE is a function of n - m alone: shifting both positions changes nothing, while
    another distance does give another score (so the check is not vacuous)."""
    from minilm.model import Rotary
    D, T = 16, 64
    rotary = Rotary(D, max_len=T, base=10000.0)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 1, T, D, generator=g), torch.randn(1, 1, T, D, generator=g)
    q, k = q[..., :1, :].expand(1, 1, T, D), k[..., :1, :].expand(1, 1, T, D)   # one q, one k, at every position
    scores = (rotary(q) @ rotary(k).transpose(-1, -2))[0, 0].double()          # (T, T): q at m, k at n
    unrotated = (q[0, 0, 0] @ k[0, 0, 0]).item()
    for distance in (-9, -1, 0, 1, 5, 30):
        diagonal = scores.diagonal(distance)                                     # all (m, m + distance)
        assert (diagonal - diagonal[0]).abs().max() < 1e-4, distance
    assert scores.diagonal(0)[0].item() == pytest.approx(unrotated, abs=1e-5)    # same position: no rotation
    assert (scores.diagonal(1)[0] - scores.diagonal(0)[0]).abs() > 1e-2
    assert (scores.diagonal(5)[0] - scores.diagonal(-5)[0]).abs() > 1e-2        # the sign of the distance counts


@torch.no_grad()
def test_rope_decoder_does_not_depend_on_absolute_position():
    """With RoPE as the only position signal, a decoder's outputs for a sequence are the same
    wherever it sits in the context window (positions s..s+T-1 instead of 0..T-1)."""
    model = make_model(position="rope")
    ids = random_ids(2, 12, seed=12)
    base = model(ids)
    for start in (1, 9, S - 12):
        torch.testing.assert_close(model(ids, positions=torch.arange(start, start + 12)), base, atol=2e-5, rtol=0)
    learned = make_model(position="learned")                     # a table of absolute positions does depend
    assert (learned(ids, positions=torch.arange(3, 15)) - learned(ids)).abs().max() > 1e-3
    # per-row positions: each row as if it alone were shifted
    shifted = model(ids, positions=torch.stack([torch.arange(12), torch.arange(5, 17)]))
    torch.testing.assert_close(shifted, base, atol=2e-5, rtol=0)


# ----------------------------------------------------------------------------- the attention function
def attention_inputs(T=9, S=9, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(2 * torch.randn(2, 3, n, 8, generator=g)).to(dtype) for n in (T, S, S)]


@pytest.mark.parametrize("mask_kind", ["none", "causal", "padding", "prefix", "additive"])
def test_attention_math_equals_sdpa(mask_kind):
    """attention_math (the plain-op path used on CPU in bf16) computes what SDPA computes, masks
    included: fp32 inputs, so any difference is a semantic one, not rounding."""
    T, S = (4, 9) if mask_kind == "prefix" else (9, 9)
    q, k, v = attention_inputs(T, S)
    mask = {"none": None, "causal": CAUSAL,
            "padding": padding_mask(torch.tensor([9, 5]), S),      # (B, 1, 1, S): row 1 has 5 real keys
            "prefix": decoding_mask(T, S - T),                      # a chunk of 4 after 5 cached keys
            "additive": torch.randn(1, 3, T, S)}[mask_kind]
    ours = attention_math(q, k, v, mask=mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask_kind == "causal" else mask,
                                         is_causal=mask_kind == "causal")
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    if mask_kind != "none":                          # the mask really mattered
        assert (ours - attention_math(q, k, v)).abs().max() > 1e-2


def test_attention_uses_plain_ops_only_for_short_low_precision_cpu_inputs(monkeypatch):
    calls = []
    monkeypatch.setattr(model_module, "attention_math", lambda *a, **kw: calls.append(a[0].dtype) or a[0])
    limit = model_module.CPU_MATH_ATTENTION_MAX_KEYS
    for dtype, S, plain in [(torch.bfloat16, limit, True), (torch.float16, 8, True),
                            (torch.bfloat16, limit + 1, False), (torch.float32, 8, False)]:
        calls.clear()
        attention(*attention_inputs(4, S, dtype=dtype))
        assert bool(calls) == plain, (dtype, S)


@pytest.mark.parametrize("mask_kind", ["none", "causal", "padding", "additive"])
def test_bf16_attention_is_close_to_fp32(mask_kind):
    """In bf16 the plain path differs from fp32 by rounding only, the output stays bf16 whatever
    the mask's dtype. Its scores are rounded to bf16 (the fused kernel keeps them in fp32), which
    costs up to ~3% of the output's scale at these large scores (|s| up to ~20) against ~1% fused:
    the price model.attention's docstring states. Bound both, so neither can silently degrade."""
    q, k, v = attention_inputs(64, 64, seed=3)
    causal = mask_kind == "causal"
    g = torch.Generator().manual_seed(4)
    mask = {"padding": padding_mask(torch.tensor([64, 40]), 64),
            "additive": torch.randn(1, 3, 64, 64, generator=g)}.get(mask_kind)
    exact = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    low = [t.bfloat16() for t in (q, k, v)]
    low_mask = mask.bfloat16() if mask is not None and mask.is_floating_point() else mask
    plain = attention(*low, mask=CAUSAL if causal else mask)
    fused = F.scaled_dot_product_attention(*low, attn_mask=low_mask, is_causal=causal).float()
    assert plain.dtype == torch.bfloat16
    scale = exact.abs().max()
    assert (plain.float() - exact).abs().max() < 0.05 * scale
    assert (fused - exact).abs().max() < 0.02 * scale


# ----------------------------------------------------------------------------- encoder mode
@pytest.mark.parametrize("position", ["rope", "learned"])
@torch.no_grad()
def test_encoder_sees_later_tokens(position):
    model = make_model(position=position)
    T = 16
    ids = random_ids(2, T, seed=2)
    hidden = model(ids, mask=None)
    for t in (0, 5, T - 2):
        later = ids.clone()
        later[:, t + 1:] = different_tokens(ids[:, t + 1:], seed=t)
        h2 = model(later, mask=None)
        assert (h2[:, t] - hidden[:, t]).abs().amax(dim=-1).min() > 1e-3
        # the causal default on the same inputs does not see them: the difference is the mask alone
        torch.testing.assert_close(model(later)[:, t], model(ids)[:, t], atol=1e-6, rtol=0)


@pytest.mark.parametrize("position", ["rope", "learned"])
@torch.no_grad()
def test_encoder_padding_mask_hides_padded_positions(position):
    model = make_model(position=position)
    T = 16
    lengths = torch.tensor([T, 9])  # row 0 has no padding, row 1 has 7 padded positions
    real = torch.arange(T)[None, :] < lengths[:, None]                 # (B, T)
    mask = real[:, None, None, :]                                      # (B, 1, 1, T), True = attend
    ids = random_ids(2, T, seed=3)
    other = ids.clone()
    other[~real] = different_tokens(ids[~real], seed=4)               # change the pads only
    h1 = model(ids, mask=mask)
    h2 = model(other, mask=mask)
    torch.testing.assert_close(h2[real], h1[real], atol=1e-6, rtol=0)
    # without the mask the same change does leak into the real positions of row 1
    leak = model(other, mask=None)[1, :9] - model(ids, mask=None)[1, :9]
    assert leak.abs().amax() > 1e-3
    # and a padded position itself does change with its token (its output is just ignored)
    assert (h2[1, 9:] - h1[1, 9:]).abs().amax() > 1e-3


@pytest.mark.parametrize("arch", [dict(position="rope", bias=False), dict(position="learned", bias=True, norm="layernorm"),
                                  dict(position="rope", qk_norm=True, mlp="relu2")],
                         ids=["rope", "learned-bias", "qk_norm-relu2"])
def test_outputs_at_computes_exactly_the_full_output_at_those_positions(arch):
    """Transformer(outputs_at=positions) == the full output's rows at those positions, gradients too,
    with uneven counts per row (one row with none), padding and segment ids."""
    model = make_model(**arch, n_segment=2, n_layer=3)
    B, T = 4, 24
    ids = random_ids(B, T, seed=5)
    segments = (torch.arange(T) >= 10).long().expand(B, T)
    lengths = torch.tensor([T, 17, 9, T])
    mask = padding_mask(lengths, T)
    chosen = (torch.rand(B, T, generator=torch.Generator().manual_seed(6)) < 0.3) & (torch.arange(T) < lengths[:, None])
    chosen[2] = False                                     # a row with nothing chosen
    chosen[0, :] = True                                   # and one with everything
    keep = torch.nonzero(chosen.flatten()).squeeze(1)

    def run(sparse):
        model.zero_grad(set_to_none=True)
        full = model(ids, mask=mask, segment_ids=segments, outputs_at=keep if sparse else None)
        out = full if sparse else full.flatten(0, 1)[keep]
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
        (out * weights).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    dense_out, dense_grads = run(False)
    sparse_out, sparse_grads = run(True)
    assert sparse_out.shape == (len(keep), model.cfg.n_embd)
    torch.testing.assert_close(sparse_out, dense_out, atol=1e-5, rtol=1e-5)
    assert dense_grads.keys() == sparse_grads.keys()
    for name in dense_grads:
        torch.testing.assert_close(sparse_grads[name], dense_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    # a subset of the positions gives the same rows (each row's output depends on its own query only)
    assert (model(ids, mask=mask, segment_ids=segments, outputs_at=keep[:-1])
            - sparse_out[:-1]).abs().max() < 1e-5
    # the comparison can fail: other positions give other rows
    shifted = torch.nonzero(chosen.roll(1, dims=1).flatten()).squeeze(1)
    assert (model(ids, mask=mask, segment_ids=segments, outputs_at=shifted)[:len(keep)]
            - sparse_out[:len(shifted)]).abs().max() > 1e-3
    # a causal mask and a per-query mask are cut down to the picked queries' rows, exactly
    with torch.no_grad():
        torch.testing.assert_close(model(ids, outputs_at=keep), model(ids).flatten(0, 1)[keep], atol=1e-5, rtol=1e-5)
        per_query = (torch.rand(B, 1, T, T, generator=torch.Generator().manual_seed(8)) < 0.5) | torch.eye(T, dtype=torch.bool)
        torch.testing.assert_close(model(ids, mask=per_query, outputs_at=keep),
                                   model(ids, mask=per_query).flatten(0, 1)[keep], atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="cache"):
            model(ids, outputs_at=keep, cache=KVCache(model.cfg, B, "cpu", torch.float32))


@torch.no_grad()
def test_padding_mask_helper_and_segment_embeddings():
    lengths = torch.tensor([5, 2])
    mask = padding_mask(lengths, 6)
    assert mask.shape == (2, 1, 1, 6) and mask.dtype == torch.bool
    assert mask[:, 0, 0].tolist() == [[True] * 5 + [False], [True, True] + [False] * 4]
    assert torch.equal(padding_mask(mask[:, 0, 0]), mask)          # the (B, T) bool form
    model = make_model(n_segment=2)
    ids = random_ids(2, 12, seed=11)
    zeros = torch.zeros_like(ids)
    ones = zeros.clone()
    ones[:, 6:] = 1
    # no segment_ids means segment 0 everywhere (BERT's default token types) ...
    torch.testing.assert_close(model(ids, mask=None), model(ids, mask=None, segment_ids=zeros), atol=0, rtol=0)
    # ... and segment ids do reach every position: the B half directly, the A half through attention
    diff = (model(ids, mask=None, segment_ids=ones) - model(ids, mask=None)).abs().amax(dim=-1)
    assert diff.min() > 1e-3
    with pytest.raises(ValueError, match="n_segment"):
        make_model()(ids, segment_ids=zeros)
    pooled = Pooler(model.cfg)(model(ids, mask=None))
    assert pooled.shape == (2, model.cfg.n_embd) and pooled.abs().max() < 1


# ----------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("position", ["rope", "learned"])
@torch.no_grad()
def test_kv_cache_token_by_token_matches_full_forward(position):
    model = make_model(position=position, mlp="swiglu")
    ids = random_ids(2, S, seed=5)
    cache = KVCache(model.cfg, batch_size=2, device="cpu", dtype=torch.float32)
    prompt = 5
    hidden = model(ids[:, :prompt], cache=cache)
    assert cache.length == prompt
    torch.testing.assert_close(model.logits(hidden), model.logits(model(ids[:, :prompt])), atol=1e-5, rtol=0)
    for t in range(prompt, S):  # up to and including the last position of the window
        hidden = model(ids[:, t:t + 1], cache=cache, mask=None)   # one new token sees everything
        assert cache.length == t + 1
        full = model.logits(model(ids[:, :t + 1]))[:, -1]
        torch.testing.assert_close(model.logits(hidden)[:, -1], full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("position", ["rope", "learned"])
@torch.no_grad()
def test_kv_cache_chunks_after_a_prefix_match_full_forward(position):
    model = make_model(position=position)
    ids = random_ids(2, S, seed=6)
    full = model.logits(model(ids))  # causal: position t of the full pass sees exactly 0..t
    cache = KVCache(model.cfg, batch_size=2, device="cpu", dtype=torch.float32)
    # prefill 7, then chunks of 6 and 5 (start > 0, T > 1), one single token, and a final chunk
    # that ends exactly at seq_len
    bounds = [0, 7, 13, 18, 19, S]
    for start, end in zip(bounds, bounds[1:]):
        hidden = model(ids[:, start:end], cache=cache, mask=decoding_mask(end - start, start) if start else CAUSAL)
        assert cache.length == end
        torch.testing.assert_close(model.logits(hidden), full[:, start:end], atol=1e-5, rtol=0)


@torch.no_grad()
def test_kv_cache_holds_the_prefix():
    """The chunk's output depends on what the cache holds: a cache filled from another prefix
    gives different logits (so the equality above is not the chunk ignoring the cache)."""
    model = make_model()
    ids = random_ids(1, 20, seed=8)
    other = ids.clone()
    other[:, :10] = different_tokens(ids[:, :10], seed=9)
    outs = []
    for prefix_source in (ids, other):
        cache = KVCache(model.cfg, batch_size=1, device="cpu", dtype=torch.float32)
        model(prefix_source[:, :10], cache=cache)
        outs.append(model(ids[:, 10:], cache=cache, mask=decoding_mask(10, 10)))
    assert (outs[0] - outs[1]).abs().amax() > 1e-3


# ----------------------------------------------------------------------------- out of range
def test_forward_past_the_context_window_raises():
    model = make_model()
    with torch.no_grad():
        model(random_ids(1, S, seed=0))                      # exactly seq_len: fine
        model(random_ids(1, 2, seed=0), positions=torch.arange(S - 2, S))   # ends exactly at seq_len: fine
        with pytest.raises(ValueError, match="seq_len"):
            model(random_ids(1, S + 1, seed=0))
        cache = KVCache(model.cfg, batch_size=1, device="cpu", dtype=torch.float32)
        model(random_ids(1, S - 2, seed=0), cache=cache)
        with pytest.raises(ValueError, match="explicit mask"):   # the cache never rewrites a mask
            model(random_ids(1, 2, seed=0), cache=cache)
        model(random_ids(1, 2, seed=0), cache=cache, mask=decoding_mask(2, S - 2))   # ends at seq_len
        with pytest.raises(ValueError, match="seq_len"):
            model(random_ids(1, 1, seed=0), cache=cache, mask=None)


# ----------------------------------------------------------------------------- parameter count
def expected_num_params(cfg: ModelConfig) -> int:
    """Closed form, derived from the architecture rather than from the module tree."""
    V_, C, L = cfg.vocab_size, cfg.n_embd, cfg.n_layer
    b = 1 if cfg.bias else 0
    if cfg.intermediate_size:
        hidden = cfg.intermediate_size
    elif cfg.mlp in ("gelu", "gelu_tanh", "relu2"):
        hidden = 4 * C
    else:  # SwiGLU: 8/3 C rounded up to a multiple of 64
        hidden = math.ceil(8 * C / 3 / 64) * 64
    norm = C + (b * C if cfg.norm == "layernorm" else 0)         # weight (+ bias for LayerNorm)
    attn = 3 * C * C + b * 3 * C + C * C + b * C                 # qkv + output projection
    attn += 2 * (C // cfg.n_head) if cfg.qk_norm else 0          # QK-norm: a weight of head size for q, one for k
    if cfg.mlp in ("gelu", "gelu_tanh", "relu2"):
        mlp = 2 * C * hidden + b * (hidden + C)                  # up, down
    else:
        mlp = 3 * C * hidden + b * (2 * hidden + C)              # gate+up, down
    n = V_ * C                                                   # token embedding
    n += L * (2 * norm + attn + mlp)
    n += norm if cfg.norm_placement == "pre" else 0              # final norm (post-norm has none)
    if not cfg.tie_embeddings:
        n += V_ * C                                              # separate LM head, no bias
    if cfg.position == "learned":
        n += cfg.seq_len * C
    n += cfg.n_segment * C                                       # segment (token-type) table
    return n


VARIANTS = {
    "defaults": {},
    "all-flipped": dict(position="learned", norm="layernorm", mlp="swiglu", bias=True, tie_embeddings=False),
    "gelu-layernorm-bias": dict(norm="layernorm", bias=True),
    "swiglu-untied": dict(mlp="swiglu", tie_embeddings=False),
    "explicit-hidden": dict(mlp="swiglu", intermediate_size=100, bias=True),
    "segments": dict(n_segment=2),
    "segments-learned-untied": dict(n_segment=3, position="learned", tie_embeddings=False),
    "gpt2": dict(position="learned", norm="layernorm", mlp="gelu_tanh", bias=True),
    "post-norm": dict(norm_placement="post", norm="layernorm", bias=True, n_segment=2),
    "speedrun": dict(qk_norm=True, mlp="relu2", logit_softcap=30.0, tie_embeddings=False),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_num_params_matches_closed_form(preset, variant):
    cfg = ModelConfig(vocab_size=1000, **PRESETS[preset], **VARIANTS[variant])
    with torch.device("meta"):  # no memory, no init cost: only the shapes matter here
        model = Transformer(cfg)
    expected = expected_num_params(cfg)
    assert model.num_params() == expected
    assert sum(p.numel() for p in model.parameters()) == expected
    positions = cfg.seq_len * cfg.n_embd if cfg.position == "learned" else 0
    segments = cfg.n_segment * cfg.n_embd   # lookups like the position table: no matmul FLOPs
    assert model.num_params(non_embedding=True) == expected - positions - segments


def test_num_params_gpt2_small_is_124m():
    """Anchor the closed form to a published number: GPT-2 small (learned positions, LayerNorm
    with biases, GELU, tied head, vocab 50257, context 1024) has 124,439,808 parameters."""
    cfg = ModelConfig(vocab_size=50257, **PRESETS["base"], position="learned", norm="layernorm",
                      mlp="gelu", bias=True, tie_embeddings=True)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert expected_num_params(cfg) == 124_439_808
    assert model.num_params() == 124_439_808


def test_num_params_allocated_model_matches_meta():
    cfg = ModelConfig(vocab_size=1000, **PRESETS["tiny"], position="learned", tie_embeddings=False)
    assert Transformer(cfg).num_params() == expected_num_params(cfg)


# ----------------------------------------------------------------------------- tied embeddings
def test_tied_embeddings_share_one_tensor():
    model = Transformer(tiny_cfg(tie_embeddings=True))
    assert model.lm_head is None
    assert model.output_weight is model.tok_emb.weight
    assert not any(k.startswith("lm_head") for k in model.state_dict())
    untied = Transformer(tiny_cfg(tie_embeddings=False))
    assert untied.output_weight is untied.lm_head.weight
    assert untied.output_weight is not untied.tok_emb.weight
    # counted once: the untied model has exactly one more V x C matrix
    assert untied.num_params() - model.num_params() == V * 32
    # the head really is the embedding: logits = hidden @ E^T, and a change to E moves the logits
    h = torch.randn(3, 32)
    torch.testing.assert_close(model.logits(h), h @ model.tok_emb.weight.T)
    with torch.no_grad():
        model.tok_emb.weight[5] += 1.0
    torch.testing.assert_close(model.logits(h)[:, 5], h @ model.tok_emb.weight[5])
    # and one gradient reaches it from both uses
    ids = random_ids(1, 8, seed=0)
    F.cross_entropy(model.logits(model(ids))[0], ids[0]).backward()
    assert model.tok_emb.weight.grad is not None
    assert model.tok_emb.weight.grad[ids[0]].abs().sum() > 0


# ----------------------------------------------------------------------------- init
def test_init_scales():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, seq_len=128, n_layer=4, n_head=4, n_embd=256, bias=True,
                      position="learned", tie_embeddings=False, mlp="swiglu")
    model = Transformer(cfg)
    residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)  # 0.00707: clearly apart from 0.02
    residual = {id(m) for b in model.blocks for m in (b.attn.proj, b.mlp.down)}
    seen_residual = seen_other = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight
            want = residual_std if id(module) in residual else 0.02
            # tens of thousands of samples each: the std estimate is within ~0.5%
            assert w.std().item() == pytest.approx(want, rel=0.03), name
            assert abs(w.mean().item()) < 0.1 * want, name
            if module is not model.lm_head:  # the LM head never has a bias
                assert torch.count_nonzero(module.bias) == 0, name
            seen_residual += id(module) in residual
            seen_other += id(module) not in residual
    assert seen_residual == 2 * cfg.n_layer
    assert seen_other == 2 * cfg.n_layer + 1  # qkv, up per block, and the LM head
    for emb in (model.tok_emb, model.pos_emb):
        assert emb.weight.std().item() == pytest.approx(0.02, rel=0.03)
    for name, p in model.named_parameters():
        if "norm" in name:
            assert torch.all(p == 1.0), name  # RMSNorm weights start at one


# ----------------------------------------------------------------------------- compile + checkpoint
def test_compiled_model_checkpoint_loads_into_uncompiled(tmp_path):
    # backend: "inductor" took ~50 s for this forward+backward on the 2-core test machine (C++
    # codegen), so "aot_eager" is used: it still goes through dynamo and AOTAutograd, i.e. the
    # OptimizedModule wrapper whose state_dict keys carry "_orig_mod.".
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = Transformer(cfg)
    compiled = torch.compile(model, backend="aot_eager")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = random_ids(2, 16, seed=10)
    hidden = compiled(ids)
    loss = F.cross_entropy(model.logits(hidden[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    opt.step()
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in after)  # the step did update weights

    assert not any("_orig_mod" in k for k in after)
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, {"config": dataclasses.asdict(cfg), "model": after})
    state = torch.load(path, weights_only=True)   # a bare Transformer: no minilm checkpoint to check
    assert not any("_orig_mod" in k for k in state["model"])

    torch.manual_seed(1)  # a fresh model with other weights: it must differ until loaded
    fresh = Transformer(ModelConfig(**state["config"])).eval()
    model.eval()
    with torch.no_grad():
        want = model.logits(model(ids))
        assert (fresh.logits(fresh(ids)) - want).abs().amax() > 1e-3
        fresh.load_state_dict(state["model"])  # strict: every key present, none extra
        torch.testing.assert_close(fresh.logits(fresh(ids)), want, atol=0, rtol=0)
        torch.testing.assert_close(fresh.logits(fresh(ids)), model.logits(compiled(ids)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_query_rows_read_their_key_value_row_as_if_it_were_repeated(dtype):
    """attention() with g * B' query rows over B' key/value rows (the beams of one encoded input):
    rows b*g .. b*g+g-1 read row b, the same as repeating each key/value row g times, under a
    padding mask of the key/value rows; the packed path (SDPA, and the CPU bf16 one) does it
    without the copy."""
    g = torch.Generator().manual_seed(0)
    rows, group, H, T, S_, D = 2, 3, 2, 4, 5, 8
    q = torch.randn(rows * group, H, T, D, generator=g).to(dtype)
    k, v = (torch.randn(rows, H, S_, D, generator=g).to(dtype) for _ in range(2))
    mask = padding_mask(torch.tensor([5, 3]), S_)                       # (B', 1, 1, S)
    repeated = attention(q, k.repeat_interleave(group, 0), v.repeat_interleave(group, 0),
                         mask=mask.repeat_interleave(group, 0))
    torch.testing.assert_close(attention(q, k, v, mask=mask), repeated)


def test_block_forward_is_its_three_steps_and_a_source_is_where_keys_and_values_come_from():
    """Block.forward(x) is attend, then feed_forward; with a source, queries come from x and keys
    and values from the source: x's own rows as source is self-attention (the one idea)."""
    torch.manual_seed(0)
    model = randomize_(Transformer(tiny_cfg(position="rope")))
    block = model.blocks[0]
    x = torch.randn(2, 6, 32)
    steps = block.feed_forward(block.attend(x, mask=CAUSAL, rotary=model.rotary))
    torch.testing.assert_close(block(x, mask=CAUSAL, rotary=model.rotary), steps)
    torch.testing.assert_close(block(x, x, mask=CAUSAL, rotary=model.rotary), steps, atol=1e-5, rtol=1e-5)
    picked = x[:, [1, 4]]                                               # queries at two positions
    want = steps[:, [1, 4]]
    rows = torch.tensor([1, 4])
    got = block(picked, x, mask=(torch.arange(6)[None, :] <= rows[:, None]), rotary=model.rotary, positions=rows)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
