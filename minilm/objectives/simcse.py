"""Contrastive sentence embeddings (SimCSE; Gao, Yao and Chen 2021), unsupervised ("simcse") and
supervised ("simcse_sup").

An encoder maps each text to one vector, which should lie nearer to its positive than to the other
texts of the batch (InfoNCE over cosine similarities). Unsupervised, the positive is the sentence
itself read a second time in the same pass, made different by dropout alone; supervised, it is a
second text of the row (an entailment, a paraphrase), with an optional hard negative.

    simcse      "sentences" data (data/sentences.py): single sentences of running text
    simcse_sup  "pairs" data (data/pairs.py): table rows (anchor, positive[, hard negative]) from
                --text_field, --pair_field, --negative_field (two names: each fixes its data)

Numbers (SimCSE's simcse/models.py, cl_forward): for B queries z1 (first views) and the N keys z2
(second views, gathered from every rank):
    logits[i, j] = cos(z1_i, z2_j) / --simcse_temperature 0.05               (B, N)
    hard negatives z3 add N columns cos(z1_i, z3_j) / 0.05, and --simcse_hard_negative_weight
    (0; a logit offset) on a row's own negative; a row without one masks its column
    loss = sum_i cross_entropy(logits[i], i's own key) / the step's row count
The negatives are the other rows' second views (N - 1 of them, not 2N - 1: SimCSE issue #11).
--simcse_pooling first: the [CLS] state, then an MLP (Linear C->C, tanh) in training only; mean:
the mean over real tokens (SimCSE's "avg"), no MLP. An embedding (embed(), --embed, the metrics) is
the pooled state before the MLP. Dropout defaults to 0.1 for these objectives (`defaults`; an
explicit --dropout wins): with --dropout 0 the two views coincide.

Gradients. Under DDP the keys are gathered with gradient (distributed.gather_with_gradient), so
the trainer's usual scaling gives exactly the gradient of one process over the global batch.
Gradient accumulation cannot: a row's negatives are its own micro-batch's, so the gradient is that
of the mean over the step's rows of per-micro-batch InfoNCE; for more negatives raise --batch_size.

Evaluation, on L2-normalized embeddings (Wang and Isola 2020, alpha = 2, t = 2), with dropout off:
align (mean ||f(x) - f(y)||^2 over positive pairs), uniform (log of the mean over a batch's distinct
pairs of exp(-2 ||f(x_i) - f(x_j)||^2)), retrieval_acc (how often x's nearest second text is its
y) beside retrieval_chance, loss and acc. A positive pair is a row's (anchor, positive) for
simcse_sup and, for simcse, a sentence and a neighbouring sentence of the same document (so these
numbers say whether nearby text lands nearby; they are not STS scores).

Shapes: input_ids (B, V, T) with V = 2 views (3 with hard negatives), lengths (B, V); hidden
(V*B, T, C) in one pass, view-major; pooled (V*B, C); logits (B, N) or (B, 2N).

Where we differ from SimCSE: its supervised recipe keeps the MLP at test time, here both variants
drop it, so an embedding means the same for both; its DDP loss is the whole global loss on every
rank with only the local slice carrying gradient, which averages to 1/world_size of ours.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minilm.distributed import gather_with_gradient
from minilm.flops import parameters_of, transformer_flops
from minilm.model import Transformer, padding_mask
from minilm.losses import step_mean
from minilm.objectives.base import Baseline, Objective
from minilm.options import Options, option
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


def embedding_metrics(sums: dict) -> dict:
    """embedding_sums, added over batches and ranks -> align, uniform, retrieval_acc and
    retrieval_chance: the ratios and the log are taken here, once."""
    out = {}
    if float(sums.get("align_count", 0)) > 0:
        out["align"] = float(sums["align_sum"]) / float(sums["align_count"])
    if float(sums.get("uniform_count", 0)) > 0 and float(sums["uniform_sum"]) > 0:
        out["uniform"] = math.log(float(sums["uniform_sum"]) / float(sums["uniform_count"]))
    if float(sums.get("retrieval_count", 0)) > 0:
        out["retrieval_acc"] = float(sums["retrieval_correct"]) / float(sums["retrieval_count"])
        out["retrieval_chance"] = float(sums["retrieval_chance_sum"]) / float(sums["retrieval_count"])
    return out


@dataclass
class SimCSEOptions(Options):
    simcse_pooling: str = option("first", "simcse: the sentence vector: first ([CLS], with an MLP in training "
                                          "only) or mean (over the real tokens)", choices=POOLINGS)
    simcse_temperature: float = option(0.05, "simcse: InfoNCE logits are cosine similarities / this", above=0)
    simcse_hard_negative_weight: float = option(0.0, "simcse_sup: added to each row's logit of its own hard "
                                                     "negative (SimCSE's hard_negative_weight)")


class SimCSE(Objective):
    name = "simcse"
    data = "sentences"
    model_kind = "encoder"
    capabilities = frozenset({"embed"})
    embeds_sentences = True          # has embed(input_ids, lengths): minilm/api.py uses its pooling
    Options = SimCSEOptions          # simcse_sup's too
    # dropout is unsupervised SimCSE's only noise: BERT's 0.1 unless --dropout is given
    defaults = {"dropout": 0.1}
    shortest_seq_len = (3, "frames each text as [CLS] text [SEP]")   # window_length checks it
    # What this baseline can catch is a collapse (every text one vector), not a run that learned
    # nothing else: in evaluation dropout is off, the two views are one text, and any encoder whose
    # vectors differ at all, random weights included, scores far under ln(candidates). Neither the
    # neighbour's retrieval nor the neighbours' distance against random pairs' tells random weights
    # from a short run either (benchmarks/README.md, issue 23), so no better trivial baseline is known.
    baseline = Baseline("a uniform guess among the batch's candidates, ln(candidates)", margin=0.05)
    views = ("view 1", "view 2")     # what a row's texts are, in make_batch's order (explain)
    # A classifier on this encoder (classify.py) fine-tunes at 3e-3 where --lr is not given, as on
    # t5's: on the man-page task (benchmarks/README.md, issue 23) each of 3 seeds gains 4-12 points
    # over classify's 1e-3 for pretrained backbones, which leaves the training rows unfitted (loss
    # 0.4). Trained from random weights, the contrastive loss alone is solved within a few hundred
    # steps without learning much of the language, and fine-tuning must move the features far.
    # simcse_sup inherits it, unmeasured.
    finetune_lr = 3e-3

    @classmethod
    def trains_first_position(cls, options) -> bool:
        return getattr(options, "simcse_pooling", "first") == "first"   # [CLS] is the sentence vector

    def __init__(self, model_cfg, tokenizer=None, options=None):
        super().__init__()
        self.options = options = self.make_options(options)
        self.pooling = options.simcse_pooling
        self.temperature = options.simcse_temperature
        self.hard_negative_weight = options.simcse_hard_negative_weight
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

    def metrics(self, sums: dict) -> dict:
        """Alignment, uniformity and retrieval of the evaluation's positive pairs (module docstring)."""
        return embedding_metrics(sums)

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

    # ---------------------------------------------------------------- explanation
    def explain(self, batch, tokenizer):
        """Row 0 of make_batch's batch (explain.py): view 1's pieces, then each other view's (the
        same ids for simcse; the positive and hard negative for simcse_sup); which positions the
        sentence vector pools (found by applying pool() itself to one-hot states) with the view its
        vector must find among the batch's as their target; and one padding mask per view, as
        embed() builds them for the encoder's one pass over every view."""
        from minilm.explain import DASH, Explained, pieces
        ids, lengths = batch["input_ids"][0], batch["lengths"][0]              # (V, T), (V,)
        V, T = ids.shape
        reads = [pieces(tokenizer, view) for view in ids]
        pooled = pool(torch.eye(T, device=ids.device)[None], lengths[:1], self.pooling)[0] > 0   # (T,)
        columns = {"reads": reads[0], "target": [f"its {self.views[1]}" if p else DASH for p in pooled.tolist()],
                   "pooled": [self.pooling if p else DASH for p in pooled.tolist()]}
        columns.update({f"{self.views[v]} reads": reads[v] for v in range(1, V)})
        masks = {f"padding, {self.views[v]}": (reads[v], reads[v], padding_mask(lengths[v:v + 1], T)[0, 0].expand(T, T))
                 for v in range(V)}
        vector = ("the [CLS] state, then an MLP (Linear, tanh) in training only" if self.pooling == "first"
                  else f"the mean over its {int(lengths[0])} real tokens")
        notes = self.view_notes(batch) + [
            f"sentence vector ({self.pooling} pooling): {vector}",
            f"InfoNCE: the {self.views[0]} vector must be nearer (cosine / {self.temperature:g}) to its "
            f"{self.views[1]}'s than to the batch's other rows' (a one-row batch has none)"]
        return Explained(columns=columns, masks=masks, notes=notes)

    def view_notes(self, batch) -> list[str]:
        """What makes the row's views differ, in a line or two."""
        p = self.backbone.cfg.dropout
        if p == 0:
            return ["both views read the same ids and, with --dropout 0, are one vector: InfoNCE has nothing to "
                    "learn (SimCSE's dropout is 0.1)"]
        return [f"both views read the same ids: dropout (p = {p:g}) on each pass makes their two vectors differ, "
                "the only noise unsupervised SimCSE has"]

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
    views = ("anchor", "positive", "hard negative")

    def view_notes(self, batch) -> list[str]:
        p = self.backbone.cfg.dropout
        notes = ["anchor and positive are two texts of one table row (an entailment, a paraphrase)"
                 + (f"; dropout (p = {p:g}) also applies to each pass" if p else "")]
        if batch["input_ids"].shape[1] == 3:
            if bool(batch["has_negative"][0]):
                notes.append(f"the hard negative is one more candidate the anchor must rank below its positive "
                             f"(its logit offset {self.hard_negative_weight:g})")
            else:
                notes.append("this row has no hard negative ([CLS] [SEP] alone): its candidate is masked out")
        return notes

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
