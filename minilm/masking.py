"""Masking primitives for the masked-LM family (MLM, whole-word masking, span masking).

Every function works on a whole batch at once with tensor ops, on the device the data is on,
and takes its randomness from an explicit torch.Generator: the same generator state gives the
same masks, so a run is reproducible and a resumed run sees the masks it would have seen.
There is no Python loop over tokens. Whole-word and span masking loop over a handful of
rounds (greedy rounds, or one span per row per round), each vectorized across the batch.

Shapes: B rows, T positions. ids (B, T) long; every mask is a (B, T) bool tensor.

    eligible_positions   tokens that may be chosen: not special (<eos>, <pad>, ...), not padding
    choose_bernoulli     BERT/RoBERTa: every eligible token independently with probability p
    whole_word_choice    whole words, at most max(1, round(p * n)) tokens (greedy, skipping misfits)
    span_choice          SpanBERT: spans of geometric word length, exactly ceil(p * n) tokens
    span_ids             the (merged) span each chosen token belongs to
    replace              the 80/10/10 rule: <mask> / random token / unchanged, per token or per span

Here n is the number of eligible tokens of a row. Choosing is separate from replacing: the
objective decides *which* positions to predict, `replace` decides what the encoder sees there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# what `replace` did at each position (its `kind` output); 0 = not chosen
MASKED, RANDOM, KEPT = 1, 2, 3


def _rand(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device)


def _times(counts: torch.Tensor, p: float) -> torch.Tensor:
    """counts * p in float64, as Python computes it (so round() ties match HF's), except on
    MPS, which has no float64."""
    return counts.to(torch.float32 if counts.device.type == "mps" else torch.float64) * p


# ----------------------------------------------------------------------------- what may be chosen
def eligible_positions(ids: torch.Tensor, special_table: torch.Tensor,
                       lengths: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) bool: True where a token may be chosen for prediction.

    special_table (V,) bool marks special ids (<pad>, <eos>, <mask>, sentinels, ...); they are
    never chosen, so a document boundary <eos> inside a window stays visible and unpredicted.
    lengths (B,), when rows are padded, also excludes positions >= length (by position, not by
    id: the padding id could be a real token elsewhere).
    """
    eligible = ~special_table[ids]
    if lengths is not None:
        positions = torch.arange(ids.shape[1], device=ids.device)
        eligible &= positions[None, :] < lengths[:, None]
    return eligible


def choose_bernoulli(eligible: torch.Tensor, mask_prob: float, generator: torch.Generator | None) -> torch.Tensor:
    """BERT/RoBERTa: each eligible token is chosen independently with probability mask_prob.

    The count per row is binomial, not fixed (as in HF's DataCollatorForLanguageModeling); over
    many tokens the chosen share of eligible tokens is mask_prob.
    """
    return eligible & (_rand(eligible.shape, generator, eligible.device) < mask_prob)


# ----------------------------------------------------------------------------- words
def word_starts_within(word_starts: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Word starts among eligible tokens only. A word is a run of eligible tokens: it begins where
    the tokenizer says a word begins (a piece starting with "▁", see tokenizer.py) and also right
    after an ineligible token. Without that, the first piece of a document (which has no "▁":
    no dummy prefix) would be glued to the <eos> before it."""
    prev_eligible = F.pad(eligible[:, :-1], (1, 0), value=False)
    return eligible & (word_starts | ~prev_eligible)


def start_of_word(starts: torch.Tensor) -> torch.Tensor:
    """(B, T) long: for each token, the position of the start of its word (a running maximum of
    start positions). Tokens before a row's first start get 0; callers mask them out."""
    positions = torch.arange(starts.shape[1], device=starts.device).expand_as(starts)
    return torch.where(starts, positions, 0).cummax(dim=1).values


def word_lengths(starts: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """(B, T) long: at each word start, the number of tokens in its word; 0 elsewhere."""
    owner = start_of_word(starts)
    return torch.zeros_like(owner).scatter_add_(1, owner, eligible.long())


# ----------------------------------------------------------------------------- whole-word masking
def greedy_with_skip(lengths: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Which items a sequential greedy fill accepts, computed in a few vectorized rounds.

    The sequential rule (HF's DataCollatorForWholeWordMask, BERT's create_pretraining_data):
    go through the items in order; take an item when its length fits in what is left of the
    budget, otherwise skip it and go on.

    lengths (B, N) long, in the order to try them (0 = no item in that slot); budget (B,) long.
    Returns accepted (B, N) bool.

    Rounds, with `left` the budget not yet used and `active` the items not yet decided:
      1. reject every active item longer than `left`: `left` only shrinks, so the sequential
         fill would skip it too when its turn comes;
      2. now every active item fits on its own. The sequential fill takes them one after the
         other while the running total fits: accept the longest prefix of the active items
         whose cumulative length is <= left. The next active item is then too long for what is
         left, so the sequential fill skips it; step 1 of the next round rejects it.
    Each round accepts at least one item per row that has any active item left, and in practice
    a few rounds decide everything.
    """
    accepted = torch.zeros_like(lengths, dtype=torch.bool)
    active = lengths > 0
    left = budget.clone()
    while True:
        active &= lengths <= left[:, None]
        if not bool(active.any()):
            return accepted
        running = torch.cumsum(lengths * active, dim=1)
        fits = active & (running <= left[:, None])
        accepted |= fits
        active &= ~fits
        left -= (lengths * fits).sum(dim=1)


def whole_word_choice(word_starts: torch.Tensor, eligible: torch.Tensor, mask_prob: float,
                      generator: torch.Generator | None) -> torch.Tensor:
    """Whole-word masking: choose words, never parts of words.

    Words come from the tokenizer's word-start flags (sentencepiece's "▁"), never BERT's "##".
    Budget: max(1, round(mask_prob * n)) tokens per row with n > 0 eligible tokens, 0 without
    (BERT's create_pretraining_data and HF's collator; HF counts [CLS]/[SEP] in n too, our windows
    have none). Without the floor a row of 3 eligible tokens or fewer (sentence pairs, padded
    rows) would predict nothing at p = 0.15. Words are tried in a random order; a word that would overshoot
    what is left of the budget is skipped, not cut (greedy_with_skip). Every piece of a chosen
    word is chosen.
    """
    B, T = eligible.shape
    starts = word_starts_within(word_starts, eligible)
    lengths = word_lengths(starts, eligible)                        # (B, T), nonzero at word starts
    n = eligible.sum(dim=1)
    budget = torch.where(n > 0, torch.round(_times(n, mask_prob)).long().clamp(min=1), 0)
    # a uniformly random order of each row's words: sort by a random key, non-starts last
    key = _rand((B, T), generator, eligible.device).masked_fill(~starts, 2.0)
    order = key.argsort(dim=1)                                      # (B, T) positions, in try order
    accepted_in_order = greedy_with_skip(lengths.gather(1, order), budget)
    accepted_start = torch.zeros_like(starts).scatter_(1, order, accepted_in_order)
    return accepted_start.gather(1, start_of_word(starts)) & eligible


# ----------------------------------------------------------------------------- span masking
def span_length_probs(geometric_p: float, min_words: int, max_words: int) -> torch.Tensor:
    """SpanBERT's span-length law over min_words..max_words: P(k) ∝ p (1-p)^(k - min_words),
    renormalized. For p=0.2 over 1..10: 0.2241, 0.1792, ..., 0.0301; mean 3.797 words."""
    k = torch.arange(min_words, max_words + 1, dtype=torch.float64)
    pmf = geometric_p * (1 - geometric_p) ** (k - min_words)
    return pmf / pmf.sum()


def span_choice(word_starts: torch.Tensor, eligible: torch.Tensor, mask_prob: float,
                generator: torch.Generator | None, geometric_p: float = 0.2, min_words: int = 1,
                max_words: int = 10, trace: list | None = None) -> torch.Tensor:
    """SpanBERT span masking (PairWithSpanMaskingScheme): exactly ceil(mask_prob * n) tokens.

    Each round adds one span to every row still under its budget:
      1. draw the span length in words from span_length_probs (Geometric(p) clipped);
      2. draw the anchor: a uniformly random eligible token not chosen yet (SpanBERT re-draws
         an anchor that is already masked; drawing among the unmasked ones is the same law);
      3. the span starts at the start of the anchor's word and covers that many whole words;
      4. its not-yet-chosen tokens are added left to right until the budget is met, so the
         last span may be cut, mid-word if need be, and the total is exactly the budget.
    Spans that overlap (or touch) simply merge in the chosen mask; span_ids recovers them.

    Where we differ from SpanBERT: a span stops at an ineligible token (a document-boundary
    <eos>, padding), so spans never cross documents or padding; SpanBERT's inputs were single
    segments with nothing to cross. The budget counts eligible tokens.

    trace: pass a list to receive, per round, a dict of (B,) tensors: active (row still under
    budget), words (drawn length), start and end (the span's positions [start, end) before the
    budget cut). For tests and for the curious.
    """
    B, T = eligible.shape
    device = eligible.device
    starts = word_starts_within(word_starts, eligible)
    word = torch.cumsum(starts, dim=1)                              # word number of each token in its row
    prev_eligible = F.pad(eligible[:, :-1], (1, 0), value=False)
    stretch = torch.cumsum(eligible & ~prev_eligible, dim=1)        # which run of eligible tokens
    owner = start_of_word(starts)
    positions = torch.arange(T, device=device)
    # ceil with a hair of slack: a p * n that lands a rounding error above an integer is that integer
    budget = torch.ceil(_times(eligible.sum(dim=1), mask_prob) - 1e-6).long()
    cdf = span_length_probs(geometric_p, min_words, max_words).cumsum(0).float().to(device)
    chosen = torch.zeros_like(eligible)
    left = budget                                                   # (B,) tokens still to choose
    while True:
        active = left > 0
        if not bool(active.any()):
            return chosen
        # 1. span length in words, by inverting the CDF
        u = _rand((B, 1), generator, device)
        n_words = min_words + torch.searchsorted(cdf, u, right=True).clamp(max=len(cdf) - 1)  # (B, 1)
        # 2. anchor: the argmax of uniform keys over the candidates is a uniform candidate
        key = _rand((B, T), generator, device).masked_fill(~(eligible & ~chosen), -1.0)
        anchor = key.argmax(dim=1, keepdim=True)                     # (B, 1)
        # 3. whole words from the anchor's word on, within the anchor's run of eligible tokens
        first = word.gather(1, anchor)
        in_span = (eligible & (stretch == stretch.gather(1, anchor)) & (word >= first)
                   & (word < first + n_words) & active[:, None])
        # 4. new tokens left to right, up to the budget
        new = in_span & ~chosen
        take = new & (torch.cumsum(new, dim=1) <= left[:, None])
        chosen |= take
        left = left - take.sum(dim=1)
        if trace is not None:
            trace.append(dict(active=active, words=n_words[:, 0], start=owner.gather(1, anchor)[:, 0],
                              end=torch.where(in_span, positions + 1, 0).amax(dim=1)))


def span_ids(chosen: torch.Tensor) -> torch.Tensor:
    """(B, T) long: for each chosen token, the flat index (row * T + position) of the first token
    of its maximal run of chosen tokens; -1 where not chosen.

    A run is one merged span: SpanBERT's merge_intervals joins spans that overlap or touch
    (end + 1 >= next start), so merged spans are exactly the maximal runs of chosen tokens.
    """
    B, T = chosen.shape
    first = chosen & ~F.pad(chosen[:, :-1], (1, 0), value=False)
    flat = torch.arange(B * T, device=chosen.device).view(B, T)
    owner = torch.where(first, flat, -1).cummax(dim=1).values
    return torch.where(chosen, owner, -1)


# ----------------------------------------------------------------------------- replacement
def replace(ids: torch.Tensor, chosen: torch.Tensor, generator: torch.Generator | None, mask_id: int,
            random_ids: torch.Tensor, mask_replace_prob: float = 0.8, random_replace_prob: float = 0.1,
            group_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's 80/10/10 rule: what the encoder sees at each chosen position.

    With probability mask_replace_prob the token becomes <mask>, with random_replace_prob a
    random token, otherwise it stays as it is (the loss still predicts it). One uniform draw u
    per token decides: u < mask_replace_prob -> <mask>; below mask_replace_prob +
    random_replace_prob -> random; else unchanged. (HF draws bernoulli(0.8), then bernoulli(0.5)
    among the rest: the same 80/10/10, but the conditional 0.5 has confused many readers.)

    random_ids (K,): the ids a random replacement is drawn from, uniformly; we pass every
    non-special id. HF draws over the whole vocabulary, special tokens included, which puts
    <pad>, <eos>, <mask> and sentinels into the input where the model must then treat them as
    ordinary words; SpanBERT draws from the corpus' token distribution. We keep specials out.

    group_ids (B, T), optional: tokens with the same group id share one draw, so a span is
    all <mask>, all random or all unchanged (SpanBERT's --replacement-method span). Any ids in
    [0, B*T) work; span_ids gives them. Random tokens are still drawn per token.

    Returns (input_ids, kind): kind (B, T) int8 is 0 where not chosen, else MASKED, RANDOM or KEPT.
    """
    B, T = ids.shape
    u = _rand(B * T, generator, ids.device)
    if group_ids is not None:
        u = u[group_ids.clamp(min=0).flatten()]                      # every token reads its group's draw
    u = u.view(B, T)
    to_mask = chosen & (u < mask_replace_prob)
    to_random = chosen & ~to_mask & (u < mask_replace_prob + random_replace_prob)
    pick = torch.randint(len(random_ids), (B, T), generator=generator, device=ids.device)
    input_ids = torch.where(to_mask, mask_id, torch.where(to_random, random_ids[pick], ids))
    kind = torch.where(to_mask, MASKED, torch.where(to_random, RANDOM, torch.where(chosen, KEPT, 0)))
    return input_ids, kind.to(torch.int8)
