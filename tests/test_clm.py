"""Causal LM labels: shifted by one, masked by position (padding), never by token id, and the
optional drop of the target right after a document boundary."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from minilm.config import ModelConfig, ObjectiveConfig
from minilm.objectives.base import IGNORE
from minilm.objectives.clm import CausalLM, causal_labels
from minilm.tokenizer import EOS_ID, NUM_SPECIAL


def test_labels_are_the_next_token_everywhere():
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(NUM_SPECIAL, 500, (4, 33), generator=g)
    input_ids, labels = causal_labels(raw)
    assert torch.equal(input_ids, raw[:, :-1])
    assert torch.equal(labels, raw[:, 1:])


def test_padding_is_masked_by_position_and_eos_targets_are_kept_when_pad_equals_eos():
    # the transformers #23530 trap: rows padded *with the eos id*. Only the lengths may say
    # what is padding; the real <eos> tokens inside the rows must stay targets.
    g = torch.Generator().manual_seed(1)
    raw = torch.randint(NUM_SPECIAL, 500, (3, 17), generator=g)
    raw[:, 5] = EOS_ID                                  # a real document end inside every row
    lengths = torch.tensor([17, 12, 7])
    for row, n in enumerate(lengths.tolist()):
        raw[row, n:] = EOS_ID                           # pad == eos
    _, labels = causal_labels(raw, lengths)
    for row, n in enumerate(lengths.tolist()):
        # target t is real exactly when t + 1 < length
        assert (labels[row, : n - 1] != IGNORE).all()
        assert (labels[row, n - 1:] == IGNORE).all()
        assert torch.equal(labels[row, : n - 1], raw[row, 1:n])
    assert (labels[:, 4] == EOS_ID).all()               # the real <eos> is predicted in every row


def test_predict_after_eos_false_drops_only_the_targets_that_read_eos():
    g = torch.Generator().manual_seed(2)
    raw = torch.randint(NUM_SPECIAL, 500, (8, 65), generator=g)
    raw[torch.rand(raw.shape, generator=g) < 0.05] = EOS_ID
    _, kept = causal_labels(raw)
    input_ids, dropped = causal_labels(raw, predict_after_eos=False)
    reads_eos = input_ids == EOS_ID
    assert reads_eos.any()
    assert (dropped[reads_eos] == IGNORE).all()
    assert torch.equal(dropped[~reads_eos], kept[~reads_eos])
    assert (dropped == EOS_ID).sum() == (kept == EOS_ID).sum() - (reads_eos & (kept == EOS_ID)).sum()


def test_loss_is_the_mean_cross_entropy_over_real_targets():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, seq_len=16, n_layer=1, n_head=2, n_embd=32)
    objective = CausalLM(cfg, None, ObjectiveConfig(predict_after_eos=False))
    raw = torch.randint(NUM_SPECIAL, 300, (4, 17))
    raw[:, 8] = EOS_ID
    lengths = torch.tensor([17, 15, 10, 4])
    batch = objective.make_batch(raw, lengths=lengths)
    loss, sums = objective(batch)
    logits = objective.backbone.logits(objective.backbone(batch["input_ids"]))
    expected = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    # 16 + 14 + 9 + 3 real targets, minus the rows' targets after <eos> at position 8 (rows 0-2)
    assert int(sums["targets"]) == 16 + 14 + 9 + 3 - 3
