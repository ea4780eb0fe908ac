"""Translation language modeling (TLM; Lample & Conneau 2019, "Cross-lingual Language Model
Pretraining", XLM).

Masked LM over a sentence and its translation side by side. A word hidden in one language can be
recovered from its own sentence or from the translation, so the encoder learns to attend across
languages and to align them (tests/test_tlm.py checks that the translation helps).

Numbers (XLM's train.py defaults, which are BERT's): --mask_prob 0.15 of the real tokens of both
sides, each chosen independently (a masked word may have its translation masked too, or not); the
four <eos> and the padding are never chosen; 80/10/10 <mask> / random / unchanged (XLM's
word_mask_keep_rand "0.8,0.1,0.1" lists mask, keep, random). Everything after the batch is
MaskedLM's (mlm.py): dynamic masking, the sparse head, the loss over the step's chosen tokens.

Input: the "parallel" source (data/parallel.py), one pair per row of a .tsv, .csv or .jsonl:
    tokens     <eos> source <eos> <eos> target <eos> <pad>...   XLM's </s> x1 </s> </s> x2 </s>
    positions  0 1 .. a+1 | 0 1 .. b+1                           restart where the target begins
    languages  0 ........ | 1 ........                           one id per token
XLM's language embedding (an (n_langs, C) table indexed per token, added to the token and position
embeddings) is model.py's segment table: `configure` asks for n_segment >= 2, and the batch's
segment_ids are the language ids.

Shapes: input_ids, segment_ids, position_ids (B, T); lengths (B,); attn_mask (B, 1, 1, T);
positions (N,) flat indices b*T + t of the chosen tokens, targets (N,) -> logits (N, V).

Where we differ from XLM: RoPE by default (XLM learns absolute positions: --position learned), so
the restart puts a word and the word at its place in the translation at distance 0; one direction,
--text_field first (XLM trains each direction of its --mlm_steps); a pair longer than the context
is cut on both sides in proportion (XLM drops it); random replacements uniform over the
non-special ids (XLM: the whole vocabulary); no frequency-smoothed targets (--sample_alpha) and no
rounding of the target count to a multiple of 8 under fp16. In mlm+tlm the masked LM part reads one
side of a pair per row (`monolingual` in data/parallel.py), where XLM reads 256-token streams.
"""
from __future__ import annotations

import dataclasses

from minilm.objectives.mlm import MaskedLM


class TranslationLM(MaskedLM):
    name = "tlm"
    data = "parallel"

    @classmethod
    def configure(cls, model_cfg, options):
        # the masked LM's encoder, and a language id per token (0 source, 1 target) read through the
        # segment embeddings (XLM's language embeddings): two of them at least
        model_cfg = super().configure(model_cfg, options)
        return dataclasses.replace(model_cfg, n_segment=max(model_cfg.n_segment, 2))

    def make_batch(self, raw, generator=None):
        """raw: a ParallelSource batch -> MaskedLM's inputs (masking over both halves, padding and
        <eos> excluded) with the languages as segment_ids and the restarting position_ids."""
        batch = super().make_batch(raw["input_ids"], generator, lengths=raw["lengths"])
        batch["segment_ids"] = raw["segment_ids"]
        batch["position_ids"] = raw["position_ids"]
        return batch

    def explain(self, batch, tokenizer):
        """MaskedLM's explanation (both halves masked alike) with the row's language ids (the
        segment ids the encoder adds) and its positions, which restart at the translation."""
        explained = super().explain(batch, tokenizer)
        languages, positions = batch["segment_ids"][0].tolist(), batch["position_ids"][0].tolist()
        explained.columns["language"] = [("source", "target")[language] for language in languages]
        explained.columns["position"] = [str(p) for p in positions]
        restart = next((t for t in range(1, len(positions)) if positions[t] < positions[t - 1]), None)
        if restart is not None:
            explained.notes.append(f"positions restart at 0 where the translation begins (position {restart})")
        return explained
