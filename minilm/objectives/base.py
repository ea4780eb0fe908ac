"""The contract every objective follows, and the metric arithmetic they share.

    class MyObjective(Objective):               # minilm/objectives/my_objective.py
        name = "mine"                           # the --objective word, the registry's key
        data = "blocks"                         # the data source it reads (minilm.data SOURCES)
        Options = MyOptions                     # a dataclass of its own options: they become flags
        defaults = {"lr": 5e-4}                 # its defaults for shared flags, where not given
        capabilities = frozenset({"embed"})     # what minilm.load() and sample.py may do with it
        configure(model_cfg, options) -> model_cfg      # what it needs of the model (classmethod)
    objective = MyObjective(model_cfg, tokenizer, options)   # an nn.Module: backbone + heads
    batch = objective.make_batch(raw, generator)     # raw token ids -> tensors, on raw's device
    loss, sums = objective(batch, totals)            # loss to backward, detached metric sums
    objective.metrics(sums)                          # its metrics beyond the shared ones

Losses are *sums* divided by step-wide totals. A training step may consist of several
micro-batches (gradient accumulation, and several ranks), and objectives such as MLM predict a
different number of tokens in each. The right loss for the step is
    sum over all micro-batches of the summed token losses / total targets in the step,
so `make_batch` reports its counts in `batch["counts"]`, the trainer adds them up over the step
and hands the totals back to every micro-batch's forward. Backpropagating each micro-batch's
share then gives exactly the gradient of one big batch. Without totals (evaluation, a single
batch) an objective divides by its own counts.

Metric sums use shared names so they aggregate by plain addition over batches and ranks:
    nll      summed negative log-likelihood of the targets, in nats
    targets  number of predicted targets
    correct  targets whose argmax was right
    bytes    UTF-8 bytes the targets stand for (for bits per byte)
An objective may add sums of its own (a detector's positives, a classifier's confusion matrix);
its `metrics` turns them into numbers. `finalize` turns the shared sums into loss, perplexity,
accuracy and bits per byte. Combined objectives ("mlm+sop", multitask.py) prefix each part's
sums with its name ("mlm/nll"), and finalize reports each prefix on its own ("mlm/loss").

The saved config is the model. `configure` returns the model config the objective needs (the
masked LMs' embedding norm, segment embeddings for sentence pairs, t5's decoder depth), applied
once, before the model is built, printed and saved; it is idempotent, so a checkpoint's config
resolves to the same model again, and for "a+b" every part's needs must agree (else a UserError;
an encoder-decoder shares its backbone with no other part). The constructor builds exactly the
config it is given. `defaults` are weaker: a fresh run takes them only for the flags its command
line does not give (simcse's dropout 0.1, rtd's lr). What train.py needs beyond that of one
objective (finishing `auto` options, facts read from the data, which parents it may start from)
are classmethod hooks with do-nothing defaults, overridden in that objective's file.

An objective's options are its own dataclass, `Options` (fields made with minilm.options.option):
the run's objective section (config.ObjectiveConfig, saved flat as "obj") is the union of the
registered objectives' Options, and build_objective hands each objective an instance of its own
(make_options, which validates it).

Trivial baselines. Each objective declares the predictor that has learned nothing (`baseline`, a
Baseline): each target by its frequency (a unigram; for labels the prior), a detector calling
every token by the base rate, or a guess among the candidates. The trainer adds its sums at
evaluation (baseline_sums), finalize reports `baseline_loss` (that predictor's loss on the same
targets, in nats) and `baseline_gap` = baseline_loss - loss, per part of "a+b", and past a quarter
of the run the trainer warns once when a gap is still below the objective's declared margin.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from minilm.errors import UserError
from minilm.flops import lm_head_matmul_weights, transformer_flops
from minilm.losses import IGNORE, cross_entropy_sum, step_mean
from minilm.model import Transformer
from minilm.options import Options, options_from
from minilm.tokenizer import EOS_ID

# The shortest context a row of each kind of data fits in (its frame plus a token per text): the
# data sources refuse a shorter --seq_len, but only once the data is tokenized, so train.py checks
# it up front through window_length_for (objectives/__init__.py) with check_rows_fit.
SHORTEST_ROW: dict[str, tuple[int, str]] = {
    "segment_pairs": (5, "sentence pairs [CLS] A [SEP] B [SEP]"),                  # data/segment_pairs.py
    "parallel": (6, "translation pairs <eos> source <eos> <eos> target <eos>"),    # data/parallel.py
}


def check_rows_fit(data: str, model_cfg) -> None:
    """A one-line UserError when --seq_len is too short for a row of `data` (SHORTEST_ROW)."""
    least, row = SHORTEST_ROW.get(data, (1, ""))
    if model_cfg.seq_len < least:
        raise UserError(f"{row} need --seq_len {least} or more, got {model_cfg.seq_len}")


@dataclasses.dataclass(frozen=True)
class Baseline:
    """The trivial predictor an objective must beat (see "Trivial baselines" above).

    what     that predictor, as the warning names it
    targets  the batch key holding the targets whose frequencies it predicts with (IGNORE entries
             are none): baseline_sums counts them. None when the objective's own sums already give
             the baseline (a detector's positives and targets) or it overrides baseline_sums.
    part     the prefix of the sums whose loss it is compared with (rtd: "discriminator"), or ""
             for the objective's own loss
    margin   nats: a gap below it, past a quarter of the run, means the objective learned nothing
    hint     what to try then, besides the learning rate"""
    what: str
    targets: str | None = None
    part: str = ""
    margin: float = 0.02
    hint: str = ""

    def stuck(self, metrics: dict, name: str, prefix: str = "") -> str | None:
        """A phrase naming objective `name`'s gap when `metrics` (finalized; a part of a+b's
        prefixed "NAME/") are still within `margin` of this baseline, else None."""
        label = prefix + (self.part + "/" if self.part else "")
        gap = metrics.get(label + "baseline_gap")
        if gap is None or gap >= self.margin:
            return None
        return (f"{' '.join(filter(None, (name, self.part)))} is still at its trivial baseline ({self.what}): val loss "
                f"{metrics[label + 'loss']:.4f} against {metrics[label + 'baseline_loss']:.4f}, a gap of {gap:.4f} "
                f"nats (< {self.margin})" + (f" (try {self.hint})" if self.hint else ""))


def prior_entropy(counts) -> float:
    """The loss, in nats, of predicting targets by the frequencies of their values (the corpus
    unigram, a label prior), estimated from the histogram `counts` of N targets: the entropy of
    their own frequencies, plus Miller and Madow's (K - 1) / 2N for the K values seen. The first
    term alone is the loss of the frequencies fitted to these very targets, which no frequency
    table learned elsewhere reaches: on few targets of a large vocabulary it sits well below, and
    a model that had learned a little would look stuck."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    n, seen = counts.sum(), counts[counts > 0]
    p = seen / n
    return float(-(p * p.log()).sum() + (len(seen) - 1) / (2 * n))


@dataclasses.dataclass(frozen=True)
class HFHead:
    """What an objective's head is called in Hugging Face transformers (minilm/hf_format.py reads it):
    `architecture` the class a folder's config.json names (LlamaForCausalLM), `names` {minilm
    state_dict name: HF name} of the head's modules or parameters (a module's .weight and .bias
    follow it), `vocab_rows` the minilm names among them with a row per token id (a masked LM's
    output bias), which a foreign tokenizer's id order permutes."""
    architecture: str
    names: dict = dataclasses.field(default_factory=dict)
    vocab_rows: tuple = ()


class Objective(nn.Module):
    name: str = ""
    data: str = "blocks"          # the data source it reads (a key of minilm/data SOURCES)
    model_kind: str = "decoder"   # what sample.py can do with its backbone
    reads_padded_rows: bool = False   # a "blocks" objective whose make_batch takes `lengths` (right-padded
                                      # rows), so that it can share a+b's sentence pairs or translations
    # What minilm.load() and sample.py may do with a checkpoint of it: a subset of minilm.api.VERBS
    # ("generate", "fill", "infill", "score", "embed", "classify"); a+b serves the union of its
    # parts'. Each verb needs a method here: fill `predict(input_ids)` -> (B, T, V) logits, score
    # `token_scores(input_ids)` -> (B, T - 1) values, classify `logits(input_ids, lengths)` and
    # `label_names`; generate, infill and embed read the backbone.
    capabilities: frozenset[str] = frozenset()
    token_score: str = ""          # with "score": what token_scores gives per token, as messages name it
                                   # ("log p", a decoder's; "P(replaced)", a replaced-token detector's)
    prompt_is_prefix: bool = False  # with "generate": the prompt is read in both directions (a prefix LM)
    embeds_sentences: bool = False  # with "embed": trained for it, `embed(input_ids, lengths)` pools as it was
                                    # trained; otherwise embed() is the mean of the final hidden states
    Options: type = Options        # its options, a dataclass in its file (module docstring); none here
    # ModelConfig or TrainConfig fields this objective defaults differently (simcse: dropout 0.1, rtd:
    # its lr), applied by train.py to a fresh run only where the flag was not given
    defaults: dict = {}

    # the shortest --seq_len a row of it can use, and why (window_length checks it before any data work)
    shortest_seq_len: tuple[int, str] = (1, "reads at least one token per row")
    baseline: Baseline | None = None   # what it must beat to have learned anything (module docstring)

    backbone: nn.Module

    @classmethod
    def trains_first_position(cls, options) -> bool:
        """Whether this objective's loss reads the first position ([CLS]) as a summary of the row
        (sop's head, simcse's first pooling): a classifier fine-tuned from it then pools there by
        default, else over the mean (objectives/classify.py). `options`: the run's ObjectiveConfig."""
        return False

    @classmethod
    def configure(cls, model_cfg, options):
        """The config this objective's model is built from: `model_cfg` with what it needs of the
        model (module docstring), a new config when anything changes. Idempotent. `options`: an
        instance of cls.Options. Nothing by default."""
        return model_cfg

    @classmethod
    def make_options(cls, section=None):
        """An instance of cls.Options, validated: from `section`, the run's objective section
        (config.ObjectiveConfig) or any object with its fields, or the defaults when None."""
        options = options_from(cls.Options, section)
        options.validate()
        return options

    @classmethod
    def window_length(cls, model_cfg, options=None) -> int:
        """Raw tokens per row this objective reads from a "blocks" source: seq_len + 1 by default
        (a causal LM's labels are its inputs shifted by one; the encoders use the first seq_len).
        t5 reads more, since its noise spans collapse into one sentinel each. A classmethod, so
        train.py can check the options before it prepares any data: --seq_len below the
        objective's `shortest_seq_len` is refused here."""
        least, why = cls.shortest_seq_len
        if model_cfg.seq_len < least:
            raise UserError(f"{cls.name} {why}: it needs --seq_len {least} or more, got {model_cfg.seq_len}")
        return model_cfg.seq_len + 1

    def build_backbone(self, model_cfg) -> Transformer:
        """The backbone, built from exactly `model_cfg`, which must already hold what this
        objective needs (configure; model_config_for / build_objective apply it)."""
        check_model_config([type(self)], model_cfg, getattr(self, "options", None))
        return Transformer(model_cfg)

    def backbone_replaced(self) -> None:
        """Called once a+b has pointed self.backbone at the parts' shared backbone (multitask.py):
        an objective whose other modules hold pieces of the backbone it built (a table they share)
        points them at the shared one here. Nothing by default."""

    def explain(self, batch: dict, tokenizer):
        """What one row of make_batch's batch (B == 1) means, for minilm/explain.py: an Explained
        with the pieces read, the targets, this objective's own columns and every attention mask
        its forward uses. An objective overrides it in its own file; this default reads what a
        batch commonly holds, so that every objective has a view: batch["input_ids"] (the first
        view of (B, V, T) rows), batch["labels"] where they are per position (a per-row label is
        a note), the decoder's rows of an encoder-decoder, and the mask: causal for a decoder,
        batch["attn_mask"] (a padding mask) where make_batch put one, else none is claimed."""
        from minilm.explain import DASH, Explained, pieces, targets
        from minilm.model import causal_mask
        ids = batch["input_ids"][0]
        notes = ([f"the default view of {self.name}'s batch (Objective.explain): its own explanation is not written yet"]
                 if type(self).explain is Objective.explain else [])
        if ids.dim() > 1:
            notes.append(f"{ids.shape[0]} views of the row; the first is shown")
            ids = ids[0]
        read = pieces(tokenizer, ids)
        labels = batch.get("labels")
        row_labels = labels[0] if torch.is_tensor(labels) and labels.dim() > 0 else None
        if row_labels is not None and row_labels.shape == ids.shape:
            target = targets(tokenizer, row_labels, IGNORE)
        else:
            target = [DASH] * len(read)
            if row_labels is not None and row_labels.dim() == 0:
                notes.append(f"the row's label: {int(row_labels)}")
        decoder = None
        if "decoder_input_ids" in batch and torch.is_tensor(labels) and labels.dim() > 1:
            decoder = {"reads": pieces(tokenizer, batch["decoder_input_ids"][0]),
                       "target": targets(tokenizer, labels[0], IGNORE)}
        masks = {}
        if self.model_kind == "decoder":
            masks["causal self-attention"] = (read, read, causal_mask(len(read)))
        elif torch.is_tensor(batch.get("attn_mask")):
            keys = batch["attn_mask"][0].reshape(-1, batch["attn_mask"].shape[-1])   # (1 or T, T)
            masks["self-attention (padding)"] = (read, read, keys.expand(len(read), -1).clone())
        return Explained(columns={"reads": read, "target": target}, decoder=decoder, masks=masks, notes=notes)

    def predictions(self, batch: dict) -> torch.Tensor | None:
        """The model's best guess (argmax) at each position of row 0 whose target the explanation
        shows (the decoder's positions for an encoder-decoder), read as forward reads the batch:
        (T,) token ids, for explain's "predicts" column when a trained checkpoint is explained.
        None: this objective does not say (the default)."""
        return None

    def encoder_input(self, ids: list[int], verb: str, mode: str = "") -> list[int]:
        """An encoder-decoder's encoder input at inference (api.py's infill, and generate where
        declared), framed as in training: `ids` (the text with its sentinels, or a prompt), then
        <eos>. `mode`: for an objective whose inputs open with a mode token (its own override);
        the others refuse one."""
        if mode:
            raise UserError(f"{self.name} has no modes: leave out mode (--mode)")
        return list(ids) + [EOS_ID]

    def make_batch(self, raw: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        raise NotImplementedError

    def metrics(self, sums: dict) -> dict:
        """This objective's metrics beyond the shared loss, ppl, acc, bpb and baseline (finalize),
        from its evaluation sums added over batches and ranks: a classifier's macro-F1, a
        detector's precision and recall. None by default."""
        return {}

    def forward(self, batch: dict, totals: dict | None = None):
        raise NotImplementedError

    def target_classes(self) -> int:
        """How many values a target can take (the length of baseline_sums' histogram)."""
        return self.backbone.cfg.vocab_size

    @torch.no_grad()
    def baseline_sums(self, batch: dict, sums: dict) -> dict:
        """The evaluation sums behind baseline_loss for one batch, beside the forward's `sums`: by
        default the histogram of batch[baseline.targets] ("target_counts"), whose entropy finalize
        reports. Additive over batches and ranks, like every sum."""
        if self.baseline is None or self.baseline.targets is None:
            return {}
        targets = batch[self.baseline.targets].flatten()
        return {"target_counts": torch.bincount(targets[targets != IGNORE], minlength=self.target_classes())}

    def keep_bytes_per_token(self, tokenizer, vocab_size: int) -> None:
        """The UTF-8 bytes each token id stands for (0 for specials), for bits per byte: a buffer,
        so it follows .to(device), and not saved (it comes from the tokenizer; zeros without one)."""
        n_bytes = tokenizer.bytes_per_token if tokenizer is not None else torch.zeros(vocab_size, dtype=torch.long)
        self.register_buffer("bytes_per_token", n_bytes.clone(), persistent=False)

    def token_loss(self, logits, labels, batch: dict, totals: dict | None):
        """The usual (loss, sums) of predicting tokens: logits (N, V), labels (N,) with IGNORE
        where nothing is predicted. The summed cross-entropy (softmax in fp32, minilm/losses.py)
        over the step's target count (base contract); accuracy and bytes only in evaluation, where
        they cost an extra pass. Needs keep_bytes_per_token."""
        nll = cross_entropy_sum(logits, labels)
        with torch.no_grad():
            real = labels != IGNORE
            sums = {"nll": nll.detach(), "targets": real.sum()}
            if not self.training:
                sums["correct"] = ((logits.argmax(-1) == labels) & real).sum()
                sums["bytes"] = (self.bytes_per_token[labels.clamp(min=0)] * real).sum()
        return step_mean(nll, batch, totals), sums

    def tokens_and_flops(self, batch: dict) -> tuple[int, float] | None:
        """(input tokens, training FLOPs) that one micro-batch really computes, for an objective
        whose batches vary in length; None (the default): rows of seq_len tokens at
        flops_per_token() each, which the trainer counts itself."""
        return None

    def flops_per_token(self) -> float:
        """Training FLOPs per input token, the numerator of the trainer's MFU: nanoGPT's
        6N + 12 L H D T, N counting the weights of the matmuls this objective runs at every
        position, never the token table itself (a lookup). One generic count,
        flops.transformer_flops: here the backbone with its LM head at every position (a causal
        LM). An objective that computes less or more overrides this with the same count and what
        differs (the masked LMs' outputs at a share of positions, a head once per row, two passes);
        only two keep a formula of their own, where the generic count cannot work: plm (a second,
        query stream whose keys and values come from the content stream) and t5 (an encoder-decoder:
        cross-attention over the encoder's length, flops.encoder_decoder_flops; ul2 inherits it)."""
        return transformer_flops(self.backbone, self.backbone.cfg.seq_len, head=lm_head_matmul_weights(self.backbone))

    # --------------------------------------------------------------- run hooks (train.py)
    # What train.py asks of an objective besides the contract; each does nothing by default.
    reads_encoder_stack: bool = False   # --init_from an encoder-decoder: its encoder stack is this
                                        # objective's backbone (classify), else the kinds must match
    finetune_lr: float | None = None    # the peak lr a classifier fine-tuning this objective's backbone
                                        # takes where --lr is not given (classify.py); None: classify's own

    @classmethod
    def finish_config(cls, cfg, parent_cfg, given: set[str]):
        """A fresh run's Config made concrete before it is printed and saved (`auto` options, say);
        parent_cfg: an --init_from parent's Config or None; given: the flags on the command line."""
        return cfg

    @classmethod
    def read_data_facts(cls, cfg, data_dir: str, log):
        """The Config with what this objective learns from the prepared data in `data_dir` (a
        classifier's label names), once the data is ready and before the model is built."""
        return cfg

    # --------------------------------------------------------------- Hugging Face heads (hf_format.py)
    # {arch (minilm.config.ARCHES): HFHead} for the architectures where this objective's trained
    # model has an exact counterpart in transformers; none by default (no HF head).
    hf_heads: dict = {}

    @classmethod
    def hf_head(cls, arch: str, options=None) -> HFHead:
        """This objective's HFHead on `arch`, or a one-line UserError naming what is missing and the
        objectives that do have a head there. `options`: an instance of cls.Options (a classifier
        checks that its head is the one the HF class computes)."""
        heads = cls.own_hf_heads()
        if arch in heads:
            return heads[arch]
        from minilm.objectives import OBJECTIVES   # the registry, which imports this module
        fits = [name for name, other in OBJECTIVES.items() if arch in other.own_hf_heads()]
        where = ", ".join(sorted(heads)) or "no architecture"
        raise UserError(f"{cls.name} has no Hugging Face counterpart on a {arch} model (it has one on {where}); "
                        f"on {arch}, export a checkpoint of {', '.join(fits) or 'none of the objectives'}")

    @classmethod
    def own_hf_heads(cls) -> dict:
        """hf_heads, where they describe this objective's model: declared by this class, or
        inherited from a class with the same model_kind (wwm's masked LM is mlm's; prefix_lm reads
        its prefix both ways, which a causal LM class does not, so clm's heads are not its)."""
        declared_by = next(klass for klass in cls.__mro__ if "hf_heads" in vars(klass))
        return cls.hf_heads if declared_by.model_kind == cls.model_kind else {}

    @classmethod
    def hf_config(cls, options) -> dict:
        """Entries this objective adds to an exported config.json (a classifier's id2label)."""
        return {}

    @classmethod
    def options_from_hf(cls, arch: str, hf_config: dict) -> dict:
        """{option: value} of this objective's options that an imported HF folder's config.json
        (`hf_config`, a dict) fixes; none by default."""
        return {}

    @classmethod
    def why_not_inherited(cls, parent_path: str) -> str | None:
        """Why an --init_from child of this objective's checkpoint must name its --objective rather
        than train this one again (a UserError's text), or None: it trains this one again."""
        return None

    def parent_tensors(self, tensors: dict, parent_cfg) -> dict:
        """Of an --init_from parent's tensors (by state_dict name), those this objective may take;
        parent_cfg: the parent's Config. A head whose outputs mean something else is left out."""
        return tensors

    def report(self, sums: dict) -> str | None:
        """Text train.py prints after the run from the last evaluation's raw `sums` (a classifier's
        confusion matrix), or None."""
        return None


def check_one_encoder_decoder(classes) -> None:
    """A one-line UserError for an encoder-decoder (t5) combined with anything else."""
    seq2seq = [cls.name for cls in classes if cls.model_kind == "seq2seq"]
    if seq2seq and len(classes) > 1:
        others = ", ".join(cls.name for cls in classes if cls.name != seq2seq[0])
        raise UserError(f"--objective {'+'.join(cls.name for cls in classes)}: {seq2seq[0]} trains an encoder-decoder "
                        f"and {others} another backbone, so they cannot share one model; train {seq2seq[0]} on its own")


def check_backbone_kinds(classes, model_cfg) -> None:
    """One-line UserErrors for objectives whose backbones cannot be one model: an encoder-decoder
    (t5) with anything else, and a decoder stack (--n_decoder_layer) for an objective without one."""
    names = "+".join(cls.name for cls in classes)
    check_one_encoder_decoder(classes)
    seq2seq = [cls.name for cls in classes if cls.model_kind == "seq2seq"]
    if not seq2seq and model_cfg.n_decoder_layer:
        from minilm.objectives import OBJECTIVES   # the registry, which imports this module
        encoder_decoders = ", ".join(name for name, cls in OBJECTIVES.items() if cls.model_kind == "seq2seq")
        raise UserError(f"--n_decoder_layer is for encoder-decoder objectives ({encoder_decoders}); {names} builds "
                        f"one stack of --n_layer blocks, so leave --n_decoder_layer at 0 (got {model_cfg.n_decoder_layer})")


def _changed(before, after) -> list[str]:
    return [f.name for f in dataclasses.fields(before) if getattr(before, f.name) != getattr(after, f.name)]


def _needs(cls, options, model_cfg, setting: str) -> tuple[object, bool]:
    """(the value of `setting` that `cls` needs, given `model_cfg`; whether it is a minimum): a
    number its configure raises a lower value to, and leaves alone once it is higher."""
    value = getattr(cls.configure(model_cfg, options), setting)
    if isinstance(value, int) and not isinstance(value, bool):
        lower, higher = (dataclasses.replace(model_cfg, **{setting: value + step}) for step in (-1, 1))
        return value, (getattr(cls.configure(lower, options), setting) == value
                       and getattr(cls.configure(higher, options), setting) == value + 1)
    return value, False


def resolve_model_config(classes, model_cfg, options=None):
    """A copy of model_cfg with what `classes` need of the model: each one's configure in turn
    (`options`: the run's objective section, each class reads its own Options from it). The
    result must be one that every part's configure leaves alone, so it is idempotent, and two parts
    that need different values of one setting are a one-line UserError."""
    check_backbone_kinds(classes, model_cfg)
    parts = [(cls, cls.make_options(options)) for cls in classes]
    resolved, set_by = model_cfg, {}
    for cls, part_options in parts:
        configured = cls.configure(resolved, part_options)
        set_by.update({setting: (cls, part_options) for setting in _changed(resolved, configured)})
        resolved = configured
    for cls, part_options in parts:
        again = cls.configure(resolved, part_options)
        for setting in _changed(resolved, again):
            if setting not in set_by or set_by[setting][0] is cls:
                raise ValueError(f"{cls.name}.configure is not idempotent: it changes {setting} of the config it "
                                 "returned; it must leave a config that already has what it needs alone")
            other, other_options = set_by[setting]
            said = [f"--{setting} {value}" + (" or more" if minimum else "")
                    for value, minimum in (_needs(cls, part_options, resolved, setting),
                                           _needs(other, other_options, resolved, setting))]
            raise UserError(f"{cls.name} needs {said[0]} but {other.name} needs {said[1]}; these objectives "
                            "cannot share one model")
    return resolved


def check_model_config(classes, model_cfg, options=None) -> None:
    """Refuse a config that lacks what `classes` need (a programming error: the caller skipped
    model_config_for, so the model would not be the one its config says)."""
    resolved = resolve_model_config(classes, model_cfg, options)
    parts = [(cls, cls.make_options(options)) for cls in classes]
    missing = []
    for setting in _changed(model_cfg, resolved):
        needs = [_needs(cls, part_options, model_cfg, setting) for cls, part_options in parts]
        # "n_segment>=2" where the part that changes it needs a minimum
        minimum = any(is_minimum for value, is_minimum in needs if value != getattr(model_cfg, setting))
        missing.append(f"{setting}{'>=' if minimum else '='}{getattr(resolved, setting)}")
    if missing:
        names = "+".join(cls.name for cls in classes)
        raise ValueError(f"{names} needs a model config with {', '.join(missing)}; resolve it first with "
                         "minilm.objectives.model_config_for (build_objective does)")


def finalize(sums: dict, objective: Objective | None = None) -> dict:
    """Metric sums -> readable metrics. Keys absent from `sums` are skipped.

    Keys "NAME/x" are a part of a combined objective: each NAME gets its own "NAME/loss",
    "NAME/ppl", "NAME/acc", "NAME/bpb" from its own sums, and "loss" is the combined loss that
    was trained, the sum over parts of weight * part loss, from the parts' "weighted_nll" sums
    (nll times the part's weight: still additive over batches, unlike a ratio). Then the
    objective's own metrics (Objective.metrics: a+b's parts prefixed with their names), when
    `objective` is given; sums that only it reads (a confusion matrix) are not reported raw.
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
    if objective is not None:
        out.update(objective.metrics(sums))
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
    # the trivial baseline's loss on the same targets (Objective.baseline), and the distance from it
    baseline = None
    if "target_counts" in sums:
        baseline = prior_entropy(sums["target_counts"])
    elif "baseline_nll" in sums and n > 0:
        baseline = float(sums["baseline_nll"]) / n
    elif "positives" in sums and n > 0:   # a detector calling every token by the base rate
        baseline = prior_entropy([n - float(sums["positives"]), float(sums["positives"])])
    if baseline is not None and "loss" in out:
        out["baseline_loss"], out["baseline_gap"] = baseline, baseline - out["loss"]
    return out
