"""One vector per sequence from a backbone's hidden states: for classification heads and
sentence embeddings.

    pool(hidden (B, T, C), lengths (B,), how) -> (B, C)

  "first"  the first position, [CLS] in BERT's convention: an encoder attends in both directions,
           so its first position can gather the whole sequence (BERT, SimCSE's default)
  "mean"   the mean over the real tokens, padding left out (Sentence-BERT; SimCSE's alternative)
  "last"   the last real token: in a causal decoder it is the only position that has seen the
           whole sequence (GPT-style classification)
Rows are padded at the end: positions >= lengths[b] are padding and never reach the result, so
adding padding leaves a sequence's vector unchanged.
"""
from __future__ import annotations

import torch

POOLINGS = ("first", "mean", "last")


def pool(hidden: torch.Tensor, lengths: torch.Tensor, how: str) -> torch.Tensor:
    B, T, _ = hidden.shape
    lengths = lengths.to(hidden.device)
    if how == "first":
        return hidden[:, 0]
    if how == "last":
        return hidden[torch.arange(B, device=hidden.device), (lengths - 1).clamp(min=0)]
    if how == "mean":
        real = (torch.arange(T, device=hidden.device)[None, :] < lengths[:, None]).to(hidden.dtype)  # (B, T)
        summed = torch.einsum("btc,bt->bc", hidden, real)
        return summed / lengths.clamp(min=1).to(hidden.dtype)[:, None]
    raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {how!r}")
