"""The Transformer: one set of blocks for decoders, encoders and encoder-decoders.

Read top to bottom: norms -> rotary positions -> attention -> MLP -> Block -> padding mask ->
logit soft-capping -> Transformer -> EncoderDecoder -> Pooler -> KV cache.

Whether a model is a decoder or an encoder is not a property of its layers: it is the attention
mask passed in at call time. `Transformer.forward(ids)` (mask=CAUSAL) is a GPT-style decoder;
`mask=padding_mask(...)` or None is a BERT-style encoder. An encoder-decoder is two such stacks,
the decoder's blocks with a cross-attention sub-layer. Attention goes through
torch.nn.functional.scaled_dot_product_attention (SDPA), which picks a fused kernel (flash /
memory-efficient on CUDA, a fused CPU kernel) when the mask allows it; the one exception, short
bf16 sequences on CPU, is explained in attention().

Shapes: B batch, T sequence length, C = n_embd, H = n_head, D = C // H head size, V vocab,
E = the embedding tables' width (cfg.embedding_width: C unless factorized, see Transformer).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from minilm.config import ModelConfig


# ----------------------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019): LayerNorm without the mean and the bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # under bf16 autocast x arrives in bf16 while the weight stays fp32; with mixed dtypes
        # torch falls back to an unfused kernel (a warning, and ~2x slower), with the same result
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


def make_norm(cfg: ModelConfig, width: int | None = None) -> nn.Module:
    """cfg's norm over the last dimension, `width` wide (n_embd by default)."""
    width = width or cfg.n_embd
    if cfg.norm == "rmsnorm":
        return RMSNorm(width, cfg.norm_eps)
    return nn.LayerNorm(width, eps=cfg.norm_eps, bias=cfg.bias)


# ----------------------------------------------------------------------------- rotary positions
class Rotary(nn.Module):
    """Rotary position embedding (RoPE, Su et al. 2021), "rotate half" layout.

    Each pair (x[i], x[i + D/2]) of a query/key head is rotated by angle pos * base^(-2i/D), so
    the dot product q·k depends only on the distance between the two positions:
        out[i]       = x[i] cos - x[i + D/2] sin
        out[i + D/2] = x[i + D/2] cos + x[i] sin          (i < D/2)
    that is x * cos + roll(x, D/2) * sin_signed, where roll swaps the two halves and sin_signed
    is sin with its first half negated: three elementwise passes over x (roll, mul, addcmul). The
    tables are buffers, not parameters, and are not saved (persistent=False): they are a pure
    function of the config.
    """

    def __init__(self, head_dim: int, max_len: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (max_len, D/2)
        self.register_buffer("cos", torch.cat([angles.cos(), angles.cos()], dim=-1), persistent=False)  # (max_len, D)
        self.register_buffer("sin", torch.cat([-angles.sin(), angles.sin()], dim=-1), persistent=False)  # signed

    def forward(self, x, positions=None):
        # x: (B, H, T, D); positions (B, T) row by row, (T,) for every row, or None: 0..T-1
        if positions is None:
            T = x.shape[-2]
            cos, sin = self.cos[:T], self.sin[:T]                            # (T, D)
        elif positions.dim() == 1:
            cos, sin = self.cos[positions], self.sin[positions]              # (T, D)
        else:
            cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # (B, 1, T, D)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


# ----------------------------------------------------------------------------- attention
# The mask argument's one value that is not a tensor: query i sees keys 0..i (a decoder). Kept
# symbolic, not spelled out as a (T, S) tensor, so SDPA can run its fused causal kernel.
CAUSAL = "causal"

# Longest key length for which attention on CPU in bf16/fp16 is spelled out (attention_math)
# instead of going through SDPA's fused CPU kernel; see attention().
CPU_MATH_ATTENTION_MAX_KEYS = 512


def attention(q, k, v, *, mask=None, dropout_p=0.0):
    """softmax(q k^T / sqrt(D) + mask) v: q (B, H, T, D), k and v (B', H, S, D) -> (B, H, T, D).

    Grouped query rows: k and v may hold fewer rows than q, B = g * B'. Rows b*g .. b*g+g-1 of q
    then all read row b of k and v, as one row of g*T queries (the row-wise counterpart of
    grouped-query attention's shared heads): several decoder rows over one encoded input (beams,
    samples) read its keys and values once, not once per row. Exact, since a query's result does
    not depend on the other queries; the mask must then be the same for every query of a row (None,
    or a padding mask (B', 1, 1, S): cross-attention).

    mask: None (every query sees every key), CAUSAL (query i sees keys 0..i, aligned top-left as
    SDPA's is_causal), a bool tensor (True = may attend, broadcast to (B, H, T, S)) or a float one
    (added to the scores). A decoder over right-padded rows or a cached chunk states its mask as
    one bool tensor (causal_mask, padding_mask, decoding_mask combine with &).

    SDPA everywhere but one case. On CPU in bf16 or fp16, PyTorch's fused kernel (a flash-attention
    port) is slower than the plain ops of attention_math for short sequences (benchmarks/README.md
    has the measurements), hence the cut at CPU_MATH_ATTENTION_MAX_KEYS keys, beyond which the
    (B, H, T, S) scores outgrow the caches. CUDA and fp32 always fuse.
    The price: the plain path rounds the scores to bf16 before the softmax (as eager attention
    under autocast does; the fused kernel keeps them in fp32), about 2-3x the fused kernel's error
    for large scores (tests/test_model.py). Set CPU_MATH_ATTENTION_MAX_KEYS = 0 to always fuse.
    """
    group = q.shape[0] // k.shape[0]        # query rows per key/value row: 1 but for grouped rows
    if group > 1:
        q = rearrange(q, "(b g) h t d -> b h (g t) d", g=group)
    if (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
            and k.shape[-2] <= CPU_MATH_ATTENTION_MAX_KEYS):
        y = attention_math(q, k, v, mask=mask, dropout_p=dropout_p)
    else:
        causal = isinstance(mask, str)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, is_causal=causal,
                                           dropout_p=dropout_p)
    return y if group == 1 else rearrange(y, "b h (g t) d -> (b g) h t d", g=group)


def causal_mask(T: int, S: int | None = None, device=None) -> torch.Tensor:
    """(T, S) bool, True = may attend: query i sees keys 0..i (top-left aligned, as CAUSAL).
    `causal_mask(T, device=d) & padding_mask(lengths, T)` is a decoder over right-padded rows."""
    return torch.ones(T, T if S is None else S, dtype=torch.bool, device=device).tril()


def decoding_mask(n_new: int, n_cached: int, device=None):
    """The mask of n_new tokens that follow n_cached tokens already in a KV cache: new token i
    sees every cached key and the new keys 0..i, (n_new, n_cached + n_new) bool. One new token
    sees everything, so that case is None (no mask at all, the fastest path)."""
    if n_new == 1:
        return None
    return torch.ones(n_new, n_cached + n_new, dtype=torch.bool, device=device).tril(diagonal=n_cached)


def prefix_mask(prefix_lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(B, 1, T, T) bool, True = may attend: query i sees key j iff j < prefix_lengths[b] (the
    prefix, in both directions) or j <= i (causal after it): a prefix LM's training
    (objectives/prefix_lm.py) and its generation (generate.py). prefix_lengths (B,) int, on the
    mask's device. A prefix of 0 or 1 is a plain causal mask; a prefix of T, no mask at all."""
    index = torch.arange(T, device=prefix_lengths.device)
    causal = index[None, :] <= index[:, None]                      # (T, T): key j <= query i
    in_prefix = index[None, :] < prefix_lengths[:, None]           # (B, T): key j is a prefix token
    return (causal[None, :, :] | in_prefix[:, None, :])[:, None]   # (B, 1, T, T)


def attention_math(q, k, v, *, mask=None, dropout_p=0.0):
    """The same attention as three plain ops, in q's dtype. Under bf16 the scores come out of the
    matmul in bf16 (as in eager attention under autocast); the softmax kernel reads them, sums in
    fp32 and rounds each probability once, which equals an fp32 softmax cast back to bf16 (checked:
    identical bits) without the two (B, H, T, S) casts."""
    T, S = q.shape[-2], k.shape[-2]
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)                    # (B, H, T, S)
    if isinstance(mask, str):
        mask = causal_mask(T, S, q.device)
    if mask is not None:
        if mask.dtype == torch.bool:  # True = may attend: 0 there, -inf elsewhere (a small tensor)
            mask = torch.zeros(mask.shape, device=q.device).masked_fill_(~mask, float("-inf"))
        scores = scores.add_(mask.to(scores.dtype))  # in place: nothing else reads the raw scores
    probs = torch.softmax(scores, dim=-1)
    if dropout_p:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v


class Attention(nn.Module):
    """Multi-head attention: queries from x, keys and values from a `source` (x itself by default).

    That one idea covers every use in minilm:
      self-attention          attn(x)                          the source is x
      cross-attention (T5)    attn(x, encoder_output)          keys/values from the other stack
      queries at some         attn(x_picked, x)                a masked LM's last block computes
      positions               (Transformer's outputs_at)       only the positions it predicts
      XLNet's query stream    attn(g, h)                       queries of the targets read the
                              (objectives/plm.py)              content stream h
    The mask and the positions are arguments, never baked into the layer. One (3C, C) weight holds
    the query, key and value projections: a single matmul when the source is x, split otherwise.

    QK-norm (cfg.qk_norm; Dehghani et al. 2023, ViT-22B; OLMo 2, Qwen3, modded-nanogpt): each
    head's query and key go through an RMSNorm over its D numbers (q_norm and k_norm, a learned
    weight of size D each, shared by the heads, eps = norm_eps) before RoPE and the dot product.
    Without it a score q·k grows with the size of W_q and W_k, and a few large logits can saturate
    the softmax (attention entropy collapse) unless the learning rate stays small; with it every
    query and key has RMS 1 times the norm's weight, so the scores are invariant to rescaling the
    projections and a higher learning rate trains stably. The 1/sqrt(D) scale stays as it is.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        # None when off (a plain attribute, not a module): today's models keep exactly their keys
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None   # over D, per head
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x, source=None, *, mask=None, rotary=None, positions=None, source_positions=None,
                cache=None):
        """x (B, T, C), source (B', S, C) -> (B, T, C).

        positions (B, T) or (T,): x's positions for the rotary embedding (0..T-1 when None);
        source_positions: the source's (x's when the source is x; 0..S-1 otherwise).
        cache (this layer's part of a KVCache, KVCache.layers[i]): for self-attention, this call's
        keys/values are appended to it and attention runs over all of them; for a source
        (cross-attention), its keys/values are computed on the first call and reused after (the
        encoder output does not change while a decoder generates).
        The source may hold fewer rows than x (B = g * B', attention()'s grouped query rows).
        """
        C = x.shape[-1]
        if source is None:
            q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.n_head)
            k = k if self.k_norm is None else self.k_norm(k)
            source_positions = positions
        else:
            w_q, w_kv = self.qkv.weight.split([C, 2 * C])
            b_q, b_kv = self.qkv.bias.split([C, 2 * C]) if self.qkv.bias is not None else (None, None)
            q = rearrange(F.linear(x, w_q, b_q), "b t (h d) -> b h t d", h=self.n_head)

            def keys_values():   # the source's, (B', H, S, D) each; cached keys are normed keys
                kv = F.linear(source, w_kv, b_kv)
                k, v = rearrange(kv, "b s (two h d) -> two b h s d", two=2, h=self.n_head)
                return (k if self.k_norm is None else self.k_norm(k)), v

            k, v = keys_values() if cache is None else cache.source(keys_values)
        if self.q_norm is not None:   # QK-norm: each head's (D,) query to RMS 1 (keys: above), before RoPE
            q = self.q_norm(q)
        if rotary is not None:
            q, k = rotary(q, positions), rotary(k, source_positions)
        if cache is not None and source is None:
            k, v = cache.append(k, v)  # every key/value so far: (B, H, cached + T, D)
        y = attention(q, k, v, mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))


# ----------------------------------------------------------------------------- MLP
class MLP(nn.Module):
    """down(act(up(x))), position by position; cfg.mlp picks act:
      gelu       exact (erf) GELU, as BERT
      gelu_tanh  GELU's tanh approximation, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as
                 GPT-2: a speed hack of its day (slower than the exact kernel on today's CPUs,
                 benchmarks/README.md), kept to match GPT-2's weights exactly
      swiglu     down(silu(gate(x)) * up(x)) (Shazeer 2020; Llama): gate and up are one matmul
      relu2      down(relu(up(x))^2), squared ReLU (Primer, So et al. 2021, whose architecture
                 search found it reaches GELU's loss with less compute; modded-nanogpt): gelu's
                 hidden width and parameters (4 x n_embd), a cheaper activation, zero for x < 0
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        self.swiglu = cfg.mlp == "swiglu"
        hidden = cfg.mlp_hidden
        # for SwiGLU the gate and up projections are one matmul, split afterwards
        self.up = nn.Linear(cfg.n_embd, (2 if self.swiglu else 1) * hidden, bias=cfg.bias)
        self.down = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        h = self.up(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate="tanh" if self.kind == "gelu_tanh" else "none")
        return self.down(h)


# ----------------------------------------------------------------------------- block
class Block(nn.Module):
    """The residual block, the only one: encoders, decoders and encoder-decoders all use it.
    cfg.norm_placement says where its norms sit.

    pre (the default; GPT-2 onwards, Llama): each sub-layer reads a normed copy of the stream and
    adds to it; the stream itself is never normed (the Transformer norms it once at the end):
        x = x + self_attention(norm1(x), norm1(source or x))     attend
        x = x + cross_attention(norm_cross(x), encoder_output)   cross_attend: an encoder-decoder's decoder
        x = x + mlp(norm2(x))                                    feed_forward

    post (the original Transformer, BERT, RoBERTa): the norm comes after the residual sum, so the
    stream is normed after every sub-layer and the last block already ends in a norm:
        x = norm1(x + self_attention(x, source or x))
        x = norm_cross(x + cross_attention(x, encoder_output))
        x = norm2(x + mlp(x))

    Why pre-norm is the default: with the norm after the sum, the path from the loss to an early
    layer passes through a norm at every sub-layer, and at initialization the layers near the
    output get much larger gradients than those near the input (Xiong et al. 2020); a post-norm
    model then needs a learning-rate warmup to train at all, the more so the deeper it is.
    Pre-norm keeps an identity path from the loss to every layer and trains stably without
    warmup at any depth. Post-norm is here to run BERT's and RoBERTa's checkpoints
    exactly (import and export map names, never math), not as a recommendation for new models.

    source (B, S, C): the stream the self-attention reads its keys and values from when it is not
    x (Attention's one idea): the whole row when x holds queries at some of its positions (the
    last block of Transformer's outputs_at), the content stream for XLNet's query stream. Pre-norm
    puts it through the same norm1; post-norm reads it as it is, since it is already a block's
    output (or the embeddings), normed. encoder_output (B', S', C): already normed by the
    encoder; the cross-attention has no rotary positions (the decoder attends to the encoder by
    content). forward is the three steps in order; they are methods so that a caller can do
    something between them (outputs_at drops padding rows before the MLP) without reaching into
    the parts.
    """

    def __init__(self, cfg: ModelConfig, cross_attention: bool = False):
        super().__init__()
        self.post_norm = cfg.norm_placement == "post"
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm_cross = make_norm(cfg) if cross_attention else None
        self.cross = Attention(cfg) if cross_attention else None
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, source=None, *, mask=None, rotary=None, positions=None, encoder_output=None,
                encoder_mask=None, cache=None):
        x = self.attend(x, source, mask=mask, rotary=rotary, positions=positions, cache=cache)
        if self.cross is not None:
            x = self.cross_attend(x, encoder_output, encoder_mask, cache=cache)
        return self.feed_forward(x)

    def attend(self, x, source=None, *, mask=None, rotary=None, positions=None, source_positions=None,
               cache=None):
        """x + self-attention: x (B, T, C), source (B, S, C) or None (x) -> (B, T, C).
        source_positions: the source's positions when they are not 0..S-1 (attention's rotary)."""
        how = dict(mask=mask, rotary=rotary, positions=positions, source_positions=source_positions, cache=cache)
        if self.post_norm:   # the source, a block's output or the embeddings, is already normed
            return self.norm1(x + self.drop(self.attn(x, source, **how)))
        source = None if source is None else self.norm1(source)
        return x + self.drop(self.attn(self.norm1(x), source, **how))

    def cross_attend(self, x, encoder_output, encoder_mask=None, *, cache=None):
        """x + cross-attention to the encoder's output (B', S, C), masked by encoder_mask (B', 1, 1, S)."""
        if encoder_output is None:
            raise ValueError("this block cross-attends: pass encoder_output (the encoder's output)")
        if self.post_norm:
            return self.norm_cross(x + self.drop(self.cross(x, encoder_output, mask=encoder_mask, cache=cache)))
        return x + self.drop(self.cross(self.norm_cross(x), encoder_output, mask=encoder_mask, cache=cache))

    def feed_forward(self, x):
        """x + MLP, position by position: (..., C) -> (..., C)."""
        if self.post_norm:
            return self.norm2(x + self.drop(self.mlp(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


# ----------------------------------------------------------------------------- padding mask
def padding_mask(lengths_or_valid: torch.Tensor, seq_len: int | None = None) -> torch.Tensor:
    """The encoder's attention mask for right-padded rows: (B, 1, 1, T) bool, True = attend.

    Takes either `lengths` (B,) with `seq_len` (row b's real tokens are 0 .. lengths[b]-1) or
    `valid` (B, T) bool. The mask hides padded *keys* from every query; it broadcasts over heads
    and query positions. Padded query positions still compute something (they attend to the real
    keys), which the objectives ignore: no row is all False, so SDPA never sees an empty softmax.
    """
    if lengths_or_valid.dtype == torch.bool:
        valid = lengths_or_valid
    else:
        positions = torch.arange(seq_len, device=lengths_or_valid.device)
        valid = positions[None, :] < lengths_or_valid[:, None]
    return valid[:, None, None, :]


# ----------------------------------------------------------------------------- logit soft-capping
def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap): every logit squashed smoothly into (-cap, cap); cap = 0 is off
    (the logits as they are). Gemma 2 (c = 30 for the final logits) and modded-nanogpt (30, later
    15): near 0 it is the identity (slope 1), so it only bends the logits that grow large, which
    keeps the output softmax from becoming over-confident early in training and lets a higher
    learning rate train stably. Every LM head applies it: Transformer.logits (the causal, prefix,
    permutation and seq2seq LMs, and generation) and the masked LMs' MLMHead, with cfg.logit_softcap."""
    if not cap:
        return logits
    return cap * torch.tanh(logits / cap)


# ----------------------------------------------------------------------------- the stack
class Transformer(nn.Module):
    """Token embedding (+ positions, + segments) -> n_layer Blocks -> final norm (pre-norm only:
    a post-norm stack's last block ends in its norm); `logits()` applies the (tied) LM head.

    forward(ids)                                   decoder (GPT): mask=CAUSAL is the default
    forward(ids, mask=padding_mask(lengths, T))    encoder (BERT); mask=None: no padding
    forward(ids, mask=causal_mask(T) & padmask)    decoder over right-padded rows
    forward(ids, positions=p)                      positions (B, T) or (T,), e.g. restarting at a
                                                   second segment; 0..T-1 by default
    forward(ids, segment_ids=seg)                  sentence pairs: seg (B, T) in 0..n_segment-1
    forward(ids, mask=m, cache=kv)                 incremental decoding with a KVCache: positions
                                                   continue after what the cache holds; the mask
                                                   is stated (decoding_mask), never guessed
    forward(ids, encoder_output=enc,               a decoder that cross-attends (EncoderDecoder)
            encoder_mask=pad)
    forward(ids, mask=padmask, outputs_at=flat)    only the outputs at flat positions b*T + t, (N, C)

    Segment (token-type) embeddings exist when cfg.n_segment > 0 (BERT's two: sentence A and B).
    A model that has them always adds them; without segment_ids every token is segment 0, as in
    BERT, so a pair-pretrained encoder also reads single texts.
    With cfg.embed_norm the summed embeddings go through a norm before the first block, as in
    BERT/RoBERTa/ModernBERT; the masked LMs use it.

    Factorized embeddings (ALBERT, Lan et al. 2019; ELECTRA), cfg.embedding_size = E < C: the
    tables are E wide, the embedding norm acts at E, and `embed_project` (Linear E -> C) maps the
    sum to the stream. The tables cost V x E instead of V x C, and a tied LM head multiplies by
    the V x E matrix after `head_project` (Linear C -> E): logits = head_project(h) W^T, 2 (C + V) E
    FLOPs per token instead of 2 V C. With E == C (or 0) neither projection exists and the model
    (its parameter names included) is exactly the unfactorized one. An untied head stays C -> V.
    """

    def __init__(self, cfg: ModelConfig, cross_attention: bool = False):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        E = cfg.embedding_width
        factorized = E != cfg.n_embd
        self.tok_emb = nn.Embedding(cfg.vocab_size, E)
        self.pos_emb = nn.Embedding(cfg.seq_len, E) if cfg.position == "learned" else None
        self.seg_emb = nn.Embedding(cfg.n_segment, E) if cfg.n_segment > 0 else None
        self.rotary = Rotary(cfg.head_dim, cfg.seq_len, cfg.rope_base) if cfg.position == "rope" else None
        self.embed_norm = make_norm(cfg, E) if cfg.embed_norm else None
        # projections only when factorized (None is a plain attribute, not a module), so an
        # unfactorized model has exactly the parameters, and state_dict keys, it always had
        self.embed_project = nn.Linear(E, cfg.n_embd, bias=cfg.bias) if factorized else None  # E -> C
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, cross_attention) for _ in range(cfg.n_layer))
        # post-norm: the last block already ends in a norm, so no final one (and no norm.* keys,
        # as BERT has none); the Identity keeps `self.norm(x)` meaning "the final norm" for callers
        self.norm = make_norm(cfg) if cfg.norm_placement == "pre" else nn.Identity()
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # the tied matrix is V x E, so the stream goes down to E first
        self.head_project = nn.Linear(cfg.n_embd, E, bias=cfg.bias) if factorized and cfg.tie_embeddings else None
        # recompute each block in backward instead of keeping its activations (set_activation_checkpointing)
        self.activation_checkpointing = False
        self.apply(self._init_weights)
        # GPT-2's depth scaling: each residual branch adds to the stream, so the layers that write
        # into it start smaller, keeping the variance of the stream independent of depth.
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.down) + ((block.cross.proj,) if block.cross else ()):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed(self, ids, positions=None, segment_ids=None):
        """ids (B, T) -> (B, T, C); positions (B, T) or (T,), 0..T-1 when None. The tables are
        E wide; a factorized model sums and norms at E, then embed_project maps E -> C."""
        x = self.tok_emb(ids)                                  # (B, T, E)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(ids.shape[1], device=ids.device) if positions is None else positions)
        if self.seg_emb is not None:
            # no segment_ids: all segment 0 (BERT's default token_type_ids)
            x = x + (self.seg_emb(segment_ids) if segment_ids is not None else self.seg_emb.weight[0])
        if self.embed_norm is not None:
            # an encoder must fetch every masked token's information from the *other* positions'
            # embeddings; at std 0.02 they are soon drowned in what the blocks add to the stream,
            # and a pre-norm encoder then learns far slower (benchmarks/README.md, "the embedding norm")
            x = self.embed_norm(x)
        if self.embed_project is not None:
            x = self.embed_project(x)                          # (B, T, E) -> (B, T, C)
        return self.drop(x)

    def forward(self, ids, *, mask=CAUSAL, positions=None, segment_ids=None, cache=None, encoder_output=None,
                encoder_mask=None, outputs_at=None):
        """ids (B, T) -> hidden states (B, T, C), normed (the final norm, or a post-norm block's).

        mask: CAUSAL (default), None, or a bool/float tensor broadcast to (B, H, T, S) (attention()).
        positions: (B, T) or (T,), each < seq_len; by default 0..T-1, after a cache's contents.
        segment_ids (B, T): only with n_segment > 0.
        cache: a KVCache this call appends to; a non-empty cache needs an explicit mask (a chunk
        of new tokens: decoding_mask(T, cache.length); one token: None).
        encoder_output (B', S, C), encoder_mask (B', 1, 1, S): the encoder's output and its padding
        mask, for a decoder built with cross_attention; B may be g * B' (the g rows b*g .. b*g+g-1
        read encoder row b: attention()'s grouped query rows).
        outputs_at (N,): sorted flat indices b*T + t (torch.nonzero's order) of the only positions
        whose output is wanted; returns (N, C), the rows of the full output there, computing the
        last block's queries, output projection and MLP at those positions alone (keys and values
        still come from every position). A masked LM predicts ~15% of positions, so its last block
        skips ~85% of that work, exactly (tests/test_model.py).
        """
        T = ids.shape[1]
        cached = 0 if cache is None else cache.length
        if positions is None:
            if cached + T > self.cfg.seq_len:
                raise ValueError(f"sequence of {cached + T} tokens is longer than seq_len={self.cfg.seq_len}")
            if cached:
                positions = torch.arange(cached, cached + T, device=ids.device)
        if cached and isinstance(mask, str):
            raise ValueError("a cache that already holds keys needs an explicit mask: "
                             "decoding_mask(new tokens, cache.length) (None for one new token)")
        if segment_ids is not None and self.seg_emb is None:
            raise ValueError("segment_ids were given but this model has no segment embeddings (n_segment=0)")
        if outputs_at is not None and cache is not None:
            raise ValueError("outputs_at computes a subset of one full pass; it cannot append to a cache")
        x = self.embed(ids, positions, segment_ids)
        shared = dict(rotary=self.rotary, encoder_output=encoder_output, encoder_mask=encoder_mask)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            if i == last and outputs_at is not None:
                x = self._last_block_at(block, x, outputs_at, mask, positions)
            elif self.activation_checkpointing and self.training and cache is None:
                # keep only the block's input; its attention and MLP activations are recomputed in
                # backward (one more forward of the block), with the RNG state of this pass, so
                # dropout drops the same units and the gradients are the same. Not with a cache
                # (generation: no backward, and the recompute would append to the cache again) nor
                # for outputs_at's last block, which holds activations at the picked positions only
                x = checkpoint(block, x, mask=mask, positions=positions, use_reentrant=False, **shared)
            else:
                layer_cache = None if cache is None else cache.layers[i]
                x = block(x, mask=mask, positions=positions, cache=layer_cache, **shared)
        if cache is not None:
            cache.length = cached + T
        return self.norm(x)

    def _last_block_at(self, block, x, outputs_at, mask, positions):
        """The last block at the positions outputs_at only: (B, T, C) -> (N, C).

        Each row's queries are packed into (B, M, C), M = the most any row has, and attend to the
        whole row (the self-attention's source is x); the few padding slots read
        position 0 and are dropped. The mask keeps its meaning: a causal or per-query mask is cut
        down to the packed queries' rows."""
        B, T, C = x.shape
        rows, columns = outputs_at // T, outputs_at % T                  # (N,) each
        counts = torch.bincount(rows, minlength=B)                       # queries per row
        slot = torch.arange(len(outputs_at), device=x.device) - (counts.cumsum(0) - counts)[rows]
        M = max(1, int(counts.max())) if len(outputs_at) else 1
        query_columns = torch.zeros(B, M, dtype=torch.long, device=x.device)
        query_columns[rows, slot] = columns                              # (B, M)
        picked = x.gather(1, query_columns[:, :, None].expand(B, M, C))  # (B, M, C)
        all_positions = torch.arange(T, device=x.device) if positions is None else positions
        query_positions = all_positions.expand(B, T).gather(1, query_columns)
        if isinstance(mask, str):          # causal: packed query q sees keys 0..its column
            mask = torch.arange(T, device=x.device)[None, None, None, :] <= query_columns[:, None, :, None]
        elif mask is not None and mask.dim() >= 2 and mask.shape[-2] > 1:  # a mask with a row per query
            rows_mask = mask[(None,) * (4 - mask.dim())]                 # (b, h, T, S), b and h maybe 1
            rows_mask = rows_mask.expand(B, rows_mask.shape[1], T, rows_mask.shape[-1])
            mask = rows_mask.gather(2, query_columns[:, None, :, None].expand(B, rows_mask.shape[1], M, T))
        if block.cross is not None:
            raise ValueError("outputs_at is for encoders and decoders, not a cross-attending decoder")
        # Block's own steps, with the rows back to one per wanted position, (N, C), between the
        # attention and the MLP: the MLP (most of the block's work) never runs on the padding slots
        attended = block.attend(picked, x, mask=mask, rotary=self.rotary, positions=query_positions,
                                source_positions=all_positions)                           # (B, M, C)
        return block.feed_forward(attended[rows, slot])                                   # (N, C)

    @property
    def output_weight(self):
        """The LM head's matrix: (V, E) tied (the token table), (V, C) untied."""
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def to_output_width(self, hidden):
        """(..., C) -> (..., output_weight's width): head_project when the tied matrix is
        factorized (E < C), the identity otherwise. Every LM head reads the stream through it."""
        return hidden if self.head_project is None else self.head_project(hidden)

    def logits(self, hidden):
        """(..., C) -> (..., V), soft-capped when cfg.logit_softcap > 0."""
        return softcap(F.linear(self.to_output_width(hidden), self.output_weight), self.cfg.logit_softcap)

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (a tied matrix once). non_embedding drops the position and segment
        tables, as nanoGPT drops the position table: they are lookups, no matmul FLOPs. The tied
        token matrix stays: it is also the LM head's matmul; so do a factorized model's
        embed_project and head_project, matmuls at every position."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            for table in (self.pos_emb, self.seg_emb):
                n -= table.weight.numel() if table is not None else 0
        return n


def set_activation_checkpointing(module: nn.Module, on: bool) -> None:
    """Turn activation (gradient) checkpointing on or off for every Transformer stack in `module`
    (an objective's backbone, both stacks of an encoder-decoder, an ELECTRA generator): while
    training, each block keeps only its input and recomputes the rest in backward. Memory for
    activations goes from every block's intermediates to one (B, T, C) tensor per block, for
    about one more forward pass of compute; the loss and the gradients are the same."""
    for stack in module.modules():
        if isinstance(stack, Transformer):
            stack.activation_checkpointing = on


# ----------------------------------------------------------------------------- encoder-decoder
class EncoderDecoder(nn.Module):
    """T5's shape (Raffel et al. 2020): an encoder reads the input in both directions, a decoder
    writes the output causally and cross-attends to the encoder's output in every block.

    Both stacks are minilm Transformers of the same Block; they share one token embedding (the
    same Parameter) and the output matrix is that embedding (tied). cfg.n_layer encoder blocks,
    cfg.n_decoder_layer decoder blocks. Each stack has its own positions (rotary or learned):
    the encoder's 0..S-1, the decoder's 0..T-1.

    encode(input_ids, input_mask) -> encoder_output (B, S, C)              once per example
    decode(decoder_ids, encoder_output, encoder_mask, ...) -> (B, T, C)    per step when generating, with a
                                                                    KVCache whose cross-attention
                                                                    keys/values are computed once
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.n_decoder_layer < 1:
            raise ValueError("an encoder-decoder needs n_decoder_layer >= 1")
        self.cfg = cfg
        self.encoder = Transformer(cfg)
        self.decoder = Transformer(dataclasses.replace(cfg, n_layer=cfg.n_decoder_layer), cross_attention=True)
        self.decoder.tok_emb = self.encoder.tok_emb      # one table for both sides
        if self.decoder.lm_head is not None:             # untied: the output matrix is the decoder's alone
            self.encoder.lm_head = None
        self.encoder.head_project = None                 # the LM head (factorized, tied) is the decoder's

    def encode(self, input_ids, input_mask=None, positions=None):
        """input_ids (B, S), input_mask (B, 1, 1, S) bool padding mask or None -> (B, S, C)."""
        return self.encoder(input_ids, mask=input_mask, positions=positions)

    def decode(self, decoder_ids, encoder_output, encoder_mask=None, *, mask=CAUSAL, positions=None, cache=None):
        """decoder_ids (B, T), encoder_output (B', S, C), B = g * B' -> hidden states (B, T, C)."""
        return self.decoder(decoder_ids, mask=mask, positions=positions, cache=cache, encoder_output=encoder_output,
                            encoder_mask=encoder_mask)

    def forward(self, input_ids, decoder_ids, input_mask=None):
        return self.decode(decoder_ids, self.encode(input_ids, input_mask), input_mask)

    @property
    def output_weight(self):
        return self.decoder.output_weight

    def logits(self, hidden):
        return self.decoder.logits(hidden)

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (the shared table once)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            for stack in (self.encoder, self.decoder):
                for table in (stack.pos_emb, stack.seg_emb):
                    n -= table.weight.numel() if table is not None else 0
        return n


# ----------------------------------------------------------------------------- pooled output
class Pooler(nn.Module):
    """BERT's pooler: tanh(dense(h[:, 0])), the hidden state of the first ([CLS]) position
    through one more layer; what sentence-level heads (order, next sentence, classes) read.

    (B, T, C) -> (B, C). Initialised like the Transformer's linear layers (normal, std 0.02).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.n_embd, cfg.n_embd)   # with a bias, as BERT's
        Transformer._init_weights(self.dense)

    def forward(self, hidden):
        return torch.tanh(self.dense(hidden[:, 0]))


# ----------------------------------------------------------------------------- KV cache
class KVCache:
    """What a decoder keeps between generation steps, preallocated.

    k, v: (n_layer, B, H, max_len, D), the self-attention keys/values of the positions processed
    so far, so each new token costs O(t) instead of recomputing the whole prefix. `length` is how
    many positions it holds; Transformer.forward advances it after each call.
    cross: per layer, the cross-attention keys/values of the encoder's output (an encoder-decoder's
    decoder), computed on the first step and reused: the encoder output does not change.
    reorder(index) keeps the rows `index` (beam search: each surviving beam takes its parent's cache).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, device, dtype, max_len: int | None = None):
        shape = (cfg.n_layer, batch_size, cfg.n_head, max_len or cfg.seq_len, cfg.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.cross: list = [None] * cfg.n_layer
        self.length = 0
        self.layers = [LayerCache(self, i) for i in range(cfg.n_layer)]   # what each block is handed

    def append(self, layer: int, k, v):
        """Write (B, H, T, D) keys/values at positions length .. length+T-1 of `layer`; returns
        that layer's keys/values so far, (B, H, length+T, D)."""
        end = self.length + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"the KV cache holds {self.k.shape[3]} positions; {end} do not fit")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def source(self, layer: int, compute):
        """Layer `layer`'s (keys, values) of a source that does not change between steps (the
        encoder's output, for cross-attention): compute() the first time, then stored."""
        if self.cross[layer] is None:
            self.cross[layer] = compute()
        return self.cross[layer]

    def reorder(self, index: torch.Tensor, cross_too: bool = True) -> None:
        """Keep rows `index` (B',) of the batch, in that order (B' may differ from B). Only the
        positions held so far are copied. cross_too=False leaves the cross-attention keys/values
        as they are: right when every row moves only among rows with the same source (the beams of
        one example), where copying them, (B, H, S, D) per layer each step, would change nothing."""
        filled = slice(0, self.length)
        k = self.k.new_empty((self.k.shape[0], len(index)) + self.k.shape[2:])
        v = self.v.new_empty(k.shape)
        k[:, :, :, filled], v[:, :, :, filled] = self.k[:, index, :, filled], self.v[:, index, :, filled]
        self.k, self.v = k, v
        if cross_too:
            self.cross = [None if kv is None else (kv[0][index], kv[1][index]) for kv in self.cross]


class LayerCache:
    """One layer's part of a KVCache, what a Block and its Attention are handed: append and source
    as KVCache's, for this layer."""

    def __init__(self, cache: KVCache, layer: int):
        self.cache, self.layer = cache, layer

    def append(self, k, v):
        return self.cache.append(self.layer, k, v)

    def source(self, compute):
        return self.cache.source(self.layer, compute)
