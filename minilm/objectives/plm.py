"""Permutation language modeling with two-stream attention (XLNet, Yang et al. 2019).

Each token is predicted from the tokens before it in a random factorization order, drawn anew for
every row, so in expectation every token learns from context on both sides with no <mask> in the
input. Positions stay where they are; only the attention masks follow the order.

Numbers (make_batch, vectorized, from the step's generator):
  * partial prediction (XLNet sec. 2.3): the last 1/K of the order are targets, --plm_partial_k
    K = 6 (XLNet: num_predict 85 of 512 tokens); M = round(T / K) targets, kept in 1..T-1, the
    same M in every row. Every non-target gets the smallest rank, so the non-targets read each
    other in both directions and never read a target (XLNet's `_local_perm`); the targets' order
    among themselves is uniformly random (ranks 1..M).
  * which tokens: a uniform M of T by default; --plm_span_targets true is XLNet's `_sample_mask`:
    stretches of 7n tokens, n in 1..5 with P(n) proportional to 1/n (0.44, 0.22, 0.15, 0.11,
    0.09), a span of n after a left context uniform in 0..6n-1; the span that reaches M is cut
    to fit, no span reaches the row's last token, and the remaining targets are drawn uniformly.
Two streams through the same blocks and weights (XLNet sec. 2.3, Figure 1), at layer l:
    h_l = block(h_{l-1})                             content: i sees j where rank[j] <= rank[i]
    g_l = block(g_{l-1}, keys/values from h_{l-1})   query: i sees j where rank[j] < rank[i]
The query stream starts from one learned vector (`query_start`, XLNet's mask_emb) at the target's
position: it knows where it predicts, never what. It runs at the M targets only, and the last
content block, read by nobody, is skipped. The content stream is the backbone that --init_from and
fine-tuning take. Logits: the tied output matrix at the targets; the loss is their cross-entropy
summed over the step's target count (base.py).

Shapes: raw (B, T+1) from "blocks" (the first T used) -> input_ids (B, T), ranks (B, T),
target_positions (B, M) in factorization order, targets (B, M); masks content (B, 1, T, T) and
query (B, 1, M, T) bool (True = may attend), built in forward; h (B, T, C), g (B, M, C) -> logits
(B, M, V).

Where HF's DataCollatorForPermutationLanguageModeling differs from XLNet: it shows <mask> at the
targets (XLNet's content stream reads the real tokens, as ours does); it never hides special
tokens; its span lengths are uniform in 1..5, so the target count varies per row; both halves of
a row share one permutation of T/2. Where we differ from XLNet:
  * no Transformer-XL memory, so no reuse_len split: one order over the whole window;
  * rotary (or learned absolute) positions instead of relative position and segment encodings;
    no <sep>/<cls> framing (<eos> is a token like any other, as XLNet's <eod>);
  * no bidirectional data (bi_data); span targets start on any token, not moved to a word start;
  * minilm's pre-norm blocks (RMSNorm, GELU) instead of XLNet's post-norm Transformer-XL layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from minilm.flops import key_value_weights, matmul_weights, parameters_of
from minilm.objectives.base import Baseline, Objective
from minilm.options import Options, option

MAX_SPAN = 5          # XLNet's max_gram: n-gram spans of 1..5 tokens
CONTEXT_PER_TOKEN = 6  # XLNet's mask_alpha / mask_beta: a span of n sits in 6n tokens of context


def targets_per_row(seq_len: int, partial_k: int) -> int:
    """M = round(T / K), kept in 1..T-1: at least one target, and at least one non-target, so
    every target's query sees some context (a query that sees nothing would be a softmax over
    an empty set). round is Python's, half to even (2.5 -> 2, 3.5 -> 4), as np.round in the
    other objectives' counts (minilm/masking.py); XLNet gives the count itself (num_predict 85
    for 512 tokens, round(512 / 6))."""
    return min(max(1, round(seq_len / partial_k)), seq_len - 1)


def draw_spans(batch: int, seq_len: int, num_targets: int, generator=None, device=None):
    """XLNet's `_sample_mask` spans for `batch` rows, all at once: (begin, length), each (B, S).

    Row b is cut into stretches of 7n tokens (n in 1..5, p ~ 1/n); stretch s holds the span
    [begin, begin + length) after a left context uniform in {0, ..., 6n-1}. length is n, cut to
    the targets still missing when the span reaches num_targets, and 0 for a span that does not
    end before the row's last token or is not needed. S = seq_len // 7 + 1 stretches always
    cover the row (each is at least 7 tokens long)."""
    stretches = seq_len // (CONTEXT_PER_TOKEN + 1) + 1
    law = 1.0 / torch.arange(1, MAX_SPAN + 1, dtype=torch.float, device=device)        # p(n) ~ 1/n
    n = torch.multinomial((law / law.sum()).expand(batch, MAX_SPAN), stretches, replacement=True,
                          generator=generator) + 1                                        # (B, S)
    before = n.cumsum(1) - n                          # targets the earlier spans hold, if kept whole
    length = (num_targets - before).clamp(min=0).minimum(n)  # the span that reaches M is cut to fit
    stretch_start = (n * (CONTEXT_PER_TOKEN + 1)).cumsum(1) - n * (CONTEXT_PER_TOKEN + 1)
    u = torch.rand(n.shape, generator=generator, device=device)
    left = (u * (CONTEXT_PER_TOKEN * length)).long()  # uniform in {0, ..., 6 * length - 1}
    begin = stretch_start + left
    length = torch.where(begin + length < seq_len, length, 0)  # XLNet: `if end >= seg_len: break`
    return begin, length


def span_targets(batch: int, seq_len: int, num_targets: int, generator=None, device=None) -> torch.Tensor:
    """(B, T) bool with exactly num_targets True per row: XLNet's spans (draw_spans), then the
    rest drawn uniformly among the other tokens (XLNet's final `while num_predict < goal` loop)."""
    begin, length = draw_spans(batch, seq_len, num_targets, generator, device)
    offset = torch.arange(MAX_SPAN, device=device)                                   # (5,)
    position = begin[:, :, None] + offset                                            # (B, S, 5)
    inside = offset < length[:, :, None]
    painted = torch.zeros(batch, seq_len + 1, dtype=torch.bool, device=device)       # column T: a dump
    painted.scatter_(1, torch.where(inside, position, seq_len).flatten(1), True)
    chosen = painted[:, :seq_len]
    missing = num_targets - chosen.sum(1, keepdim=True)                              # (B, 1), >= 0
    noise = torch.rand(batch, seq_len, generator=generator, device=device).masked_fill(chosen, 2.0)
    noise_rank = noise.argsort(1).argsort(1)           # 0 = the smallest noise among the free tokens
    return chosen | (noise_rank < missing)


def factorization_order(is_target: torch.Tensor | None, batch: int, seq_len: int, num_targets: int,
                        generator=None, device=None):
    """(ranks (B, T) long, target_positions (B, M)) of a random factorization order whose last M
    positions are the targets: `is_target` (B, T) bool with M True per row, or None for the last M
    of a uniformly random permutation. Targets are listed in the order they are predicted; the
    target in slot m has rank m+1, every non-target rank 0 (XLNet's `_local_perm`: the smallest
    index, seen by all, seeing no target)."""
    noise = torch.rand(batch, seq_len, generator=generator, device=device)      # the permutation
    if is_target is not None:
        noise = noise + is_target.float()            # targets after the context, random among themselves
    order = noise.argsort(1)                                                       # (B, T)
    target_positions = order[:, seq_len - num_targets:]                            # (B, M)
    ranks = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    slot_ranks = torch.arange(1, num_targets + 1, device=device).expand(batch, num_targets)
    ranks.scatter_(1, target_positions, slot_ranks)
    return ranks, target_positions


def two_stream_masks(ranks: torch.Tensor, num_targets: int):
    """ranks (B, T) -> content mask (B, 1, T, T), query mask (B, 1, M, T); True = may attend.
    Content i sees j iff rank[j] <= rank[i]; the query of target slot m (rank m+1) sees j iff
    rank[j] < m+1, i.e. rank[j] <= m: everything before it in the order, not itself."""
    content = ranks[:, None, :] <= ranks[:, :, None]                                 # (B, T, T)
    slots = torch.arange(num_targets, device=ranks.device)
    query = ranks[:, None, :] <= slots[None, :, None]                                # (B, M, T)
    return content[:, None], query[:, None]


@dataclass
class PermutationLMOptions(Options):
    plm_partial_k: int = option(6, "plm: predict the last 1/K of each sequence's random factorization order "
                                   "(XLNet's K): round(seq_len / K) targets per row", at_least=2)
    plm_span_targets: bool = option(False, "plm: choose the targets as XLNet's spans (n = 1..5 tokens with p ~ 1/n, "
                                           "one per stretch of 7n tokens) instead of uniformly")


class PermutationLM(Objective):
    name = "plm"
    data = "blocks"
    model_kind = "encoder"
    Options = PermutationLMOptions
    capabilities = frozenset({"embed"})   # its head predicts a token at a position given others, not a <mask>
    shortest_seq_len = (2, "predicts some tokens of a row from the others")   # a target and some context
    baseline = Baseline("each target predicted by its unigram frequency", targets="targets", margin=0.05)

    def __init__(self, model_cfg, tokenizer=None, options=None):
        super().__init__()
        self.options = options = self.make_options(options)
        self.seq_len = model_cfg.seq_len
        self.partial_k = options.plm_partial_k
        self.num_targets = targets_per_row(model_cfg.seq_len, options.plm_partial_k)   # M at full length
        self.span_targets = options.plm_span_targets
        self.backbone = self.build_backbone(model_cfg)
        # the query stream's input (XLNet's mask_emb): one learned vector, initialised as a token row
        self.query_start = nn.Parameter(torch.randn(model_cfg.n_embd) * 0.02)
        self.keep_bytes_per_token(tokenizer, model_cfg.vocab_size)     # for bits per byte

    def make_batch(self, raw, generator=None):
        """raw (B, T+1) -> input_ids, ranks (B, T), target_positions, targets (B, M), counts."""
        ids = raw[:, :self.seq_len]
        B, T = ids.shape
        M = targets_per_row(T, self.partial_k)
        is_target = span_targets(B, T, M, generator, ids.device) if self.span_targets else None
        ranks, target_positions = factorization_order(is_target, B, T, M, generator, ids.device)
        return {"input_ids": ids, "ranks": ranks, "target_positions": target_positions,
                "targets": ids.gather(1, target_positions),
                "counts": {"targets": torch.tensor(B * M, device=ids.device)}}

    # --------------------------------------------------------------- model
    def query_input(self, target_positions):
        """The query stream's first state, (B, M) -> (B, M, C): the learned vector in place of a
        token's embedding, plus what the backbone adds to every token (a learned position, the
        segment-0 embedding), through the same embedding norm and dropout."""
        backbone = self.backbone
        B, M = target_positions.shape
        g = self.query_start.expand(B, M, -1)
        if backbone.pos_emb is not None:
            g = g + backbone.pos_emb(target_positions)
        if backbone.seg_emb is not None:
            g = g + backbone.seg_emb.weight[0]
        if backbone.embed_norm is not None:
            g = backbone.embed_norm(g)
        return backbone.drop(g)

    def query_hidden(self, input_ids, ranks, target_positions):
        """The query stream's last hidden states at the targets, after the final norm: (B, M, C)."""
        backbone = self.backbone
        content_mask, query_mask = two_stream_masks(ranks, target_positions.shape[1])
        h = backbone.embed(input_ids)                                       # content stream (B, T, C)
        g = self.query_input(target_positions)                              # query stream (B, M, C)
        last = len(backbone.blocks) - 1
        for i, block in enumerate(backbone.blocks):
            # both from the previous layer's h: the query stream reads the content stream as it was
            g_next = block(g, h, mask=query_mask, rotary=backbone.rotary, positions=target_positions)
            if i < last:  # the last content layer would feed no query layer: skip it
                h = block(h, mask=content_mask, rotary=backbone.rotary)
            g = g_next
        return backbone.norm(g)

    def query_logits(self, batch):
        """(B, M, V): the prediction of each target from the tokens before it in the order."""
        return self.backbone.logits(self.query_hidden(batch["input_ids"], batch["ranks"], batch["target_positions"]))

    def forward(self, batch, totals=None):
        logits = self.query_logits(batch).flatten(0, 1)                     # (B*M, V)
        targets = batch["targets"].flatten()                                # (B*M,)
        return self.token_loss(logits, targets, batch, totals)

    def explain(self, batch, tokenizer):
        """One row: every position's rank in the factorization order (0 for the context, 1..M for
        the targets in the order they are predicted), the token predicted at each target, and both
        streams' masks side by side as two_stream_masks gives them to forward: content (T, T),
        query (M, T), one query row per target in order."""
        from minilm.explain import DASH, Explained, pieces
        input_ids, ranks, target_positions = batch["input_ids"][0], batch["ranks"][0], batch["target_positions"][0]
        content_mask, query_mask = two_stream_masks(batch["ranks"], batch["target_positions"].shape[1])
        reads = pieces(tokenizer, input_ids)
        target = [DASH] * len(reads)
        for position, token in zip(target_positions.tolist(), batch["targets"][0].tolist()):
            target[position] = tokenizer.id_to_piece(token)
        predicted = [reads[position] for position in target_positions.tolist()]   # in the order, slot m = rank m+1
        M, T = len(predicted), len(reads)
        chosen = "as XLNet's spans" if self.span_targets else "uniformly"
        return Explained(
            columns={"reads": reads, "target": target, "rank": [str(r) for r in ranks.tolist()],
                     "target?": ["yes" if r > 0 else "no" for r in ranks.tolist()]},
            masks={"content stream": (reads, reads, content_mask[0, 0]),
                   "query stream": (predicted, reads, query_mask[0, 0])},
            notes=[f"{M} of {T} tokens are targets (the last 1/{self.partial_k} of the order, chosen {chosen}), "
                   f"predicted in this order: {' '.join(predicted)}",
                   "content stream: a position sees every token of rank <= its own (the context, rank 0, sees "
                   "only the context); query stream: the target of rank r sees those of rank < r, its own position "
                   "but never its own token"])

    def flops_per_token(self) -> float:
        """What a step computes, per input token (for MFU), with f = M / T ~ 1/K:
        content stream   L-1 blocks at every position (the last one is skipped)
        query stream     L blocks at the f share of positions, except that each layer projects the
                         keys and values of every content position again (Attention with a source)
        LM head          at the f share of positions
        attention        (L-1 + L f) 12 H D T."""
        cfg = self.backbone.cfg
        L, f = cfg.n_layer, self.num_targets / cfg.seq_len
        per_block = parameters_of(self.backbone.blocks[0])
        key_value = key_value_weights(self.backbone.blocks[0].attn)
        blocks_and_head = matmul_weights(self.backbone, lm_head=True)
        norms_head = blocks_and_head - L * per_block                      # final norm + output matrix
        weights = (L - 1) * per_block + L * (key_value + f * (per_block - key_value)) + f * norms_head
        return 6 * weights + (L - 1 + L * f) * 12 * cfg.n_head * cfg.head_dim * cfg.seq_len
