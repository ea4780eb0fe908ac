"""Whole-word masking (google-research/bert's whole-word-masking release, 2019; HF's
DataCollatorForWholeWordMask).

Predicting one piece of a word from its other pieces is often easy ("un ##believ ##able"), so
choose whole words and hide all their pieces together: the model must use the context instead.

Numbers:
  * budget: max(1, round(mask_prob x n)) tokens per row (--mask_prob 0.15, n = eligible tokens; a
    row with none gets 0), as BERT's create_pretraining_data;
  * words are tried in a random order, and a word is taken whole when it fits in what is left of
    the budget; a word that would overshoot is skipped, never cut, so a row gets at most the
    budget, in practice exactly it (short words fill the gaps; masking.whole_word_choice);
  * then the usual 80/10/10 per token, as BERT's create_pretraining_data and HF do.

Words come from the tokenizer's word-start flags: a piece starting with "▁", the first piece after
a newline, after a document boundary or at the start of a window. A window that starts mid-word
treats the partial word as a word.

Shapes and loss: as MaskedLM (mlm.py); only the choice of positions differs.

Where we differ from the references: word starts come from sentencepiece's "▁", never from BERT's
"##" convention, so any sentencepiece vocabulary works (HF's collator needs WordPiece:
transformers #11768, #9866); random replacements are uniform over the non-special ids.
"""
from __future__ import annotations

import torch

from minilm import masking
from minilm.objectives.mlm import MaskedLM


class WholeWordMaskedLM(MaskedLM):
    name = "wwm"

    def choose(self, ids, eligible, generator):
        chosen = masking.whole_word_choice(self.word_starts(ids), eligible, self.options.mask_prob, generator)
        return chosen, None

    def chosen_units(self, original, chosen, eligible):
        # the words of masking.whole_word_choice: runs of eligible tokens from one word start on
        starts = masking.word_starts_within(self.word_starts(original[None]), eligible[None])
        return "word", torch.where(chosen, masking.start_of_word(starts)[0], -1)
