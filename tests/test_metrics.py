"""The reported metrics (objectives/base.py, finalize; the objectives' metric sums): loss,
perplexity, accuracy and bits per byte, pinned to hand-computed numbers, and the bytes behind bits
per byte counted from the text the targets stand for."""
from __future__ import annotations

import math

import pytest
import torch

from minilm.config import ModelConfig, parse_overrides
from minilm.objectives import build_objective, finalize
from minilm.tokenizer import EOS_ID, PAD_ID

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

# multi-byte characters (2, 3 and 4 bytes in UTF-8), some of them surely byte-fallback pieces
TEXTS = ["The naïve café served crème brûlée.", "Arrows → and emoji 😀 cost more bytes 日本.",
         "def f(x):\n    return x * 2  # plain ASCII"]


def test_finalize_pins_each_formula():
    out = finalize({"nll": 12.0, "targets": 8, "correct": 3, "bytes": 20})
    assert out["loss"] == pytest.approx(12.0 / 8)
    assert out["ppl"] == pytest.approx(math.exp(1.5))                 # e^loss: the loss is in nats
    assert out["acc"] == pytest.approx(3 / 8)
    assert out["bpb"] == pytest.approx(12.0 / math.log(2) / 20)       # nats -> bits, over bytes, not tokens
    # combined objectives: each part from its own sums, "loss" the weighted sum of part losses
    parts = finalize({"mlm/nll": 6.0, "mlm/targets": 4, "mlm/correct": 1, "mlm/bytes": 10, "mlm/weighted_nll": 6.0,
                      "sop/nll": 2.0, "sop/targets": 5, "sop/correct": 4, "sop/weighted_nll": 0.5})
    assert parts["loss"] == pytest.approx(6.0 / 4 + 0.5 / 5)
    assert parts["mlm/loss"] == pytest.approx(1.5) and parts["mlm/ppl"] == pytest.approx(math.exp(1.5))
    assert parts["mlm/bpb"] == pytest.approx(6.0 / math.log(2) / 10)
    assert parts["sop/loss"] == pytest.approx(0.4) and parts["sop/acc"] == pytest.approx(0.8)
    assert "sop/bpb" not in parts                                       # no bytes, no bits per byte


def test_an_objectives_own_metrics_come_from_its_metrics_and_a_combinations_parts_are_prefixed():
    """finalize reports the shared metrics alone; with the objective, its metrics() (rtd's
    precision, recall and positive_share), under the part's name in a+b; sums only an objective
    reads are never reported raw."""
    cfg = ModelConfig(vocab_size=400, seq_len=8, n_layer=1, n_head=2, n_embd=16)
    detector = {"discriminator/nll": 3.0, "discriminator/targets": 10.0, "discriminator/true_positives": 2.0,
                "discriminator/predicted_positives": 4.0, "discriminator/positives": 5.0}
    shared = finalize(detector)
    assert set(shared) == {"discriminator/" + k for k in ("loss", "ppl", "baseline_loss", "baseline_gap")}
    own = finalize(detector, build_objective("rtd", cfg))
    assert own == {**shared, "discriminator/precision": 0.5, "discriminator/recall": 0.4,
                   "discriminator/positive_share": 0.5}
    combined = finalize({"mlm/nll": 6.0, "mlm/targets": 4.0, **{"rtd/" + k: v for k, v in detector.items()}},
                        build_objective("mlm+rtd", cfg))
    assert combined["rtd/discriminator/precision"] == 0.5 and combined["rtd/discriminator/recall"] == 0.4
    assert combined["mlm/loss"] == 1.5 and not any(k.endswith("positives") for k in combined)

def rows_of(tokenizer, prefix: list[int], T: int):
    """One row per text: `prefix`, then the text's tokens, then <pad> up to T + 1 tokens; the
    rows' lengths (prefix and text); and the texts' token lists."""
    encoded = [tokenizer.encode(text) for text in TEXTS]
    raw = torch.full((len(TEXTS), T + 1), PAD_ID)
    for row, ids in enumerate(encoded):
        raw[row, :len(prefix) + len(ids)] = torch.tensor(prefix + ids)
    return raw, torch.tensor([len(prefix) + len(ids) for ids in encoded]), encoded


@pytest.mark.parametrize("name", ["clm", "mlm"])
def test_bits_per_byte_count_the_bytes_of_the_text_the_targets_stand_for(name, tokenizer):
    """clm: rows "<eos> text" with lengths, so the targets are exactly the text's tokens; mlm with
    --mask_prob 1: every real token is a target. Either way the metric's bytes are the text's
    UTF-8 bytes, and bpb = nll / ln 2 / bytes."""
    T = 48
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=T, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(0)
    flags = ["--mask_prob", "1"] if name == "mlm" else []
    objective = build_objective(name, cfg, tokenizer, parse_overrides(flags).obj).eval()
    raw, lengths, encoded = rows_of(tokenizer, [EOS_ID] if name == "clm" else [], T)
    assert lengths.max() <= T
    batch = objective.make_batch(raw, torch.Generator().manual_seed(0), lengths=lengths)
    with torch.no_grad():
        _, sums = objective(batch)
    assert int(sums["targets"]) == sum(len(ids) for ids in encoded)
    n_bytes = sum(len(text.encode("utf-8")) for text in TEXTS)
    assert n_bytes > sum(len(text) for text in TEXTS) + 10               # multi-byte characters are in
    assert int(sums["bytes"]) == n_bytes
    metrics = finalize({k: float(v) for k, v in sums.items()})
    assert metrics["bpb"] == pytest.approx(float(sums["nll"]) / math.log(2) / n_bytes, rel=1e-9)
    assert metrics["ppl"] == pytest.approx(math.exp(float(sums["nll"]) / int(sums["targets"])), rel=1e-9)
