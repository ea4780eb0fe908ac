"""`--objective plm` (minilm/objectives/plm.py): XLNet's permutation LM. What each stream may see
(by autograd, exactly), that the query stream run at the targets alone equals the full two-stream
computation, the share and law of the targets, exact accumulation, FLOPs, learning, and a real
train.py run."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from minilm import model
from minilm.config import ModelConfig, ObjectiveConfig, parse_overrides
from minilm.errors import UserError
from minilm.objectives import build_objective
from minilm.objectives.plm import (CONTEXT_PER_TOKEN, MAX_SPAN, PermutationLM, draw_spans, span_targets,
                                   targets_per_row, two_stream_masks)
from minilm.tokenizer import NUM_SPECIAL
from tests.conftest import run_in_process
from tests.test_cli import TINY
from tests.test_trainer import accumulated_gradients, make_config

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

V = 256


def plm(seq_len=16, options=None, **changes) -> PermutationLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, seq_len=seq_len, n_layer=2, n_head=2, n_embd=32, **changes)
    return build_objective("plm", cfg, None, options or ObjectiveConfig())


def random_batch(objective, rows=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(NUM_SPECIAL, V, (rows, objective.seq_len + 1), generator=g)
    return objective.make_batch(raw, g)


def dependence(outputs, embeddings):
    """d outputs / d embeddings as a (rows of outputs) x (positions) table of gradient norms:
    outputs (N, C) computed from embeddings (B, T, C) of one row b (the caller picks it)."""
    table = []
    for row in outputs:
        (grad,) = torch.autograd.grad(row @ torch.randn(row.shape[-1]), embeddings, retain_graph=True)
        table.append(grad.norm(dim=-1))
    return torch.stack(table)                                            # (N, B, T)


def capture_token_embeddings(objective):
    """A hook that keeps the token embeddings (B, T, C) of the next forward as a tensor we can
    differentiate with respect to: 'the input embedding at j'."""
    seen = []

    def keep(module, args, out):
        out.retain_grad()
        seen.append(out)
    return seen, objective.backbone.tok_emb.register_forward_hook(keep)


# ----------------------------------------------------------------------------- what each stream sees
@pytest.mark.parametrize("position", ["rope", "learned"])
def test_query_stream_at_a_target_sees_exactly_the_tokens_before_it_in_the_order(position):
    objective = plm(position=position)
    batch = random_batch(objective)
    seen, hook = capture_token_embeddings(objective)
    logits = objective.query_logits(batch)                               # (B, M, V)
    hook.remove()
    embeddings = seen[0]
    ranks, target_positions = batch["ranks"], batch["target_positions"]
    B, M = target_positions.shape
    for b in range(B):
        table = dependence(logits[b], embeddings)[:, b]                  # (M, T)
        for m in range(M):
            i = target_positions[b, m]
            before = ranks[b] < ranks[b, i]                              # rank of slot m is m+1
            assert ranks[b, i] == m + 1
            assert (table[m][~before] == 0).all(), (m, table[m])         # itself and all after: exactly 0
            assert table[m, i] == 0
            assert (table[m][before] > 0).all(), (m, table[m])           # every token before it: some


def test_content_stream_sees_its_own_token_and_exactly_those_at_or_before_it_in_the_order():
    objective = plm()
    batch = random_batch(objective)
    ranks = batch["ranks"]
    content_mask, _ = two_stream_masks(ranks, objective.num_targets)
    seen, hook = capture_token_embeddings(objective)
    hidden = objective.backbone(batch["input_ids"], mask=content_mask)   # the content stream, every layer
    hook.remove()
    for b in range(ranks.shape[0]):
        table = dependence(hidden[b], seen[0])[:, b]                     # (T, T)
        allowed = ranks[b][None, :] <= ranks[b][:, None]
        assert (table.diagonal() > 0).all()                              # i depends on token i
        assert (table[allowed] > 0).all() and (table[~allowed] == 0).all()


def test_with_the_identity_order_the_streams_are_a_causal_lm():
    """Order 0, 1, ..., T-1 with position 0 the only context (M = T-1): the content stream is a
    causal LM's (i sees 0..i), and the query stream at i sees 0..i-1, a causal LM predicting
    token i from the tokens before it."""
    objective = plm()
    T = objective.seq_len
    ids = torch.randint(NUM_SPECIAL, V, (1, T), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "ranks": torch.arange(T)[None], "target_positions": torch.arange(1, T)[None]}
    content_mask, _ = two_stream_masks(batch["ranks"], T - 1)
    seen, hook = capture_token_embeddings(objective)
    hidden = objective.backbone(ids, mask=content_mask)[0]
    logits = objective.query_logits(batch)[0]                            # (T-1, V)
    hook.remove()
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    content = dependence(hidden, seen[0])[:, 0]
    assert torch.equal(content > 0, causal)
    query = dependence(logits, seen[1])[:, 0]                            # row m: target at position m+1
    assert torch.equal(query > 0, causal[:-1])                           # position m+1 sees 0..m


def full_two_stream_query(objective, batch):
    """The reference: the query stream at EVERY position (B, T, C), as Hugging Face's XLNet runs it,
    each position i seeing the content at rank[j] < rank[i] (a non-target: the other non-targets,
    so that no row is empty); returns the final-normed states at the targets, (B, M, C)."""
    backbone = objective.backbone
    ids, ranks, target_positions = batch["input_ids"], batch["ranks"], batch["target_positions"]
    B, T = ids.shape
    content_mask = (ranks[:, None, :] <= ranks[:, :, None])[:, None]
    query_mask = ((ranks[:, None, :] < ranks[:, :, None]) | (ranks[:, None, :] == 0))[:, None]
    h = backbone.embed(ids)
    g = objective.query_input(torch.arange(T).expand(B, T))
    for block in backbone.blocks:
        h, g = (block(h, mask=content_mask, rotary=backbone.rotary),
                block(g, h, mask=query_mask, rotary=backbone.rotary))
    picked = g.gather(1, target_positions[:, :, None].expand(-1, -1, g.shape[-1]))
    return backbone.norm(picked)


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_query_stream_at_the_targets_alone_equals_the_full_two_stream_computation(position):
    objective = plm(seq_len=32, position=position)
    batch = random_batch(objective, rows=3)
    ours = objective.query_hidden(batch["input_ids"], batch["ranks"], batch["target_positions"])
    reference = full_two_stream_query(objective, batch)
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()


# ----------------------------------------------------------------------------- which tokens are targets
@pytest.mark.parametrize("k, span", [(6, False), (7, False), (6, True), (8, True)])
def test_predicted_fraction_is_one_in_k_and_every_target_has_one_slot_in_the_order(k, span):
    objective = plm(seq_len=128, options=ObjectiveConfig(plm_partial_k=k, plm_span_targets=span))
    batch = random_batch(objective, rows=8)
    ranks, target_positions, ids = batch["ranks"], batch["target_positions"], batch["input_ids"]
    B, T = ids.shape
    assert abs(int(batch["counts"]["targets"]) / (B * T) - 1 / k) < 0.01
    M = target_positions.shape[1]
    assert ((ranks > 0).sum(1) == M).all()                               # the same M in every row
    assert torch.equal(ranks.gather(1, target_positions), torch.arange(1, M + 1).expand(B, M))
    assert torch.equal(batch["targets"], ids.gather(1, target_positions))
    # spans: a target's right neighbour is a target far more often than the M/T of a uniform choice
    neighbour_too = ((ranks[:, :-1] > 0) & (ranks[:, 1:] > 0)).sum() / (ranks[:, :-1] > 0).sum()
    assert (neighbour_too > 0.4) if span else (neighbour_too < 0.3), float(neighbour_too)


# T / K -> M: rounded, not floored (64 / 6 = 10.67 -> 11), ties half to even (15 / 6 = 2.5 -> 2,
# 21 / 6 = 3.5 -> 4), XLNet's 85 of 512, and kept in 1..T-1
TARGET_COUNTS = [(64, 6, 11), (512, 6, 85), (15, 6, 2), (21, 6, 4), (9, 6, 2), (20, 8, 2), (28, 8, 4),
                 (2, 6, 1), (5, 2, 2), (7, 2, 4), (3, 2, 2)]


@pytest.mark.parametrize("seq_len, k, m", TARGET_COUNTS, ids=[f"{t}/{k}" for t, k, _ in TARGET_COUNTS])
def test_target_count_per_row_is_exactly_t_over_k_rounded_half_to_even(seq_len, k, m):
    assert targets_per_row(seq_len, k) == m
    objective = plm(seq_len=seq_len, options=ObjectiveConfig(plm_partial_k=k))
    batch = random_batch(objective, rows=2)
    assert batch["target_positions"].shape == (2, m) and int(batch["counts"]["targets"]) == 2 * m


def test_a_one_token_context_is_refused_before_any_data_work(tmp_path):
    """round(1 / K) targets kept in 1..T-1 would be none: a loss of 0 over nothing, every step."""
    out = tmp_path / "run"
    result = run_in_process("train.py", "--objective", "plm", "--out_dir", out, *TINY, "--seq_len", 1)
    assert result.returncode == 2 and "plm" in result.stderr and "--seq_len 2 or more" in result.stderr
    assert not out.exists()


def test_the_order_among_the_targets_is_uniformly_random():
    objective = plm(seq_len=16)
    raw = torch.randint(NUM_SPECIAL, V, (4000, 17))
    batch = objective.make_batch(raw, torch.Generator().manual_seed(0))
    # which position is predicted first: uniform over the T positions
    first = torch.bincount(batch["target_positions"][:, 0], minlength=16).float() / 4000
    assert (first - 1 / 16).abs().max() < 0.015, first


def test_span_targets_follow_xlnet_law():
    """n in 1..5 with p ~ 1/n, each span inside its own stretch of 7n tokens after a left context
    uniform in 0..6n-1; the first three spans of a 512-token row are never cut nor dropped."""
    rows, T, M = 4000, 512, 85
    begin, length = draw_spans(rows, T, M, torch.Generator().manual_seed(0))
    first = length[:, :3]                                                 # (rows, 3): whole spans
    frequency = torch.bincount(first.flatten(), minlength=MAX_SPAN + 1)[1:].float() / first.numel()
    law = 1 / torch.arange(1, MAX_SPAN + 1)
    assert (frequency - law / law.sum()).abs().max() < 0.01, frequency
    stretch = (CONTEXT_PER_TOKEN + 1) * length
    stretch_start = stretch[:, :3].cumsum(1) - stretch[:, :3]
    left = begin[:, :3] - stretch_start
    assert (left >= 0).all() and (left < CONTEXT_PER_TOKEN * length[:, :3]).all()
    for n in (1, 3):
        lefts = left[first == n].float()
        assert abs(lefts.mean() - (6 * n - 1) / 2) < 0.1 * n, (n, lefts.mean())   # uniform on 0..6n-1
    # spans never overlap, stop at M targets, and end before the last token
    assert (length.sum(1) <= M).all()
    ends = begin + length
    assert (ends[length > 0] < T).all()
    chosen = span_targets(rows, T, M, torch.Generator().manual_seed(0))
    assert (chosen.sum(1) == M).all()
    # about 1/7 of the row is covered by spans before the uniform top-up
    assert abs(length.sum(1).float().mean() / T - 1 / 7) < 0.02


# ----------------------------------------------------------------------------- training
class RowSeeded(PermutationLM):
    """Each row drawn with its own generator, seeded by its number (the raw row's first column),
    so a row gets the same order whichever micro-batch it lands in."""

    def make_batch(self, raw, generator=None):
        rows = [super(RowSeeded, self).make_batch(r[None, 1:], torch.Generator().manual_seed(int(r[0]))) for r in raw]
        batch = {k: torch.cat([r[k] for r in rows]) for k in ("input_ids", "ranks", "target_positions", "targets")}
        return {**batch, "counts": {"targets": sum(r["counts"]["targets"] for r in rows)}}


def test_accumulation_of_two_micro_batches_equals_one_big_batch(tmp_path):
    g = torch.Generator().manual_seed(4)
    big = torch.cat([torch.arange(8)[:, None], torch.randint(NUM_SPECIAL, V, (8, 34), generator=g)], dim=1)

    def gradients(accum):
        cfg = make_config(tmp_path, V, objective="plm", grad_accum=accum, batch_size=8 // accum)
        return accumulated_gradients(cfg, lambda c: RowSeeded(c.model, None, c.obj), big, accum)

    loss1, g1 = gradients(1)
    loss2, g2 = gradients(2)
    assert torch.allclose(loss1, loss2, atol=1e-6)
    assert g1["query_start"].abs().sum() > 0
    for name in g1:
        assert torch.allclose(g1[name], g2[name], atol=1e-7, rtol=1e-4), name


def test_flops_per_token_counts_what_a_step_computes(monkeypatch):
    """Against FlopCounterMode on one forward + backward (attention as plain matmuls); the formula
    adds only the norms' 6N, which the counter ignores. Counting the query stream at every
    position, or the last content block, is off by far more."""
    monkeypatch.setattr(model, "attention", model.attention_math)
    torch.manual_seed(0)
    objective = build_objective("plm", ModelConfig(vocab_size=2048, seq_len=120, n_layer=3, n_head=4, n_embd=64))
    g = torch.Generator().manual_seed(0)
    batch = objective.make_batch(torch.randint(NUM_SPECIAL, 2048, (4, 121), generator=g), g)
    with FlopCounterMode(display=False) as counter:
        objective(batch)[0].backward()
    ratio = objective.flops_per_token() / (counter.get_total_flops() / (4 * 120))
    assert 1.0 <= ratio < 1.02, ratio


def test_a_tiny_model_learns():
    """Rows that follow a fixed random successor map on 16 token ids, each from a random start: no
    model that ignores the context beats ln(16) = 2.77 nats; reading the neighbours of a target
    (whichever of them come before it in the order) gets far below that."""
    alphabet = 16
    torch.manual_seed(0)
    objective = PermutationLM(ModelConfig(vocab_size=V, seq_len=16, n_layer=2, n_head=2, n_embd=64))
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    successor = torch.randperm(alphabet, generator=g)
    losses = []
    for step in range(70):
        token = torch.randint(0, alphabet, (16,), generator=g)
        row = [token]
        for _ in range(16):
            token = successor[token]
            row.append(token)
        raw = NUM_SPECIAL + torch.stack(row, dim=1)                       # (16, 17)
        loss, _ = objective(objective.make_batch(raw, torch.Generator().manual_seed(step)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > math.log(V) - 0.3                                  # about uniform guessing at first
    assert sum(losses[-10:]) / 10 < 0.55 * math.log(alphabet), losses[-10:]


def test_partial_k_below_two_is_refused():
    with pytest.raises(UserError, match="--plm_partial_k must be >= 2, got 1"):
        parse_overrides(["--objective", "plm", "--plm_partial_k", "1"])


def test_train_py_runs_plm_end_to_end(tmp_path, corpus_dir, peak_flops_once):
    out = tmp_path / "run"
    result = run_in_process("train.py", "--data", corpus_dir, "--out_dir", out, "--objective", "plm",
                            "--plm_span_targets", "--max_steps", 3, "--eval_every", 3, *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    assert any("val_bpb" in r for r in records)
    state = torch.load(out / "ckpt-00000003.pt", map_location="cpu", weights_only=False)
    assert state["config"]["obj"]["plm_span_targets"] is True
    assert "query_start" in state["model"]
