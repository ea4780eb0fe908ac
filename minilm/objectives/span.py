"""Span masking (SpanBERT, Joshi et al. 2020; facebookresearch/SpanBERT, PairWithSpanMaskingScheme).

Mask contiguous spans of whole words rather than scattered tokens, so the model must reconstruct a
phrase from what surrounds it, which helps span-level tasks (question answering, coreference).

Numbers (SpanBERT's recipe):
  * budget: exactly ceil(mask_prob x n) tokens per row (--mask_prob 0.15, n = eligible tokens);
  * span length in words ~ Geometric(--span_geometric_p 0.2) clipped to --span_min_words 1 ..
    --span_max_words 10 and renormalized: P = 0.2241, 0.1792, 0.1434, ..., 0.0301, mean 3.797
    words;
  * a span starts at the start of the word holding a uniformly random not-yet-masked token and
    covers whole words; spans are added until the budget is met, the last one cut to fit;
    overlapping (or touching) spans merge (masking.span_choice);
  * the 80/10/10 choice is made once per merged span (SpanBERT's --replacement-method span): a
    span is all <mask>, all random tokens or all unchanged (masking.replace with span_ids).

Shapes and loss: as MaskedLM (mlm.py); only the choice of positions and the per-span draw differ.

Where we differ from SpanBERT:
  * no span boundary objective (SBO: predicting span tokens from the two boundary tokens and a
    position embedding) and no 512-token single-segment inputs: this file is the masking scheme
    alone, trained with the plain MLM loss;
  * random replacements are uniform over non-special ids, not drawn from the corpus' token
    distribution;
  * a span never crosses a document boundary (<eos>) or padding.
"""
from __future__ import annotations

from minilm import masking
from minilm.objectives.mlm import MaskedLM


class SpanMaskedLM(MaskedLM):
    name = "span"

    def choose(self, ids, eligible, generator):
        o = self.options
        chosen = masking.span_choice(self.word_starts(ids), eligible, o.mask_prob, generator,
                                     o.span_geometric_p, o.span_min_words, o.span_max_words)
        return chosen, masking.span_ids(chosen)
