"""Masked language modeling (BERT: Devlin et al. 2018; RoBERTa: Liu et al. 2019).

Hide some tokens of the input and train a bidirectional encoder to recover them from the context
on both sides. Every position sees the whole window; only the chosen tokens give a training signal.

Numbers (BERT's and RoBERTa's defaults):
  * --mask_prob 0.15: each eligible token (not special, not padding; a document's <eos> stays in
    the input but is never chosen) is chosen independently, so the count per row is binomial
    (RoBERTa, HF's DataCollatorForLanguageModeling). Wettig et al. 2023 ("Should You Mask 15% in
    Masked Language Modeling?") recommend higher rates, e.g. 0.4, for larger models.
  * 80/10/10 (--mask_replace_prob 0.8, --random_replace_prob 0.1): a chosen token is shown as
    <mask>, as a random non-special token, or unchanged; the loss predicts the original in all
    three cases (masking.replace).
  * dynamic masking (RoBERTa): a new mask every time a window is drawn, from the generator the
    trainer seeds per step, so a resumed run sees the masks it would have seen;
  * the loss: cross-entropy at the chosen positions, summed and divided by the step's count of
    chosen tokens (base.py);
  * the encoder normalizes its summed embeddings before the first block (embed_norm, as BERT,
    RoBERTa and ModernBERT do), set by this objective's `configure`, so the saved config says so.

Sparse prediction: the head (BERT's transform: Linear W->W, GELU, norm; then the tied output
matrix and a bias per vocabulary entry) runs at the chosen positions only, and so do the last
block's queries, attention output, projection and MLP (its keys and values still come from every
position: the backbone's `outputs_at`). Loss and gradients equal the dense ones (tests/test_mlm.py)
for the mask_prob share of that work. `predict` is the dense path, used by fill-mask.

Shapes: raw (B, T+1) from the "blocks" source (the first T = seq_len tokens used) -> input_ids
(B, T), labels (B, T) (IGNORE where not chosen), positions (N,) flat indices b*T + t of the chosen
tokens, targets (N,); the backbone's output there (N, C) -> logits (N, V).

Where we differ from the references:
  * random replacements are uniform over the non-special ids; HF draws over the whole vocabulary,
    specials included;
  * no [CLS] ... [SEP] framing: a window is a stretch of the token stream that may cross
    documents, separated by <eos> (RoBERTa's FULL-SENTENCES packing); no padding, so no mask;
  * the encoder is minilm's pre-norm Transformer (RoPE and RMSNorm by default), where BERT and
    RoBERTa are post-norm with learned positions and LayerNorm (--position learned --norm
    layernorm --bias true comes closer). Why a pre-norm encoder needs the embedding norm:
    benchmarks/README.md, "Masked LM: the embedding norm".
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minilm import masking
from minilm.errors import UserError
from minilm.flops import lm_head_matmul_weights, parameters_of, transformer_flops
from minilm.model import Transformer, make_norm, padding_mask, softcap
from minilm.losses import step_mean
from minilm.objectives.base import IGNORE, Baseline, HFHead, Objective
from minilm.options import Options, option
from minilm.tokenizer import MASK_ID, NUM_SPECIAL, word_starts_from_tables


@dataclass
class MaskedLMOptions(Options):
    """The masking options of the masked-LM family (mlm, wwm, span, tlm; rtd's generator inputs
    too, minilm/masking.py): how many tokens to predict, and how they are shown."""
    mask_prob: float = option(0.15, "masked LMs: share of eligible (non-special) tokens to predict; mlm "
                                    "each independently, wwm max(1, round(p*n)) tokens in whole words, span "
                                    "exactly ceil(p*n)", within="(0, 1]")
    mask_replace_prob: float = option(0.8, "of the chosen tokens, the share shown as <mask>",
                                      within="[0, 1]")
    random_replace_prob: float = option(0.1, "the share shown as a random non-special token; the rest "
                                             "stay unchanged", within="[0, 1]")

    def validate(self) -> None:
        super().validate()
        if self.mask_replace_prob + self.random_replace_prob > 1.0 + 1e-9:
            raise UserError(f"--mask_replace_prob + --random_replace_prob must be at most 1, got "
                            f"{self.mask_replace_prob} + {self.random_replace_prob}")


CHOICES = {masking.MASKED: "masked", masking.RANDOM: "random", masking.KEPT: "unchanged"}   # shown_as -> word


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
        self.logit_softcap = cfg.logit_softcap     # 0 = off; as every LM head (model.py's softcap)
        Transformer._init_weights(self.dense)

    def forward(self, hidden, output_weight):
        logits = F.linear(self.norm(F.gelu(self.dense(hidden))), output_weight, self.bias)
        return softcap(logits, self.logit_softcap)


class MaskedLM(Objective):
    name = "mlm"
    data = "blocks"
    model_kind = "encoder"
    capabilities = frozenset({"fill", "embed"})   # fill: predict(input_ids), the masked-LM head's logits
    reads_padded_rows = True   # wwm, span and tlm too
    Options = MaskedLMOptions
    baseline = Baseline("each masked token predicted by its unigram frequency", targets="targets", margin=0.05)
    # transformers' masked LMs: MLMHead is BERT's transform + the (tied) output matrix + a bias per id
    hf_heads = {"bert": HFHead("BertForMaskedLM", {"head.dense": "cls.predictions.transform.dense",
                                                   "head.norm": "cls.predictions.transform.LayerNorm",
                                                   "head.bias": "cls.predictions.bias",
                                                   "backbone.lm_head.weight": "cls.predictions.decoder.weight"},
                               ("head.bias", "backbone.lm_head.weight")),
                "roberta": HFHead("RobertaForMaskedLM", {"head.dense": "lm_head.dense",
                                                         "head.norm": "lm_head.layer_norm",
                                                         "head.bias": "lm_head.bias",
                                                         "backbone.lm_head.weight": "lm_head.decoder.weight"},
                                  ("head.bias", "backbone.lm_head.weight"))}

    def __init__(self, model_cfg, tokenizer=None, options=None):
        super().__init__()
        self.options = options = self.make_options(options)
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

    @classmethod
    def configure(cls, model_cfg, options):
        return dataclasses.replace(model_cfg, embed_norm=True)   # the encoder normalizes its embeddings

    # --------------------------------------------------------------- which positions to predict
    def word_starts(self, ids):
        return word_starts_from_tables(ids, self.starts_word_table, self.breaks_line_table)

    def choose(self, ids, eligible, generator):
        """(chosen (B, T) bool, group ids for replacement or None = per token). WWM and span
        masking override this and nothing else."""
        return masking.choose_bernoulli(eligible, self.options.mask_prob, generator), None

    def chosen_units(self, original, chosen, eligible):
        """What each chosen token was chosen as part of, for explain: (column title, (T,) long:
        the position of its unit's first token, -1 where not chosen), or None when tokens are
        chosen one by one (mlm). wwm's words and span's spans override it. One row: (T,) tensors."""
        return None

    def make_batch(self, raw, generator=None, lengths=None):
        """raw (B, T+1) -> model inputs; `lengths` (B,) for right-padded rows."""
        ids = raw[:, :self.seq_len]
        eligible = masking.eligible_positions(ids, self.special_table, lengths)
        chosen, groups = self.choose(ids, eligible, generator)
        input_ids, shown_as = masking.replace(ids, chosen, generator, MASK_ID, self.random_ids,
                                              self.options.mask_replace_prob, self.options.random_replace_prob, groups)
        positions = torch.nonzero(chosen.flatten()).squeeze(1)      # (N,) flat indices b*T + t
        # shown_as (B, T) int8, what was done at each position (0 not chosen, masking.MASKED, RANDOM,
        # KEPT): forward never reads it, explain does (a random token may draw the original itself)
        batch = {"input_ids": input_ids, "labels": torch.where(chosen, ids, IGNORE), "positions": positions,
                 "targets": ids.flatten()[positions], "shown_as": shown_as, "counts": {"targets": chosen.sum()}}
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

    # --------------------------------------------------------------- explain
    def explain(self, batch, tokenizer):
        """One row of make_batch's batch: what the encoder reads, the originals it predicts, what
        was done at each chosen token (batch["shown_as"], masking.replace's record: masked, random
        or unchanged), the unit it was chosen in (chosen_units: wwm's word, span's span) and the
        encoder's attention mask, the one forward passes (attention_mask)."""
        from minilm.explain import DASH, Explained, mask_grid, pieces, targets
        ids, labels, shown_as = batch["input_ids"][0], batch["labels"][0], batch["shown_as"][0]
        T = len(ids)
        chosen = labels != IGNORE
        original = torch.where(chosen, labels, ids)          # the window before any replacement, (T,)
        mask = self.attention_mask(batch)
        # the tokens that could be chosen, by make_batch's own rule; a padded row's length from its mask
        lengths = None if mask is None else mask[:1, 0, 0].sum(-1)
        eligible = masking.eligible_positions(original[None], self.special_table, lengths)[0]
        reads = pieces(tokenizer, ids)
        columns = {"reads": reads, "target": targets(tokenizer, labels, IGNORE),
                   "choice": [CHOICES.get(int(k), DASH) for k in shown_as]}
        counts = {name: int((shown_as == k).sum()) for k, name in CHOICES.items()}
        notes = [f"{int(chosen.sum())} of {int(eligible.sum())} eligible tokens chosen: "
                 + ", ".join(f"{n} {name}" for name, n in counts.items())]
        units = self.chosen_units(original, chosen, eligible)
        if units is not None:
            title, first = units
            column = [DASH] * T
            for k, start in enumerate(sorted(set(first[chosen].tolist())), 1):
                where = torch.nonzero(first == start).squeeze(1).tolist()
                for t in where:
                    column[t] = f"{k} ({where[0]}-{where[-1]})"
                notes.append(f"{title} {k}, positions {where[0]}-{where[-1]}: "
                             f"{tokenizer.decode(original[where].tolist())!r}")
            columns[title] = column
        title = "bidirectional self-attention" if mask is None else "self-attention, padding masked"
        return Explained(columns=columns, masks={title: (reads, reads, mask_grid(mask, T, T))}, notes=notes)

    # --------------------------------------------------------------- model
    def predict(self, input_ids, attn_mask=None, segment_ids=None):
        """The dense path: logits at every position, (B, T) -> (B, T, V)."""
        hidden = self.backbone(input_ids, mask=attn_mask, segment_ids=segment_ids)
        return self.head(self.backbone.to_output_width(hidden), self.backbone.output_weight)

    def attention_mask(self, batch):
        """What the encoder's attention is masked with: the padding mask (B, 1, 1, T) of padded rows,
        else None, every position sees every other (no causal mask: this is an encoder)."""
        return batch.get("attn_mask")

    @torch.no_grad()
    def predictions(self, batch):
        """The token the masked-LM head finds likeliest at every position of row 0, read as forward
        reads the batch (its mask, positions and segments) but densely: (T,)."""
        row = {key: value[:1] for key, value in batch.items() if torch.is_tensor(value) and value.dim() > 1}
        hidden = self.backbone(row["input_ids"], mask=self.attention_mask(row), positions=row.get("position_ids"),
                               segment_ids=row.get("segment_ids"))
        return self.head(self.backbone.to_output_width(hidden), self.backbone.output_weight)[0].argmax(-1)

    def forward(self, batch, totals=None):
        # attn_mask: padded rows only; segment_ids: sentence pairs (mlm+sop, objectives/multitask.py)
        # or languages (tlm); position_ids: tlm's, which restart at the translation (B, T)
        # only the chosen positions' outputs: the last block computes them alone (model.py, outputs_at)
        picked = self.backbone(batch["input_ids"], mask=self.attention_mask(batch), positions=batch.get("position_ids"),
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
