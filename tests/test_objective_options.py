"""Every objective option, end to end: the documented defaults, and each flag going from the
command line (config.parse_overrides) through build_objective to make_batch, where it changes
the statistic it is meant to change. The algorithms themselves are pinned in test_masking.py,
test_clm.py, test_sop.py and test_multitask.py; here the question is only whether the flag gets
there. Tolerances are about 4 standard deviations."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from minilm import masking
from minilm.config import ModelConfig, ObjectiveConfig, TrainConfig, parse_overrides
from minilm.data import BlockSource, SegmentPairSource
from minilm.objectives import IGNORE, build_objective
from minilm.tokenizer import EOS_ID, MASK_ID, NUM_SPECIAL
from tests.test_sop import QUIET, numbered  # noqa: F401  (the module-scoped corpus fixture)

V = 8192

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def options(*flags) -> ObjectiveConfig:
    """The ObjectiveConfig a command line gives."""
    return parse_overrides([str(f) for f in flags]).obj


def model_cfg(seq_len: int, vocab_size: int = V) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, seq_len=seq_len, n_layer=1, n_head=2, n_embd=16)


def shares_among_chosen(ids, inputs, chosen):
    """(shown as <mask>, shown as another token, unchanged) shares of the chosen tokens."""
    n = chosen.sum().item()
    masked = (chosen & (inputs == MASK_ID)).sum().item()
    changed = (chosen & (inputs != MASK_ID) & (inputs != ids)).sum().item()
    return masked / n, changed / n, (n - masked - changed) / n


# ----------------------------------------------------------------------------- defaults
def test_defaults_are_the_documented_numbers():
    """README's tables: BERT's 15% and 80/10/10, SpanBERT's Geometric(0.2) over 1..10 words,
    causal LM predicting after <eos>, ALBERT's SOP, equal weights; AdamW's settings."""
    for obj in (ObjectiveConfig(), parse_overrides([]).obj):
        assert obj.mask_prob == 0.15
        assert obj.mask_replace_prob == 0.8 and obj.random_replace_prob == 0.1
        assert obj.span_geometric_p == 0.2 and obj.span_min_words == 1 and obj.span_max_words == 10
        assert obj.predict_after_eos is True and obj.sentence_task == "sop" and obj.objective_weights == ""
    train = TrainConfig()
    assert (train.beta1, train.beta2, train.weight_decay, train.grad_clip) == (0.9, 0.95, 0.1, 1.0)


# ----------------------------------------------------------------------------- mlm, wwm: rates and 80/10/10
FLAGS = ("--mask_prob", 0.3, "--mask_replace_prob", 0.5, "--random_replace_prob", 0.3)


def test_mlm_flags_set_the_rate_and_the_replacement_shares():
    T = 256
    raw = torch.randint(NUM_SPECIAL, V, (2000, T + 1), generator=torch.Generator().manual_seed(0))
    ids = raw[:, :T]
    results = {}
    for name, flags in (("default", ()), ("flags", FLAGS)):
        objective = build_objective("mlm", model_cfg(T), None, options(*flags))
        batch = objective.make_batch(raw, torch.Generator().manual_seed(1))
        chosen = batch["labels"] != IGNORE
        results[name] = (chosen.float().mean().item(), *shares_among_chosen(ids, batch["input_ids"], chosen))
    # 512,000 eligible tokens: the rate's sd is 0.0006; among ~150,000 chosen a share's is 0.0013
    for got, want, tolerance in zip(results["default"], (0.15, 0.8, 0.1, 0.1), (0.003, 0.008, 0.006, 0.006)):
        assert abs(got - want) < tolerance, results
    for got, want, tolerance in zip(results["flags"], (0.3, 0.5, 0.3, 0.2), (0.003, 0.006, 0.006, 0.006)):
        assert abs(got - want) < tolerance, results


def test_wwm_flags_set_the_rate_and_the_replacement_shares(prepared, tokenizer):
    T = 128
    raw = BlockSource(prepared[0], "train", T, 3000, seed=4).batch(0)
    ids = raw[:, :T]
    eligible = ~tokenizer.special_table[ids]
    for flags, (p, mask, random, kept) in (((), (0.15, 0.8, 0.1, 0.1)), (FLAGS, (0.3, 0.5, 0.3, 0.2))):
        objective = build_objective("wwm", model_cfg(T, tokenizer.vocab_size), tokenizer, options(*flags))
        batch = objective.make_batch(raw, torch.Generator().manual_seed(2))
        chosen = batch["labels"] != IGNORE
        # whole words against a per-row budget of about p * n: within a couple of tokens per row
        rate = chosen.sum().item() / eligible.sum().item()
        assert abs(rate - p) < 2 / T, (flags, rate)
        got = shares_among_chosen(ids, batch["input_ids"], chosen)      # per token: sd < 0.003
        assert all(abs(g - w) < 0.012 for g, w in zip(got, (mask, random, kept))), (flags, got)


# ----------------------------------------------------------------------------- span
def truncated_geometric_mean(p: float, low: int, high: int) -> float:
    weights = {k: p * (1 - p) ** (k - low) for k in range(low, high + 1)}
    return sum(k * w for k, w in weights.items()) / sum(weights.values())


def word_rows(rows: int, T: int, seed: int):
    """(rows, T + 1) ids where every id is a word (no tokenizer: each token starts a word)."""
    return torch.randint(NUM_SPECIAL, V, (rows, T + 1), generator=torch.Generator().manual_seed(seed))


def span_batch(monkeypatch, flags, raw, seed=0):
    """The span objective built from `flags` makes a batch; returns (batch, drawn span lengths).
    The lengths are recorded from inside masking.span_choice (its `trace`), as called by the
    objective with whatever arguments it passes."""
    traces = []
    real_span_choice = masking.span_choice

    def traced(*args, **kwargs):
        kwargs["trace"] = trace = []
        traces.append(trace)
        return real_span_choice(*args, **kwargs)

    monkeypatch.setattr(masking, "span_choice", traced)
    objective = build_objective("span", model_cfg(raw.shape[1] - 1), None, options(*flags))
    batch = objective.make_batch(raw, torch.Generator().manual_seed(seed))
    monkeypatch.undo()
    assert len(traces) == 1
    drawn = torch.cat([t["words"][t["active"]] for t in traces[0]])
    return batch, drawn, traces[0]


@pytest.mark.parametrize("flags,p,low,high", [((), 0.2, 1, 10),
                                              (("--span_geometric_p", 0.5), 0.5, 1, 10),
                                              (("--span_geometric_p", 0.05, "--span_min_words", 3,
                                                "--span_max_words", 5), 0.05, 3, 5)],
                         ids=["default", "p=0.5", "p=0.05-3..5"])
def test_span_length_flags_reach_the_span_law(monkeypatch, flags, p, low, high):
    raw = word_rows(1000, 256, seed=0)
    _, drawn, trace = span_batch(monkeypatch, flags, raw)
    assert len(drawn) > 5000
    assert drawn.min() >= low and drawn.max() <= high
    assert set(drawn.unique().tolist()) == set(range(low, high + 1))          # every length occurs
    mean = truncated_geometric_mean(p, low, high)                              # 3.797, 1.990, 3.983
    pmf = torch.tensor([p * (1 - p) ** (k - low) for k in range(low, high + 1)], dtype=torch.float64)
    sd = math.sqrt(((torch.arange(low, high + 1) - mean) ** 2 * pmf / pmf.sum()).sum().item() / len(drawn))
    assert abs(drawn.double().mean().item() - mean) < 4 * sd, (drawn.double().mean().item(), mean)
    # and what was masked follows the drawn spans: no span covers more than `high` words (every
    # token is a word here, so a span [start, end) has end - start words)
    for t in trace:
        length = (t["end"] - t["start"])[t["active"]]
        assert (length <= high).all() and (length <= t["words"][t["active"]]).all()


def test_span_mask_prob_and_replacement_flags(monkeypatch):
    T = 128
    raw = word_rows(1500, T, seed=1)
    batch, _, _ = span_batch(monkeypatch, FLAGS, raw)
    chosen = batch["labels"] != IGNORE
    # exactly ceil(0.3 * n) tokens per row (every one of the T tokens is eligible here)
    assert (chosen.sum(1) == math.ceil(Fraction("0.3") * T)).all()
    # one replacement per merged span, in the flags' proportions
    first = chosen & ~F.pad(chosen[:, :-1], (1, 0), value=False)
    ids, inputs = raw[:, :T], batch["input_ids"]
    masked, random, kept = shares_among_chosen(ids, inputs, first)
    n = first.sum().item()
    assert n > 10_000
    assert abs(masked - 0.5) < 0.02 and abs(random - 0.3) < 0.02 and abs(kept - 0.2) < 0.02, (masked, random, kept)
    # a span is all <mask> or none: the share of <mask> among all chosen tokens is not per token
    owner = masking.span_ids(chosen)
    shown_mask = inputs == MASK_ID
    assert torch.equal(shown_mask[chosen], shown_mask.flatten()[owner[chosen]])


# ----------------------------------------------------------------------------- clm
def test_predict_after_eos_flag():
    T = 64
    raw = torch.randint(NUM_SPECIAL, 500, (16, T + 1), generator=torch.Generator().manual_seed(0))
    raw[:, 10::13] = EOS_ID                                  # document ends at 10, 23, 36, 49, 62
    reads_eos = raw[:, :T] == EOS_ID
    for flags, dropped in (((), 0), (("--predict_after_eos", "false"), int(reads_eos.sum()))):
        objective = build_objective("clm", model_cfg(T, 500), None, options(*flags))
        batch = objective.make_batch(raw)
        labels = batch["labels"]
        assert int(batch["counts"]["targets"]) == 16 * T - dropped
        assert (labels[reads_eos] == IGNORE).all() == bool(dropped)
        assert torch.equal(labels[~reads_eos], raw[:, 1:][~reads_eos])  # every other target is the next token
        assert (labels == EOS_ID).sum() == (raw[:, 1:] == EOS_ID).sum()  # <eos> stays a target either way


# ----------------------------------------------------------------------------- sop / nsp
@pytest.mark.parametrize("task", ["sop", "nsp"])
def test_sentence_task_flag(numbered, task):
    _, tokenizer, folder = numbered
    T = 64
    raw = SegmentPairSource(folder, "train", T, 200, seed=3, **QUIET).batch(0)
    objective = build_objective("sop", model_cfg(T, tokenizer.vocab_size), tokenizer,
                                options("--sentence_task", task))
    batch = objective.make_batch(raw, torch.Generator().manual_seed(0))
    flipped = torch.nonzero(batch["labels"] == 1).squeeze(1).tolist()
    assert 60 < len(flipped) < 140
    for row in flipped:
        a, b = int(raw["a_lengths"][row]), int(raw["b_lengths"][row])
        A, B = raw["input_ids"][row, 1:1 + a], raw["input_ids"][row, 2 + a:2 + a + b]
        shown = batch["input_ids"][row]
        if task == "sop":   # the same two segments, B first
            assert torch.equal(shown[1:1 + b], B) and torch.equal(shown[2 + b:2 + b + a], A)
        else:               # A stays first; B comes from a row of another document
            assert torch.equal(shown[1:1 + a], A)
            assert not torch.equal(shown[2 + a:2 + a + b], B)


# ----------------------------------------------------------------------------- multitask weights
def test_objective_weights_flag(numbered):
    _, tokenizer, folder = numbered
    cfg = parse_overrides(["--objective", "mlm+sop", "--objective_weights", "0.25,2"])
    torch.manual_seed(0)
    objective = build_objective(cfg.train.objective, model_cfg(48, tokenizer.vocab_size), tokenizer, cfg.obj)
    raw = SegmentPairSource(folder, "train", 48, 16, seed=0, **QUIET).batch(0)
    batch = objective.make_batch(raw, torch.Generator().manual_seed(0))
    loss, _ = objective(batch)
    mlm_loss, _ = objective.parts["mlm"](batch["mlm"])
    sop_loss, _ = objective.parts["sop"](batch["sop"])
    torch.testing.assert_close(loss, 0.25 * mlm_loss + 2 * sop_loss)
    assert abs(loss.item() - (mlm_loss + sop_loss).item()) > 0.1           # the weights did change it
