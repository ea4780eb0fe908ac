"""Sampling from a decoder: temperature, top-k, top-p (nucleus), with a KV cache.

top-k keeps exactly k tokens, the k largest logits; among tied logits at the boundary the ones
torch.topk returns are kept, so the kept set never grows past k (a threshold `logits >= kth`
would keep every tie).
top-p keeps the smallest set of most-probable tokens whose total probability reaches p: tokens
are sorted by probability and a token is kept when the mass *before* it is still below p, so the
token that crosses p is included and the set is never empty (the most probable token is always
kept). Both act after temperature scaling; when both are given, top-k applies first.
"""
from __future__ import annotations

from typing import Callable

import torch

from minilm.model import CAUSAL, KVCache, Transformer, decoding_mask


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(B, V) logits -> the same with -inf outside the kept set."""
    if top_k and top_k < logits.shape[-1]:
        kept = torch.topk(logits, top_k, dim=-1).indices
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, kept, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    if top_p < 1.0:
        probs, order = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True)
        # exclusive cumsum (shifted right), not cumsum - probs: the subtraction rounds, and at a p
        # exactly on a boundary it could keep one token past the smallest set reaching p
        cumsum = probs.cumsum(dim=-1)
        mass_before = torch.cat([torch.zeros_like(cumsum[..., :1]), cumsum[..., :-1]], dim=-1)
        keep_sorted = mass_before < top_p
        keep_sorted[..., 0] = True
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. temperature 0 means greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
             use_cache: bool = True, warn: Callable[[str], None] | None = None) -> torch.Tensor:
    """prompt (B, T0) -> (B, T0 + max_new_tokens).

    Context window: the model sees at most seq_len tokens. A longer prompt keeps its last
    seq_len tokens, and once the text outgrows the window every new token is predicted from the
    last seq_len tokens (recomputed without the cache, since the cached keys' positions would no
    longer match). `warn` is called once when that happens.
    """
    was_training = model.training
    model.eval()
    window = model.cfg.seq_len
    tokens = prompt
    warned = False

    def note_overflow():
        nonlocal warned
        if warn is not None and not warned:
            warn(f"prompt + generation is longer than the model's context window ({window} tokens); "
                 f"each new token sees only the last {window}")
        warned = True

    if tokens.shape[1] > window:
        note_overflow()
    cache = None
    dtype = model.tok_emb.weight.dtype
    if use_cache:
        cache = KVCache(model.cfg, tokens.shape[0], tokens.device, dtype)
    for _ in range(max_new_tokens):
        if tokens.shape[1] > window:
            cache = None  # from here on, a sliding window without a cache
        if cache is not None:
            new = tokens[:, cache.length:]     # the whole prompt first, then one token at a time
            hidden = model(new, cache=cache, mask=decoding_mask(new.shape[1], cache.length) if cache.length else CAUSAL)
        else:
            if tokens.shape[1] > window:
                note_overflow()
            hidden = model(tokens[:, -window:])
        logits = model.logits(hidden[:, -1])
        next_token = sample_next(logits, temperature, top_k, top_p, generator)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
    model.train(was_training)
    return tokens
