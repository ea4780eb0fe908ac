"""Masking primitives for the masked-LM family (MLM, whole-word masking, span masking) and the
noise spans of span corruption (T5, and UL2's denoisers built on it).

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
    noise_span_corruption  T5: noise spans -> a sentinel each in the input; target = sentinel + span, ...

Here n is the number of eligible tokens of a row. Choosing is separate from replacing: the
objective decides *which* positions to predict, `replace` decides what the encoder sees there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from minilm.errors import UserError
from minilm.tokenizer import EOS_ID, SENTINEL_IDS

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


# ============================================================================= T5 span corruption
# (objectives/t5.py; objectives/ul2.py's R and X denoisers are the same with other densities and spans)
# T5 (Raffel et al. 2020), google-research/text-to-text-transfer-transformer preprocessors.py:
# random_spans_noise_mask, _random_segmentation, noise_span_to_unique_sentinel,
# nonnoise_span_to_unique_sentinel, random_spans_helper; the same as HF's run_t5_mlm_flax.py.
# Example, sentinels written <0>, <1>:
#     raw      a b c d e f g h i j
#     noise    . . x x . . . . x x    (starts with non-noise, ends with noise: noise_span_mask)
#     input    a b <0> e f g h <1> <eos>
#     target   <0> c d <1> i j <eos>
# Unlike the masked-LM functions above, no token is "eligible" or not: every raw token may be
# noise, <eos> document boundaries included (T5 corrupts packed windows the same way), and
# every row of a window of L tokens gets exactly the same counts, so inputs and targets are
# rectangular with no padding.


class SpanCorruptionError(UserError, ValueError):
    """Span-corruption settings that cannot work. A UserError, so the command line prints it
    on one line; also a ValueError, since it is one for a library caller."""


def _noise_span_counts_unchecked(raw_length: int, noise_density: float,
                                 mean_noise_span_length: float) -> tuple[int, int]:
    # round() is Python's, half to even on the float product, like numpy's np.round and TF's tf.round
    num_noise = min(max(round(raw_length * noise_density), 1), raw_length - 1)
    num_spans = max(1, round(num_noise / mean_noise_span_length))
    return num_noise, num_spans


def noise_span_counts(raw_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                    num_sentinels: int = len(SENTINEL_IDS)) -> tuple[int, int]:
    """(num_noise_tokens, num_noise_spans) for a window of raw_length tokens, the same for every row.

    num_noise_tokens = round(L * density) clamped to 1..L-1 (at least one token of each kind);
    num_noise_spans = max(1, round(num_noise_tokens / mean_noise_span_length)). For L = 568 and
    the defaults: 85 noise tokens in 28 spans, 483 non-noise tokens in 28 segments.

    Raises SpanCorruptionError when the settings cannot work: a density outside (0, 1), a mean
    span length below 1, a window shorter than 2 tokens, more spans than non-noise tokens (every
    non-noise segment must be non-empty; HF's script instead rounds min(noise, non-noise) / mean,
    which changes the span law and the lengths its own length helper computed), or more spans
    than sentinel ids (each span needs its own).
    """
    if not 0.0 < noise_density < 1.0:
        raise SpanCorruptionError(f"noise density must be between 0 and 1 (exclusive), got {noise_density}")
    if not mean_noise_span_length >= 1.0:
        raise SpanCorruptionError(f"mean noise span length must be at least 1 token, got {mean_noise_span_length}")
    if raw_length < 2:
        raise SpanCorruptionError(f"span corruption needs windows of at least 2 tokens, got {raw_length}")
    num_noise, num_spans = _noise_span_counts_unchecked(raw_length, noise_density, mean_noise_span_length)
    if num_spans > raw_length - num_noise:
        raise SpanCorruptionError(
            f"span corruption of {raw_length} tokens at noise density {noise_density} makes {num_spans} noise "
            f"spans but only {raw_length - num_noise} non-noise tokens to separate them; use a lower noise "
            f"density or a longer mean span length")
    if num_spans > num_sentinels:
        raise SpanCorruptionError(
            f"span corruption of {raw_length} tokens needs {num_spans} noise spans but there are only "
            f"{num_sentinels} sentinel ids, one per span; use a shorter input length, a lower noise density "
            f"or a longer mean span length")
    return num_noise, num_spans


def noise_span_output_lengths(raw_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                      num_sentinels: int = len(SENTINEL_IDS)) -> tuple[int, int]:
    """(input_length, target_length) that a window of raw_length tokens corrupts into:
    input = non-noise tokens + one sentinel per span + <eos>; target = noise tokens + one
    sentinel per span + <eos>. 568 -> (512, 114) with the defaults."""
    num_noise, num_spans = noise_span_counts(raw_length, noise_density, mean_noise_span_length, num_sentinels)
    return raw_length - num_noise + num_spans + 1, num_noise + num_spans + 1


def noise_span_window(input_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
               num_sentinels: int = len(SENTINEL_IDS)) -> tuple[int, int]:
    """(raw_length, target_length): the longest raw window whose input comes out at exactly
    input_length tokens, and the target length it gives (T5's random_spans_helper, HF's
    compute_input_and_target_lengths). 512 -> (568, 114), 256 -> (284, 58), 128 -> (141, 29).

    Why an exact answer always exists: from L to L + 1 raw tokens, either the noise count stays
    (one more non-noise token: input + 1) or it grows by one (the non-noise count stays and the
    span count, a function of the noise count, grows by 0 or 1 when mean >= 1). So the input
    length climbs through every integer from 3 (L = 2) on, and the raw lengths that give a
    given input length form a run; we take its longest. Also input <= L + 1 (a span costs a
    sentinel but hides at least one token), so the search can start at input_length - 1.

    Unlike HF's helper we count with the same clamps as the mask (at least one noise token,
    one span) and check the result, so the lengths are those noise_span_corruption really makes;
    we also skip HF's density-0.5 adjustment (it shortens the raw window by one token when
    the target would outgrow the input).
    """
    noise_span_counts(2, noise_density, mean_noise_span_length, num_sentinels)  # validates density and mean
    if input_length < 3:
        raise SpanCorruptionError(f"inputs hold at least 3 tokens (a token, a sentinel, <eos>), got {input_length}")

    def input_of(raw_length: int) -> int:
        num_noise, num_spans = _noise_span_counts_unchecked(raw_length, noise_density, mean_noise_span_length)
        return raw_length - num_noise + num_spans + 1

    raw_length = max(2, input_length - 1)
    while input_of(raw_length + 1) <= input_length:
        raw_length += 1
    assert input_of(raw_length) == input_length, (input_length, raw_length)  # see the docstring
    return raw_length, noise_span_output_lengths(raw_length, noise_density, mean_noise_span_length, num_sentinels)[1]


def random_segmentation(num_items: int, num_segments: int, rows: int, generator: torch.Generator | None,
                        device) -> torch.Tensor:
    """(rows, num_segments) long: for each row, num_items split into num_segments positive parts,
    a uniformly random composition (T5's _random_segmentation).

    Items 0..n-1 in a line have n-1 gaps between them; cutting at k-1 distinct gaps, chosen
    uniformly among all such sets, makes every composition of n into k positive parts equally
    likely (there are C(n-1, k-1) of both). One part then has length j with probability
    C(n-j-1, k-2) / C(n-1, k-1): close to, but not, geometric (no part exceeds n-k+1).
    The k-1 gaps with the smallest random keys are a uniformly random set of k-1 gaps (topk, not
    a full argsort, which is slower: benchmarks/README.md). Keys are float64 (float32 on MPS, which has none)
    so that ties, which topk breaks by position, are negligible.
    """
    assert 1 <= num_segments <= num_items, (num_segments, num_items)
    dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
    keys = torch.rand((rows, num_items - 1), generator=generator, device=device, dtype=dtype)
    cut_gaps = keys.topk(num_segments - 1, dim=1, largest=False, sorted=False).indices
    cuts = cut_gaps + 1                                              # first item of segments 1..k-1
    bounds = torch.cat([torch.zeros(rows, 1, dtype=torch.long, device=device), cuts.sort(dim=1).values,
                        torch.full((rows, 1), num_items, dtype=torch.long, device=device)], dim=1)
    return bounds.diff(dim=1)                                        # (rows, k), every part >= 1


def noise_span_mask(rows: int, raw_length: int, generator: torch.Generator | None, device,
                  noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                  num_sentinels: int = len(SENTINEL_IDS)) -> torch.Tensor:
    """(rows, raw_length) bool, True on noise tokens (T5's random_spans_noise_mask), every row
    with the counts of noise_span_counts.

    The noise tokens and the non-noise tokens are each split into num_spans non-empty segments
    (random_segmentation, independently), then laid out alternately starting with non-noise:
    nonnoise_0, noise_0, nonnoise_1, noise_1, ..., nonnoise_{k-1}, noise_{k-1}. So position 0
    is never noise and the last position always is (T5's random_roll, off by default there and
    absent here, would rotate the pattern).
    """
    num_noise, num_spans = noise_span_counts(raw_length, noise_density, mean_noise_span_length, num_sentinels)
    noise_lengths = random_segmentation(num_noise, num_spans, rows, generator, device)
    nonnoise_lengths = random_segmentation(raw_length - num_noise, num_spans, rows, generator, device)
    lengths = torch.stack([nonnoise_lengths, noise_lengths], dim=2).view(rows, 2 * num_spans)
    # mark where segments 1..2k-1 begin, count the marks: odd segment numbers are noise
    segment_starts = lengths.cumsum(dim=1)[:, :-1]                   # (rows, 2k-1), distinct, in 1..L-1
    marks = torch.zeros(rows, raw_length, dtype=torch.long, device=device).scatter_(1, segment_starts, 1)
    return marks.cumsum(dim=1) % 2 == 1


def noise_span_corruption(raw: torch.Tensor, generator: torch.Generator | None, noise_density: float = 0.15,
                       mean_noise_span_length: float = 3.0, sentinel_ids: list[int] = SENTINEL_IDS,
                       eos_id: int = EOS_ID) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """T5 span corruption of a batch of raw windows. raw (B, L) long, on any device; generator
    on that device.

    Returns (inputs, targets, noise):
      inputs  (B, input_length) long: the non-noise tokens, each noise span replaced by one
              sentinel, then <eos>;
      targets (B, target_length) long: each span's sentinel followed by the tokens it hides,
              span after span, then <eos>;
      noise   (B, L) bool: the noise mask (noise_span_mask).
    (input_length, target_length) = noise_span_output_lengths(L): (512, 114) for L = 568, and noise_span_window
    goes the other way. Span s (counting from 0, left to right) gets sentinel_ids[s], so the first
    span of every row is <extra_id_0> (id 7), the next <extra_id_1>, and so on.

    Where this differs from HF's run_t5_mlm_flax.py: nowhere in the result, only in the ids. HF
    numbers sentinels down from the end of the vocabulary (<extra_id_0> = len(tokenizer) - 1,
    then - 2, ...); ours are reserved at 7..106, counting up. HF's labels also read
    <extra_id_0> span_0 <extra_id_1> span_1 ... <eos> with no final sentinel, since the mask ends
    in noise. (The T5 paper's example ends its target with a sentinel because its text ends in
    non-noise; random_spans_noise_mask never does that without random_roll.) See noise_span_counts
    for the one count that differs from HF at noise density above 0.5.

    No Python loop over rows, tokens or spans: every token's place in the input and in the
    target is a running count, and scatters put the tokens there.
    """
    B, L = raw.shape
    device = raw.device
    num_noise, num_spans = noise_span_counts(L, noise_density, mean_noise_span_length, len(sentinel_ids))
    input_length, target_length = L - num_noise + num_spans + 1, num_noise + num_spans + 1
    noise = noise_span_mask(B, L, generator, device, noise_density, mean_noise_span_length, len(sentinel_ids))
    span_start = noise & ~F.pad(noise[:, :-1], (1, 0), value=False)  # first token of each noise span
    span_number = span_start.cumsum(dim=1) - 1                        # at noise tokens: 0..k-1
    sentinel = torch.tensor(sentinel_ids[:num_spans], dtype=raw.dtype, device=device)[span_number.clamp(min=0)]

    # Input: a non-noise token stays, the first token of a span becomes its sentinel, the rest
    # of the span goes. A kept token's slot is the number of kept tokens before it. Every row
    # keeps exactly input_length - 1 tokens, so slots 0..input_length-2 are all filled and the
    # last slot is free for <eos>; the dropped tokens are sent there too (scatter needs a place
    # for every element) and <eos> overwrites them.
    keep = ~noise | span_start
    slot = torch.where(keep, keep.cumsum(dim=1) - 1, input_length - 1)
    inputs = raw.new_empty(B, input_length).scatter_(1, slot, torch.where(span_start, sentinel, raw))
    inputs[:, -1] = eos_id

    # Target: noise token t goes after the noise tokens before it and after the sentinels of
    # spans 0..span_number[t]; a span's sentinel goes just before its first token. Non-noise
    # tokens go to the <eos> slot, overwritten as above.
    token_slot = noise.cumsum(dim=1) - 1 + span_number + 1
    targets = raw.new_empty(B, target_length)
    targets.scatter_(1, torch.where(noise, token_slot, target_length - 1), raw)
    targets.scatter_(1, torch.where(span_start, token_slot - 1, target_length - 1), sentinel)
    targets[:, -1] = eos_id
    return inputs, targets, noise
