"""A toy objective written outside the library, in this one file: random-token detection.

Replace a share of the tokens by random ones and train an encoder to tell, at every position,
whether the token there was replaced: ELECTRA's discriminator with a uniform sampler in place of
its generator (Clark et al. 2020 report that such easy replacements teach less; this file is the
proof of the objective contract, not a recipe).

Numbers: each non-special token is chosen with probability --toy_replace_prob 0.15 and replaced
by a token drawn uniformly from the non-special ids (a draw equal to the original stays
"original"); loss = binary cross-entropy summed over every position / the step's position count.
It needs the masked LMs' embedding norm (configure) and trains at lr 1e-3 unless told
otherwise (defaults). Shapes: raw (B, T+1) from "blocks" (the first T used) -> input_ids and
replaced (B, T); hidden (B, T, C) -> logits (B, T).

tests/test_toy_objective.py registers it (minilm.objectives.register) and trains, resumes and
loads it through train.py and minilm.load, with no library file edited.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minilm.objectives.base import Baseline, Objective
from minilm.options import Options, option
from minilm.tokenizer import NUM_SPECIAL


@dataclass
class RandomTokenDetectionOptions(Options):
    toy_replace_prob: float = option(0.15, "random_detect: the share of tokens replaced by a random token",
                                     within="(0, 1)")


class RandomTokenDetection(Objective):
    name = "random_detect"
    data = "blocks"
    Options = RandomTokenDetectionOptions
    model_kind = "encoder"
    capabilities = frozenset({"embed"})          # minilm.load(...).embed: the mean of its final states
    defaults = {"lr": 1e-3}
    baseline = Baseline("every token called original")   # the detector's positives give it (base.py)

    @classmethod
    def configure(cls, model_cfg, options):
        return dataclasses.replace(model_cfg, embed_norm=True)

    def __init__(self, model_cfg, tokenizer=None, options=None):
        super().__init__()
        self.options = self.make_options(options)
        self.backbone = self.build_backbone(model_cfg)
        self.head = nn.Linear(model_cfg.n_embd, 1)   # C -> 1: the logit of "replaced"

    def make_batch(self, raw, generator=None):
        ids = raw[:, :-1]                                                              # (B, T)
        chosen = torch.rand(ids.shape, generator=generator, device=ids.device) < self.options.toy_replace_prob
        chosen &= ids >= NUM_SPECIAL
        random_ids = torch.randint(NUM_SPECIAL, self.backbone.cfg.vocab_size, ids.shape, generator=generator,
                                   device=ids.device)
        input_ids = torch.where(chosen, random_ids, ids)
        return {"input_ids": input_ids, "replaced": input_ids != ids,
                "counts": {"targets": torch.tensor(ids.numel(), device=ids.device)}}

    def forward(self, batch, totals=None):
        hidden = self.backbone(batch["input_ids"], mask=None)                          # (B, T, C), both ways
        logits = self.head(hidden).squeeze(-1).float()                                 # (B, T)
        labels = batch["replaced"].float()
        nll = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
        sums = {"nll": nll.detach(), "targets": torch.tensor(labels.numel()), "positives": labels.sum()}
        if not self.training:
            sums["correct"] = ((logits > 0) == batch["replaced"]).sum()
        return nll / (totals or batch["counts"])["targets"].clamp(min=1), sums
