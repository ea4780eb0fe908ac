"""Whole-word masking (google-research/bert's whole-word-masking release, May 2019; HF's
DataCollatorForWholeWordMask).

The idea: predicting one piece of a word from its other pieces is often easy ("un ##believ
##able"), so choose whole words and hide all of their pieces together; the model must then use
the context, not the rest of the word.

Numbers: a budget of max(1, round(mask_prob * n)) tokens per row (mask_prob 0.15; n = eligible
tokens, and a row with none gets 0), as BERT's create_pretraining_data.
Words are tried in a random order and a word is taken whole when it fits in what is left of
the budget; a word that would overshoot it is skipped, never cut, so a row gets at most the
budget, and in practice exactly it (short words fill the gaps). Then the usual 80/10/10, per
token, as BERT's create_pretraining_data and HF do.

Words come from the tokenizer's word-start flags (a sentencepiece piece starting with "▁", the
first piece after a newline, after a document boundary or at the start of a window), never
from BERT's "##" convention, so it works for any sentencepiece vocabulary (HF's collator only
worked with WordPiece: transformers #11768, #9866). A window that starts mid-word treats the
partial word as a word.

Shapes and loss: as MaskedLM (mlm.py); only the choice of positions differs
(masking.whole_word_choice).
"""
from __future__ import annotations

from minilm import masking
from minilm.objectives.mlm import MaskedLM


class WholeWordMaskedLM(MaskedLM):
    name = "wwm"

    def choose(self, ids, eligible, generator):
        chosen = masking.whole_word_choice(self.word_starts(ids), eligible, self.options.mask_prob, generator)
        return chosen, None
