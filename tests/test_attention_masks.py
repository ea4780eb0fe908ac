"""Causal attention with a mask as well (a decoder over padded rows, a document mask): the caller
states one mask, causal_mask(T) & mask (bool) or the causal -inf added to a float mask, and both
the fused path (SDPA) and the plain-op path (attention_math) apply all of it, and agree."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minilm.model import attention, attention_math, causal_mask, padding_mask

B, H, T, D = 3, 2, 7, 8


def qkv(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, T, D, generator=g).to(dtype) for _ in range(3)]


def reference(q, k, v, allowed):
    """softmax over the allowed keys, spelled out in float64. allowed broadcasts to (B, H, T, T)."""
    q, k, v = (x.double() for x in (q, k, v))
    scores = q @ k.transpose(-1, -2) / D ** 0.5
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v


def with_causal(mask):
    """mask and the causal mask, as one mask of mask's kind."""
    if mask.dtype == torch.bool:
        return mask & causal_mask(T)
    return mask.masked_fill(~causal_mask(T), float("-inf"))


def masks():
    """A right-padding mask (lengths 7, 4, 1) and one that hides keys in the middle of rows (key 0
    always visible, so no causal row is empty), as bool (True = attend) and as additive floats."""
    padding = padding_mask(torch.tensor([7, 4, 1]), T)                          # (B, 1, 1, T)
    hidden = torch.zeros(B, 1, 1, T, dtype=torch.bool)
    hidden[0, ..., 2] = hidden[1, ..., 3:5] = hidden[2, ..., 1] = True
    scattered = ~hidden
    for name, mask in (("padding", padding), ("scattered", scattered)):
        yield name, mask, mask
        yield name + "-float", torch.zeros(mask.shape).masked_fill(~mask, float("-inf")), mask


@pytest.mark.parametrize("name", [name for name, _, _ in masks()])
def test_causal_and_a_mask_both_apply_in_both_paths(name):
    _, mask, allowed = next(m for m in masks() if m[0] == name)
    q, k, v = qkv()
    want = reference(q, k, v, allowed & torch.ones(T, T, dtype=torch.bool).tril()).float()
    mask = with_causal(mask)
    torch.testing.assert_close(attention(q, k, v, mask=mask), want)        # SDPA (fp32)
    torch.testing.assert_close(attention_math(q, k, v, mask=mask), want)   # plain ops
    # bf16 on CPU takes the plain path inside attention(): the same result, to bf16's precision
    got = attention(*qkv(torch.bfloat16), mask=mask).float()
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)


def test_the_two_paths_agree_bit_for_bit_where_sdpa_runs_the_math():
    """With SDPA's own math kernel, the combined mask gives what attention_math gives."""
    q, k, v = qkv()
    mask = padding_mask(torch.tensor([7, 4, 1]), T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask & causal)
    torch.testing.assert_close(attention_math(q, k, v, mask=with_causal(mask)), sdpa)
    torch.testing.assert_close(attention(q, k, v, mask=with_causal(mask)), sdpa)
