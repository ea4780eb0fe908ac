"""Translation language modeling (TLM; Lample & Conneau 2019, "Cross-lingual Language Model
Pretraining", XLM).

The idea: masked LM over a sentence and its translation side by side. A word hidden in one
language can be recovered from its own sentence or from the translation, so the encoder learns to
attend across languages and to align their representations (what makes XLM transfer from one
language to another). With the translation present the model predicts hidden words better than
from one side alone: tests/test_tlm.py measures exactly that on a synthetic language pair.

Input (data/parallel.py, "parallel" data; one pair per row of a .tsv/.csv/.jsonl):
    <eos> source <eos> <eos> target <eos> <pad>...      XLM's </s> x1 </s> </s> x2 </s>
    positions  0 1 .. a+1 | 0 1 .. b+1                    restart where the target half begins
    languages  0 ........ | 1 ........                    a learned embedding per language
Numbers (XLM's train.py defaults, the same as BERT's; ObjectiveConfig, shared with mlm):
  * word_pred 0.15: each real token of either side is chosen independently (Bernoulli), so
    masking reaches both languages at the same rate, jointly: a masked word may have its
    translation masked too, or not;
  * word_mask_keep_rand 0.8,0.1,0.1: a chosen token is shown as <mask>, unchanged, or as a random
    token (minilm/masking.py `replace`); the loss predicts the original in all three cases;
  * the four <eos> and the padding are never chosen (special ids, and positions past the row's
    length), so never predicted; the padding is hidden from attention by a padding mask.
Everything after the batch is MaskedLM's (objectives/mlm.py): dynamic masking per step, the sparse
head on the chosen positions only, the loss summed over the step's chosen tokens.

Language embeddings are the segment embeddings. XLM adds lang_embeddings(langs), an (n_langs, C)
table indexed per token, to the token and position embeddings; the segment table (model.py,
n_segment) is the same thing: a learned (n, C) table indexed per token and added there. A pair's
two segments are its two languages, so one table serves, and the model needs no keyword or
config field of its own for it: parallel data declares n_segment >= 2 (objectives/base.py,
DATA_MODEL_MINIMUMS), the saved config says so, and the batch's `segment_ids` are the language
ids. Language k is named by the reserved tag <lang_k> (tokenizer.LANG_IDS).

Shapes: input_ids, segment_ids (languages), position_ids (B, T); lengths (B,); attn_mask
(B, 1, 1, T); positions (N,) flat indices b*T + t of the chosen tokens, targets (N,); the backbone's
output at them (N, C) -> logits (N, V).

Where we differ from XLM:
  * minilm's Transformer (pre-norm; RoPE by default, where XLM learns absolute positions, which
    --position learned gives): with rotary positions the restart means a word and the word at the
    same place in the translation are at distance 0, which helps alignment as XLM's shared
    absolute positions do;
  * the direction is fixed, --text_field first; XLM trains each direction its --mlm_steps list
    (e.g. "en-fr,fr-en");
  * a pair longer than the context is cut on both sides in proportion; XLM drops such sentences
    (--max_len) before training;
  * random replacements are uniform over the non-special ids (XLM: over the whole vocabulary);
    no frequency-smoothed choice of targets (XLM's --sample_alpha, 0 by default) and no rounding
    of the target count to a multiple of 8 under fp16;
  * `--objective mlm+tlm` (XLM's MLM + TLM): the masked LM part reads one side of a pair per row
    from the same prepared data (data/parallel.py, `monolingual`), where XLM reads 256-token streams
    of monolingual text, so its rows hold much padding.
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
