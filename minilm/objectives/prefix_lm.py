"""Prefix language modeling (T5's "prefix LM", Raffel et al. 2020 sec. 3.2; UL2's S-denoiser, Tay
et al. 2022): a decoder-only model reads a prefix in both directions and predicts the rest left to
right.

Each window is split at a random point: the tokens before it are read as an encoder reads them
(every prefix token sees every other), the tokens after it are written as a decoder writes them
(each sees the whole prefix and the tokens before itself). One Transformer does both, by its
attention mask alone (model.prefix_mask); the loss covers the tokens after the prefix only.

Numbers:
  * split law: T5's `random_prefix_noise_mask`, which UL2's S-denoiser reuses through T5's
    `prefix_lm` preprocessor: a row of L real raw tokens gets a prefix length P uniform on
    {1, ..., L-1}, independently per row, from the step's generator. Without padding L = T+1, so
    P is uniform on {1, ..., T} and every row keeps at least one target;
  * targets: inputs raw[:, :-1], labels raw[:, 1:] (clm.causal_labels: padding by length,
    --predict_after_eos). Position t predicts raw[t+1]; labels count at t >= P-1 (the position
    that reads the last prefix token predicts the first target, as T5's decoder predicts
    targets[0] after reading the inputs), and are IGNORE before, where the target is itself a
    prefix token that position t attends to. A row has L-P targets, T5's target length for the
    same split; the loss is summed over the step's target count (base.py).

Shapes: raw (B, T+1) -> input_ids (B, T), labels (B, T), prefix_lengths (B,); the attention mask
(B, 1, T, T) bool is built in forward from prefix_lengths. The LM head runs at the target
positions alone (about half of them).

Where we differ from T5 and UL2:
  * this is T5's decoder-only "prefix LM" architecture (its Figures 3 and 4, sec. 3.2.1); T5's
    `prefix_lm` preprocessor is written for an encoder-decoder (inputs to the encoder, targets to
    the decoder); here the two halves stay one sequence in one stack;
  * no <eos> is appended to the prefix or the targets and no mode token (UL2's "[S2S]") is
    prepended: the window is the raw token stream, cut without regard to documents (as clm's),
    where T5 and UL2 take one document's chunk per example.
"""
from __future__ import annotations

import torch

from minilm.flops import lm_head_matmul_weights, transformer_flops
from minilm.model import prefix_mask
from minilm.objectives.base import IGNORE
from minilm.objectives.clm import CausalLM, causal_labels


def draw_prefix_lengths(real_lengths: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """P (B,) uniform on {1, ..., L-1} per row, L = real_lengths (B,) raw tokens (T5's law; see
    the module docstring). A row with L < 2 has no target either way and gets P = 1.

    floor(u * (L-1)) + 1 with u uniform in [0, 1) in float64: each of the L-1 values has
    probability 1/(L-1) up to float64 rounding (about 1e-16 relative), one draw per row."""
    u = torch.rand(real_lengths.shape, generator=generator, device=real_lengths.device, dtype=torch.float64)
    choices = (real_lengths - 1).clamp(min=1)
    return (u * choices).floor().long() + 1


class PrefixLM(CausalLM):
    """A causal LM (same backbone, labels, options) whose batches carry a prefix that attends
    both ways and whose loss skips the prefix's targets."""
    name = "prefix_lm"
    data = "blocks"
    model_kind = "prefix_decoder"
    capabilities = frozenset({"generate"})   # not score: its log p would depend on where a prefix ends
    prompt_is_prefix = True                  # generate reads the prompt in both directions, as the prefix
    defaults = {}   # not clm's speedrun defaults: measured on the causal LM only

    def make_batch(self, raw, generator=None, lengths=None):
        """raw (B, T+1) -> input_ids, labels (B, T), prefix_lengths (B,), counts. lengths (B,):
        real raw tokens per row (right padding), T+1 for every row when None."""
        B, T = raw.shape[0], raw.shape[1] - 1
        input_ids, labels = causal_labels(raw, lengths, self.predict_after_eos)
        real_lengths = torch.full((B,), T + 1, device=raw.device) if lengths is None else lengths.to(raw.device)
        prefix_lengths = draw_prefix_lengths(real_lengths, generator)
        # position t predicts raw[t+1]; only targets after the prefix (t + 1 >= P) count
        inside_prefix = torch.arange(T, device=raw.device)[None, :] + 1 < prefix_lengths[:, None]
        labels[inside_prefix] = IGNORE
        return {"input_ids": input_ids, "labels": labels, "prefix_lengths": prefix_lengths,
                "counts": {"targets": (labels != IGNORE).sum()}}

    def attention_mask(self, batch) -> torch.Tensor:
        """(B, 1, T, T) bool, True = may attend: the prefix both ways, causal after it
        (model.prefix_mask); forward and explain both take it from here."""
        return prefix_mask(batch["prefix_lengths"], batch["input_ids"].shape[1])

    def explain(self, batch, tokenizer):
        """The causal LM's rows plus "prefix/target" per position (the prefix is read both ways,
        the rest written left to right) and the prefix mask forward hands the model."""
        from minilm.explain import Explained, pieces, targets
        ids, P = batch["input_ids"][0], int(batch["prefix_lengths"][0])
        labels = pieces(tokenizer, ids)
        part = ["prefix" if t < P else "target" for t in range(len(labels))]
        return Explained(
            columns={"reads": labels, "target": targets(tokenizer, batch["labels"][0], IGNORE), "prefix/target": part},
            masks={"prefix LM self-attention": (labels, labels, self.attention_mask(batch)[0, 0])},
            notes=[f"a prefix of {P} tokens (drawn uniformly from 1 to the row's raw tokens - 1) sees itself both "
                   "ways; the position that reads its last token predicts the first target"])

    @torch.no_grad()
    def predictions(self, batch):
        """The next token the model finds likeliest at each position of row 0, the prefix read both
        ways as in forward: (T,)."""
        hidden = self.backbone(batch["input_ids"][:1], mask=self.attention_mask(batch)[:1])
        return self.backbone.logits(hidden)[0].argmax(-1)

    def forward(self, batch, totals=None):
        input_ids, labels = batch["input_ids"], batch["labels"]
        mask = self.attention_mask(batch)
        hidden = self.backbone(input_ids, mask=mask)                  # (B, T, C)
        real = labels != IGNORE                                       # (B, T)
        targets = labels[real]                                        # (N,)
        logits = self.backbone.logits(hidden[real])                   # (N, V): the head at targets only
        return self.token_loss(logits, targets, batch, totals)

    def flops_per_token(self) -> float:
        """The generic count (flops.transformer_flops), with the LM head at the share of positions
        that are targets: (T+1)/2 of T on average under the split law (E[L-P] with P uniform on
        1..T, L = T+1)."""
        T = self.backbone.cfg.seq_len
        return transformer_flops(self.backbone, T, head=lm_head_matmul_weights(self.backbone),
                                 head_share=(T + 1) / (2 * T))
