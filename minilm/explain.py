"""See what an objective does to a sentence: its input, its targets and every attention mask.

The explanation is the training batch: the sentence becomes one row of the data the objective
reads, the objective's own make_batch turns it into a batch with the seed's generator, and the
objective's `explain` (in its own file) says what that batch means, position by position, with the
masks built by the same functions its forward calls. Nothing here re-implements a masking rule.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

DASH = "\u2013"   # "nothing predicted here"


@dataclass
class Explained:
    """What one row of an objective's batch means (Objective.explain).

    columns  column title -> one string per input position, in order: always "reads" (the piece
             the model reads there) and "target" (DASH where nothing is predicted), then the
             objective's own columns
    decoder  encoder-decoders: "reads" and "target" per decoder position; None otherwise
    masks    title -> (query labels, key labels, (Q, K) bool tensor, True = may attend): every
             attention mask the model receives for the row, from the functions forward uses
    notes    one-line facts worth looking at"""
    columns: dict[str, list[str]]
    decoder: dict[str, list[str]] | None = None
    masks: dict[str, tuple[list[str], list[str], torch.Tensor]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def pieces(tokenizer, ids) -> list[str]:
    """Token ids (a 1-D tensor or list) -> their pieces, specials by name (<mask>, <eos>, ...)."""
    return [tokenizer.id_to_piece(int(i)) for i in (ids.tolist() if torch.is_tensor(ids) else ids)]


def targets(tokenizer, labels, ignore: int) -> list[str]:
    """A row of labels (IGNORE where nothing is predicted) -> pieces, DASH at the ignored."""
    return [DASH if int(i) == ignore else tokenizer.id_to_piece(int(i)) for i in labels.tolist()]
