"""Masked language modeling (BERT, Devlin et al. 2018; RoBERTa, Liu et al. 2019).

The idea: hide some tokens of the input and train a bidirectional encoder to recover them from
the context on both sides. Unlike a decoder, every position sees the whole window, so the
representation of a token depends on what comes after it too; the price is that only the
chosen tokens give a training signal.

Numbers (ObjectiveConfig; defaults are BERT's and RoBERTa's):
  * mask_prob = 0.15: each eligible token is chosen independently with this probability, so
    the count per row is binomial (RoBERTa, HF's DataCollatorForLanguageModeling). Wettig et
    al. 2023 ("Should You Mask 15% in Masked Language Modeling?") find that higher rates, e.g.
    0.4, train better for larger models: try --mask_prob 0.4.
  * 80/10/10 (mask_replace_prob 0.8, random_replace_prob 0.1): a chosen token is shown as
    <mask>, as a random non-special token, or unchanged; the loss predicts the original in all
    three cases (minilm/masking.py, `replace`).
  * Dynamic masking (RoBERTa): make_batch draws a new mask every time a window is drawn, from
    the generator the trainer seeds per step, so no two epochs see the same masks.
Eligible: every token of the window that is not special. A document boundary <eos> inside a
window stays in the input (the encoder sees where documents end) and is never chosen.

The loss is the cross-entropy at the chosen positions only, summed and divided by the step's
total count of chosen tokens (the contract in base.py).

Sparse prediction: the head (BERT's transform: Linear C->C, GELU, norm; then the tied output
matrix plus a bias per vocabulary entry) runs only on the hidden states at the chosen
positions: (N, C) -> (N, V) with N ~ 0.15 * B * T, instead of (B*T, C) -> (B*T, V). The head
acts on each position alone and the other positions' losses are ignored anyway, so the loss
and its gradients are exactly the dense ones (tests/test_mlm.py checks it) for about 15% of
the head's FLOPs and memory. The same holds one layer further down: the last block's output is
only read at the chosen positions, so it computes its queries, attention output, projection and
MLP there alone (keys and values still come from every position; Transformer's `outputs_at`). At the
benchmark shape that removes ~12% of the blocks' FLOPs on top of ~85% of the head's.
`predict` is the dense path (all positions; used by fill-mask).

Shapes: raw (B, T+1) from the "blocks" source (the first T = seq_len tokens are used; the
extra token exists for causal LM's shifted labels) -> input_ids (B, T), labels (B, T) (IGNORE
where not chosen), positions (N,) flat indices b*T + t of the chosen tokens, targets (N,);
picked (N, C) (the backbone's output at the chosen positions) -> logits (N, V).

Where we differ from the references:
  * Random replacements are uniform over the non-special ids; HF draws over the whole vocab,
    specials included (see masking.replace).
  * No [CLS] ... [SEP] framing: a window is a plain stretch of the token stream that may cross
    documents, separated by <eos> (RoBERTa's FULL-SENTENCES packing). With no padding there is
    no attention mask and SDPA runs its fastest kernel.
  * The encoder is minilm's Transformer with no causal mask: pre-norm and, by default, RoPE and
    RMSNorm, where BERT/RoBERTa are post-norm with learned positions and LayerNorm
    (--position learned --norm layernorm --bias true gets closer). Like BERT, RoBERTa and
    ModernBERT it normalizes the summed embeddings before the first block (embed_norm: declared in
    model_settings, so the config that is printed and saved says so; objectives/base.py). Without it a pre-norm encoder whose embeddings start at GPT's std 0.02 learns far
    slower: a 2x64 encoder after 300 steps of 16 x 64 tokens predicted 7.5% of masked tokens
    (the most-frequent-token rate: it had learned nothing but unigrams) against 11.6% with it,
    and 10.5% for HF's RobertaForMaskedLM of the same size.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minilm import masking
from minilm.flops import lm_head_matmul_weights, parameters_of, transformer_flops
from minilm.model import Transformer, make_norm, padding_mask
from minilm.losses import step_mean
from minilm.objectives.base import IGNORE, Baseline, Objective
from minilm.tokenizer import MASK_ID, NUM_SPECIAL, word_starts_from_tables


def check_masking_options(opts) -> None:
    """One-line UserErrors for impossible masking options. The rules live with the fields
    (ObjectiveConfig.validate, which parse_overrides runs on every command line); this runs them
    for options built in Python too."""
    opts.validate()


class MLMHead(nn.Module):
    """BERT/RoBERTa's prediction head: transform (Linear W->W, GELU, norm), then the output matrix
    (the tied token embeddings) and a bias per vocabulary entry. (..., W) -> (..., V).

    W is the output matrix's width: C, or E when the tied embeddings are factorized (model.py),
    where the head reads backbone.to_output_width(hidden), the backbone's C -> E projection, so
    every weight of the backbone is used (DDP needs that) and an LM head on the same backbone
    (mlm+clm) shares it. ALBERT folds that projection into the transform (one Linear C -> E)."""

    def __init__(self, cfg, width: int | None = None):
        super().__init__()
        width = width or cfg.n_embd
        self.dense = nn.Linear(width, width, bias=cfg.bias)
        self.norm = make_norm(cfg, width)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        Transformer._init_weights(self.dense)

    def forward(self, hidden, output_weight):
        return F.linear(self.norm(F.gelu(self.dense(hidden))), output_weight, self.bias)


class MaskedLM(Objective):
    name = "mlm"
    data = "blocks"
    model_kind = "encoder"
    fills_masks = True
    reads_padded_rows = True   # wwm, span and tlm too
    model_settings = {"embed_norm": True}   # the encoder normalizes its embeddings (module docstring)
    baseline = Baseline("each masked token predicted by its unigram frequency", targets="targets", margin=0.05)

    def __init__(self, model_cfg, tokenizer=None, options=None):
        super().__init__()
        if options is None:
            from minilm.config import ObjectiveConfig
            options = ObjectiveConfig()
        check_masking_options(options)
        self.options = options
        self.seq_len = model_cfg.seq_len
        self.backbone = self.build_backbone(model_cfg)
        self.head = MLMHead(model_cfg, self.backbone.output_weight.shape[1])
        # per-id tables as buffers, so they follow .to(device) and cost no copy per batch.
        # Without a tokenizer (benchmarks, unit tests): ids below NUM_SPECIAL are special and
        # every token starts a word.
        V = model_cfg.vocab_size
        if tokenizer is not None:
            tables = (tokenizer.special_table, tokenizer.starts_word_table, tokenizer.breaks_line_table,
                      tokenizer.bytes_per_token)
        else:
            tables = (torch.arange(V) < NUM_SPECIAL, torch.ones(V, dtype=torch.bool),
                      torch.zeros(V, dtype=torch.bool), torch.zeros(V, dtype=torch.long))
        for name, table in zip(("special_table", "starts_word_table", "breaks_line_table", "bytes_per_token"), tables):
            self.register_buffer(name, table.clone(), persistent=False)
        self.register_buffer("random_ids", torch.nonzero(~self.special_table).squeeze(1), persistent=False)

    # --------------------------------------------------------------- which positions to predict
    def word_starts(self, ids):
        return word_starts_from_tables(ids, self.starts_word_table, self.breaks_line_table)

    def choose(self, ids, eligible, generator):
        """(chosen (B, T) bool, group ids for replacement or None = per token). WWM and span
        masking override this and nothing else."""
        return masking.choose_bernoulli(eligible, self.options.mask_prob, generator), None

    def make_batch(self, raw, generator=None, lengths=None):
        """raw (B, T+1) -> model inputs; `lengths` (B,) for right-padded rows."""
        ids = raw[:, :self.seq_len]
        eligible = masking.eligible_positions(ids, self.special_table, lengths)
        chosen, groups = self.choose(ids, eligible, generator)
        input_ids, _ = masking.replace(ids, chosen, generator, MASK_ID, self.random_ids,
                                       self.options.mask_replace_prob, self.options.random_replace_prob, groups)
        positions = torch.nonzero(chosen.flatten()).squeeze(1)      # (N,) flat indices b*T + t
        batch = {"input_ids": input_ids, "labels": torch.where(chosen, ids, IGNORE), "positions": positions,
                 "targets": ids.flatten()[positions], "counts": {"targets": chosen.sum()}}
        if lengths is not None:
            batch["attn_mask"] = padding_mask(lengths, ids.shape[1])
        return batch

    def flops_per_token(self) -> float:
        """What a step really computes, per input token (for MFU): every block but the last in
        full; in the last, keys and values everywhere but queries, projection and MLP only at the
        mask_prob share of positions that are predicted; the head (transform + tied output
        matrix, after the C -> E projection when factorized) at those positions too; a factorized
        embedding's E -> C projection everywhere (flops.transformer_flops)."""
        head = parameters_of(self.head) + lm_head_matmul_weights(self.backbone)
        return transformer_flops(self.backbone, self.backbone.cfg.seq_len, outputs_share=self.options.mask_prob,
                                 head=head)

    # --------------------------------------------------------------- model
    def predict(self, input_ids, attn_mask=None, segment_ids=None):
        """The dense path: logits at every position, (B, T) -> (B, T, V)."""
        hidden = self.backbone(input_ids, mask=attn_mask, segment_ids=segment_ids)
        return self.head(self.backbone.to_output_width(hidden), self.backbone.output_weight)

    def forward(self, batch, totals=None):
        # attn_mask: padded rows only; segment_ids: sentence pairs (mlm+sop, objectives/multitask.py)
        # or languages (tlm); position_ids: tlm's, which restart at the translation (B, T)
        # only the chosen positions' outputs: the last block computes them alone (model.py, outputs_at)
        picked = self.backbone(batch["input_ids"], mask=batch.get("attn_mask"), positions=batch.get("position_ids"),
                               segment_ids=batch.get("segment_ids"), outputs_at=batch["positions"])  # (N, C)
        # fp32 for a stable softmax: a no-op in fp32, an (N, V) cast under bf16 autocast
        logits = self.head(self.backbone.to_output_width(picked), self.backbone.output_weight).float()  # (N, V)
        targets = batch["targets"]
        nll = F.cross_entropy(logits, targets, reduction="sum")
        with torch.no_grad():
            sums = {"nll": nll.detach(), "targets": batch["counts"]["targets"]}
            if not self.training:
                # bits per byte here are those of masked tokens given context on both sides:
                # comparable between masked-LM runs, not with a causal LM's
                sums["correct"] = (logits.argmax(-1) == targets).sum()
                sums["bytes"] = self.bytes_per_token[targets].sum()
        return step_mean(nll, batch, totals), sums
