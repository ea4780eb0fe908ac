"""Contrastive sentence embeddings (SimCSE; Gao, Yao and Chen 2021, "SimCSE: Simple Contrastive
Learning of Sentence Embeddings"), unsupervised ("simcse") and supervised ("simcse_sup").

The idea: an encoder maps each sentence to one vector; a sentence's vector should be nearer to
its positive than to the other sentences of the batch, measured by InfoNCE over cosine
similarities. Unsupervised, the positive is *the sentence itself*, read a second time: each
sentence appears twice in one forward pass, and dropout, which draws an independent mask for
every row, makes the two copies differ slightly. That noise is the only augmentation, so this
objective declares dropout 0.1 as its default (see "Dropout" below). Supervised, the positive is
a second text of the row (an entailed hypothesis, a paraphrase), with an optional hard negative
(a contradiction) as one more column of candidates.

    simcse      "sentences" data (minilm/data/sentences.py): single sentences of running text
    simcse_sup  "pairs" data (minilm/data/pairs.py): rows (anchor, positive[, hard negative]) of a
                .tsv / .csv / .jsonl table: --text_field anchor, --pair_field positive,
                --negative_field hard negative (optional)
A second objective name rather than a flag, because the name fixes the data an objective reads
(Objective.data), and train.py prepares that data before any objective is built.

The loss (SimCSE's simcse/models.py, cl_forward). For B rows with queries z1 (the first view)
and keys z2 (the second view), over the global batch of N keys (all ranks, see DDP below):
    logits[i, j] = cos(z1_i, z2_j) / temperature            (B, N), temperature 0.05
    supervised with hard negatives z3: (B, 2N), the columns cos(z1_i, z3_j) / temperature
        appended, + hard_negative_weight on each row's own negative (SimCSE's hard_negative_weight,
        default 0, a logit offset, so "weight" is exp(it)); a row without a negative masks its column
    loss = sum_i cross_entropy(logits[i], i's own key) / rows in the step
The negatives are the other rows' second views (N - 1 of them, not 2N - 1: the authors saw no
difference, SimCSE issue #11).

Pooling (--simcse_pooling):
    first  the [CLS] position's hidden state, then an MLP (Linear C -> C, tanh) in training only:
           the embedding (embed(), the metrics) is the hidden state before the MLP. SimCSE's
           unsupervised recipe ("cls" with --mlp_only_train); its supervised one keeps the MLP at
           test time, here both variants drop it, so an embedding means the same for both
    mean   the mean of the hidden states over the real tokens (SimCSE's "avg"); no MLP
Both ignore padding: the encoder's padding mask hides pad keys and mean pooling skips pad positions.

Dropout. The noise must come from dropout, so "simcse" and "simcse_sup" default to --dropout 0.1
(BERT's, which SimCSE relies on): base.py's `model_defaults`, applied by train.py to a fresh run
(and an --init_from run) when --dropout is not on the command line; an explicit --dropout wins,
and the value is printed and saved with the config, like any other. With --dropout 0 the two views
are the same vector and the unsupervised loss only pushes sentences apart.

DDP. The keys (and hard negatives) are gathered across ranks with minilm.distributed.
gather_with_gradient, so the negatives come from the global batch; each rank takes its own rows as
queries, whose labels start at its offset in the gathered keys. The gather's backward gives each
rank's keys the gradient of every rank's queries, so the trainer's usual scaling (loss x
world_size, DDP's average) yields exactly the gradient of one process over the whole global batch
(tests/test_distributed.py). (SimCSE's reference instead computes the whole global loss on every
rank and puts only its own grad-carrying slice back, so its averaged gradient is 1/world_size of
that.) Evaluation gathers nothing: each rank scores its own batches.

Gradient accumulation cannot reproduce one big batch for a contrastive loss: a row's negatives
are only the rows of its own micro-batch (on every rank), since the other micro-batches' keys
are computed in other forward passes. What holds, and is tested: each micro-batch's loss is the
InfoNCE of that micro-batch (its summed row losses over the step's total rows, base.py's
contract), and the accumulated gradient is the sum of those micro-batch gradients, i.e. the
gradient of the mean over the step's rows of per-micro-batch InfoNCE. To get more negatives, raise
--batch_size (or add ranks), not --grad_accum.

Evaluation (each eval, additive sums for finalize, base.py), on the embeddings embed() returns,
L2-normalized (Wang and Isola 2020, "Understanding Contrastive Representation Learning through
Alignment and Uniformity on the Hypersphere", alpha = 2, t = 2):
    align            mean over positive pairs (x, y) of ||f(x) - f(y)||^2 (lower: positives closer)
                     = align_sum / align_count
    uniform          log of the mean over pairs of distinct rows i < j of one batch of
                     exp(-2 ||f(x_i) - f(x_j)||^2) (lower: spread over the sphere)
                     = log(uniform_sum / uniform_count); within-batch pairs estimate the expectation
    retrieval_acc    share of positive pairs (x, y) whose x has y as its nearest neighbour (cosine)
                     among the batch's second texts = retrieval_correct / retrieval_count;
                     retrieval_chance = 1 / (candidates) averaged the same way, what guessing gets
    loss, acc        the InfoNCE of the batch and how often a query's nearest key is its own, as
                     in training but with dropout off
What a positive pair is: simcse_sup, a row's (anchor, positive). simcse has no labelled pairs, and
with dropout off its two views are one vector; its pairs are (sentence, a neighbouring sentence
of the same document) from the validation text (data/sentences.py), a sentence without one is
left out. Neighbouring sentences share topic and entities, so these numbers say whether nearby
text lands nearby; they are not STS scores.

Shapes: input_ids (B, V, T) with V = 2 views (3 with hard negatives), lengths (B, V); hidden
(V*B, T, C) in one pass, view-major; pooled (V*B, C); logits (B, N or 2N).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minilm.distributed import gather_with_gradient
from minilm.errors import UserError
from minilm.flops import parameters_of, transformer_flops
from minilm.model import Transformer, padding_mask
from minilm.losses import step_mean
from minilm.objectives.base import Baseline, Objective
from minilm.pooling import pool

POOLINGS = ("first", "mean")


def info_nce_logits(queries, keys, temperature: float, negatives=None, negative_valid=None,
                    hard_negative_weight: float = 0.0, gather: bool = False):
    """(logits (B, N or 2N) float32, labels (B,)) of InfoNCE: query i's positive is key
    offset + i, where offset is where this rank's rows start among the gathered keys (0 without
    gathering). queries, keys, negatives (B, C); negative_valid (B,) bool: rows with a negative."""
    with torch.autocast(queries.device.type, enabled=False):       # cosines / 0.05 need fp32
        q = F.normalize(queries.float(), dim=-1)
        k, offset = F.normalize(keys.float(), dim=-1), 0
        if gather:
            k, offset = gather_with_gradient(k)                     # (N, C)
        labels = offset + torch.arange(q.shape[0], device=q.device)
        logits = q @ k.T / temperature                              # (B, N)
        if negatives is not None:
            n = F.normalize(negatives.float(), dim=-1)
            valid = negative_valid.float()
            if gather:
                n, _ = gather_with_gradient(n)
                valid, _ = gather_with_gradient(valid)
            own = torch.arange(n.shape[0], device=q.device)[None, :] == labels[:, None]     # (B, N)
            negative_logits = q @ n.T / temperature + hard_negative_weight * own
            negative_logits = negative_logits.masked_fill(valid[None, :] == 0, float("-inf"))
            logits = torch.cat([logits, negative_logits], dim=1)   # (B, 2N)
    return logits, labels


def embedding_sums(first, second, valid) -> dict:
    """Alignment, uniformity and retrieval sums (module docstring) over positive pairs
    (first_i, second_i) where valid_i: first, second (B, C) embeddings, valid (B,) bool."""
    a, b = F.normalize(first.float(), dim=-1), F.normalize(second.float(), dim=-1)
    B = a.shape[0]
    valid_f = valid.float()
    squared = (2 - 2 * a @ a.T).clamp(min=0)                       # ||a_i - a_j||^2 of unit vectors
    upper = torch.triu(torch.ones(B, B, dtype=torch.bool, device=a.device), diagonal=1)
    similarity = (a @ b.T).masked_fill(~valid[None, :], float("-inf"))   # candidates: valid seconds
    nearest = similarity.argmax(dim=1)
    own = torch.arange(B, device=a.device)
    return {"align_sum": (((a - b) ** 2).sum(dim=-1) * valid_f).sum(), "align_count": valid_f.sum(),
            "uniform_sum": torch.exp(-2 * squared[upper]).sum(), "uniform_count": upper.sum().float(),
            "retrieval_correct": ((nearest == own) & valid).sum().float(), "retrieval_count": valid_f.sum(),
            "retrieval_chance_sum": (valid_f.sum() > 0).float()}   # per pair 1/n, n pairs per batch


class SimCSE(Objective):
    name = "simcse"
    data = "sentences"
    model_kind = "encoder"
    embeds_sentences = True          # has embed(input_ids, lengths): minilm/api.py uses its pooling
    model_defaults = {"dropout": 0.1}
    shortest_seq_len = (3, "frames each text as [CLS] text [SEP]")   # window_length checks it
    baseline = Baseline("a uniform guess among the batch's candidates, ln(candidates)", margin=0.05)

    @classmethod
    def trains_first_position(cls, options) -> bool:
        return getattr(options, "simcse_pooling", "first") == "first"   # [CLS] is the sentence vector

    def __init__(self, model_cfg, tokenizer=None, options=None):
        super().__init__()
        self.pooling = getattr(options, "simcse_pooling", "first")
        if self.pooling not in POOLINGS:
            raise UserError(f"--simcse_pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        self.temperature = getattr(options, "simcse_temperature", 0.05)
        self.hard_negative_weight = getattr(options, "simcse_hard_negative_weight", 0.0)
        self.backbone = self.build_backbone(model_cfg)
        # SimCSE's MLPLayer over [CLS], in training only; mean pooling has none (as SimCSE's "avg")
        self.mlp = nn.Sequential(nn.Linear(model_cfg.n_embd, model_cfg.n_embd), nn.Tanh()) \
            if self.pooling == "first" else None
        if self.mlp is not None:
            Transformer._init_weights(self.mlp[0])

    def flops_per_token(self) -> float:
        """Per input token (seq_len per row, what the trainer's tokens/s counts): every row runs
        through the encoder twice (its two views), with no LM head, and the MLP twice on one
        position per row. simcse_sup counts the same two passes (anchor, positive); a hard
        negative is a third pass the trainer's MFU does not see (it is fixed before any batch).
        The (B, N) similarity matrix, 6 N C per row, is left out: N C << 12 L C^2 T."""
        T = self.backbone.cfg.seq_len
        return 2 * transformer_flops(self.backbone, T, head=parameters_of(self.mlp), head_share=1 / T)

    # ---------------------------------------------------------------- embeddings
    def embed(self, input_ids, lengths):
        """input_ids (N, T) framed `[CLS] text [SEP]` and right-padded, lengths (N,) -> (N, C): the
        pooled hidden state, before the training-only MLP (what embed() and the metrics use)."""
        hidden = self.backbone(input_ids, mask=padding_mask(lengths, input_ids.shape[1]))   # (N, T, C)
        return pool(hidden, lengths, self.pooling)

    def baseline_sums(self, batch, sums):
        """ln(candidates) per row (base.py, Baseline): the InfoNCE loss of embeddings that tell no
        text apart. In evaluation a row's candidates are the batch's keys and valid hard negatives."""
        rows, views = batch["input_ids"].shape[:2]
        candidates = rows + (int(batch["has_negative"].sum()) if views == 3 and "has_negative" in batch else 0)
        return {"baseline_nll": torch.tensor(rows * math.log(candidates))}

    def positive_pairs(self, batch, pooled, B):
        """(first (B, C), second (B, C), valid (B,)) for the evaluation metrics: the sentence and
        its neighbour (encoded after the views, rows V*B..), valid where it has one."""
        return pooled[:B], pooled[-B:], batch["has_neighbour"]

    # ---------------------------------------------------------------- batches
    def make_batch(self, raw, generator=None):
        """A SentenceSource batch -> each sentence twice, (B, 2, T): dropout makes the views
        differ. In evaluation the neighbours come along for the metrics."""
        ids, lengths = raw["input_ids"], raw["lengths"]
        batch = {"input_ids": torch.stack([ids, ids], dim=1), "lengths": torch.stack([lengths, lengths], dim=1),
                 "counts": {"targets": torch.tensor(ids.shape[0], device=ids.device)}}
        if not self.training:
            batch.update(extra_ids=raw["neighbour_ids"], extra_lengths=raw["neighbour_lengths"],
                         has_neighbour=raw["has_neighbour"])
        return batch

    def forward(self, batch, totals=None):
        ids, lengths = batch["input_ids"], batch["lengths"]                  # (B, V, T), (B, V)
        B, V, T = ids.shape
        flat_ids = ids.transpose(0, 1).reshape(V * B, T)                    # view-major: row v*B + b
        flat_lengths = lengths.transpose(0, 1).reshape(V * B)
        if "extra_ids" in batch:                                            # evaluation's second texts
            flat_ids = torch.cat([flat_ids, batch["extra_ids"]])
            flat_lengths = torch.cat([flat_lengths, batch["extra_lengths"]])
        pooled = self.embed(flat_ids, flat_lengths)                         # one pass: (V*B [+ B], C)
        z = (self.mlp(pooled) if self.mlp is not None else pooled)[:V * B].view(V, B, -1)
        logits, labels = info_nce_logits(z[0], z[1], self.temperature,
                                         negatives=z[2] if V == 3 else None,
                                         negative_valid=batch.get("has_negative"),
                                         hard_negative_weight=self.hard_negative_weight, gather=self.training)
        nll = F.cross_entropy(logits, labels, reduction="sum")
        with torch.no_grad():
            sums = {"nll": nll.detach(), "targets": batch["counts"]["targets"],
                    "correct": (logits.argmax(dim=1) == labels).sum()}
            if not self.training:
                sums.update(embedding_sums(*self.positive_pairs(batch, pooled, B)))
        return step_mean(nll, batch, totals), sums


class SupervisedSimCSE(SimCSE):
    """SimCSE from (anchor, positive[, hard negative]) rows; see the module docstring."""

    name = "simcse_sup"
    data = "pairs"

    def make_batch(self, raw, generator=None):
        """A PairSource batch is already (B, V, T): anchor, positive[, hard negative]."""
        batch = {"input_ids": raw["input_ids"], "lengths": raw["lengths"],
                 "counts": {"targets": torch.tensor(raw["input_ids"].shape[0], device=raw["input_ids"].device)}}
        if "has_negative" in raw:
            batch["has_negative"] = raw["has_negative"]
        return batch

    def positive_pairs(self, batch, pooled, B):
        """(anchors, positives, all valid): the rows' own pairs, held out in the validation split."""
        return pooled[:B], pooled[B:2 * B], torch.ones(B, dtype=torch.bool, device=pooled.device)
