"""Sentence-order prediction (SOP; Lan et al. 2019, "ALBERT"), with BERT's next-sentence
prediction (NSP; Devlin et al. 2018) as an option.

Show the encoder two consecutive runs of sentences A and B of one document, in their order or
swapped, and let it tell which. Both come from the same document, so the topic gives nothing away
(NSP's weakness: a random B is usually off-topic); only coherence does.

Numbers (ALBERT's create_pretraining_data.py and modeling.py):
  * layout [CLS] A [SEP] B [SEP] [PAD]..., segment ids 0 on [CLS] A [SEP], 1 on B [SEP], 0 on pad;
  * swap probability 0.5, drawn per row in make_batch from the step's generator; label 1 =
    swapped (HF AlbertForPreTraining's sentence_order_label), 0 = in order. A swapped row is
    [CLS] B [SEP] A [SEP] with its segment ids recomputed;
  * head: Pooler (dense + tanh on the [CLS] state, model.py), then Linear(C, 2); the loss is the
    cross-entropy summed over rows, divided by the step's row count (base.py);
  * how A and B are chosen (whole sentences, the cut a_end = randint(1, len - 1), longest-first
    truncation) is the data source's: SegmentPairSource in minilm/data/segment_pairs.py.
--sentence_task nsp (BERT): with probability 0.5, B is replaced by the B of another row of the
batch from a different document (cut to fit); label 1 = random B, 0 = the real continuation. A
row with no such partner (every row of the batch from one document: a one-document split, or
--batch_size 1) is no NSP example: label IGNORE, left out of the loss and the metrics, with a
warning the first time. ALBERT's paper shows NSP teaches little beyond topic; it is here to compare.

Shapes: input_ids, segment_ids (B, T); lengths, labels (B,); hidden (B, T, C); pooled (B, C);
logits (B, 2). Metrics: the shared sums (nll, targets = rows, correct): loss, acc and a
perplexity exp(loss), which for two classes lies between 1 and 2. Sentence pairs need segment
embeddings: this objective's `configure` asks for n_segment >= 2.

Where we differ from ALBERT: a single-sentence document is skipped by the data source (counted and
reported when it is built); ALBERT pairs it with text from a random document and labels that
"swapped", although nothing was swapped. NSP's random B comes from the same batch, not from the
whole corpus.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minilm.data import pack_pairs
from minilm.flops import parameters_of, transformer_flops
from minilm.model import Pooler, Transformer, padding_mask
from minilm.losses import step_mean
from minilm.objectives.base import IGNORE, Baseline, Objective
from minilm.options import Options, option

SWAP_PROB = 0.5
TASKS = ("sop", "nsp")
LABEL_NAMES = {"sop": ("in order", "swapped"), "nsp": ("next", "random")}   # label id -> what it says


def partners_from_other_documents(documents: torch.Tensor, generator=None):
    """For each row, a random other row of the batch from another document: (partner (B,),
    has_partner (B,) bool). A row with none gets itself and has_partner False."""
    other = documents[:, None] != documents[None, :]                 # (B, B)
    has_partner = other.any(dim=1)
    eye = torch.eye(len(documents), dtype=torch.bool, device=documents.device)
    weights = torch.where(has_partner[:, None], other, eye).float()
    return torch.multinomial(weights, 1, generator=generator).squeeze(1), has_partner


@dataclass
class SentenceOrderOptions(Options):
    sentence_task: str = option("sop", "the sentence-pair head: sop (ALBERT: order swapped?) or nsp "
                                       "(BERT: B random?)", choices=TASKS)


class SentenceOrder(Objective):
    name = "sop"
    data = "segment_pairs"
    model_kind = "encoder"
    Options = SentenceOrderOptions
    capabilities = frozenset({"embed"})
    baseline = Baseline("the label prior: a coin flip, ln 2", targets="labels", margin=0.01)

    @classmethod
    def trains_first_position(cls, options) -> bool:
        return True   # the pooler and the order head read [CLS]

    @classmethod
    def configure(cls, model_cfg, options):
        # sentence pairs carry segment ids 0 (A) and 1 (B): two segment embeddings (more are allowed)
        return dataclasses.replace(model_cfg, n_segment=max(model_cfg.n_segment, 2))

    def __init__(self, model_cfg, tokenizer=None, options=None):
        super().__init__()
        self.options = options = self.make_options(options)
        self.task = options.sentence_task
        self.backbone = self.build_backbone(model_cfg)
        self.warned_without_negatives = False
        self.pooler = Pooler(model_cfg)
        self.head = nn.Linear(model_cfg.n_embd, 2)
        Transformer._init_weights(self.head)

    def flops_per_token(self) -> float:
        """What a step computes, per input token (for MFU): the encoder at every position but no
        LM head (its output matrix is never used), then the pooler and the two-way head on one
        position per row, shared by the row's seq_len tokens (flops.transformer_flops)."""
        T = self.backbone.cfg.seq_len
        return transformer_flops(self.backbone, T, head=parameters_of(self.pooler) + parameters_of(self.head),
                                 head_share=1 / T)

    def make_batch(self, raw, generator=None):
        """raw: a SegmentPairSource batch (A then B, in order) -> inputs with labels (B,): 0, 1,
        or IGNORE for an NSP row that could not be a negative (the module docstring)."""
        ids, a_len, b_len = raw["input_ids"], raw["a_lengths"], raw["b_lengths"]
        B, T = ids.shape
        flip = torch.rand(B, generator=generator, device=ids.device) < SWAP_PROB   # the label-1 rows
        counted = torch.ones(B, dtype=torch.bool, device=ids.device)               # rows that are examples
        row = torch.arange(B, device=ids.device) * T          # where each row starts in ids.flatten()
        a_start, b_start = row + 1, row + a_len + 2
        if self.task == "sop":                                # [CLS] B [SEP] A [SEP]
            new = pack_pairs(ids.flatten(), b_start, b_len, a_start, a_len, T)
        else:                                                 # [CLS] A [SEP] B' [SEP], B' from another document
            partner, has_partner = partners_from_other_documents(raw["documents"], generator)
            flip &= has_partner
            counted = has_partner
            # the check reads a device value on the host: on a GPU only in evaluation, where a
            # one-document split would otherwise report a meaningless accuracy
            check = not self.warned_without_negatives and (not self.training or ids.device.type == "cpu")
            if check and not bool(has_partner.all()):
                self.warn_without_negatives()
            new = pack_pairs(ids.flatten(), a_start, a_len, b_start[partner],
                             torch.minimum(b_len[partner], T - 3 - a_len), T)
        new_ids, new_segments, new_lengths = new
        return {"input_ids": torch.where(flip[:, None], new_ids, ids),
                "segment_ids": torch.where(flip[:, None], new_segments, raw["segment_ids"]),
                "lengths": torch.where(flip, new_lengths, raw["lengths"]),
                "labels": torch.where(counted, flip.long(), IGNORE),
                "counts": {"targets": counted.sum()}}

    def warn_without_negatives(self) -> None:
        split = "a training" if self.training else "an evaluation"
        warnings.warn(f"--sentence_task nsp: every row of {split} batch comes from one document, so none can "
                      "get a random next segment from another; such rows are left out of the NSP loss and "
                      "accuracy (a split of one document, or --batch_size 1, gives NSP nothing to measure)",
                      stacklevel=3)
        self.warned_without_negatives = True

    def explain(self, batch, tokenizer):
        """Row 0 of make_batch's batch (explain.py): the pieces read; the pair's label as the target
        of [CLS], the one position the pooler and the head read; each position's segment embedding
        (A: segment id 0, B: 1; DASH on padding, which no query attends to) and the padding mask
        forward gives the encoder. Which text came first in the document is in the notes."""
        from minilm.explain import DASH, Explained, pieces
        ids, lengths = batch["input_ids"][0], batch["lengths"][:1]
        T, length, label = len(ids), int(lengths[0]), int(batch["labels"][0])
        reads = pieces(tokenizer, ids)
        target = [DASH] * T
        if label != IGNORE:
            target[0] = LABEL_NAMES[self.task][label]
        segment = ["AB"[s] if t < length else DASH for t, s in enumerate(batch["segment_ids"][0].tolist())]
        keys_seen = padding_mask(lengths, T)[0, 0].expand(T, T)             # (T, T): forward's mask, per query
        notes = [self.label_note(label),
                 f"the pooler (dense + tanh) reads [CLS] and a two-way head predicts the label there; no token "
                 f"is predicted (the label was drawn with probability {SWAP_PROB} from the seed's generator)"]
        if length < T:
            notes.append(f"positions {length}..{T - 1} are padding: hidden as keys from every query")
        return Explained(columns={"reads": reads, "target": target, "segment": segment},
                         masks={"padding (encoder, both ways)": (reads, reads, keys_seen)}, notes=notes)

    def label_note(self, label: int) -> str:
        """One line: what the row's label says about its segments A and B."""
        if label == IGNORE:
            return ("no label: the batch holds no row of another document to take a random B from, so B is the "
                    "real continuation and the row is left out of the NSP loss (NSP needs a batch of several "
                    "documents)")
        said = {("sop", 0): "A then B, as in the document",
                ("sop", 1): "the text read first (segment A) came second in the document, and segment B "
                            "came before it",
                ("nsp", 0): "segment B is the text that follows A in the document",
                ("nsp", 1): "segment B is another document's text, cut to fit, put after A"}
        return f"label {label}, {LABEL_NAMES[self.task][label]}: {said[self.task, label]}"

    def forward(self, batch, totals=None):
        ids = batch["input_ids"]
        hidden = self.backbone(ids, mask=padding_mask(batch["lengths"], ids.shape[1]),
                               segment_ids=batch["segment_ids"])                 # (B, T, C)
        logits = self.head(self.pooler(hidden)).float()                          # (B, 2)
        labels = batch["labels"]
        nll = F.cross_entropy(logits, labels, reduction="sum", ignore_index=IGNORE)
        with torch.no_grad():
            sums = {"nll": nll.detach(), "targets": batch["counts"]["targets"],
                    "correct": (logits.argmax(-1) == labels).sum()}
        return step_mean(nll, batch, totals), sums
