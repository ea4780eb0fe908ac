"""The Transformer: one set of blocks for decoders, encoders and (later) encoder-decoders.

Read top to bottom: norms -> rotary positions -> attention -> MLP -> Block -> padding mask ->
Transformer -> Pooler -> KV cache.

Whether a model is a decoder or an encoder is not a property of its layers: it is the attention
mask passed in at call time. `Transformer.forward(ids, causal=True)` is a GPT-style decoder;
`causal=False` with a padding mask is a BERT-style encoder. Attention goes through
torch.nn.functional.scaled_dot_product_attention (SDPA), which picks a fused kernel (flash /
memory-efficient on CUDA, a fused CPU kernel) when the mask allows it; the one exception, short
bf16 sequences on CPU, is explained in attention().

Shapes: B batch, T sequence length, C = n_embd, H = n_head, D = C // H head size, V vocab.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

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


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


# ----------------------------------------------------------------------------- rotary positions
class Rotary(nn.Module):
    """Rotary position embedding (RoPE, Su et al. 2021), "rotate half" layout.

    Each pair (x[i], x[i + D/2]) of a query/key head is rotated by angle pos * base^(-2i/D), so
    the dot product q·k depends only on the distance between the two positions. The tables are
    buffers, not parameters, and are not saved (persistent=False): they are a pure function of
    the config.
    """

    def __init__(self, head_dim: int, max_len: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (max_len, D/2)
        angles = torch.cat([angles, angles], dim=-1)                                 # (max_len, D)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x, start: int = 0, positions=None):
        # x: (B, H, T, D); positions start .. start+T-1, or `positions` (B, T) given row by row
        if positions is None:
            T = x.shape[-2]
            cos, sin = self.cos[start:start + T].to(x.dtype), self.sin[start:start + T].to(x.dtype)
        else:
            cos, sin = self.cos[positions][:, None].to(x.dtype), self.sin[positions][:, None].to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


# ----------------------------------------------------------------------------- attention
# Longest key length for which attention on CPU in bf16/fp16 is spelled out (attention_math)
# instead of going through SDPA's fused CPU kernel; see attention().
CPU_MATH_ATTENTION_MAX_KEYS = 512


def attention(q, k, v, *, attn_mask=None, causal=False, dropout_p=0.0):
    """softmax(q k^T / sqrt(D) + mask) v: q (B, H, T, D), k and v (B, H, S, D) -> (B, H, T, D).

    attn_mask: bool, True = may attend (broadcast to (B, H, T, S)), or float, added to the scores.
    causal: query i sees keys 0..i (SDPA's is_causal: the mask is aligned top-left). With an
    attn_mask too, both apply (a decoder over right-padded rows, a document mask): they are combined
    into one mask first (with_causal), the same in both paths; SDPA is never handed the pair, which
    older torch versions refuse.

    SDPA everywhere but one case. On CPU in bf16 or fp16, PyTorch's fused kernel (a flash-attention
    port) is slower than the plain ops of attention_math for short sequences. Causal forward +
    backward of one layer, H 6, D 64, 2,048 tokens, 2 threads: T 256, 24 ms fused against 12-16 ms
    plain (a 5-10% faster training step); T 512, 40 against 21-32; T 1024, 47 against 57, where the
    (B, H, T, S) scores outgrow the caches. Hence the cut at CPU_MATH_ATTENTION_MAX_KEYS keys.
    CUDA and fp32 always fuse.
    The price: the plain path rounds the scores to bf16 before the softmax (as eager attention
    under autocast does; the fused kernel keeps them in fp32), about 2-3x the fused kernel's error
    for large scores (tests/test_model.py). Set CPU_MATH_ATTENTION_MAX_KEYS = 0 to always fuse.
    """
    if (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
            and k.shape[-2] <= CPU_MATH_ATTENTION_MAX_KEYS):
        return attention_math(q, k, v, attn_mask=attn_mask, causal=causal, dropout_p=dropout_p)
    if causal and attn_mask is not None:  # one mask that says both
        attn_mask, causal = with_causal(attn_mask, q.shape[-2], k.shape[-2], q.device), False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, dropout_p=dropout_p)


def with_causal(attn_mask, T: int, S: int, device):
    """The causal (T, S) mask, aligned top-left as SDPA's is_causal, combined with attn_mask:
    bool (True = may attend) -> both must allow; float -> -inf added above the diagonal; None ->
    the causal mask alone (bool). Broadcasts like attn_mask, e.g. (B, 1, 1, S) -> (B, 1, T, S)."""
    causal = torch.ones(T, S, dtype=torch.bool, device=device).tril()
    if attn_mask is None:
        return causal
    if attn_mask.dtype == torch.bool:
        return attn_mask & causal
    return attn_mask.masked_fill(~causal, float("-inf"))


def attention_math(q, k, v, *, attn_mask=None, causal=False, dropout_p=0.0):
    """The same attention as three plain ops, in q's dtype. Under bf16 the scores come out of the
    matmul in bf16 (as in eager attention under autocast); the softmax kernel reads them, sums in
    fp32 and rounds each probability once, which equals an fp32 softmax cast back to bf16 (checked:
    identical bits) without the two (B, H, T, S) casts."""
    T, S = q.shape[-2], k.shape[-2]
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)                    # (B, H, T, S)
    if causal:  # with a given attn_mask too, both apply (as attention() does for SDPA)
        attn_mask = with_causal(attn_mask, T, S, q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:  # True = may attend: 0 there, -inf elsewhere (a small tensor)
            attn_mask = torch.zeros(attn_mask.shape, device=q.device).masked_fill_(~attn_mask, float("-inf"))
        scores = scores.add_(attn_mask.to(scores.dtype))  # in place: nothing else reads the raw scores
    probs = torch.softmax(scores, dim=-1)
    if dropout_p:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v


class Attention(nn.Module):
    """Multi-head self-attention. The mask is an argument, never baked into the layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # one matmul for q, k, v
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x, *, rotary=None, attn_mask=None, causal=False, cache=None, layer=0, start=0, keep=None):
        # x: (B, T, C) -> (B, T, C); with `keep`, (N, C): see attend_at
        if keep is not None:
            return self.attend_at(x, keep, rotary=rotary, attn_mask=attn_mask, causal=causal, cache=cache)
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.n_head)
        if rotary is not None:
            q, k = rotary(q, start), rotary(k, start)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)  # all keys/values so far: (B, H, start+T, D)
        y = attention(q, k, v, attn_mask=attn_mask, causal=causal, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))

    def attend_at(self, x, keep, *, rotary=None, attn_mask=None, causal=False, cache=None):
        """The same attention, computed for the query positions `keep` only: (B, T, C) -> (N, C).

        keep (N,): sorted flat indices b*T + t (what torch.nonzero gives). Keys and values come
        from every position, as usual; only the queries (and so the outputs) are a subset. A
        masked LM needs the last layer's output at its masked positions alone, so its last
        block skips ~85% of the query, output-projection and MLP work, and the result is exactly
        that of the full layer at those positions (tests/test_model.py).
        The queries of each row are packed into (B, M, C), M = the most any row has; the few
        padding slots read position 0 and are dropped.
        """
        if causal or cache is not None:
            raise ValueError("attention at chosen positions is for encoders (no causal mask, no cache)")
        B, T, C = x.shape
        w_q, w_kv = self.qkv.weight.split([C, 2 * C])
        b_q, b_kv = self.qkv.bias.split([C, 2 * C]) if self.qkv.bias is not None else (None, None)
        k, v = rearrange(F.linear(x, w_kv, b_kv), "b t (two h d) -> two b h t d", two=2, h=self.n_head)
        rows, cols = keep // T, keep % T                            # (N,) each
        counts = torch.bincount(rows, minlength=B)                  # queries per row
        slot = torch.arange(len(keep), device=x.device) - (counts.cumsum(0) - counts)[rows]
        M = max(1, int(counts.max())) if len(keep) else 1
        query_cols = torch.zeros(B, M, dtype=torch.long, device=x.device)
        query_cols[rows, slot] = cols                               # (B, M) positions of the queries
        x_q = x.gather(1, query_cols[:, :, None].expand(B, M, C))   # (B, M, C)
        q = rearrange(F.linear(x_q, w_q, b_q), "b m (h d) -> b h m d", h=self.n_head)
        if rotary is not None:
            q, k = rotary(q, positions=query_cols), rotary(k)
        y = attention(q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0)
        y = rearrange(y, "b h m d -> b m (h d)")[rows, slot]        # (N, C), in the order of keep
        return self.proj(y)


# ----------------------------------------------------------------------------- MLP
class MLP(nn.Module):
    """GELU MLP (GPT-2/BERT) or SwiGLU (Shazeer 2020; LLaMA): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
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
        else:
            # exact (erf) GELU, as BERT; GPT-2's tanh approximation was a speed hack that is
            # slower than the exact kernel on today's CPUs (measured: ~5% of a bf16 step)
            h = F.gelu(h)
        return self.down(h)


# ----------------------------------------------------------------------------- block
class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, keep=None, **attn_args):
        # keep (N,) flat positions: compute only their outputs, (B, T, C) -> (N, C) (Attention.attend_at)
        residual = x if keep is None else x.flatten(0, 1).index_select(0, keep)
        x = residual + self.drop(self.attn(self.norm1(x), keep=keep, **attn_args))
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


# ----------------------------------------------------------------------------- the stack
class Transformer(nn.Module):
    """Token embedding (+ positions, + segments) -> n_layer Blocks -> final norm; `logits()`
    applies the (tied) LM head.

    forward(ids, causal=True)                      decoder (GPT)
    forward(ids, causal=False, attn_mask=padmask)  encoder (BERT); padmask = padding_mask(lengths, T)
    forward(ids, causal=True, attn_mask=padmask)   decoder over right-padded rows (both masks apply)
    forward(ids, ..., segment_ids=seg)             sentence pairs: seg (B, T) in 0..n_segment-1
    forward(ids, cache=kv, start=pos)              incremental decoding with a KVCache

    Segment (token-type) embeddings exist when cfg.n_segment > 0 (BERT's two: sentence A and B).
    A model that has them always adds them; without segment_ids every token is segment 0, as in
    BERT, so a pair-pretrained encoder also reads single texts.
    With cfg.embed_norm the summed embeddings go through a norm before the first block, as in
    BERT/RoBERTa/ModernBERT; the masked-LM encoders use it.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.n_embd) if cfg.position == "learned" else None
        self.seg_emb = nn.Embedding(cfg.n_segment, cfg.n_embd) if cfg.n_segment > 0 else None
        self.rotary = Rotary(cfg.head_dim, cfg.seq_len, cfg.rope_base) if cfg.position == "rope" else None
        self.embed_norm = make_norm(cfg) if cfg.embed_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2's depth scaling: each residual branch adds to the stream, so the layers that write
        # into it start smaller, keeping the variance of the stream independent of depth.
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.down):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed(self, ids, start: int = 0, segment_ids=None):
        x = self.tok_emb(ids)                                  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + ids.shape[1], device=ids.device))
        if self.seg_emb is not None:
            # no segment_ids: all segment 0 (BERT's default token_type_ids)
            x = x + (self.seg_emb(segment_ids) if segment_ids is not None else self.seg_emb.weight[0])
        if self.embed_norm is not None:
            # an encoder must fetch every masked token's information from the *other* positions'
            # embeddings; at std 0.02 they are soon drowned in what the blocks add to the stream,
            # and a pre-norm encoder then learns far slower (measured in objectives/mlm.py)
            x = self.embed_norm(x)
        return self.drop(x)

    def forward(self, ids, *, causal: bool = True, attn_mask=None, cache=None, start: int = 0,
                segment_ids=None, keep=None):
        """ids (B, T) -> hidden states (B, T, C). segment_ids (B, T), only with n_segment > 0.

        keep (N,), encoders only: sorted flat indices b*T + t of the only positions whose output
        is wanted; returns (N, C), the rows of the full output at those positions, computing the
        last block at those positions alone (a masked LM's masked tokens: objectives/mlm.py)."""
        T = ids.shape[1]
        if start + T > self.cfg.seq_len:
            raise ValueError(f"sequence of {start + T} tokens is longer than seq_len={self.cfg.seq_len}")
        if segment_ids is not None and self.seg_emb is None:
            raise ValueError("segment_ids were given but this model has no segment embeddings (n_segment=0)")
        if cache is not None and causal and start > 0 and T > 1:
            # a chunk after a cached prefix: query i may see keys 0 .. start+i
            attn_mask = torch.ones(T, start + T, dtype=torch.bool, device=ids.device).tril(diagonal=start)
            causal = False
        elif cache is not None and start > 0:
            causal = False  # one new token attends to everything cached, itself included
        x = self.embed(ids, start, segment_ids)
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            x = block(x, rotary=self.rotary, attn_mask=attn_mask, causal=causal, cache=cache, layer=i, start=start,
                      keep=keep if last else None)
        if cache is not None:
            cache.length = start + T
        return self.norm(x)

    @property
    def output_weight(self):
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden):
        """(..., C) -> (..., V)."""
        return F.linear(hidden, self.output_weight)

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (a tied matrix once). non_embedding drops the position and segment
        tables, as nanoGPT drops the position table: they are lookups, no matmul FLOPs. The tied
        token matrix stays: it is also the LM head's matmul."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            for table in (self.pos_emb, self.seg_emb):
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
    """Keys and values of every layer for positions already processed, preallocated.

    k, v: (n_layer, B, H, max_len, D). Decoding step t writes position t and attends over 0..t,
    so each new token costs O(t) instead of recomputing the whole prefix.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, device, dtype, max_len: int | None = None):
        shape = (cfg.n_layer, batch_size, cfg.n_head, max_len or cfg.seq_len, cfg.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0

    def update(self, layer: int, start: int, k, v):
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
