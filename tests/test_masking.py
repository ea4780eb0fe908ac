"""The masking primitives (minilm/masking.py) and the three masked-LM objectives' make_batch:
rates over about a million tokens, the 80/10/10 split, labels, what is never chosen, dynamic
masking; whole words never split and budgets never exceeded; SpanBERT's exact budget, span
length law (chi-square), one replacement per span, and no span across padding or documents.

All statistical tests use fixed seeds; tolerances are about 4 standard deviations."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from minilm import masking
from minilm.config import ModelConfig, ObjectiveConfig
from minilm.errors import UserError
from minilm.objectives import IGNORE, build_objective
from minilm.tokenizer import EOS_ID, MASK_ID, NUM_SPECIAL, PAD_ID

V = 8192


def tiny_model(seq_len=256, vocab_size=V):
    return ModelConfig(vocab_size=vocab_size, seq_len=seq_len, n_layer=1, n_head=2, n_embd=16)


def synthetic_windows(rows, seq_len, seed, eos_rate=0.02):
    """(rows, seq_len + 1) raw windows of non-special ids with <eos> document boundaries here and
    there, and per-row lengths (about a third of the rows padded with <pad> after their length)."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(NUM_SPECIAL, V, (rows, seq_len + 1), generator=g)
    raw[torch.rand(raw.shape, generator=g) < eos_rate] = EOS_ID
    lengths = torch.full((rows,), seq_len)
    padded = torch.rand(rows, generator=g) < 0.33
    lengths[padded] = torch.randint(seq_len // 4, seq_len, (int(padded.sum()),), generator=g)
    raw[torch.arange(seq_len + 1)[None, :] >= lengths[:, None]] = PAD_ID
    return raw, lengths


def shares(original, inputs, chosen):
    """Among chosen tokens: shares shown as <mask>, as another token, unchanged."""
    n = chosen.sum().item()
    masked = (chosen & (inputs == MASK_ID)).sum().item()
    changed = (chosen & (inputs != MASK_ID) & (inputs != original)).sum().item()
    return masked / n, changed / n, (n - masked - changed) / n


# ----------------------------------------------------------------------------- MLM: rates and 80/10/10
@pytest.mark.parametrize("mask_prob", [0.15, 0.4])
def test_mlm_rates_split_labels_and_what_is_never_chosen(mask_prob):
    T = 256
    raw, lengths = synthetic_windows(4800, T, seed=0)
    ids = raw[:, :T]
    objective = build_objective("mlm", tiny_model(T), options=ObjectiveConfig(mask_prob=mask_prob))
    batch = objective.make_batch(raw, torch.Generator().manual_seed(1), lengths=lengths)
    inputs, labels = batch["input_ids"], batch["labels"]
    chosen = labels != IGNORE
    real = torch.arange(T)[None, :] < lengths[:, None]
    eligible = real & (ids >= NUM_SPECIAL)
    assert 1_000_000 <= eligible.sum() <= 1_100_000                          # about a million eligible tokens
    # chosen share of eligible tokens: std 0.00036 at p=0.15, 0.00049 at p=0.4
    assert abs(chosen.sum().item() / eligible.sum().item() - mask_prob) < 0.0015
    # 80/10/10 among chosen (a random draw equal to the original counts as unchanged: 1/8077 of 10%)
    masked, random, kept = shares(ids, inputs, chosen)
    assert abs(masked - 0.8) < 0.004 and abs(random - 0.1) < 0.004 and abs(kept - 0.1) < 0.004
    # labels: the original id exactly where chosen, ignored elsewhere
    assert torch.equal(labels[chosen], ids[chosen])
    assert (labels[~chosen] == IGNORE).all()
    assert torch.equal(batch["targets"], ids.flatten()[batch["positions"]])
    assert torch.equal(batch["positions"], chosen.flatten().nonzero().squeeze(1))
    assert batch["counts"]["targets"] == chosen.sum()
    # special tokens (<eos> inside windows) and padding are never chosen and never changed
    assert not (chosen & ~eligible).any()
    assert torch.equal(inputs[~eligible], ids[~eligible])
    assert (ids[real & ~eligible] == EOS_ID).sum() > 10_000 and (~real).sum() > 100_000  # both were present
    # random replacements are never special tokens; unchosen tokens are untouched
    replaced = chosen & (inputs != MASK_ID) & (inputs != ids)
    assert replaced.sum() > 10_000 and (inputs[replaced] >= NUM_SPECIAL).all()
    assert torch.equal(inputs[~chosen], ids[~chosen])


def test_replacement_proportions_are_configurable():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(NUM_SPECIAL, V, (4000, 256), generator=g)
    chosen = torch.ones_like(ids, dtype=torch.bool)
    random_ids = torch.arange(NUM_SPECIAL, V)
    inputs, kind = masking.replace(ids, chosen, g, MASK_ID, random_ids, mask_replace_prob=0.5,
                                   random_replace_prob=0.3)
    n = chosen.sum().item()
    for value, want in ((masking.MASKED, 0.5), (masking.RANDOM, 0.3), (masking.KEPT, 0.2)):
        assert abs((kind == value).sum().item() / n - want) < 0.004
    # kind says what happened, exactly
    assert (inputs[kind == masking.MASKED] == MASK_ID).all()
    assert torch.equal(inputs[kind == masking.KEPT], ids[kind == masking.KEPT])
    assert (inputs[kind == masking.RANDOM] >= NUM_SPECIAL).all()


def test_masks_are_dynamic_and_reproducible():
    objective = build_objective("mlm", tiny_model(128))
    raw = torch.randint(NUM_SPECIAL, V, (32, 129), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(5)
    first, second = objective.make_batch(raw, g), objective.make_batch(raw, g)
    # the same windows drawn twice get different masks (RoBERTa's dynamic masking) ...
    assert not torch.equal(first["labels"] != IGNORE, second["labels"] != IGNORE)
    # ... and the same generator state gives the same mask (exact resume)
    again = objective.make_batch(raw, torch.Generator().manual_seed(5))
    assert torch.equal(again["input_ids"], first["input_ids"]) and torch.equal(again["labels"], first["labels"])


@pytest.mark.parametrize("bad,message", [(dict(mask_replace_prob=0.8, random_replace_prob=0.3),
                                          "--mask_replace_prob.*--random_replace_prob"),
                                         (dict(mask_prob=0.0), "--mask_prob"), (dict(mask_prob=1.5), "--mask_prob"),
                                         (dict(span_min_words=4, span_max_words=2), "--span_min_words"),
                                         (dict(span_geometric_p=0.0), "--span_geometric_p")])
def test_bad_masking_options_are_one_line_user_errors(bad, message):
    with pytest.raises(UserError, match=message) as err:
        build_objective("mlm", tiny_model(32), options=ObjectiveConfig(**bad))
    assert "\n" not in str(err.value) and "--" in str(err.value)


# ----------------------------------------------------------------------------- whole words
def sequential_greedy(lengths, budget):
    """The reference: try items in order, take one when it fits in what is left, else skip it."""
    accepted, left = [], budget
    for n in lengths:
        take = 0 < n <= left
        accepted.append(take)
        left -= n if take else 0
    return accepted


def test_vectorized_greedy_with_skip_equals_the_sequential_rule():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 7, (500, 40), generator=g)
    lengths[torch.rand(lengths.shape, generator=g) < 0.3] = 0          # empty slots
    budget = torch.randint(0, 45, (500,), generator=g)
    accepted = masking.greedy_with_skip(lengths, budget)
    for row in range(500):
        assert accepted[row].tolist() == sequential_greedy(lengths[row].tolist(), int(budget[row])), row
    # the case that needs the rounds: a row skips an item, then still takes a later, shorter one
    def skips_then_takes(row):
        items = [(n, a) for n, a in zip(lengths[row].tolist(), accepted[row].tolist()) if n > 0]
        first_skip = next((i for i, (_, a) in enumerate(items) if not a), len(items))
        return any(a for _, a in items[first_skip:])
    assert sum(skips_then_takes(r) for r in range(500)) > 50


def real_windows(prepared, rows, seq_len, seed):
    from minilm.data import BlockSource
    return BlockSource(prepared[0], "train", seq_len, rows, seed=seed).batch(0)


def test_whole_word_masking_never_splits_a_word_nor_exceeds_its_budget(prepared, tokenizer):
    T, p = 128, 0.15
    raw = real_windows(prepared, 2500, T, seed=1)
    ids = raw[:, :T]
    eligible = masking.eligible_positions(ids, tokenizer.special_table)
    starts = tokenizer.word_starts(ids)                 # sentencepiece "▁" flags, not "##"
    # a piece that continues a word: eligible, after an eligible piece, and not flagged as a start
    prev_eligible = torch.nn.functional.pad(eligible[:, :-1], (1, 0), value=False)
    continues = eligible & prev_eligible & ~starts
    assert continues.float().mean() > 0.2              # the text has many multi-piece words
    g = torch.Generator().manual_seed(2)
    total_chosen = total_eligible = 0
    for _ in range(4):                                   # 10,000 rows in all
        chosen = masking.whole_word_choice(starts, eligible, p, g)
        assert not (chosen & ~eligible).any()
        # every piece that continues a word has the state of the piece before it: words are whole
        before = torch.nn.functional.pad(chosen[:, :-1], (1, 0), value=False)
        assert torch.equal(chosen[continues], before[continues])
        budget = torch.round(eligible.sum(1).double() * p).long()
        count = chosen.sum(1)
        assert (count <= budget).all()
        total_chosen += count.sum().item()
        total_eligible += eligible.sum().item()
    # short words fill the gaps, so the rate is just under p (HF's test: within [p - 2/len, p])
    assert p - 2 / T <= total_chosen / total_eligible <= p
    # and multi-piece words were chosen whole (the test above is not vacuous)
    assert (chosen & continues).sum() > 1000


def short_documents(tokenizer, texts, rows, T):
    """(rows, T + 1) windows cut from a stream of short documents (the corpus' lines), each followed
    by <eos>: about one document boundary every 25 tokens. A document's first piece has no "▁"
    (no dummy prefix), so only the boundary says that it starts a word."""
    lines = [line.strip() for text in texts for line in text.split("\n") if line.strip()]
    stream = torch.tensor([t for ids in tokenizer.encode_batch(lines) for t in ids + [EOS_ID]][:rows * (T + 1)])
    assert len(stream) == rows * (T + 1)
    return stream.view(rows, T + 1)


def test_the_token_after_a_document_boundary_starts_a_word(tokenizer, texts):
    T = 128
    ids = short_documents(tokenizer, texts, 400, T)[:, :T]
    eligible = masking.eligible_positions(ids, tokenizer.special_table)
    after_eos = eligible & F.pad(ids[:, :-1] == EOS_ID, (1, 0), value=False)
    assert after_eos.sum() > 1000 and not tokenizer.word_starts(ids)[after_eos].all()   # no "▁" there
    assert masking.word_starts_within(tokenizer.word_starts(ids), eligible)[after_eos].all()


def test_whole_words_never_reach_across_a_document_boundary(tokenizer, texts):
    """Rows `x <eos> y` with a budget of one token (p = 0.5 of 2 eligible): x and y are two
    one-piece words, so every row gets exactly one of them. Were y glued to x across the <eos>,
    the one "word" x y would not fit, and nothing would be chosen."""
    pieces = [i for i in range(NUM_SPECIAL, tokenizer.vocab_size) if not tokenizer.special_table[i]]
    g = torch.Generator().manual_seed(0)
    raw = torch.tensor(pieces)[torch.randint(len(pieces), (2000, 4), generator=g)]
    raw[:, 1] = EOS_ID
    y_is_no_start = ~tokenizer.starts_word_table[raw[:, 2]]
    assert y_is_no_start.sum() > 500                       # the case that matters: y has no "▁"
    objective = build_objective("wwm", tiny_model(3, tokenizer.vocab_size), tokenizer, ObjectiveConfig(mask_prob=0.5))
    chosen = objective.make_batch(raw, torch.Generator().manual_seed(1))["labels"] != IGNORE
    assert torch.equal(chosen.sum(1), torch.ones(2000, dtype=torch.long)) and not chosen[:, 1].any()
    assert 0.4 < chosen[:, 2][y_is_no_start].float().mean() < 0.6       # x or y, by chance
    # in real text: whether a document's first word is chosen does not follow from whether the
    # word before the <eos> was (glued, they would always agree)
    T = 128
    raw = short_documents(tokenizer, texts, 700, T)
    batch = build_objective("wwm", tiny_model(T, tokenizer.vocab_size), tokenizer).make_batch(
        raw, torch.Generator().manual_seed(2))
    chosen, ids = batch["labels"] != IGNORE, raw[:, :T]
    boundary = (ids[:, 1:-1] == EOS_ID) & (ids[:, :-2] != EOS_ID) & (ids[:, 2:] != EOS_ID)
    before, after = chosen[:, :-2][boundary], chosen[:, 2:][boundary]
    assert before.sum() > 200
    assert after[before].float().mean() < 0.5 and after[~before].any()


def test_whole_word_objective_masks_pieces_of_a_word_together(tokenizer):
    text = "Unbelievably, the interpreter's documentation mentions subprocesses and coroutines. " * 6
    ids = torch.tensor([tokenizer.encode(text)[:129]] * 64)
    objective = build_objective("wwm", tiny_model(128, tokenizer.vocab_size), tokenizer)
    batch = objective.make_batch(ids, torch.Generator().manual_seed(0))
    chosen = batch["labels"] != IGNORE
    starts = tokenizer.word_starts(ids[:, :128])
    before = torch.nn.functional.pad(chosen[:, :-1], (1, 0), value=False)
    assert torch.equal(chosen[~starts], before[~starts])  # no special tokens here: words split at starts only
    assert (chosen & ~starts).any()                     # some chosen word had more than one piece


# ----------------------------------------------------------------------------- SpanBERT spans
def random_words(rows, T, seed):
    """(rows, T) ids of words of random piece lengths (a piece starts a word with probability
    0.45), some <eos> document boundaries, and a third of the rows padded after their length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(NUM_SPECIAL, V, (rows, T), generator=g)
    starts = torch.rand(rows, T, generator=g) < 0.45
    starts[:, 0] = True
    ids[torch.rand(rows, T, generator=g) < 0.005] = EOS_ID
    lengths = torch.full((rows,), T)
    padded = torch.rand(rows, generator=g) < 0.33
    lengths[padded] = torch.randint(T // 4, T, (int(padded.sum()),), generator=g)
    ids[torch.arange(T)[None, :] >= lengths[:, None]] = PAD_ID
    return ids, starts, lengths


# SpanBERT's span-length law: a clipped geometric over 1..10 words, p = 0.2, renormalized
SPAN_PMF = 0.2 * 0.8 ** torch.arange(10, dtype=torch.float64)
SPAN_PMF /= SPAN_PMF.sum()                                  # 0.2241, 0.1792, ..., 0.0301; mean 3.797
CHI2_CRITICAL = 27.88                                       # chi-square, df = 9, alpha = 0.001 (no scipy here)


def chi_square(word_lengths):
    """Pearson's chi-square statistic of a sample of span word-lengths (1..10) against SPAN_PMF."""
    assert word_lengths.min() >= 1 and word_lengths.max() <= 10
    observed = torch.bincount(word_lengths - 1, minlength=10).double()
    expected = SPAN_PMF * len(word_lengths)
    return ((observed - expected) ** 2 / expected).sum().item()


def test_span_masking_budget_lengths_and_boundaries():
    T, p, max_words = 512, 0.15, 10
    ids, starts, lengths = random_words(4000, T, seed=0)
    eligible = masking.eligible_positions(ids, torch.arange(V) < NUM_SPECIAL, lengths)
    trace = []
    chosen = masking.span_choice(starts, eligible, p, torch.Generator().manual_seed(0), trace=trace)
    # exactly ceil(p * n) tokens per row, n = eligible tokens (computed exactly with fractions)
    budget = torch.tensor([math.ceil(Fraction(str(p)) * int(n)) for n in eligible.sum(1)])
    assert torch.equal(chosen.sum(1), budget)
    assert not (chosen & ~eligible).any()               # never padding, never <eos>
    # the sampler alone: the drawn lengths (before runs, overlaps and the budget act) fit the law
    drawn = torch.stack([t["words"] for t in trace])[torch.stack([t["active"] for t in trace])]
    assert chi_square(drawn) < CHI2_CRITICAL

    # Rebuild the mask round by round from the trace's spans [start, end) with the rule "add the
    # span's tokens not chosen yet, left to right, up to the budget" and check that it ends as the
    # mask span_choice returned: then `take` below is what each round really added to the mask.
    positions = torch.arange(T)
    word_start = masking.word_starts_within(starts, eligible)
    n_starts = F.pad(torch.cumsum(word_start, dim=1), (1, 0))       # (B, T + 1): word starts before i
    n_inel = F.pad(torch.cumsum(~eligible, dim=1), (1, 0))
    run_end = torch.where(eligible, T, positions).flip(1).cummin(dim=1).values.flip(1)  # first ineligible >= i
    rebuilt, left = torch.zeros_like(chosen), budget.clone()
    realised, naive = [], []
    for t in trace:
        assert torch.equal(t["active"], left > 0)
        rows = t["active"].nonzero().squeeze(1)
        s, e, w, room = t["start"][rows], t["end"][rows], t["words"][rows], left[rows]
        ns, end_of_run, before = n_starts[rows], run_end[rows, s], rebuilt[rows]
        # a span starts at a word start, never crosses an ineligible token, ends at a word boundary
        # and covers its drawn number of words, or all the words left in its run if fewer
        assert word_start[rows, s].all()
        assert torch.equal(n_inel[rows, e], n_inel[rows, s])
        assert ((e == end_of_run) | word_start[rows, e.clamp(max=T - 1)]).all()
        first_word = ns.gather(1, s[:, None])
        words_left = ns.gather(1, end_of_run[:, None])[:, 0] - first_word[:, 0]
        assert torch.equal(ns.gather(1, e[:, None])[:, 0] - first_word[:, 0], torch.minimum(w, words_left))
        span = (positions >= s[:, None]) & (positions < e[:, None])
        new = span & ~before
        take = new & (torch.cumsum(new, dim=1) <= room[:, None])
        rebuilt[rows] = before | take
        left[rows] = room - take.sum(dim=1)

        # Which realised spans may enter the histogram? Keeping a span for its outcome ("it was
        # not cut by the budget", "it did not run into tokens chosen earlier") biases the law: the
        # longer the drawn span, the likelier it is cut or overlaps, so such a sample is short of
        # long spans (on this data: chi-square ~320, mean ~3.51; checked below). An unbiased
        # selection is settled before the length is drawn: by the start (the anchor is drawn
        # independently of the length) and the state before the round (mask, budget left). So
        # ask it of the longest possible span: the max_words whole words from the start lie in
        # the start's run, hold no token chosen earlier, and fit in what is left of the budget.
        # Then any drawn length is realised in full and uncut, and given the selection the
        # length still has the clipped geometric law, independently across selected spans.
        after_window = torch.searchsorted(ns, first_word + max_words + 1)[:, 0] - 1   # 11th word start
        window_end = torch.minimum(end_of_run, after_window)
        window = (positions >= s[:, None]) & (positions < window_end[:, None])
        selected = (words_left >= max_words) & ~(window & before).any(dim=1) & (window_end - s <= room)
        words = (take & word_start[rows]).sum(dim=1)                # realised word-length
        assert torch.equal(take[selected], span[selected]) and torch.equal(words[selected], w[selected])
        realised.append(words[selected])
        outcome = (words_left >= max_words) & ~(span & before).any(dim=1) & (take == span).all(dim=1)
        naive.append(words[outcome])
    assert torch.equal(rebuilt, chosen) and (left == 0).all()

    realised = torch.cat(realised)
    assert len(realised) > 10_000
    assert chi_square(realised) < CHI2_CRITICAL, chi_square(realised)
    sd = ((SPAN_PMF * (torch.arange(1, 11) - 3.797) ** 2).sum() / len(realised)).sqrt().item()
    assert abs(realised.double().mean().item() - 3.797) < 4 * sd    # 4 standard errors: ~0.08
    # the test has the power to see a biased selection: the outcome-based one fails it
    assert chi_square(torch.cat(naive)) > 3 * CHI2_CRITICAL


def test_one_replacement_per_span():
    T = 512
    ids, starts, lengths = random_words(5000, T, seed=5)
    eligible = masking.eligible_positions(ids, torch.arange(V) < NUM_SPECIAL, lengths)
    g = torch.Generator().manual_seed(1)
    chosen = masking.span_choice(starts, eligible, 0.15, g)
    spans = masking.span_ids(chosen)
    inputs, kind = masking.replace(ids, chosen, g, MASK_ID, torch.arange(NUM_SPECIAL, V), group_ids=spans)
    # spans are maximal runs of chosen tokens (SpanBERT merges overlapping or touching spans)
    prev = torch.nn.functional.pad(chosen[:, :-1], (1, 0), value=False)
    run_first = chosen & ~prev
    assert torch.equal(spans[run_first], run_first.flatten().nonzero().squeeze(1))
    same_as_left = chosen & prev
    assert torch.equal(spans[:, 1:][same_as_left[:, 1:]], spans[:, :-1][same_as_left[:, 1:]])
    # every token of a span got the span's replacement type
    flat_kind = kind.flatten()
    assert torch.equal(kind[chosen], flat_kind[spans[chosen]])
    assert (kind[~chosen] == 0).all()
    # and per span, the types are 80/10/10
    per_span = kind[run_first]
    n = len(per_span)
    assert n > 30_000
    for value, want in ((masking.MASKED, 0.8), (masking.RANDOM, 0.1), (masking.KEPT, 0.1)):
        assert abs((per_span == value).sum().item() / n - want) < 0.004
    # a random span is random token by token, and never a special token
    random = kind == masking.RANDOM
    assert (inputs[random] >= NUM_SPECIAL).all() and (inputs[random] != ids[random]).float().mean() > 0.99


def test_span_objective_on_text_chooses_exactly_the_budget(prepared, tokenizer):
    T = 128
    raw = real_windows(prepared, 200, T, seed=3)
    objective = build_objective("span", tiny_model(T, tokenizer.vocab_size), tokenizer)
    batch = objective.make_batch(raw, torch.Generator().manual_seed(0))
    chosen = batch["labels"] != IGNORE
    n = (~tokenizer.special_table[raw[:, :T]]).sum(1)
    assert torch.equal(chosen.sum(1), torch.tensor([math.ceil(Fraction("0.15") * int(x)) for x in n]))
    # spans start at word starts and a cut only shortens a span's end, so every run of chosen
    # tokens (one merged span) begins at a word start
    starts = masking.word_starts_within(tokenizer.word_starts(raw[:, :T]), ~tokenizer.special_table[raw[:, :T]])
    prev = torch.nn.functional.pad(chosen[:, :-1], (1, 0), value=False)
    assert (starts[chosen & ~prev]).all()
