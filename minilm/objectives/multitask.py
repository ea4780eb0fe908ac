"""Several objectives trained together on one backbone: `--objective mlm+sop` (ALBERT's recipe),
or any "a+b+...", with `--objective_weights 1,0.5` (one weight per part; empty = all 1).

The loss is the weighted sum of the parts' losses, each its own summed loss over its own
step-wide count (MLM: masked tokens; SOP: rows), so gradient accumulation stays exact part by
part:  loss = sum_k weight_k * nll_k / total_targets_k.

Each part runs its own forward pass over its own batch. That lets any objectives combine,
whatever inputs and masks they need, at the price of one encoder pass per part; BERT and ALBERT
run a single pass over the masked pair and put both heads on it, which is cheaper but only works
when the parts agree on the input.

One backbone: every part is built as usual, then each part's `backbone` is pointed at the first
part's, which this module registers once as `self.backbone`. In the parts the attribute is a
plain reference, not a registered submodule, so state_dict() holds "backbone.*" once and each
part's heads under "parts.NAME.*", and parameters() lists every weight once (the optimizer
asserts it). The parts' own backbones are built and dropped: a moment of extra memory at start.

Data: the parts must read the same kind of data, with one exception: an objective that reads
"blocks" can read sentence pairs as right-padded windows. It gets make_batch(pairs' input_ids,
generator, lengths=pairs' lengths) (the objectives with reads_padded_rows: CLM, the prefix LM,
the masked LMs and rtd; specials and padding are never masked), plus the pairs' "segment_ids" in
its batch. plm reads full windows only, so plm+sop is refused (check_reads_padded_rows). So in
mlm+sop, MLM and SOP see the same [CLS] A [SEP] B [SEP] rows, each with its own random draw (MLM's
masks, SOP's swaps).
With parallel data (mlm+tlm) the "blocks" part reads the source's `monolingual` rows instead: one
side of a pair per row, with its language id as segment id, drawn apart from the pairs TLM reads
(XLM's MLM on monolingual text beside TLM; data/parallel.py).
The shared backbone is built from a config that every part's `configure` has seen (base.py;
model_config_for in objectives/__init__.py), so mlm+sop and sop+mlm build the same model:
embed_norm for the masked LM, segment embeddings for the pairs.

Metrics: each part's sums and counts are prefixed with its name ("mlm/nll", "sop/targets");
finalize (base.py) reports "mlm/loss", "mlm/acc", "sop/loss", "sop/acc", ..., and "loss", the
weighted sum that is trained; metrics() adds each part's own ("rtd/discriminator/recall").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn as nn

from minilm.errors import UserError
from minilm.objectives.base import Objective, check_model_config, check_one_encoder_decoder
from minilm.options import Options, option


@dataclass
class MultiTaskOptions(Options):
    """The option of a+b itself; each part reads its own (their formats are checked where read)."""
    objective_weights: str = option("", "a+b objectives: one loss weight per part, e.g. 1,0.5; "
                                         "empty: every weight is 1")


def parse_weights(text: str, names: list[str]) -> list[float]:
    """"1,0.5" -> [1.0, 0.5]; "" -> all ones. One-line UserErrors for anything else."""
    if not text.strip():
        return [1.0] * len(names)
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise UserError(f"--objective_weights takes numbers separated by commas, got {text!r}") from None
    if len(weights) != len(names):
        raise UserError(f"--objective_weights has {len(weights)} weight(s) for the {len(names)} objectives of "
                        f"{'+'.join(names)}; give one per objective, e.g. {','.join('1' for _ in names)}")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
        raise UserError(f"--objective_weights must be finite, not negative, and not all 0; got {text!r}")
    return weights


def common_data(classes: list[type[Objective]]) -> str:
    """The one data kind every part can read (see the module docstring)."""
    kinds = {cls.data for cls in classes}
    if len(kinds) == 1:
        return kinds.pop()
    if kinds in ({"blocks", "segment_pairs"}, {"blocks", "parallel"}):   # parallel: one side per row
        return (kinds - {"blocks"}).pop()
    reads = ", ".join(f"{cls.name} reads {cls.data}" for cls in classes)
    raise UserError(f"these objectives cannot train on the same batches ({reads}); combine objectives "
                    "that read the same data")


ROWS_OF = {"segment_pairs": "sentence pairs", "parallel": "translation pairs"}


def check_reads_padded_rows(classes: list[type[Objective]], data: str) -> None:
    """The "blocks" parts of an a+b reading `data` get right-padded rows: each must take them."""
    from minilm.objectives import OBJECTIVES   # the registry, which imports this module
    for cls in classes:
        if data != "blocks" and cls.data == "blocks" and not cls.reads_padded_rows:
            other = next(c.name for c in classes if c.data == data)
            readers = ", ".join(c.name for c in OBJECTIVES.values() if c.data == "blocks" and c.reads_padded_rows)
            raise UserError(f"--objective {'+'.join(c.name for c in classes)}: {cls.name} reads full windows of "
                            f"running text, not the padded rows of {other}'s {ROWS_OF[data]} (padding "
                            f"would become its inputs and targets); combine {other} with {readers}")


def check_parts(classes: list[type[Objective]]) -> None:
    """One-line UserErrors for parts that cannot train together as a+b, found before any data is
    prepared (model_config_for calls it): one named twice, an encoder-decoder with another
    backbone, no data kind they can all read, or a part that cannot read the common data's padded
    rows. Model settings that conflict: model_config_for, as it resolves the parts' model."""
    names = [cls.name for cls in classes]
    if len(set(names)) != len(names):
        raise UserError(f"--objective {'+'.join(names)} names an objective twice; use --objective_weights "
                        "to weigh one more")
    check_one_encoder_decoder(classes)
    check_reads_padded_rows(classes, common_data(classes))


def share_backbone(part: nn.Module, backbone: nn.Module) -> None:
    """part.backbone = backbone as a plain reference, not a submodule of `part`: the MultiTask
    registers it once, so it is saved and optimized once."""
    del part.backbone                                  # the part's own, and its registration
    object.__setattr__(part, "backbone", backbone)     # bypasses nn.Module's registration
    part.backbone_replaced()                           # modules that held pieces of its own follow


class MultiTask(Objective):
    Options = MultiTaskOptions

    def __init__(self, classes: list[type[Objective]], model_cfg, tokenizer=None, options=None):
        """options: the run's objective section (config.ObjectiveConfig), or None for the defaults:
        objective_weights for a+b, and each part's own Options, made from it."""
        super().__init__()
        names = [cls.name for cls in classes]
        check_parts(classes)
        self.name = "+".join(names)
        self.data = common_data(classes)
        self.weights = parse_weights(self.make_options(options).objective_weights, names)
        check_model_config(classes, model_cfg, options)
        parts = [cls(model_cfg, tokenizer, cls.make_options(options)) for cls in classes]
        self.model_kind = parts[0].model_kind
        self.backbone = parts[0].backbone
        for part in parts:
            share_backbone(part, self.backbone)
        self.parts = nn.ModuleDict(zip(names, parts))

    @property
    def capabilities(self) -> frozenset[str]:
        """What its parts serve, together (minilm.api asks the part that serves a verb: part_serving)."""
        return frozenset().union(*(part.capabilities for part in self.parts.values()))

    def metrics(self, sums: dict) -> dict:
        """Each part's own metrics (Objective.metrics) from its own sums, prefixed with its name."""
        out = {}
        for name, part in self.parts.items():
            own = {k[len(name) + 1:]: v for k, v in sums.items() if k.startswith(name + "/")}
            out.update({f"{name}/{k}": v for k, v in part.metrics(own).items()})
        return out

    def flops_per_token(self) -> float:
        """Each part runs its own pass over the batch: their FLOPs add up."""
        return sum(part.flops_per_token() for part in self.parts.values())

    def baseline_sums(self, batch, sums):
        """Each part's baseline sums (base.py, Baseline) from its own batch, prefixed with its name."""
        out = {}
        for name, part in self.parts.items():
            own = {k[len(name) + 1:]: v for k, v in sums.items() if k.startswith(name + "/")}
            out.update({f"{name}/{k}": v for k, v in part.baseline_sums(batch[name], own).items()})
        return out

    def predict(self, input_ids, attn_mask=None, segment_ids=None):
        """The masked-LM part's dense logits (B, T, V), for fill-mask (sample.py)."""
        for part in self.parts.values():
            if "fill" in part.capabilities:
                return part.predict(input_ids, attn_mask=attn_mask, segment_ids=segment_ids)
        raise TypeError(f"{self.name} has no masked-LM part to predict with")

    def make_batch(self, raw, generator=None):
        batch = {"counts": {}}
        for name, part in self.parts.items():
            if part.data == self.data:
                part_batch = part.make_batch(raw, generator)
            else:  # a "blocks" objective reading sentence pairs as right-padded windows
                rows = raw.get("monolingual", raw)   # parallel data: one side per row (data/parallel.py)
                part_batch = part.make_batch(rows["input_ids"], generator, lengths=rows["lengths"])
                part_batch["segment_ids"] = rows["segment_ids"]
            batch[name] = part_batch
            batch["counts"].update({f"{name}/{k}": v for k, v in part_batch["counts"].items()})
        return batch

    def explain(self, batch, tokenizer):
        """The parts' explanations side by side (explain.py), each from its own part of the batch:
        every column titled "NAME/title" ("mlm/reads", "sop/segment"; no bare "reads": each part
        reads its own row), a shorter part's columns padded with "" to the longest, every mask
        titled "NAME: title" and every note prefixed "NAME: ". The parts draw from the one
        generator in turn (mlm's masks, then sop's swap), as in training."""
        from minilm.explain import Explained
        parts = {name: part.explain(batch[name], tokenizer) for name, part in self.parts.items()}
        rows = max(len(values) for explained in parts.values() for values in explained.columns.values())
        columns = {f"{name}/{title}": values + [""] * (rows - len(values))
                   for name, explained in parts.items() for title, values in explained.columns.items()}
        decoders = {f"{name}/{title}": values for name, explained in parts.items()
                    for title, values in (explained.decoder or {}).items()}
        masks = {f"{name}: {title}": mask for name, explained in parts.items()
                 for title, mask in explained.masks.items()}
        weights = " + ".join(f"{weight:g} * {name}" for name, weight in zip(self.parts, self.weights))
        notes = [f"one backbone, one pass per part over its own batch; the loss is {weights}"]
        notes += [f"{name}: {note}" for name, explained in parts.items() for note in explained.notes]
        return Explained(columns=columns, decoder=decoders or None, masks=masks, notes=notes)

    def forward(self, batch, totals=None):
        loss, sums = 0.0, {}
        for (name, part), weight in zip(self.parts.items(), self.weights):
            # each part normalizes by its own step-wide counts
            part_totals = None if totals is None else {
                k[len(name) + 1:]: v for k, v in totals.items() if k.startswith(name + "/")}
            part_loss, part_sums = part(batch[name], part_totals)
            loss = loss + weight * part_loss
            sums.update({f"{name}/{k}": v for k, v in part_sums.items()})
            if "nll" in part_sums:
                sums[f"{name}/weighted_nll"] = weight * part_sums["nll"]
        return loss, sums
