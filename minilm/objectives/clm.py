"""Causal language modeling (GPT; Radford et al. 2018/2019): predict every next token.

The idea: a decoder reads tokens 0..t and predicts token t+1, for every t at once, with a causal
attention mask so position t never sees the future. The loss is the mean cross-entropy over all
target positions; nothing is masked out except padding.

Numbers: none to tune. A raw window of T+1 tokens gives inputs raw[:, :-1] and labels raw[:, 1:]
(nanoGPT's get_batch). Shapes: input_ids (B, T), labels (B, T), logits (B, T, V).

Labels are masked by *position*, never by token id. Batches that carry padding give
`lengths` (B,), the number of real tokens per row; labels at positions >= length-1 become
IGNORE. Document-end tokens (<eos>) are ordinary targets, so the model learns to stop. The trap
this avoids: setting labels[labels == pad_id] = -100 when pad == eos silently removes every
end-of-text target (transformers issue #23530).

Document boundaries: windows are cut from the token stream without regard to documents
(nanoGPT, GPT-2), so a window may read "...end of doc A <eos> start of doc B". By default the
target after <eos> (doc B's first token, predicted from doc A) is kept, as nanoGPT does; with
--predict_after_eos false it is ignored, since no context can predict it. Attention still
crosses the boundary either way (no per-document mask).
"""
from __future__ import annotations

import torch

from minilm.objectives.base import IGNORE, Baseline, Objective
from minilm.tokenizer import EOS_ID


def causal_labels(raw: torch.Tensor, lengths: torch.Tensor | None = None, predict_after_eos: bool = True):
    """raw (B, T+1) -> input_ids (B, T), labels (B, T); labels[t] = raw[t+1] where real."""
    input_ids, labels = raw[:, :-1], raw[:, 1:].clone()
    if lengths is not None:
        # target t is real when token t+1 is real: t + 1 < length
        positions = torch.arange(labels.shape[1], device=raw.device)
        labels[positions[None, :] + 1 >= lengths[:, None]] = IGNORE
    if not predict_after_eos:
        # the position that *reads* <eos> would predict the next document's first token
        labels[input_ids == EOS_ID] = IGNORE
    return input_ids, labels


class CausalLM(Objective):
    name = "clm"
    data = "blocks"
    model_kind = "decoder"
    capabilities = frozenset({"generate", "score"})   # score: log p(token | the tokens before it)
    token_score = "log p"
    reads_padded_rows = True   # prefix_lm too
    baseline = Baseline("each next token predicted by its unigram frequency", targets="labels", margin=0.05)

    def __init__(self, model_cfg, tokenizer=None, options=None):
        super().__init__()
        self.backbone = self.build_backbone(model_cfg)
        self.keep_bytes_per_token(tokenizer, model_cfg.vocab_size)     # for bits per byte
        self.predict_after_eos = getattr(options, "predict_after_eos", True)

    def make_batch(self, raw, generator=None, lengths=None):
        input_ids, labels = causal_labels(raw, lengths, self.predict_after_eos)
        return {"input_ids": input_ids, "labels": labels,
                "counts": {"targets": (labels != IGNORE).sum()}}

    @torch.no_grad()
    def token_scores(self, input_ids):
        """score(): (B, T) framed after <eos> -> (B, T - 1), log p(token | the tokens before it),
        in nats, for every token after the first."""
        log_probs = self.backbone.logits(self.backbone(input_ids)[:, :-1]).float().log_softmax(dim=-1)  # (B, T-1, V)
        return log_probs.gather(2, input_ids[:, 1:, None]).squeeze(2)

    def forward(self, batch, totals=None):
        hidden = self.backbone(batch["input_ids"])      # (B, T, C)
        logits = self.backbone.logits(hidden)                         # (B, T, V), bf16 under autocast
        return self.token_loss(logits.flatten(0, 1), batch["labels"].flatten(), batch, totals)
