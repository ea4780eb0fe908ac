"""Fine-tuning a classifier on labelled text (BERT's sequence classification: Devlin et al. 2019,
section 4.1; GPT's last-token head: Radford et al. 2018, section 3.3).

Pretraining has taught a backbone what text means, so a classification head on top of it needs few
labelled rows. The head reads one vector per text and maps it to a score per label; the backbone is
fine-tuned with it, or frozen (--freeze_backbone: a linear probe of what pretraining put there).

The network and its numbers:
  * backbone: any minilm Transformer, from --init_from (any pretraining checkpoint: rtd's
    discriminator and t5's encoder stack are mapped onto it) or from scratch. It reads the row
    both ways (mask = the padding mask) or causally, --classifier_attention; auto takes the
    parent's way (causal after clm; bidirectional after the masked and denoising objectives and
    prefix_lm, whose prefix is read both ways), bidirectional from scratch. No LM head runs.
  * pooling (minilm/pooling.py), --pooling: first (the [CLS] position, BERT's), mean (over the real
    tokens: better for a probe of a masked LM, which never learned to summarize into [CLS]) or last
    (the last real token, [SEP]: the one position of a causal decoder that has seen the whole
    row). auto = last for a causal backbone; first after objectives whose loss reads [CLS] (sop,
    simcse: their trains_first_position); mean after the others, and from scratch.
  * from scratch, the model an encoder parent's classifier would be (mean pooling and the masked
    LMs' embedding norm: scratch_model_config), so comparing with scratch compares weights alone;
    an explicit --pooling or --embed_norm wins.
  * head: dropout (--dropout, BERT's hidden_dropout_prob), then Linear(C, n_labels), weights
    normal(0, 0.02), bias 0, as BERT's classifier; its own peak learning rate --head_lr (0 = --lr).
    --layer_lr_decay d (ELECTRA's layer-wise decay, off at 1): lower layers at lower lrs (layer_depths).
    --classifier_head pooler puts BERT's pooler (tanh(dense)) before it (RoBERTa's classifier.dense
    is the same computation); score drops its bias (GPT-2's and Llama's `score`): the heads that
    transformers' *ForSequenceClassification compute, so such a classifier exports (hf_format.py).
  * labels: the names come from the data (sorted; minilm/data/rows.py) and are saved in the config
    (--labels, a JSON list), so n_labels and what each id means survive save and load.
  * loss: cross-entropy summed over the rows, divided by the step's row count (base.py).
  * learning rate, where --lr is not given: 1e-3 on a pretrained backbone (FINETUNE_LR) or the
    parent objective's own (Objective.finetune_lr: t5's and simcse's 3e-3), 3e-4 from random weights
    (SCRATCH_LR), decaying to a tenth: what the man-page task measured best for each.

Evaluation visits every validation row once (padding rows, row_valid False, count nowhere) and adds
up, besides nll, targets (rows) and correct, a confusion matrix (rows = true label, columns =
predicted), additive over batches and ranks; from it accuracy and macro-F1 (the unweighted mean of
the per-label F1 = 2 tp / (2 tp + fp + fn) over the labels that occur in truth or predictions).
The checkpoint with the best macro-F1 is also kept as best.pt.

Shapes: input_ids (B, T) [CLS] text [SEP] [PAD]..., lengths, labels, row_valid (B,); the batch is
cut to its longest row; hidden (B, T', C); pooled (B, C); logits (B, n_labels); confusion
(n_labels, n_labels).

Where we differ from BERT and GPT: by default the pooled vector feeds the head directly (BERT's
pooler dense + tanh only with --classifier_head pooler; GPT adds the LM loss as an auxiliary, which
this does not).
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minilm.errors import UserError
from minilm.flops import transformer_flops
from minilm.losses import step_mean
from minilm.model import CAUSAL, Transformer, causal_mask, padding_mask
from minilm.objectives.base import IGNORE, Baseline, HFHead, Objective
from minilm.options import Options, option
from minilm.pooling import pool

# the parent objectives' model_kind -> how a classifier on their backbone reads (auto)
ATTENTION_OF_KIND = {"decoder": "causal", "prefix_decoder": "bidirectional", "encoder": "bidirectional",
                     "seq2seq": "bidirectional", "classifier": None}


@dataclass
class ClassifierOptions(Options):
    pooling: str = option("auto", "classify: the one vector per text the head reads: first ([CLS]), mean (over "
                                  "the real tokens) or last (the last real token, for causal decoders); auto = "
                                  "last for a causal backbone, first from scratch or after sop/simcse (which "
                                  "train [CLS]), mean after the other pretraining objectives",
                          choices=("auto", "first", "mean", "last"))
    classifier_attention: str = option("auto", "classify: how the backbone reads: bidirectional (an encoder) or "
                                               "causal (a decoder: clm); auto = the --init_from parent's way, "
                                               "bidirectional from scratch",
                                       choices=("auto", "bidirectional", "causal"))
    labels: str = option("", "classify: the label names in id order, a JSON list; filled in from the data and "
                             "saved with the model (give it only to insist on exactly these labels)")
    freeze_backbone: bool = option(False, "classify: train the head only (a linear probe); the backbone stays "
                                          "as loaded, in eval mode")
    head_lr: float = option(0.0, "classify: the head's peak learning rate; 0 = --lr (the schedule scales both)",
                            at_least=0)
    layer_lr_decay: float = option(1.0, "classify: ELECTRA's layer-wise lr decay: the head at --lr, the top block "
                                        "at lr x d^2, each block below a further x d, the embeddings at "
                                        "lr x d^(n_layer + 2); 1 = one lr for every layer",
                                   within="(0, 1]")
    classifier_head: str = option("linear", "classify: the head on the pooled vector: linear (one Linear), pooler "
                                            "(BERT's and RoBERTa's: tanh(dense) first, then the Linear) or score "
                                            "(GPT-2's and Llama's: one Linear without bias)",
                                  choices=("linear", "pooler", "score"))


def parse_labels(text: str) -> list[str]:
    """--labels (a JSON list of two or more distinct strings) -> the label names in id order."""
    try:
        names = json.loads(text)
    except ValueError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError(f'--labels must be a JSON list of label names, e.g. ["negative", "positive"]; got {text!r}')
    if len(set(names)) != len(names):
        raise UserError(f"--labels names a label twice: {text}")
    if len(names) < 2:
        raise UserError(f"a classifier needs two labels or more; the data has {len(names)} ({text}): add rows of "
                        "another label")
    return names


def resolve_options(options, parent_kind: str | None = None, parent_options=None,
                    parent_trained_first: bool | None = None):
    """A copy of `options` with classify's `auto` settings made concrete, so the printed and saved
    config says what the model does: attention from the --init_from parent's model_kind
    (`parent_kind`; a classify parent passes its own options) or bidirectional; pooling: last for a
    causal backbone, first ([CLS]) where the parent's pretraining taught the first position to
    summarize the row (`parent_trained_first`: sop's and simcse's heads read it), mean otherwise,
    from scratch too (as an encoder parent's classifier: scratch_model_config). A masked LM
    pretrained on running text never sees [CLS], so its first position starts as an untrained
    vector (ELECTRA's discriminator, for one, gives nearly the same [CLS] vector for every row)."""
    options = copy.deepcopy(options)
    if options.classifier_attention == "auto":
        kind = ATTENTION_OF_KIND.get(parent_kind) if parent_kind else "bidirectional"
        if kind is None and parent_options is not None:
            kind = parent_options.classifier_attention
        options.classifier_attention = kind if kind in ("bidirectional", "causal") else "bidirectional"
    if options.pooling == "auto":
        if options.classifier_attention == "causal":
            options.pooling = "last"
        elif parent_kind == "classifier" and parent_options is not None:
            options.pooling = parent_options.pooling
        else:
            options.pooling = "first" if parent_trained_first else "mean"
    return options


# The peak learning rate of a fine-tuning run that gives no --lr (the schedule decays to a tenth
# of it), measured on the man-page task at the default shape (benchmarks/README.md, issue 23):
# a pretrained backbone's classifier does better at 1e-3 than at 3e-4 (a masked LM's, a
# discriminator's and a permutation LM's, 3 seeds each; a masked LM's is worse again at 3e-3), one
# from random weights at 3e-4 (ELECTRA-Small's fine-tuning lr). A parent objective whose backbone
# measured best elsewhere declares its own (Objective.finetune_lr; t5, simcse). Neither is the pretraining
# default, 2e-3.
FINETUNE_LR = 1e-3
SCRATCH_LR = 3e-4


def finetune_lr_for(parent_cfg) -> float:
    """The default peak lr of a classifier: SCRATCH_LR from random weights (`parent_cfg` None); on
    an --init_from parent's backbone the first part of its objective (a+b) that declares a
    finetune_lr, else FINETUNE_LR."""
    if parent_cfg is None:
        return SCRATCH_LR
    from minilm.objectives import objective_class   # here: the registry imports this module
    declared = [objective_class(part).finetune_lr for part in parent_cfg.train.objective.split("+")]
    return next((lr for lr in declared if lr is not None), FINETUNE_LR)


# What a masked LM (mlm, rtd, ...) parent's model has that a fresh config lacks: a classifier from
# scratch gets it too, so that it is the same model as a fine-tuned encoder's, with other weights.
SCRATCH_MODEL_SETTINGS = {"embed_norm": True}


def scratch_model_config(model_cfg, given: set[str]):
    """A from-scratch classifier's model config: `model_cfg` with SCRATCH_MODEL_SETTINGS for the
    fields not in `given` (the flags on the command line, config.explicit_flags)."""
    changes = {field: value for field, value in SCRATCH_MODEL_SETTINGS.items() if field not in given}
    return dataclasses.replace(model_cfg, **changes)


def options_for_parent(options, parent_cfg):
    """resolve_options for an --init_from parent's Config (its train.objective the objective it
    trained; None from scratch): the parent's first part's model_kind, and whether any part
    taught the first position."""
    if parent_cfg is None:
        return resolve_options(options)
    from minilm.objectives import objective_class   # here: the registry imports this module
    classes = [objective_class(part) for part in parent_cfg.train.objective.split("+")]
    trained_first = any(cls.trains_first_position(parent_cfg.obj) for cls in classes)
    return resolve_options(options, classes[0].model_kind, parent_cfg.obj, trained_first)


class Classifier(Objective):
    name = "classify"
    data = "labelled"
    model_kind = "classifier"
    Options = ClassifierOptions
    capabilities = frozenset({"classify"})   # label_names, logits(input_ids, lengths): minilm.api.classify_texts
    best_metric = "macro_f1"      # the trainer keeps out_dir/best.pt by this validation metric
    shortest_seq_len = (3, "frames each text as [CLS] text [SEP]")   # window_length checks it
    baseline = Baseline("the label prior (the majority class)", targets="labels", margin=0.02)
    reads_encoder_stack = True    # from t5: its encoder stack is the backbone (base.py, run hooks)

    def __init__(self, model_cfg, tokenizer=None, options=None):
        super().__init__()
        options = self.make_options(options)
        if not options.labels:
            raise UserError("--objective classify needs its label names (--labels); train.py fills them in from "
                            "the labelled --data")
        self.options = options = resolve_options(options)
        self.label_names = parse_labels(options.labels)
        self.causal = options.classifier_attention == "causal"
        self.pooling = options.pooling
        self.freeze_backbone = options.freeze_backbone
        self.head_lr = options.head_lr
        self.backbone = self.build_backbone(model_cfg)
        # no LM head runs: drop its own weights (tied: the token table stays, as the input table)
        self.backbone.lm_head = None
        self.backbone.head_project = None
        # BERT's pooler (tanh(dense)) before the label head, with --classifier_head pooler
        self.pooler = nn.Linear(model_cfg.n_embd, model_cfg.n_embd) if options.classifier_head == "pooler" else None
        self.head_dropout = nn.Dropout(model_cfg.dropout)
        self.label_head = nn.Linear(model_cfg.n_embd, len(self.label_names), bias=options.classifier_head != "score")
        for layer in (self.pooler, self.label_head):
            if layer is not None:
                Transformer._init_weights(layer)
        if self.freeze_backbone:
            self.backbone.requires_grad_(False)

    # --------------------------------------------------------------- run hooks (base.py)
    @classmethod
    def finish_config(cls, cfg, parent_cfg, given):
        """The `auto` options made concrete (resolve_options): an --init_from parent's backbone says
        how the classifier reads (causal for clm) and pools (whether its pretraining taught the
        first position anything). From scratch, the model a fine-tuned encoder would be
        (scratch_model_config). The learning rate, where no --lr is given: finetune_lr_for the
        parent, decaying to a tenth of it (unless --min_lr is given)."""
        cfg.obj = options_for_parent(cfg.obj, parent_cfg)
        if parent_cfg is None:
            cfg.model = scratch_model_config(cfg.model, given)
        if "lr" not in given:
            cfg.train.lr = finetune_lr_for(parent_cfg)
            if "min_lr" not in given:
                cfg.train.min_lr = cfg.train.lr / 10
        return cfg

    @classmethod
    def read_data_facts(cls, cfg, data_dir, log):
        """The label names of the prepared labelled data, as --labels' JSON list. A run that already
        has labels (given as --labels, or a resumed checkpoint's) must find exactly those, in that
        order: the head's outputs mean those labels."""
        from minilm.data import load_meta
        names = list((load_meta(data_dir) or {}).get("labels") or [])
        found = json.dumps(names, ensure_ascii=False)
        parse_labels(found)   # two labels or more
        if cfg.obj.labels and parse_labels(cfg.obj.labels) != names:
            raise UserError(f"the labelled data has the labels {found} but the model's are {cfg.obj.labels}; "
                            "the head's outputs mean those labels: give data with the same labels (or drop --labels)")
        log(f"{cls.name}: {len(names)} labels: {', '.join(names[:20])}{', ...' if len(names) > 20 else ''}")
        cfg.obj.labels = found
        return cfg

    @classmethod
    def why_not_inherited(cls, parent_path):
        return (f"--init_from {parent_path} is a classifier: pass --objective {cls.name} to fine-tune it again, "
                "or a pretraining --objective to train its backbone")

    def parent_tensors(self, tensors, parent_cfg):
        """A classifier parent's head is taken only for the same label set: with other labels its
        outputs mean other things, so the head starts afresh."""
        if parent_cfg.obj.labels != json.dumps(self.label_names, ensure_ascii=False):
            tensors = {key: value for key, value in tensors.items() if not key.startswith("label_head.")}
        return tensors

    def report(self, sums):
        """The confusion matrix of the last evaluation, when there was one."""
        if "confusion" not in sums:
            return None
        return ("confusion matrix of the validation rows (rows: true label, columns: predicted):\n"
                + format_confusion(sums["confusion"], self.label_names))

    # --------------------------------------------------------------- Hugging Face heads (base.py)
    # *ForSequenceClassification: BERT's pooler + classifier and RoBERTa's classifier.dense + out_proj on
    # the first token, read both ways; GPT-2's and Llama's bias-free score on the last real token, causally
    hf_heads = {"bert": HFHead("BertForSequenceClassification", {"pooler": "bert.pooler.dense",
                                                                 "label_head": "classifier"}),
                "roberta": HFHead("RobertaForSequenceClassification", {"pooler": "classifier.dense",
                                                                       "label_head": "classifier.out_proj"}),
                "llama": HFHead("LlamaForSequenceClassification", {"label_head": "score"}),
                "qwen3": HFHead("Qwen3ForSequenceClassification", {"label_head": "score"}),
                "gpt2": HFHead("GPT2ForSequenceClassification", {"label_head": "score"})}
    # what the HF class computes, as this objective's options (hf_options)
    HF_READS = {"bert": ("first", "bidirectional", "pooler"), "roberta": ("first", "bidirectional", "pooler"),
                "llama": ("last", "causal", "score"), "qwen3": ("last", "causal", "score"),
                "gpt2": ("last", "causal", "score")}

    @classmethod
    def hf_head(cls, arch, options=None):
        """The HF head only when this classifier computes what that class computes: its pooling,
        its way of reading and its head (HF_READS)."""
        head = super().hf_head(arch, options)
        options = resolve_options(cls.make_options(options))
        wanted = dict(zip(("pooling", "classifier_attention", "classifier_head"), cls.HF_READS[arch]))
        for name, value in wanted.items():
            if getattr(options, name) != value:
                flags = " ".join(f"--{k} {v}" for k, v in wanted.items())
                raise UserError(f"this classifier has --{name} {getattr(options, name)}; transformers' "
                                f"{head.architecture} reads with {flags}: fine-tune with those to export it")
        return head

    @classmethod
    def hf_config(cls, options) -> dict:
        """config.json's label names: id2label and label2id."""
        names = parse_labels(cls.make_options(options).labels)
        return {"id2label": {str(i): name for i, name in enumerate(names)},
                "label2id": {name: i for i, name in enumerate(names)}}

    @classmethod
    def options_from_hf(cls, arch, hf_config):
        """A classifier that computes what `arch`'s HF class does, with config.json's label names."""
        id2label = hf_config.get("id2label") or {}
        try:
            names = [str(id2label[key]) for key in sorted(id2label, key=int)]
        except (TypeError, ValueError):
            raise UserError(f"config.json's id2label must map label ids to names, got {str(id2label)[:80]}") from None
        options = dict(zip(("pooling", "classifier_attention", "classifier_head"), cls.HF_READS[arch]))
        options["labels"] = json.dumps(names, ensure_ascii=False)
        parse_labels(options["labels"])
        return options

    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    def target_classes(self) -> int:
        return self.n_labels      # the label prior's histogram (base.py, baseline_sums)

    def train(self, mode: bool = True):
        """A frozen backbone stays in eval mode (no dropout): a linear probe reads fixed features."""
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def lr_scales(self, lr: float) -> dict[int, float]:
        """{id(parameter): its learning rate / --lr}, for the parameters that differ: the backbone's
        with --layer_lr_decay (layer_depths), the head's with --head_lr; read by the trainer's
        build_optimizer."""
        scales = {}
        decay = self.options.layer_lr_decay
        if decay != 1:
            top = self.backbone.cfg.n_layer + 2                  # the head's depth
            scales = {id(p): decay ** (top - depth) for p, depth in self.layer_depths()}
        if self.head_lr:
            head = list(self.label_head.parameters()) + (list(self.pooler.parameters()) if self.pooler is not None else [])
            scales.update({id(p): self.head_lr / lr for p in head})
        return scales

    def layer_depths(self):
        """(parameter, depth) for the backbone's trainable parameters, ELECTRA's depths
        (_get_layer_lrs in its optimization.py): 0 for the embeddings (tables, their norm and
        projection), i + 1 for block i, n_layer + 1 for the final norm; the head is n_layer + 2.
        Layer-wise decay gives depth d lr x decay^(n_layer + 2 - d): the layers nearest the input,
        which pretraining made most general, move least, so a few hundred labelled rows cannot
        wash out what they learned (ELECTRA fine-tunes with decay 0.8). ELECTRA gives no layer
        depth n_layer + 1, so its top block is at d^2, as here; the final norm, which its post-norm
        model does not have, takes that depth here."""
        n_layer = self.backbone.cfg.n_layer
        for name, p in self.backbone.named_parameters():
            if not p.requires_grad:
                continue
            parts = name.split(".")
            if parts[0] == "blocks":
                yield p, int(parts[1]) + 1
            elif parts[0] == "norm":
                yield p, n_layer + 1
            else:
                yield p, 0

    def flops_per_token(self, length: int | None = None) -> float:
        """Per input token of rows `length` long (seq_len by default): the backbone at every
        position (no LM head), the head once per row; a frozen backbone runs forward only (2 N,
        not 6 N, and no attention backward)."""
        length = length or self.backbone.cfg.seq_len
        backbone = transformer_flops(self.backbone, length)          # (flops.py)
        head_weights = self.label_head.weight.numel() + (self.pooler.weight.numel() if self.pooler is not None else 0)
        head = 6 * head_weights / length
        return backbone / 3 + head if self.freeze_backbone else backbone + head

    def tokens_and_flops(self, batch: dict) -> tuple[int, float]:
        """What a batch really computes (the trainer's tokens/s and MFU): its rows as make_batch cut
        them, to the batch's longest, padding included, since the blocks and attention run over the
        padding too (the mask only hides it as a key), at the FLOPs per token of that length: not
        seq_len per row, which short rows never reach."""
        rows, length = batch["input_ids"].shape
        return rows * length, rows * length * self.flops_per_token(length)

    def make_batch(self, raw, generator=None):
        """raw: a LabelledSource batch -> the same, cut to its longest row, labels IGNORE on padding
        rows, counts {"targets": real rows}."""
        valid = raw["row_valid"].bool()
        T = max(1, int(raw["lengths"].max()))      # one host sync per batch; the columns past it are padding
        return {"input_ids": raw["input_ids"][:, :T], "lengths": raw["lengths"], "row_valid": valid,
                "labels": torch.where(valid, raw["labels"], IGNORE), "counts": {"targets": valid.sum()}}

    def attention_mask(self, input_ids, lengths):
        """What the backbone is given as its mask: CAUSAL (a decoder's way) or the padding mask
        (B, 1, 1, T) of right-padded rows read both ways."""
        return CAUSAL if self.causal else padding_mask(lengths, input_ids.shape[1])

    def logits(self, input_ids, lengths):
        """input_ids (B, T) framed [CLS] text [SEP], right-padded; lengths (B,) -> (B, n_labels) fp32."""
        mask = self.attention_mask(input_ids, lengths)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            hidden = self.backbone(input_ids, mask=mask)                       # (B, T, C)
            pooled = pool(hidden, lengths, self.pooling)                        # (B, C)
        if self.pooler is not None:
            pooled = torch.tanh(self.pooler(pooled))                            # BERT's pooler
        return self.label_head(self.head_dropout(pooled)).float()              # (B, n_labels)

    def explain(self, batch, tokenizer):
        """Row 0 of make_batch's batch (explain.py): the pieces read, the row's label as the target
        of the positions the head's vector pools (found by applying pool() itself to one-hot
        states), and the mask logits() gives the backbone (CAUSAL drawn as model.causal_mask)."""
        from minilm.explain import DASH, Explained, pieces
        ids, lengths = batch["input_ids"][:1], batch["lengths"][:1]
        T, label = ids.shape[1], int(batch["labels"][0])
        reads = pieces(tokenizer, ids[0])
        pooled = pool(torch.eye(T, device=ids.device)[None], lengths, self.pooling)[0] > 0      # (T,)
        name = self.label_names[label] if label != IGNORE else DASH
        mask = self.attention_mask(ids, lengths)
        if mask is CAUSAL:
            title, grid = "causal", causal_mask(T, device=ids.device)
        else:
            title, grid = "padding (both ways)", mask[0, 0].expand(T, T)
        where = {"first": "the [CLS] state", "mean": "the mean over the real tokens",
                 "last": "the last real token, the one that has seen the whole row"}[self.pooling]
        notes = [f"label {label}, {name}: the head reads {where} ({self.pooling} pooling)" if label != IGNORE
                 else "an evaluation padding row: no label, counted nowhere",
                 f"{self.n_labels} labels: {', '.join(self.label_names)}"]
        return Explained(columns={"reads": reads, "target": [name if p else DASH for p in pooled.tolist()],
                                  "pooled": [self.pooling if p else DASH for p in pooled.tolist()]},
                         masks={title: (reads, reads, grid)}, notes=notes)

    def forward(self, batch, totals=None):
        logits = self.logits(batch["input_ids"], batch["lengths"])
        labels = batch["labels"]
        nll = F.cross_entropy(logits, labels, reduction="sum", ignore_index=IGNORE)
        with torch.no_grad():
            valid = labels != IGNORE
            predicted = logits.argmax(-1)
            sums = {"nll": nll.detach(), "targets": valid.sum(), "correct": ((predicted == labels) & valid).sum()}
            if not self.training:   # (true, predicted) pairs of the real rows, counted
                K = self.n_labels
                pairs = (labels.clamp(min=0) * K + predicted)[valid]
                sums["confusion"] = torch.bincount(pairs, minlength=K * K).view(K, K)
        return step_mean(nll, batch, totals), sums

    def metrics(self, sums: dict) -> dict:
        """macro_f1 of the evaluation's confusion matrix (accuracy is the shared correct / targets)."""
        return {"macro_f1": confusion_metrics(sums["confusion"])["macro_f1"]} if "confusion" in sums else {}


def confusion_metrics(confusion) -> dict:
    """acc and macro_f1 of a confusion matrix (n_labels, n_labels), rows = true label, columns =
    predicted. Macro-F1 is the unweighted mean over labels of F1 = 2 tp / (2 tp + fp + fn); a label
    that occurs neither in the truth nor in the predictions has no F1 (0 / 0) and is left out of
    the mean (as scikit-learn's f1_score with labels=None, which only knows the labels it sees)."""
    confusion = torch.as_tensor(confusion, dtype=torch.float64)
    true_positives = confusion.diagonal()
    occurrences = confusion.sum(1) + confusion.sum(0)          # 2 tp + fp + fn, per label
    present = occurrences > 0
    f1 = 2 * true_positives[present] / occurrences[present]
    total = float(confusion.sum())
    return {"acc": float(true_positives.sum()) / total if total else 0.0,
            "macro_f1": float(f1.mean()) if bool(present.any()) else 0.0}


FULL_MATRIX_LABELS = 20   # past this many labels the matrix is summarized: 3,000 labels are 9 M numbers


def format_confusion(confusion: torch.Tensor, label_names: list[str], max_labels: int = FULL_MATRIX_LABELS) -> str:
    """The confusion matrix as text: one row per true label, one column per predicted label; past
    `max_labels` labels, a summary of it instead (confusion_summary)."""
    names = [str(n) for n in label_names]
    if len(names) > max_labels:
        return confusion_summary(confusion, names, max_labels)
    width = max([len(n) for n in names] + [len(str(int(confusion.max()))) if confusion.numel() else 1, 4])
    header = " " * width + " | " + " ".join(n[:width].rjust(width) for n in names) + "   (columns: predicted)"
    lines = [header]
    for name, row in zip(names, confusion.long().tolist()):
        lines.append(name[:width].rjust(width) + " | " + " ".join(str(v).rjust(width) for v in row))
    return "\n".join(lines)


def confusion_summary(confusion: torch.Tensor, label_names: list[str], top: int = FULL_MATRIX_LABELS) -> str:
    """A confusion matrix too large to print, summarized: the recall and precision of the `top`
    labels with the most errors (their rows predicted as another label, plus other rows predicted
    as them), then the `top` most frequent confusions, true label -> predicted label."""
    confusion = confusion.long()
    K = len(label_names)
    names = [str(n)[:40] for n in label_names]
    right, rows, predicted = confusion.diagonal(), confusion.sum(1), confusion.sum(0)
    errors = rows + predicted - 2 * right
    right, rows, predicted, errors = right.tolist(), rows.tolist(), predicted.tolist(), errors.tolist()
    worst = [i for i in sorted(range(K), key=lambda i: (-errors[i], i))[:top] if errors[i] > 0]
    width = max([len(names[i]) for i in worst] + [5])
    lines = [f"{K} labels: the {K} x {K} matrix is too large to print; the {len(worst)} labels with the most "
             f"errors, then the most frequent confusions",
             f"{'label'.rjust(width)} | {'rows':>6} {'recall':>6} | {'predicted':>9} {'precision':>9} | {'errors':>6}"]
    for i in worst:
        recall = f"{right[i] / rows[i]:.3f}" if rows[i] else "-"
        precision = f"{right[i] / predicted[i]:.3f}" if predicted[i] else "-"
        lines.append(f"{names[i].rjust(width)} | {rows[i]:>6} {recall:>6} | {predicted[i]:>9} {precision:>9} | "
                     f"{errors[i]:>6}")
    off_diagonal = confusion.clone()
    off_diagonal.fill_diagonal_(0)
    flat = off_diagonal.flatten()
    # the largest counts, ties in label order: the key count * K^2 - index orders both at once
    _, where = (flat * flat.numel() - torch.arange(flat.numel())).topk(min(top, flat.numel()))
    pairs = [(n, k // K, k % K) for n, k in zip(flat[where].tolist(), where.tolist()) if n > 0]
    lines.append("most frequent confusions (true -> predicted: rows):" if pairs else "no row was confused")
    lines += [f"  {names[t]} -> {names[p]}: {n}" for n, t, p in pairs]
    return "\n".join(lines)
