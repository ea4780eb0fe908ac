"""Whole-word masking's budget is BERT's max(1, round(p * n)) for a row with n > 0 eligible
tokens: with round(p * n) alone, a row of 3 eligible tokens or fewer (a short padded row, a
short sentence pair) predicted nothing at p = 0.15. Span masking keeps its ceil(p * n)."""
from __future__ import annotations

import pytest
import torch

from minilm import masking
from minilm.config import ModelConfig
from minilm.objectives import build_objective
from minilm.tokenizer import NUM_SPECIAL

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def rows_with_eligible(counts: list[int], T: int, repeats: int):
    """(starts, eligible): each row has counts[i] eligible tokens at random places, every token
    its own word, so the greedy fill reaches the budget exactly."""
    g = torch.Generator().manual_seed(0)
    n = torch.tensor(counts).repeat(repeats)
    rank = torch.rand(len(n), T, generator=g).argsort(dim=1).argsort(dim=1)      # a random permutation
    eligible = rank < n[:, None]
    return torch.ones_like(eligible), eligible, n


def test_short_rows_predict_one_token_and_empty_rows_none():
    starts, eligible, n = rows_with_eligible([0, 1, 2, 3, 0, 3], T=24, repeats=200)
    chosen = masking.whole_word_choice(starts, eligible, 0.15, torch.Generator().manual_seed(1))
    assert not (chosen & ~eligible).any()
    assert torch.equal(chosen.sum(1), (n > 0).long())


def test_longer_rows_keep_round_p_n():
    counts = [7, 10, 20, 40, 100, 117]                       # round(0.15 n): 1, 2, 3, 6, 15, 18
    starts, eligible, _ = rows_with_eligible(counts, T=128, repeats=100)
    chosen = masking.whole_word_choice(starts, eligible, 0.15, torch.Generator().manual_seed(2))
    assert torch.equal(chosen.sum(1), torch.tensor([1, 2, 3, 6, 15, 18]).repeat(100))


def test_long_rows_of_multi_piece_words_stay_just_under_round_p_n():
    """Words of 1 to 4 pieces: a word that would overshoot is skipped, so a row gets at most the
    budget, and over many rows just under it (short words fill the gaps)."""
    g = torch.Generator().manual_seed(3)
    B, T = 2000, 200
    starts = torch.rand(B, T, generator=g) < 0.5
    eligible = torch.ones(B, T, dtype=torch.bool)
    chosen = masking.whole_word_choice(starts, eligible, 0.15, g)
    count = chosen.sum(1)
    assert (count <= 30).all() and count.float().mean() > 29.5    # round(0.15 * 200) = 30


def test_the_wwm_objective_predicts_a_token_in_every_short_padded_row():
    objective = build_objective("wwm", ModelConfig(vocab_size=200, seq_len=16, n_layer=1, n_head=2, n_embd=16))
    g = torch.Generator().manual_seed(4)
    raw = torch.randint(NUM_SPECIAL, 200, (300, 17), generator=g)
    lengths = torch.tensor([1, 2, 3]).repeat(100)
    batch = objective.make_batch(raw, g, lengths=lengths)
    assert torch.equal((batch["labels"] != -100).sum(1), torch.ones(300, dtype=torch.long))
    assert int(batch["counts"]["targets"]) == 300
