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

from dataclasses import dataclass

from minilm import masking
from minilm.errors import UserError
from minilm.objectives.mlm import MaskedLM, MaskedLMOptions
from minilm.options import option


@dataclass
class SpanMaskedLMOptions(MaskedLMOptions):
    """The masked LM's options, and the law of the span lengths."""
    span_geometric_p: float = option(0.2, "span: span length in words ~ Geometric(p), clipped to "
                                          "span_min_words..span_max_words and renormalized",
                                     within="(0, 1]")
    span_min_words: int = option(1, "span: the shortest span, in words", at_least=1)
    span_max_words: int = option(10, "span: the longest span, in words", at_least=1)

    def validate(self) -> None:
        super().validate()
        if self.span_min_words > self.span_max_words:
            raise UserError(f"span lengths need 1 <= --span_min_words <= --span_max_words, got "
                            f"{self.span_min_words} and {self.span_max_words}")


class SpanMaskedLM(MaskedLM):
    name = "span"
    Options = SpanMaskedLMOptions

    def choose(self, ids, eligible, generator):
        o = self.options
        chosen = masking.span_choice(self.word_starts(ids), eligible, o.mask_prob, generator,
                                     o.span_geometric_p, o.span_min_words, o.span_max_words)
        return chosen, masking.span_ids(chosen)

    def chosen_units(self, original, chosen, eligible):
        # the merged spans (maximal runs of chosen tokens), the groups make_batch's replacement drew
        # one choice for; in one row a run's flat id is its first position
        return "span", masking.span_ids(chosen[None])[0]
