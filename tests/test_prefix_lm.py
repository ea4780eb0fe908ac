"""Prefix LM: the mask (bidirectional prefix, causal rest), the split law, which targets count,
exact accumulation, learning, and one run of train.py --objective prefix_lm."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from minilm.config import ModelConfig, ObjectiveConfig
from minilm.data import BlockSource
from minilm.model import Transformer
from minilm.objectives import IGNORE, build_objective
from minilm.objectives import prefix_lm
from minilm.model import prefix_mask
from minilm.objectives.prefix_lm import PrefixLM
from minilm.tokenizer import EOS_ID, NUM_SPECIAL
from minilm.trainer import Trainer
from tests.test_cli import TINY, run
from tests.test_trainer import make_config, recorded

pytestmark = pytest.mark.usefixtures("one_thread")


VOCAB = NUM_SPECIAL + 64   # 64 ordinary tokens after the reserved ids


def tiny_config(seq_len=12):
    return ModelConfig(vocab_size=VOCAB, seq_len=seq_len, n_layer=2, n_head=2, n_embd=32)


def test_mask_equals_a_hand_built_one():
    T = 4
    got = prefix_mask(torch.tensor([0, 1, 2, 4]), T)
    causal = [[1, 0, 0, 0],
              [1, 1, 0, 0],
              [1, 1, 1, 0],
              [1, 1, 1, 1]]
    prefix_2 = [[1, 1, 0, 0],      # query 0 also sees key 1: both are prefix tokens
                [1, 1, 0, 0],
                [1, 1, 1, 0],      # after the prefix: causal
                [1, 1, 1, 1]]
    everything = [[1] * 4] * 4
    expected = torch.tensor([causal, causal, prefix_2, everything], dtype=torch.bool)[:, None]
    assert got.dtype == torch.bool and got.shape == (4, 1, T, T)
    assert torch.equal(got, expected)


def outputs(model, ids, prefix_lengths):
    return model(ids, mask=prefix_mask(prefix_lengths, ids.shape[1]))


def test_after_the_prefix_output_at_t_ignores_every_later_token_exactly():
    torch.manual_seed(0)
    T = 12
    model = Transformer(tiny_config(T)).eval()
    ids = torch.randint(NUM_SPECIAL, VOCAB, (3, T))
    prefix_lengths = torch.tensor([1, 4, 7])
    base = outputs(model, ids, prefix_lengths)
    for row, P in enumerate(prefix_lengths.tolist()):
        for t in range(P - 1, T - 1):       # t >= P-1: every token after t is outside the prefix
            changed = ids.clone()
            changed[row, t + 1:] = torch.randint(NUM_SPECIAL, VOCAB, (T - t - 1,))
            after = outputs(model, changed, prefix_lengths)
            assert torch.equal(after[row, : t + 1], base[row, : t + 1]), (row, P, t)
            assert not torch.equal(after[row, t + 1:], base[row, t + 1:])   # the change did reach the model


def test_inside_the_prefix_output_sees_later_prefix_tokens_but_nothing_after_the_prefix():
    torch.manual_seed(1)
    T, P = 12, 6
    model = Transformer(tiny_config(T)).eval()
    ids = torch.randint(NUM_SPECIAL, VOCAB, (2, T))
    prefix_lengths = torch.tensor([P, P])
    base = outputs(model, ids, prefix_lengths)
    # the last prefix token changes what position 0 (and every prefix position) computes
    changed = ids.clone()
    changed[:, P - 1] = (ids[:, P - 1] + 1 - NUM_SPECIAL) % 64 + NUM_SPECIAL
    after = outputs(model, changed, prefix_lengths)
    for t in range(P - 1):
        assert not torch.allclose(after[:, t], base[:, t], atol=1e-4), t
    # tokens after the prefix change nothing inside it, exactly
    changed = ids.clone()
    changed[:, P:] = torch.randint(NUM_SPECIAL, VOCAB, (2, T - P))
    after = outputs(model, changed, prefix_lengths)
    assert torch.equal(after[:, :P], base[:, :P])


def test_split_points_follow_t5s_law_and_come_from_the_generator():
    """P uniform on {1, ..., L-1} for a row of L real raw tokens: chi-square over 40,000 rows, for
    full rows (L = T+1 = 9: P in 1..8) and padded ones (L = 5: P in 1..4)."""
    objective = PrefixLM(tiny_config(8))
    n = 40_000
    raw = torch.randint(NUM_SPECIAL, VOCAB, (n, 9))
    lengths = torch.where(torch.arange(n) % 2 == 0, 9, 5)
    batch = objective.make_batch(raw, torch.Generator().manual_seed(0), lengths=lengths)
    P = batch["prefix_lengths"]
    # chi-square critical values at p = 0.001: 24.32 (7 degrees of freedom), 16.27 (3)
    for L, critical in ((9, 24.32), (5, 16.27)):
        drawn = P[lengths == L]
        counts = torch.bincount(drawn, minlength=L + 1).double()
        assert counts[0] == 0 and counts[L:].sum() == 0, counts      # never 0, never >= L
        expected = len(drawn) / (L - 1)
        chi_square = float(((counts[1:L] - expected) ** 2 / expected).sum())
        assert chi_square < critical, (L, counts.tolist())
    # reproducible from the generator alone, and a different seed draws differently
    again = objective.make_batch(raw, torch.Generator().manual_seed(0), lengths=lengths)["prefix_lengths"]
    other = objective.make_batch(raw, torch.Generator().manual_seed(1), lengths=lengths)["prefix_lengths"]
    assert torch.equal(again, P)
    assert not torch.equal(other, P)


def test_only_targets_after_the_prefix_count(monkeypatch):
    """Hand-checked: raw row r holds 100*r + 0..6 (T = 6), prefixes 1, 3, 6 and, for a row padded
    to 5 real tokens, 3. Position t predicts raw[t+1]; it counts when t >= P-1."""
    monkeypatch.setattr(prefix_lm, "draw_prefix_lengths", lambda lengths, generator: torch.tensor([1, 3, 6, 3]))
    torch.manual_seed(0)
    # two layers: with one, a causal mask gives the same outputs at the target positions (each
    # already sees the whole prefix); with two, they read prefix states that saw the whole prefix
    objective = PrefixLM(ModelConfig(vocab_size=500, seq_len=6, n_layer=2, n_head=2, n_embd=32))
    raw = 100 * torch.arange(1, 5)[:, None] + torch.arange(7)[None, :]
    batch = objective.make_batch(raw, lengths=torch.tensor([7, 7, 7, 5]))
    x = IGNORE
    assert batch["labels"].tolist() == [
        [101, 102, 103, 104, 105, 106],     # P = 1: every target, as a causal LM
        [x, x, 203, 204, 205, 206],         # P = 3: position 2 reads raw[2], the last prefix token
        [x, x, x, x, x, 306],               # P = 6: one target, predicted from inside the prefix
        [x, x, 403, 404, x, x],             # P = 3 of 5 real tokens: targets raw[3], raw[4]
    ]
    assert int(batch["counts"]["targets"]) == 6 + 4 + 1 + 2
    loss, sums = objective(batch)
    # the reference: the LM head at every position, F.cross_entropy over the counted targets
    hidden = objective.backbone(batch["input_ids"], mask=prefix_mask(batch["prefix_lengths"], 6))
    expected = F.cross_entropy(objective.backbone.logits(hidden).flatten(0, 1), batch["labels"].flatten(),
                               ignore_index=IGNORE)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    assert int(sums["targets"]) == 13


def test_predict_after_eos_false_also_applies_after_the_prefix(monkeypatch):
    monkeypatch.setattr(prefix_lm, "draw_prefix_lengths", lambda lengths, generator: torch.tensor([2]))
    objective = PrefixLM(tiny_config(6), None, ObjectiveConfig(predict_after_eos=False))
    raw = torch.tensor([[10, 11, 12, EOS_ID, 14, 15, 16]])
    assert objective.make_batch(raw)["labels"].tolist() == [[IGNORE, 12, EOS_ID, IGNORE, 15, 16]]


def test_two_micro_batches_give_the_gradient_of_one_big_batch(tmp_path, prepared, tokenizer):
    """The trainer's step of 2 micro-batches (each its own split points, so unequal target
    counts) against the objective's forward on the two batches joined into one."""
    cfg = make_config(tmp_path, tokenizer.vocab_size, grad_accum=2, batch_size=4, objective="prefix_lm")
    source = BlockSource(prepared[0], "train", cfg.model.seq_len, 4, seed=1)
    torch.manual_seed(0)
    objective = build_objective("prefix_lm", cfg.model, tokenizer, cfg.obj)
    trainer = Trainer(cfg, objective, source, None, tokenizer, log=lambda *_: None)
    made = recorded(objective)
    step_loss = trainer.accumulate_gradients(0)
    accumulated = {n: p.grad.clone() for n, p in objective.named_parameters()}
    counts = [int(batch["counts"]["targets"]) for batch in made]
    assert len(made) == 2 and counts[0] != counts[1], counts
    objective.zero_grad(set_to_none=True)
    big = {key: torch.cat([batch[key] for batch in made]) for key in ("input_ids", "labels", "prefix_lengths")}
    big["counts"] = {"targets": torch.tensor(sum(counts))}
    loss, _ = objective(big)
    loss.backward()
    assert step_loss.item() == pytest.approx(loss.item(), rel=1e-5)
    for name, parameter in objective.named_parameters():
        torch.testing.assert_close(accumulated[name], parameter.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_a_tiny_model_learns():
    """16 fixed rows of uniformly random tokens, new split points every step: no context-free
    model beats ln(64) = 4.16 nats on them; a model that learns to use its context memorises
    them far below that."""
    torch.manual_seed(0)
    objective = PrefixLM(ModelConfig(vocab_size=VOCAB, seq_len=16, n_layer=2, n_head=2, n_embd=64))
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-2)
    raw = torch.randint(NUM_SPECIAL, VOCAB, (16, 17))
    losses = []
    for step in range(70):
        loss, _ = objective(objective.make_batch(raw, torch.Generator().manual_seed(step)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > math.log(VOCAB) - 0.3                   # about uniform guessing at first
    assert sum(losses[-10:]) / 10 < 1.5, losses[-10:]         # far below ln(64), the best without context


def test_train_py_runs_prefix_lm_end_to_end(tmp_path, corpus_dir):
    out = tmp_path / "run"
    result = run("train.py", "--data", corpus_dir, "--out_dir", out, "--objective", "prefix_lm",
                 "--max_steps", 3, "--eval_every", 3, *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    assert any("val_bpb" in r for r in records)
    checkpoint = torch.load(os.path.join(out, "ckpt-00000003.pt"), map_location="cpu", weights_only=False)
    assert checkpoint["config"]["train"]["objective"] == "prefix_lm"
