"""The contract every objective follows, and the metric arithmetic they share.

    objective = SomeObjective(model_cfg, tokenizer, options)   # an nn.Module: backbone + heads;
                                                               # options: the run's ObjectiveConfig
    batch = objective.make_batch(raw, generator)   # raw token ids -> tensors, on raw's device
    loss, sums = objective(batch, totals)           # scalar loss to backward, detached metric sums

Losses are *sums* divided by step-wide totals. A training step may consist of several
micro-batches (gradient accumulation, and later several ranks), and objectives such as MLM
predict a different number of tokens in each. The right loss for the step is
    sum over all micro-batches of the summed token losses / total targets in the step,
so `make_batch` reports its counts in `batch["counts"]`, the trainer adds them up over the step
and hands the totals back to every micro-batch's forward. Backpropagating each micro-batch's
share then gives exactly the gradient of one big batch. Without totals (evaluation, a single
batch) an objective divides by its own counts.

Metric sums use shared names so they aggregate by plain addition over batches:
    nll      summed negative log-likelihood of the targets, in nats
    targets  number of predicted tokens
    correct  predicted tokens whose argmax was right
    bytes    UTF-8 bytes the targets stand for (for bits per byte)
`finalize` turns such sums into loss, perplexity, accuracy and bits per byte. Combined
objectives ("mlm+sop", multitask.py) prefix each part's sums with its name ("mlm/nll",
"sop/correct"), and finalize gives each prefix its own metrics ("mlm/loss", "sop/acc").
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from minilm.flops import flops_per_token
from minilm.losses import IGNORE  # noqa: F401  (re-exported: objectives import it from here)


class Objective(nn.Module):
    name: str = ""
    data: str = "blocks"          # the data source it reads (see minilm/data.py)
    model_kind: str = "decoder"   # what sample.py can do with its backbone
    fills_masks: bool = False     # has a masked-LM head: `predict(input_ids)` gives (B, T, V) logits

    backbone: nn.Module

    def make_batch(self, raw: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        raise NotImplementedError

    def forward(self, batch: dict, totals: dict | None = None):
        raise NotImplementedError

    def flops_per_token(self) -> float:
        """Training FLOPs per input token, the numerator of the trainer's MFU: nanoGPT's
        6N + 12 L H D T (minilm/flops.py) for the backbone and its tied LM head. Objectives that
        compute less (the masked LMs' sparse head and last layer) override it."""
        cfg = self.backbone.cfg
        return flops_per_token(self.backbone.num_params(non_embedding=True), cfg.n_layer, cfg.n_head,
                               cfg.head_dim, cfg.seq_len)


def backbone_config(model_cfg, data: str):
    """The backbone's config for an objective that reads `data`: sentence pairs come with segment
    ids, so there n_segment 0 becomes 2 (A and B); other data keeps the config as it is."""
    if data == "segment_pairs" and model_cfg.n_segment < 2:
        return dataclasses.replace(model_cfg, n_segment=2)
    return model_cfg


def finalize(sums: dict) -> dict:
    """Metric sums -> readable metrics. Keys absent from `sums` are skipped.

    Keys "NAME/x" are a part of a combined objective: each NAME gets its own "NAME/loss",
    "NAME/ppl", "NAME/acc", "NAME/bpb" from its own sums, and "loss" is the combined loss that
    was trained, the sum over parts of weight * part loss, from the parts' "weighted_nll" sums
    (nll times the part's weight: still additive over batches, unlike a ratio).
    """
    parts: dict[str, dict] = {}
    for k, v in sums.items():
        prefix, _, name = k.rpartition("/")
        parts.setdefault(prefix, {})[name] = v
    out = {}
    weighted = [float(p["weighted_nll"]) / float(p["targets"]) for prefix, p in parts.items()
                if prefix and "weighted_nll" in p and float(p.get("targets", 0)) > 0]
    if weighted and "" not in parts:
        out["loss"] = sum(weighted)
    for prefix, part in parts.items():
        label = prefix + "/" if prefix else ""
        out.update({label + k: v for k, v in _finalize_one(part).items()})
    return out


def _finalize_one(sums: dict) -> dict:
    out = {}
    n = float(sums.get("targets", 0))
    if n > 0 and "nll" in sums:
        loss = float(sums["nll"]) / n
        out["loss"] = loss
        out["ppl"] = math.exp(min(loss, 50.0))
        if "correct" in sums:
            out["acc"] = float(sums["correct"]) / n
        if float(sums.get("bytes", 0)) > 0:
            out["bpb"] = float(sums["nll"]) / math.log(2) / float(sums["bytes"])
    for k, v in sums.items():  # objective-specific extras, already final ("sop_acc", ...)
        if k not in ("nll", "targets", "correct", "bytes", "weighted_nll"):
            out[k] = float(v)
    return out
