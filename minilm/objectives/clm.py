"""Causal language modeling (GPT: Radford et al. 2018, 2019; nanoGPT's train.py).

A decoder reads tokens 0..t and predicts token t+1, for every t at once; a causal attention mask
keeps position t from seeing the future. The loss is the cross-entropy over every target
position, nothing masked out but padding.

Numbers: none to tune. A raw window of T+1 tokens gives input_ids = raw[:, :-1] and labels =
raw[:, 1:] (nanoGPT's get_batch); the loss is summed and divided by the step's target count
(base.py). --predict_after_eos (true) keeps the target that follows a document's <eos>.

Shapes: raw (B, T+1) from the "blocks" source -> input_ids (B, T), labels (B, T) (IGNORE where
there is no target); lengths (B,) for right-padded rows; hidden (B, T, C) -> logits (B, T, V).

Labels are masked by *position*, never by token id: in padded rows the labels at positions
>= length-1 become IGNORE, and <eos> stays an ordinary target, so the model learns to stop.
(Setting labels[labels == pad_id] = -100 when pad == eos removes every end-of-text target:
transformers issue #23530.)

Its defaults (`defaults`, where the flags leave them out; issue 21's speedrun, benchmarks/README.md):
Muon on the blocks' matrices (--optimizer muon, minilm/muon.py), a warmup-stable-decay schedule
(--schedule wsd: the peak lr until the last 20% of the steps, then linear to --min_lr) and QK-norm
(--qk_norm, model.py's Attention): each reached the old defaults' (AdamW, cosine, no QK-norm) final
validation loss in fewer steps, and together in well under two thirds of them (the table and its
command: benchmarks/README.md, "Speedrun"). nanoGPT trains with AdamW and a cosine schedule:
`--optimizer adamw --schedule cosine --qk_norm false` is that recipe. A model with QK-norm exports
as transformers' Qwen3 (`--arch qwen3`); `--arch llama` or `--arch gpt2` turn it off, and an
--init_from parent keeps its own model.

Where we differ from the references: nothing in the objective itself. Windows are cut from the
token stream without regard to documents, as nanoGPT and GPT-2 cut them, so a window may read
"...end of doc A <eos> start of doc B" and attention crosses that boundary (no per-document mask).
The target after <eos> (doc B's first token, predicted from doc A) is kept, as nanoGPT keeps it;
--predict_after_eos false ignores it, since no context can predict it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minilm.objectives.base import IGNORE, Baseline, HFHead, Objective
from minilm.options import Options, option
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


@dataclass
class CausalLMOptions(Options):
    predict_after_eos: bool = option(True, "clm: predict a document's first token from the end of the "
                                           "one before; false ignores those targets (<eos> itself is "
                                           "always a target)")


class CausalLM(Objective):
    name = "clm"
    data = "blocks"
    Options = CausalLMOptions   # prefix_lm's too
    model_kind = "decoder"
    capabilities = frozenset({"generate", "score"})   # score: log p(token | the tokens before it)
    token_score = "log p"
    reads_padded_rows = True   # prefix_lm too
    baseline = Baseline("each next token predicted by its unigram frequency", targets="labels", margin=0.05)
    defaults = {"optimizer": "muon", "schedule": "wsd", "qk_norm": True}   # the speedrun's measured gains
    # transformers' causal LMs: the backbone's logits are the whole head; an untied output matrix is
    # their lm_head (a tied one is not stored: config.json's tie_word_embeddings says so)
    hf_heads = {arch: HFHead(architecture, {"backbone.lm_head.weight": "lm_head.weight"}, ("backbone.lm_head.weight",))
                for arch, architecture in (("llama", "LlamaForCausalLM"), ("qwen3", "Qwen3ForCausalLM"),
                                           ("gpt2", "GPT2LMHeadModel"))}

    def __init__(self, model_cfg, tokenizer=None, options=None):
        super().__init__()
        self.options = options = self.make_options(options)
        self.backbone = self.build_backbone(model_cfg)
        self.keep_bytes_per_token(tokenizer, model_cfg.vocab_size)     # for bits per byte
        self.predict_after_eos = options.predict_after_eos

    def make_batch(self, raw, generator=None, lengths=None):
        input_ids, labels = causal_labels(raw, lengths, self.predict_after_eos)
        return {"input_ids": input_ids, "labels": labels,
                "counts": {"targets": (labels != IGNORE).sum()}}

    def explain(self, batch, tokenizer):
        """The default rows (each position reads a piece and predicts the next one, under the causal
        mask forward's backbone applies), and what the labels leave out."""
        explained = super().explain(batch, tokenizer)
        ignored = int((batch["labels"][0] == IGNORE).sum())
        explained.notes.append("position t reads piece t and predicts piece t+1: the target column is the reads "
                               "column shifted up by one")
        if ignored:
            explained.notes.append(f"{ignored} position(s) predict nothing (padding, or the first token after <eos> "
                                   "with --predict_after_eos false)")
        return explained

    @torch.no_grad()
    def token_scores(self, input_ids):
        """score(): (B, T) framed after <eos> -> (B, T - 1), log p(token | the tokens before it),
        in nats, for every token after the first."""
        log_probs = self.backbone.logits(self.backbone(input_ids)[:, :-1]).float().log_softmax(dim=-1)  # (B, T-1, V)
        return log_probs.gather(2, input_ids[:, 1:, None]).squeeze(2)

    @torch.no_grad()
    def predictions(self, batch):
        """The next token the model finds likeliest at each position of row 0: (T,)."""
        return self.backbone.logits(self.backbone(batch["input_ids"][:1]))[0].argmax(-1)

    def forward(self, batch, totals=None):
        hidden = self.backbone(batch["input_ids"])      # (B, T, C)
        logits = self.backbone.logits(hidden)                         # (B, T, V), bf16 under autocast
        return self.token_loss(logits.flatten(0, 1), batch["labels"].flatten(), batch, totals)
