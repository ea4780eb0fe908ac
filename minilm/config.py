"""Configuration: plain dataclasses, size presets, and command-line overrides by field name.

A run is described by one `Config`, made of four sections:

    ModelConfig      the network's shape (n_layer, n_head, n_embd, ...)
    DataConfig       where the text comes from and how it is tokenized
    ObjectiveConfig  options of the objectives (masking rates, span lengths, loss weights)
    TrainConfig      which objective, the optimizer, the schedule, logging and checkpoints

Every field of every section can be set from the command line as `--field value` (or
`--field=value`); field names are unique across sections, so no prefixes are needed. A preset
(`--preset tiny|small|base`) fills the model section first, then explicit flags win.
Each field carries its meaning (printed by `train.py --help`) and the values it accepts; the
parsed config is validated whole before anything runs, so a bad value is one line naming its
flag (`--beta1 must be in [0, 1), got 1.5`), never a traceback minutes into a run.
The resolved config is printed at start and stored, as a plain dict, in every checkpoint.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import math
import textwrap
from dataclasses import dataclass, field, fields

from minilm.errors import UserError


# ----------------------------------------------------------------------------- fields and their rules
# A field is declared with option(default, meaning, rule): the meaning is what `train.py --help`
# prints, the rule the values the field accepts on its own. Rules that tie two fields together
# (n_embd divisible by n_head, min_lr <= lr, ...) are code, in each section's validate().

def option(default, meaning: str, *, at_least=None, above=None, within: str | None = None,
           choices: tuple[str, ...] | None = None):
    """A config field with its meaning and, at most one of:
    at_least=x or above=x (a lower bound, inclusive or not); within="[a, b)" (an interval, its
    brackets saying which ends are included; a bound may be inf or a power like 2**64);
    choices=("a", "b") (a choice "name:N" also accepts name:0, name:1, ...)."""
    rule = {"at_least": at_least, "above": above, "within": within, "choices": choices}
    return field(default=default, metadata={"help": meaning,
                                            **{k: v for k, v in rule.items() if v is not None}})


def _bound(text: str) -> float:
    base, _, power = text.strip().partition("**")
    return float(base) ** int(power) if power else float(base)


def check_value(name: str, value, *, at_least=None, above=None, within: str | None = None,
                choices: tuple[str, ...] | None = None) -> None:
    """UserError `--name must be <rule>, got <value>` when `value` breaks the rule (see option)."""
    if choices is not None:
        indexed = [c[:-2] for c in choices if c.endswith(":N")]  # "cuda:N": cuda:0, cuda:1, ...
        base, colon, index = str(value).partition(":")
        if value not in choices and not (colon and base in indexed and index.isdigit()):
            raise UserError(f"--{name} must be one of {', '.join(choices)}, got {value!r}")
        return
    if within is not None:
        low, high = (_bound(b) for b in within[1:-1].split(","))
        ok = ((low < value if within[0] == "(" else low <= value)
              and (value < high if within[-1] == ")" else value <= high))
        requirement = f"in {within}"
    elif at_least is not None:
        ok, requirement = value >= at_least, f">= {at_least}"
    elif above is not None:
        ok, requirement = value > above, f"> {above}"
    else:
        ok, requirement = True, ""
    if isinstance(value, float) and not math.isfinite(value):  # nan compares false, inf may pass
        raise UserError(f"--{name} must be a finite number{' ' + requirement if requirement else ''}, "
                        f"got {value}")
    if not ok:
        raise UserError(f"--{name} must be {requirement}, got {value}")


TYPES = {"int": int, "float": float, "str": str, "bool": bool}  # the annotations, as strings
ARTICLE = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}


def _fits(value, kind: type) -> bool:
    if isinstance(value, bool):  # bool is a subclass of int: True is no n_layer
        return kind is bool
    return isinstance(value, kind) or (kind is float and isinstance(value, int))


def check_fields(section) -> None:
    """Each field of a config section alone: its type, then its rule (option's metadata)."""
    for f in fields(section):
        value = getattr(section, f.name)
        if not _fits(value, TYPES[f.type]):
            raise UserError(f"--{f.name} expects {ARTICLE[f.type]}, got {value!r}")
        rule = {k: v for k, v in f.metadata.items() if k != "help"}
        check_value(f.name, value, **rule)


# ----------------------------------------------------------------------------- the four sections
@dataclass
class ModelConfig:
    # The defaults are the quick run of `python train.py`: a few minutes on a laptop CPU.
    vocab_size: int = option(4096, "tokenizer size; the tokenizer is trained to exactly this many ids",
                             at_least=1)
    seq_len: int = option(128, "context window in tokens: the longest sequence the model sees", at_least=1)
    n_layer: int = option(4, "depth: the number of Transformer blocks", at_least=1)
    n_head: int = option(4, "attention heads; n_embd must be divisible by n_head", at_least=1)
    n_embd: int = option(256, "model width; head size is n_embd // n_head", at_least=1)
    # ALBERT/ELECTRA's factorized embeddings: E-wide tables projected up to n_embd (model.py)
    embedding_size: int = option(0, "width E of the token/position/segment tables, projected to n_embd (ALBERT, "
                                    "ELECTRA: 128); 0 = n_embd, no projection", at_least=0)
    intermediate_size: int = option(0, "MLP hidden width; 0 = 4 x n_embd (GELU) or 8/3 x n_embd (SwiGLU)",
                                    at_least=0)
    mlp: str = option("gelu", "the MLP: gelu or swiglu", choices=("gelu", "swiglu"))
    norm: str = option("rmsnorm", "the norm: rmsnorm or layernorm", choices=("rmsnorm", "layernorm"))
    position: str = option("rope", "positions: rope (rotary) or learned (GPT-2's table)",
                           choices=("rope", "learned"))
    rope_base: float = option(10000.0, "RoPE frequency base", above=1)
    norm_eps: float = option(1e-5, "norm epsilon", above=0)
    dropout: float = option(0.0, "dropout on attention weights, residual branches and embeddings",
                            within="[0, 1)")
    bias: bool = option(False, "biases in linear layers and LayerNorm")
    tie_embeddings: bool = option(True, "the LM head reuses the token embedding matrix")
    # objectives that read sentence pairs need n_segment >= 2 (objectives/base.py, model settings)
    n_segment: int = option(0, "segment (token-type) embeddings; 0 = none, but objectives that read "
                               "sentence pairs (sop) use 2 or more", at_least=0)
    # the masked LMs turn it on for their encoder (objectives/mlm.py)
    embed_norm: bool = option(False, "a norm on the summed embeddings before the first block (BERT, "
                                     "RoBERTa, ModernBERT); the masked LMs always use it")
    # encoder-decoder objectives (t5) set it from n_layer when it is 0 (objectives/base.py)
    n_decoder_layer: int = option(0, "decoder depth of an encoder-decoder (t5), which has n_layer encoder "
                                     "blocks; 0 = no decoder stack (t5 then uses n_layer)", at_least=0)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def embedding_width(self) -> int:
        """E, the width of the embedding tables: embedding_size, or n_embd when it is 0."""
        return self.embedding_size or self.n_embd

    @property
    def mlp_hidden(self) -> int:
        if self.intermediate_size:
            return self.intermediate_size
        if self.mlp == "swiglu":  # keeps the parameter count of a 4x GELU MLP (LLaMA's 2/3 rule)
            return int(8 * self.n_embd / 3 + 63) // 64 * 64
        return 4 * self.n_embd

    def validate(self) -> None:
        check_fields(self)
        if self.n_embd % self.n_head != 0:
            raise UserError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                            f"try --n_embd {self.n_embd // self.n_head * self.n_head or self.n_head}")
        if self.position == "rope" and self.head_dim % 2 != 0:
            raise UserError(f"RoPE needs an even head size, got n_embd/n_head = {self.head_dim}; "
                            "change n_embd or n_head, or pass --position learned")
        if self.embedding_size > self.n_embd:
            raise UserError(f"embedding_size ({self.embedding_size}) must be 0 (= n_embd) or at most n_embd "
                            f"({self.n_embd}); try --embedding_size {min(128, self.n_embd)}")


# Size presets. "base" is the GPT-2 124M shape (with GPT-2's 1024 context and 50k-ish vocab
# it is 124M parameters; with the benchmarks' 8192-token vocab it is about 92M).
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=2, n_head=4, n_embd=128, seq_len=128),     # ~0.9M with a 4096 vocab (tests)
    "small": dict(n_layer=6, n_head=6, n_embd=384, seq_len=256),    # ~10.6M + embeddings (the bench config)
    "base": dict(n_layer=12, n_head=12, n_embd=768, seq_len=1024),  # GPT-2 small's shape
}


@dataclass
class DataConfig:
    data: str = option("", "text file, folder, glob or .jsonl; empty = the built-in corpus")
    text_field: str = option("text", "the field (JSON, JSON Lines) or column (CSV, TSV) holding the text")
    label_field: str = option("label", "classify: the field or column holding each row's label (any string)")
    pair_field: str = option("", "row data with two texts: the second text's field or column (tlm: the "
                                 "translation; simcse pairs: the positive)")
    negative_field: str = option("", "simcse pairs: the hard negative's field or column (optional)")
    val_data: str = option("", "row data: a file of validation rows; empty: a split of --data (stratified "
                               "by label for classify)")
    tokenizer: str = option("", "a tokenizer.model to use (e.g. another run's out_dir/tokenizer.model) instead of "
                                "training one on --data; it sets --vocab_size")
    character_coverage: float = option(0.9995, "share of characters sentencepiece gives their own piece; "
                                               "the rest use byte fallback", within="(0, 1]")
    tokenizer_sample_lines: int = option(2_000_000, "lines the tokenizer trains on, sampled uniformly "
                                                    "from large corpora", at_least=1)
    val_fraction: float = option(0.05, "share of documents (or rows) held out for validation", within="(0, 1)")
    num_workers: int = option(0, "processes for tokenizing the data; 0 = every core", at_least=0)

    def validate(self) -> None:
        check_fields(self)


@dataclass
class ObjectiveConfig:
    """Options of the objectives (masking rates, span laws, loss weights). Each objective reads
    the fields it needs and documents them in its own file. The objective names and the format
    of objective_weights are checked where they are read (minilm/objectives/)."""
    objective_weights: str = option("", "a+b objectives: one loss weight per part, e.g. 1,0.5; "
                                         "empty: every weight is 1")
    # causal LM (minilm/objectives/clm.py)
    predict_after_eos: bool = option(True, "clm: predict a document's first token from the end of the "
                                           "one before; false ignores those targets (<eos> itself is "
                                           "always a target)")
    # masked-LM family (mlm, wwm, span; minilm/objectives/mlm.py, minilm/masking.py)
    mask_prob: float = option(0.15, "masked LMs: share of eligible (non-special) tokens to predict; mlm "
                                    "each independently, wwm max(1, round(p*n)) tokens in whole words, span "
                                    "exactly ceil(p*n)", within="(0, 1]")
    mask_replace_prob: float = option(0.8, "of the chosen tokens, the share shown as <mask>",
                                      within="[0, 1]")
    random_replace_prob: float = option(0.1, "the share shown as a random non-special token; the rest "
                                             "stay unchanged", within="[0, 1]")
    span_geometric_p: float = option(0.2, "span: span length in words ~ Geometric(p), clipped to "
                                          "span_min_words..span_max_words and renormalized",
                                     within="(0, 1]")
    span_min_words: int = option(1, "span: the shortest span, in words", at_least=1)
    span_max_words: int = option(10, "span: the longest span, in words", at_least=1)
    # T5 span corruption (minilm/objectives/t5.py, minilm/masking.py)
    noise_density: float = option(0.15, "t5: share of each window's tokens hidden in noise spans (each span "
                                        "becomes one sentinel in the input)", within="(0, 1)")
    mean_noise_span_length: float = option(3.0, "t5: mean length of a noise span, in tokens; spans = "
                                                "round(noise tokens / this)", at_least=1)
    # replaced-token detection (ELECTRA; minilm/objectives/rtd.py); its masking reads --mask_prob too
    generator_fraction: float = option(0.25, "rtd: the generator's width as a share of the discriminator's "
                                             "(head size kept, so its heads are scaled; at least one)",
                                       within="(0, 1]")
    rtd_weight: float = option(50.0, "rtd: loss = generator MLM loss + this x discriminator loss",
                               at_least=0)
    rtd_replacement: str = option("electra", "rtd: what the generator sees at a chosen token: electra (85% "
                                             "<mask>, 15% unchanged) or bert (--mask_replace_prob / "
                                             "--random_replace_prob, 80/10/10)", choices=("electra", "bert"))
    generator_temperature: float = option(1.0, "rtd: replacements are sampled from softmax(generator logits "
                                               "/ this)", above=0)
    embedding_sharing: str = option("electra", "rtd: the token table of the generator and the discriminator: "
                                               "electra (one table), none (one each) or gdes (the "
                                               "discriminator's is the generator's, without its gradient, "
                                               "plus a residual of its own: DeBERTa-v3)",
                                    choices=("electra", "none", "gdes"))
    # permutation LM (minilm/objectives/plm.py)
    plm_partial_k: int = option(6, "plm: predict the last 1/K of each sequence's random factorization order "
                                   "(XLNet's K): round(seq_len / K) targets per row", at_least=2)
    plm_span_targets: bool = option(False, "plm: choose the targets as XLNet's spans (n = 1..5 tokens with p ~ 1/n, "
                                           "one per stretch of 7n tokens) instead of uniformly")
    sentence_task: str = option("sop", "the sentence-pair head: sop (ALBERT: order swapped?) or nsp "
                                       "(BERT: B random?)", choices=("sop", "nsp"))
    # --- classify (fine-tuning a classification head; minilm/objectives/classify.py) ---
    pooling: str = option("auto", "classify: the one vector per text the head reads: first ([CLS]), mean (over "
                                  "the real tokens) or last (the last real token, for causal decoders); auto = "
                                  "last for a causal backbone, first from scratch or after sop/simcse (which "
                                  "train [CLS]), mean after the other pretraining objectives", choices=("auto", "first", "mean", "last"))
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
    # contrastive sentence embeddings (simcse, simcse_sup; minilm/objectives/simcse.py)
    simcse_pooling: str = option("first", "simcse: the sentence vector: first ([CLS], with an MLP in training "
                                          "only) or mean (over the real tokens)", choices=("first", "mean"))
    simcse_temperature: float = option(0.05, "simcse: InfoNCE logits are cosine similarities / this", above=0)
    simcse_hard_negative_weight: float = option(0.0, "simcse_sup: added to each row's logit of its own hard "
                                                     "negative (SimCSE's hard_negative_weight)")

    def validate(self) -> None:
        check_fields(self)
        if self.mask_replace_prob + self.random_replace_prob > 1.0 + 1e-9:
            raise UserError(f"--mask_replace_prob + --random_replace_prob must be at most 1, got "
                            f"{self.mask_replace_prob} + {self.random_replace_prob}")
        if self.span_min_words > self.span_max_words:
            raise UserError(f"span lengths need 1 <= --span_min_words <= --span_max_words, got "
                            f"{self.span_min_words} and {self.span_max_words}")


TENSORBOARD_HINT = ('--tensorboard needs the tensorboard package: pip install tensorboard (or pip install -e '
                    '".[tensorboard]"), or leave out --tensorboard')


@dataclass
class TrainConfig:
    objective: str = option("clm", "the objective, or a+b for several on one backbone (the list is in "
                                   "README.md)")
    out_dir: str = option("out", "where checkpoints, metrics, tokenizer and token files go")
    batch_size: int = option(16, "sequences per micro-batch", at_least=1)
    grad_accum: int = option(1, "micro-batches per optimizer step", at_least=1)
    max_steps: int = option(600, "optimizer steps; 0 = prepare the tokenizer and data only", at_least=0)
    lr: float = option(2e-3, "peak learning rate", above=0)
    min_lr: float = option(2e-4, "final learning rate, at max_steps (at most lr)", at_least=0)
    warmup_steps: int = option(100, "linear warmup from 0 to lr (at most max_steps)", at_least=0)
    schedule: str = option("cosine", "decay after warmup: cosine, linear or constant",
                           choices=("cosine", "linear", "constant"))
    weight_decay: float = option(0.1, "AdamW decay, on matrices only (not on norms or biases)", at_least=0)
    beta1: float = option(0.9, "AdamW beta1", within="[0, 1)")
    beta2: float = option(0.95, "AdamW beta2", within="[0, 1)")
    grad_clip: float = option(1.0, "max gradient norm; 0 disables clipping", at_least=0)
    eval_every: int = option(200, "steps between validations (and one at the end)", at_least=1)
    eval_batches: int = option(20, "batches per validation", at_least=1)
    log_every: int = option(10, "steps between log lines", at_least=1)
    ckpt_every: int = option(500, "steps between checkpoints (and one at the end)", at_least=1)
    seed: int = option(1337, "data order, masking and initialisation", within="[0, 2**64)")
    device: str = option("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps",
                         choices=("auto", "cpu", "cuda", "cuda:N", "mps"))
    dtype: str = option("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16, or fp16 (CUDA "
                                "only, with loss scaling)", choices=("auto", "fp32", "bf16", "fp16"))
    compile: bool = option(False, "torch.compile the model (checkpoints hold the uncompiled weights)")
    resume: str = option("", "auto (or bare --resume): the newest checkpoint in out_dir that loads; or "
                             "the path of a checkpoint file; empty = start fresh")
    init_from: str = option("", "start a new run from a checkpoint's weights (continued pretraining): "
                                "its tokenizer, step 0, a fresh optimizer and schedule")
    overwrite: bool = option(False, "allow a fresh run in an out_dir that already holds checkpoints "
                                    "(they are deleted first)")
    keep_checkpoints: int = option(3, "newest checkpoints kept in out_dir, older ones are deleted; "
                                      "0 keeps them all", at_least=0)
    on_nan: str = option("stop", "non-finite loss: stop with a message, or rollback to the last "
                                 "checkpoint at half the learning rate", choices=("stop", "rollback"))
    fsdp: bool = option(False, "shard the model across torchrun processes (FSDP2) instead of "
                               "replicating it (DDP)")
    deterministic: bool = option(False, "PyTorch's deterministic algorithms (CUDA); CPU runs are "
                                        "already deterministic")
    threads: int = option(0, "CPU threads for torch; 0 = torch's default", at_least=0)
    tensorboard: bool = option(False, "also log every metrics.jsonl row to out_dir/tensorboard (needs the "
                                      "tensorboard package)")

    def validate(self) -> None:
        check_fields(self)
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:   # before any data is prepared
            raise UserError(TENSORBOARD_HINT)
        if self.min_lr > self.lr:
            raise UserError(f"--min_lr must be at most --lr ({self.lr}), got {self.min_lr}")
        if self.max_steps > 0 and self.warmup_steps > self.max_steps:
            raise UserError(f"--warmup_steps must be at most --max_steps ({self.max_steps}), got "
                            f"{self.warmup_steps}: the learning rate would never reach --lr; pass "
                            f"--warmup_steps {self.max_steps} or less")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    obj: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        def build(klass, values):
            known = {f.name for f in fields(klass)}
            return klass(**{k: v for k, v in (values or {}).items() if k in known})
        return cls(model=build(ModelConfig, d.get("model")), data=build(DataConfig, d.get("data")),
                   obj=build(ObjectiveConfig, d.get("obj")), train=build(TrainConfig, d.get("train")))

    def validate(self) -> None:
        """A one-line UserError naming the flag for the first field out of its range, or for two
        fields that do not fit together."""
        for section in SECTIONS:
            getattr(self, section).validate()

    def check_fields(self) -> None:
        """Each field alone, without the rules that tie fields together."""
        for section in SECTIONS:
            check_fields(getattr(self, section))

    def describe(self) -> str:
        lines = []
        for section in SECTIONS:
            obj = getattr(self, section)
            items = "  ".join(f"{f.name}={getattr(obj, f.name)}" for f in fields(obj))
            lines.append(f"[{section}] {items}")
        return "\n".join(lines)


SECTIONS = ("model", "data", "obj", "train")
SECTION_CLASSES = {"model": ModelConfig, "data": DataConfig, "obj": ObjectiveConfig, "train": TrainConfig}


def config_from_saved(saved) -> Config:
    """The Config a checkpoint stores (Config.to_dict), held to what flags are held to: each
    section a table of known fields, each field of its type and in its range (check_fields), and
    the rules that tie the model's fields and the objective options together. The data and
    training sections' cross-field rules are left out: they shape no weights, and a resumed run
    validates its whole config again. A missing section or field takes its default (a checkpoint
    of an older minilm lacks the newer fields). UserError naming the first problem."""
    if not isinstance(saved, dict):
        raise UserError(f"the config is {type(saved).__name__}, not a table of sections")
    extra = [name for name in saved if name not in SECTION_CLASSES]
    if extra:
        raise UserError(f"the config has an unknown section {extra[0]!r} (known: {', '.join(SECTIONS)})")
    for section, klass in SECTION_CLASSES.items():
        values = saved.get(section, {})
        if not isinstance(values, dict):
            raise UserError(f"the config's {section!r} section is {type(values).__name__}, not a table of fields")
        known = {f.name for f in fields(klass)}
        unknown = [name for name in values if name not in known]
        if unknown:
            raise UserError(f"the config's {section!r} section has an unknown field {unknown[0]!r}")
    cfg = Config.from_dict(saved)
    cfg.check_fields()
    cfg.model.validate()
    cfg.obj.validate()
    return cfg


def _field_index(cfg: Config) -> dict[str, tuple[object, dataclasses.Field]]:
    """flag name -> (section object, field). Names are unique across sections by design."""
    index = {}
    for section in SECTIONS:
        obj = getattr(cfg, section)
        for f in fields(obj):
            assert f.name not in index, f"duplicate config field {f.name}"
            index[f.name] = (obj, f)
    return index


def _convert(name: str, raw: str, kind: type):
    try:
        if kind is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            return int(float(raw)) if ("e" in raw.lower() and float(raw).is_integer()) else int(raw)
        if kind is float:
            return float(raw)
        return raw
    except ValueError:
        raise UserError(f"--{name} expects {ARTICLE[kind.__name__]}, got {raw!r}") from None


# flags that may stand alone, and the value they then mean (besides booleans, which mean true)
BARE_VALUES = {"resume": "auto"}


def _split_flags(argv: list[str], is_bool) -> list[tuple[str, str]]:
    """['--a', '1', '--b=2', '--flag'] -> [('a', '1'), ('b', '2'), ('flag', 'true')]."""
    pairs = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise UserError(f"unexpected argument {arg!r}; flags look like --name value")
        name, eq, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if (is_bool(name) or name in BARE_VALUES) and (nxt is None or nxt.startswith("--")):
                value = BARE_VALUES.get(name, "true")  # `--compile` alone means --compile true
            elif nxt is None:
                raise UserError(f"--{name} needs a value")
            else:
                value = nxt
                i += 1
        pairs.append((name, value))
        i += 1
    return pairs


def _reject_unknown(pairs, valid) -> None:
    valid = sorted(valid)
    for name, _ in pairs:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f"; did you mean --{close[0]}?" if close else "; see the README for every flag"
            raise UserError(f"unknown flag --{name}{hint}")


def parse_flags(argv: list[str], defaults: dict) -> dict:
    """Flags of a script that has no Config (sample.py): name -> typed value, typed by default."""
    pairs = _split_flags(argv, lambda n: isinstance(defaults.get(n), bool))
    _reject_unknown(pairs, defaults)
    out = dict(defaults)
    for name, value in pairs:
        out[name] = _convert(name, value, type(defaults[name])) if defaults[name] is not None else value
    return out


# --resume values that mean a fresh start (train.py's wants_resume reads the others)
FRESH_START = ("", "false", "0", "no", "off")


def parse_overrides(argv: list[str], base: Config | None = None) -> Config:
    """A Config from `--preset` and `--field value` flags, applied on top of `base`, validated.

    Raises UserError for an unknown flag (naming the closest valid one) or a bad value: any field
    out of its range, or two fields that do not fit together (Config.validate). A command line that
    resumes, parsed without a base, is checked field by field only: its config is the checkpoint's
    with these flags on top, which train.py parses again, and validates whole, once it has the
    checkpoint (so `--resume --max_steps 50` is not held against the default --warmup_steps 100).
    """
    cfg = copy.deepcopy(base) if base is not None else Config()
    index = _field_index(cfg)
    pairs = _split_flags(argv, lambda n: n in index and index[n][1].type == "bool")
    _reject_unknown(pairs, set(index) | {"preset"})
    # preset first, so explicit flags override it whatever their order
    for name, value in pairs:
        if name == "preset":
            if value not in PRESETS:
                raise UserError(f"unknown --preset {value!r}; choose one of {', '.join(PRESETS)}")
            for k, v in PRESETS[value].items():
                setattr(cfg.model, k, v)
    for name, value in pairs:
        if name != "preset":
            obj, f = index[name]
            setattr(obj, name, _convert(name, value, TYPES[f.type]))
    if base is None and cfg.train.resume.strip().lower() not in FRESH_START:
        cfg.check_fields()
    else:
        cfg.validate()
    return cfg


def explicit_flags(argv: list[str]) -> set[str]:
    """Names of the flags given on a command line (to tell what a resumed run overrides)."""
    return {a[2:].partition("=")[0].replace("-", "_") for a in argv if a.startswith("--")}


# ----------------------------------------------------------------------------- --help
SECTION_TITLES = {
    "model": "model (ModelConfig); --preset tiny|small|base sets n_layer, n_head, n_embd and seq_len, "
             "then the flags win",
    "data": "data and tokenizer (DataConfig)",
    "obj": "objective options (ObjectiveConfig); each objective reads the ones it needs",
    "train": "training (TrainConfig)",
}


def _shown(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if value != "" else '""'


def help_text(width: int = 100) -> str:
    """Every flag, section by section: `--name default`, then its meaning, wrapped to `width`."""
    column = 31  # where meanings start; a longer flag puts its meaning on the next line
    lines = []
    for section in SECTIONS:
        lines += ["", *textwrap.wrap(SECTION_TITLES[section], width)]
        for f in fields(getattr(Config(), section)):
            flag = f"  --{f.name} {_shown(f.default)}"
            meaning = textwrap.wrap(f.metadata["help"], width - column)
            if len(flag) >= column - 1:
                lines.append(flag)
            else:
                flag, first = flag.ljust(column), meaning.pop(0)
                lines.append(flag + first)
            lines += [" " * column + rest for rest in meaning]
    return "\n".join(lines)
