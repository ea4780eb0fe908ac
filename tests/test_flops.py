"""MFU's numerator, objective.flops_per_token(), counts what a step computes: checked against
torch's FlopCounterMode on a real forward + backward of a tiny model, as tests/test_mlm.py checks
the masked LMs. The counter does not see SDPA's CPU kernel, so attention runs as plain matmuls
here (attention_math: the same result); then the count and the formula differ only by the norms
and biases that 6N includes and the counter ignores, under 2%.
Before matmul_weights, an objective without an LM head (sop) and an untied model counted the
V x C token table as a matmul: 30% (untied clm) to 83% (untied sop) too many FLOPs here."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from minilm import model
from minilm.config import ModelConfig, ObjectiveConfig
from minilm.data import pack_pairs
from minilm.objectives import build_objective
from minilm.tokenizer import NUM_SPECIAL

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

V, T, B = 2048, 64, 8


def config(**changes) -> ModelConfig:
    return ModelConfig(vocab_size=V, seq_len=T, n_layer=3, n_head=4, n_embd=128, position="learned",
                       norm="layernorm", bias=True, **changes)


def pair_batch(generator: torch.Generator) -> dict:
    """A SegmentPairSource-like batch of full rows: [CLS] A [SEP] B [SEP], A + B = T - 3 tokens,
    every row from its own document (so NSP could draw from any other row)."""
    a_len = torch.randint(1, T - 4, (B,), generator=generator)
    b_len = T - 3 - a_len
    flat = torch.randint(NUM_SPECIAL, V, (B * (T - 3),), generator=generator)
    start = torch.arange(B) * (T - 3)
    input_ids, segment_ids, lengths = pack_pairs(flat, start, a_len, start + a_len, b_len, T)
    return {"input_ids": input_ids, "segment_ids": segment_ids, "lengths": lengths,
            "a_lengths": a_len, "b_lengths": b_len, "documents": torch.arange(B)}


def formula_over_count(name: str, **changes) -> float:
    """objective.flops_per_token() / the FLOPs per token FlopCounterMode counts in one step."""
    torch.manual_seed(0)
    objective = build_objective(name, config(**changes), None, ObjectiveConfig(mask_prob=0.15))
    generator = torch.Generator().manual_seed(0)
    reads_pairs = objective.data == "segment_pairs"
    raw = pair_batch(generator) if reads_pairs else torch.randint(NUM_SPECIAL, V, (B, T + 1), generator=generator)
    batch = objective.make_batch(raw, generator)
    with FlopCounterMode(display=False) as counter:
        loss, _ = objective(batch)
        loss.backward()
    return objective.flops_per_token() / (counter.get_total_flops() / (B * T))


def test_flops_per_token_counts_what_each_objective_computes(monkeypatch):
    monkeypatch.setattr(model, "attention", model.attention_math)    # attention the counter can see
    ratios = {f"{name} {changes}": formula_over_count(name, **changes)
              for name, changes in (("clm", {}), ("clm", dict(tie_embeddings=False)), ("sop", {}),
                                    ("sop", dict(tie_embeddings=False)), ("mlm+sop", {}),
                                    ("mlm", dict(tie_embeddings=False)))}
    # at most 2% over (norms and biases); a hair under 1.0 for the masked LMs, whose packed queries'
    # few padding slots (outputs_at: up to the most any row has) also go through two projections
    assert all(0.997 <= ratio < 1.02 for ratio in ratios.values()), ratios


def test_the_generic_count_is_nanogpts_for_a_causal_lm_and_counts_keys_values_everywhere():
    """flops.transformer_flops with the LM head at every position is nanoGPT's 6N + 12 L H D T;
    with outputs at a share p of positions, the last block but its keys and values, and the head,
    run at p, and so does that block's attention."""
    from minilm.flops import (flops_per_token, key_value_weights, lm_head_matmul_weights, matmul_weights,
                              parameters_of, transformer_flops)
    from minilm.model import Transformer
    cfg = config()
    backbone = Transformer(cfg)
    dense = transformer_flops(backbone, T, head=lm_head_matmul_weights(backbone))
    assert dense == flops_per_token(matmul_weights(backbone, lm_head=True), cfg.n_layer, cfg.n_head, cfg.head_dim, T)
    p = 0.25
    last = backbone.blocks[-1]
    rest = parameters_of(last) - key_value_weights(last.attn) + parameters_of(backbone.norm)
    sparse = transformer_flops(backbone, T, outputs_share=p, head=lm_head_matmul_weights(backbone))
    head = lm_head_matmul_weights(backbone)
    assert sparse == pytest.approx(dense - 6 * (1 - p) * (rest + head) - (1 - p) * 12 * cfg.n_head * cfg.head_dim * T)
