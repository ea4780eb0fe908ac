"""Configuration: plain dataclasses, size presets, and command-line overrides by field name.

A run is described by one `Config`, made of four sections:

    ModelConfig      the network's shape (n_layer, n_head, n_embd, ...)
    DataConfig       where the text comes from and how it is tokenized
    ObjectiveConfig  the objectives' options (masking rates, span lengths, loss weights), each
                     declared in its objective's file (an Options dataclass) and gathered here
    TrainConfig      which objective, the optimizer, the schedule, logging and checkpoints

Every field of every section can be set from the command line as `--field value` (or
`--field=value`); field names are unique across sections, so no prefixes are needed. A size
preset (`--preset tiny|small|base`) and an architecture (`--arch llama|qwen3|gpt2|bert|roberta`) fill
the model section first, then explicit flags win.
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
import textwrap
from dataclasses import dataclass, field, fields

from minilm.errors import UserError
# fields are declared with option(default, meaning, rule), shared with the objectives' own options:
# check_fields checks each alone, a section's validate() the rules that tie fields together
from minilm.options import ARTICLE, TYPES, check_fields, check_value, merge_fields, option, type_name  # noqa: F401


def auto_warmup(max_steps: int) -> int:
    """--warmup_steps auto: min(100, max_steps // 5), so a 600-step run keeps 100 and a 50-step
    run warms up over 10 (a fifth of it) instead of being refused. max_steps 0 (prepare the data
    only) trains no step: it keeps the cap, the default of before."""
    return min(100, max_steps // 5) if max_steps > 0 else 100


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
    mlp: str = option("gelu", "the MLP: gelu (exact, BERT), swiglu (Llama), gelu_tanh (GPT-2's tanh "
                              "approximation) or relu2 (squared ReLU, Primer)",
                      choices=("gelu", "swiglu", "gelu_tanh", "relu2"))
    norm: str = option("rmsnorm", "the norm: rmsnorm or layernorm", choices=("rmsnorm", "layernorm"))
    # model.py's Block says why pre is the default
    norm_placement: str = option("pre", "where each block's norms sit: pre (before each sub-layer, and a final "
                                        "norm; stable without warmup) or post (after each residual sum, no final "
                                        "norm: BERT, RoBERTa)", choices=("pre", "post"))
    position: str = option("rope", "positions: rope (rotary) or learned (GPT-2's table)",
                           choices=("rope", "learned"))
    rope_base: float = option(10000.0, "RoPE frequency base", above=1)
    norm_eps: float = option(1e-5, "norm epsilon", above=0)
    dropout: float = option(0.0, "dropout on attention weights, residual branches and embeddings",
                            within="[0, 1)")
    bias: bool = option(False, "biases in linear layers and LayerNorm")
    tie_embeddings: bool = option(True, "the LM head reuses the token embedding matrix")
    # objectives that read sentence pairs or translations raise it to 2 (their configure: sop.py, tlm.py)
    n_segment: int = option(0, "segment (token-type) embeddings; 0 = none, but objectives that read "
                               "sentence pairs or translations use 2 or more", at_least=0)
    # the masked LMs turn it on for their encoder (objectives/mlm.py, configure)
    embed_norm: bool = option(False, "a norm on the summed embeddings before the first block (BERT, "
                                     "RoBERTa, ModernBERT); the masked LMs always use it")
    # encoder-decoder objectives (t5) set it from n_layer when it is 0 (objectives/t5.py, configure)
    n_decoder_layer: int = option(0, "decoder depth of an encoder-decoder, which has n_layer encoder "
                                     "blocks; 0 = no decoder stack (an encoder-decoder then uses n_layer)", at_least=0)
    # speedrun switches (modded-nanogpt's recipe; model.py says what each does), off by default
    qk_norm: bool = option(False, "QK-norm: an RMSNorm over each head's queries and keys before RoPE and the "
                                  "dot product (the scores no longer grow with the weights)")
    logit_softcap: float = option(0.0, "soft-cap the LM head's logits to (-C, C) as C * tanh(logits / C) (Gemma "
                                       "2, modded-nanogpt: 30 or 15); 0 = off", at_least=0)

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


# Architecture presets: the fields that make minilm's one Block and its embeddings exactly a
# family the ecosystem uses, so its checkpoints import and export by renaming weights
# (hf_format.py). Applied like a size preset (`--preset small --arch bert`: both fill, then
# explicit flags win), and not saved: what is saved is the fields. Each sets every field that
# tells the families apart, so an arch is the same model whatever it is applied on; README.md's
# model section lists each one's differences from the defaults.
ARCHES: dict[str, dict] = {
    # Touvron et al. 2023: RMSNorm, rotary positions, SwiGLU, no biases, an untied output matrix
    "llama": dict(norm_placement="pre", norm="rmsnorm", norm_eps=1e-6, bias=False, position="rope",
                  mlp="swiglu", tie_embeddings=False, n_segment=0, embed_norm=False, qk_norm=False),
    # Qwen Team 2025 (Qwen3): llama's blocks with QK-norm, an RMSNorm over each head's query and key
    "qwen3": dict(norm_placement="pre", norm="rmsnorm", norm_eps=1e-6, bias=False, position="rope",
                  mlp="swiglu", tie_embeddings=False, n_segment=0, embed_norm=False, qk_norm=True),
    # Radford et al. 2019: LayerNorm with biases, a learned position table, tanh GELU, tied head
    "gpt2": dict(norm_placement="pre", norm="layernorm", norm_eps=1e-5, bias=True, position="learned",
                 mlp="gelu_tanh", tie_embeddings=True, n_segment=0, embed_norm=False, qk_norm=False),
    # Devlin et al. 2019: post-LayerNorm blocks, learned positions, two token types, a normed embedding sum
    "bert": dict(norm_placement="post", norm="layernorm", norm_eps=1e-12, bias=True, position="learned",
                 mlp="gelu", tie_embeddings=True, n_segment=2, embed_norm=True, qk_norm=False),
    # Liu et al. 2019: BERT's model with one token type (its position offset of 2 is import/export's)
    "roberta": dict(norm_placement="post", norm="layernorm", norm_eps=1e-12, bias=True, position="learned",
                    mlp="gelu", tie_embeddings=True, n_segment=1, embed_norm=True, qk_norm=False),
}


@dataclass
class DataConfig:
    data: str = option("", "text file, folder, glob or .jsonl; empty = the built-in corpus")
    text_field: str = option("text", "the field (JSON, JSON Lines) or column (CSV, TSV) holding the text")
    label_field: str = option("label", "labelled rows: the field or column holding each row's label (any string)")
    pair_field: str = option("", "row data with two texts: the second text's field or column (a "
                                 "translation, or a sentence pair's positive)")
    negative_field: str = option("", "sentence pairs: the hard negative's field or column (optional)")
    val_data: str = option("", "row data: a file of validation rows; empty: a split of --data (stratified "
                               "by label for labelled rows)")
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


# ObjectiveConfig: the options of every registered objective (minilm/objectives/__init__.py), one
# flat section: each objective declares its own in its file (an Options dataclass), and the run's
# section is their union, made when it is first used (so an objective registered later, a toy in
# a test or a user's script, gets its flags too). Flat, so a checkpoint's "obj" table, and every
# flag, stay as they were when all of them lived here.
_objective_config: tuple[tuple, type] | None = None


def _validate_objective_options(self) -> None:
    """Each field alone, then each objective's own rules (its Options.validate) on its fields."""
    check_fields(self)
    for options_class in self.option_classes:
        options_class(**{f.name: getattr(self, f.name) for f in fields(options_class)}).validate()


def objective_config_class() -> type:
    """The dataclass of the objective section: the registered objectives' Options fields, grouped
    by objective in the registry's order. Made again when the registry has changed."""
    global _objective_config
    from minilm.objectives import option_classes   # the registry (imports torch): only once a Config is made
    classes = tuple(option_classes())
    if _objective_config is None or _objective_config[0] != classes:
        # types as their names ("float"), as this module's own annotations are (parse_overrides reads them)
        declared = [(f.name, type_name(f), field(default=f.default, metadata=f.metadata))
                    for f in merge_fields(classes)]
        made = dataclasses.make_dataclass("ObjectiveConfig", declared, namespace={
            "__doc__": "Options of the registered objectives, one flat section: each objective declares its "
                       "own (its Options dataclass, in its file) and reads them there.",
            "__module__": __name__,
            "option_classes": classes,
            "validate": _validate_objective_options})
        _objective_config = (classes, made)
    return _objective_config[1]


def __getattr__(name: str):
    # `from minilm.config import ObjectiveConfig`: the class of the registry as it is now
    if name == "ObjectiveConfig":
        return objective_config_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    # --epochs: the steps follow from the prepared data's size (minilm/epochs.py)
    epochs: int = option(0, "passes over the training data; sets max_steps from the data's size (0 = use "
                            "--max_steps)", at_least=0)
    lr: float = option(2e-3, "peak learning rate", above=0)
    min_lr: float = option(2e-4, "final learning rate, at max_steps (at most lr)", at_least=0)
    warmup_steps: int = option(-1, "linear warmup from 0 to lr (at most max_steps); auto (or -1) = min(100, "
                                   "max_steps // 5), resolved to the number used", at_least=0, auto=-1)
    schedule: str = option("cosine", "decay after warmup: cosine, linear, constant or wsd (constant, then a "
                                     "linear decay over the last --decay_fraction)",
                           choices=("cosine", "linear", "constant", "wsd"))
    decay_fraction: float = option(0.2, "--schedule wsd: the fraction of max_steps, at the end, over which the lr "
                                        "falls linearly to min_lr", within="(0, 1]")
    optimizer: str = option("adamw", "adamw, or muon: Muon on the blocks' 2-D weights (attention, MLP), AdamW "
                                     "on embeddings, LM head, norms, biases and objective heads (minilm/optim.py)",
                            choices=("adamw", "muon"))
    muon_lr: float = option(0.0, "--optimizer muon: Muon's lr, scaled per matrix to AdamW's update size "
                                 "(match_rms_adamw); 0 = --lr", at_least=0)
    muon_momentum: float = option(0.95, "--optimizer muon: Muon's (Nesterov) momentum", within="[0, 1)")
    embedding_lr: float = option(0.0, "the token, position and segment tables' AdamW lr; 0 = --lr", at_least=0)
    lm_head_lr: float = option(0.0, "the untied LM head's AdamW lr (a tied head is the token table); 0 = --lr",
                               at_least=0)
    weight_decay: float = option(0.1, "AdamW decay, on matrices only (not on norms or biases)", at_least=0)
    beta1: float = option(0.9, "AdamW beta1", within="[0, 1)")
    beta2: float = option(0.95, "AdamW beta2", within="[0, 1)")
    grad_clip: float = option(1.0, "max gradient norm; 0 disables clipping", at_least=0)
    eval_every: int = option(200, "steps between validations (and one at the end)", at_least=1)
    eval_batches: int = option(20, "batches per validation", at_least=1)
    early_stopping_patience: int = option(0, "stop when the objective's best_metric (a classifier's macro_f1; "
                                             "else the val loss) has not improved for this many evaluations; 0 = off",
                                          at_least=0)
    log_every: int = option(10, "steps between log lines", at_least=1)
    ckpt_every: int = option(500, "steps between checkpoints (and one at the end)", at_least=1)
    seed: int = option(1337, "data order, masking and initialisation", within="[0, 2**64)")
    device: str = option("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps",
                         choices=("auto", "cpu", "cuda", "cuda:N", "mps"))
    dtype: str = option("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16, or fp16 (CUDA "
                                "only, with loss scaling)", choices=("auto", "fp32", "bf16", "fp16"))
    compile: bool = option(False, "torch.compile the model (checkpoints hold the uncompiled weights)")
    activation_checkpointing: bool = option(False, "recompute each block's activations in backward instead of "
                                                    "keeping them: less memory, ~1 more forward pass of compute, "
                                                    "same gradients")
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
        if self.optimizer == "muon" and self.fsdp:
            raise UserError("--optimizer muon orthogonalizes whole matrices, and --fsdp shards them; "
                            "drop --fsdp (DDP works) or use --optimizer adamw")
        # with --epochs the steps are known once the data is (minilm/epochs.py checks the warmup then)
        if self.warmup_steps < 0 and not self.epochs:
            self.warmup_steps = auto_warmup(self.max_steps)   # the saved and printed config holds the number
        if self.max_steps > 0 and not self.epochs and self.warmup_steps > self.max_steps:
            raise UserError(f"--warmup_steps must be at most --max_steps ({self.max_steps}), got "
                            f"{self.warmup_steps}: the learning rate would never reach --lr; pass "
                            f"--warmup_steps {self.max_steps} or less")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    obj: ObjectiveConfig = field(default_factory=lambda: objective_config_class()())
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        def build(klass, values):
            known = {f.name for f in fields(klass)}
            return klass(**{k: v for k, v in (values or {}).items() if k in known})
        return cls(model=build(ModelConfig, d.get("model")), data=build(DataConfig, d.get("data")),
                   obj=build(objective_config_class(), d.get("obj")), train=build(TrainConfig, d.get("train")))

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


def section_classes() -> dict[str, type]:
    """Section name -> its dataclass (the objective section's as the registry makes it now)."""
    return {"model": ModelConfig, "data": DataConfig, "obj": objective_config_class(), "train": TrainConfig}


def config_from_saved(saved) -> Config:
    """The Config a checkpoint stores (Config.to_dict), held to what flags are held to: each
    section a table of known fields, each field of its type and in its range (check_fields), and
    the rules that tie the model's fields and the objective options together. The data and
    training sections' cross-field rules are left out: they shape no weights, and a resumed run
    validates its whole config again. A missing section or field takes its default (a checkpoint
    of an older minilm lacks the newer fields). UserError naming the first problem."""
    if not isinstance(saved, dict):
        raise UserError(f"the config is {type(saved).__name__}, not a table of sections")
    extra = [name for name in saved if name not in SECTIONS]
    if extra:
        raise UserError(f"the config has an unknown section {extra[0]!r} (known: {', '.join(SECTIONS)})")
    for section, klass in section_classes().items():
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
            if raw.lower() == "auto" and name in AUTO_INTS:
                return AUTO_INTS[name]
            return int(float(raw)) if ("e" in raw.lower() and float(raw).is_integer()) else int(raw)
        if kind is float:
            return float(raw)
        return raw
    except ValueError:
        raise UserError(f"--{name} expects {ARTICLE[kind.__name__]}, got {raw!r}") from None


# int flags that also take the word auto, and the number that stands for it until resolved (option's auto)
AUTO_INTS = {"warmup_steps": -1}


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


# ----------------------------------------------------------------------------- --config run.toml
# the flags that fill model fields from a table, in the order they apply; not fields themselves
# (applied before the fields' own flags, from the command line or a --config file)
MODEL_PRESETS = {"preset": PRESETS, "arch": ARCHES}
META_FLAGS = tuple(MODEL_PRESETS)


def _flag_value(argv: list[str], name: str) -> list[str]:
    """The values given to --name on a command line (`--name v` or `--name=v`), in order."""
    values = []
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag.startswith("--") and flag[2:].replace("-", "_") == name:
            values.append(value if eq else (argv[i + 1] if i + 1 < len(argv) else ""))
    return values


def _toml_value(where: str, name: str, value, kind: type) -> str:
    """A TOML value as the flag text it stands for, after checking its type: the file and the
    command line then go through the same parsing and the same checks (and flags stay the one way
    in). bool is a subclass of int in Python, so it is told apart first."""
    fits = (isinstance(value, bool) if kind is bool else
            isinstance(value, str) if kind is str else
            not isinstance(value, bool) and (isinstance(value, int) or (kind is float and isinstance(value, float))))
    if not fits:
        shown = str(value).lower() if isinstance(value, bool) else repr(value)   # as TOML writes it
        raise UserError(f"{where}: {name} expects {ARTICLE[kind.__name__]}, got {shown}")
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def _did_you_mean(name: str, valid, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, sorted(valid), n=1)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def read_config_file(path: str) -> list[tuple[str, str]]:
    """A TOML file of settings as (flag name, flag text) pairs, in the file's order.

    Keys are field names, at the top level or in the table of their section:

        preset = "small"          # and the other flags that are not fields (META_FLAGS)
        objective = "mlm"
        [model]
        n_layer = 8
        [train]
        lr = 1e-3

    Each value must have its field's type (a TOML string for a string field, true/false for a
    bool, ...). An unknown key, a key in another section's table, an unknown table or a key set
    twice is a one-line UserError naming the file."""
    try:
        import tomllib   # the standard library's TOML reader, new in Python 3.11
    except ImportError:
        import platform
        raise UserError(f"--config reads TOML with tomllib, which Python 3.11+ has and this Python "
                        f"{platform.python_version()} lacks; use Python 3.11+ or give the settings as flags") from None
    where = path
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"--config {path} is a folder; give a .toml file") from None
    except OSError as err:
        raise UserError(f"--config {path}: cannot read it ({err.strerror or err})") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{where} is not valid TOML: {err}") from None
    sections = {name: {f.name: f for f in fields(klass)} for name, klass in section_classes().items()}
    owner = {name: section for section, names in sections.items() for name in names}
    pairs, seen = [], {}

    def add(name: str, value, place: str) -> None:
        if name in seen:
            raise UserError(f"{where} sets {name} twice ({seen[name]} and {place}); keep one")
        seen[name] = place
        if name in META_FLAGS:
            pairs.append((name, _toml_value(where, name, value, str)))
        else:
            pairs.append((name, _toml_value(where, name, value, TYPES[type_name(sections[owner[name]][name])])))

    for key, value in table.items():
        # `data` is both a section and a field (the text to train on): a table is the section
        if key in sections and (isinstance(value, dict) or key not in owner):
            if not isinstance(value, dict):
                raise UserError(f"{where}: {key} is a section: write its fields under a [{key}] table")
            for name, item in value.items():
                if name not in sections[key]:
                    if name in owner:
                        raise UserError(f"{where}: [{key}] has no field {name}: it belongs in [{owner[name]}] "
                                        f"(or at the top of the file)")
                    raise UserError(f"{where}: [{key}] has no field {name!r}"
                                    + (_did_you_mean(name, sections[key]) or "; see the README for every flag"))
                add(name, item, f"[{key}]")
        elif key in owner or key in META_FLAGS:
            add(key, value, "the top level")
        elif isinstance(value, dict):
            close = difflib.get_close_matches(key, list(sections), n=1)
            raise UserError(f"{where}: unknown table [{key}]" + (f"; did you mean [{close[0]}]?" if close else "")
                            + f" (the tables are {', '.join(f'[{name}]' for name in sections)})")
        else:
            raise UserError(f"{where}: unknown key {key!r}"
                            + (_did_you_mean(key, [*owner, *META_FLAGS]) or "; see the README for every flag"))
    return pairs


def _with_config_file(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The command line's (name, value) pairs with a --config file's settings put first, so that
    every flag on the command line overrides the file wherever it stands."""
    files = [value for name, value in pairs if name == "config"]
    if len(files) > 1:
        raise UserError(f"--config was given {len(files)} times; give one file (flags can override it)")
    if not files:
        return pairs
    return read_config_file(files[0]) + [(name, value) for name, value in pairs if name != "config"]


def setting_origins(argv: list[str], cfg: Config) -> str:
    """One line: each value of `cfg` that differs from minilm's default, and where it came from:
    the command line, the --config file, a --preset, or else the run's own resolution (an
    objective's defaults, a resumed checkpoint's or an --init_from parent's config, the device)."""
    files = _flag_value(argv, "config")
    in_file = dict(read_config_file(files[0])) if files else {}
    on_line = explicit_flags(argv, with_file=False)
    presets = [value for value in [in_file.get("preset"), *_flag_value(argv, "preset")] if value in PRESETS]
    from_preset = set(PRESETS[presets[-1]]) if presets else set()
    default, shown = Config(), []
    for section in SECTIONS:
        for f in fields(getattr(cfg, section)):
            value = getattr(getattr(cfg, section), f.name)
            if value == getattr(getattr(default, section), f.name):
                continue
            given = f.name in on_line or f.name in in_file
            if f.name == "warmup_steps" and not given and value == auto_warmup(cfg.train.max_steps):
                continue                                  # the default, auto, as it resolved
            origin = ("command line" if f.name in on_line else files[0] if f.name in in_file else
                      f"--preset {presets[-1]}" if f.name in from_preset else "resolved")
            text = str(value) if len(str(value)) <= 40 else str(value)[:37] + "..."
            shown.append(f"{f.name}={text} ({origin})")
    return "settings other than the defaults: " + (", ".join(shown) if shown else "none")


def parse_overrides(argv: list[str], base: Config | None = None) -> Config:
    """A Config from `--preset`, `--arch` and `--field value` flags, applied on top of `base`, validated.

    Raises UserError for an unknown flag (naming the closest valid one) or a bad value: any field
    out of its range, or two fields that do not fit together (Config.validate). A command line that
    resumes, parsed without a base, is checked field by field only: its config is the checkpoint's
    with these flags on top, which train.py parses again, and validates whole, once it has the
    checkpoint (so `--resume --max_steps 50` is not held against the default --warmup_steps 100).
    """
    cfg = copy.deepcopy(base) if base is not None else Config()
    index = _field_index(cfg)
    pairs = _split_flags(argv, lambda n: n in index and index[n][1].type == "bool")
    _reject_unknown(pairs, set(index) | set(META_FLAGS) | {"config"})
    pairs = _with_config_file(pairs)   # --config FILE: its settings first, then the command line's
    # presets first (the size, then the architecture), so explicit flags override them whatever their order
    for flag, presets in MODEL_PRESETS.items():
        for name, value in pairs:
            if name == flag:
                for k, v in presets[_preset_name(flag, value, presets)].items():
                    setattr(cfg.model, k, v)
    for name, value in pairs:
        if name not in MODEL_PRESETS:
            obj, f = index[name]
            setattr(obj, name, _convert(name, value, TYPES[f.type]))
    if base is None and cfg.train.resume.strip().lower() not in FRESH_START:
        cfg.check_fields()
    else:
        cfg.validate()
    return cfg


def _preset_name(flag: str, value: str, presets: dict) -> str:
    if value not in presets:
        raise UserError(f"unknown --{flag} {value!r}; choose one of {', '.join(presets)}")
    return value


def explicit_flags(argv: list[str], with_file: bool = True) -> set[str]:
    """Names of the flags given on a command line (to tell what a resumed run overrides, and
    where an objective's defaults may still fill in), and of the settings of its --config file,
    which count as given flags. `--arch NAME` gives each field the arch sets: they are the user's
    choice of model, which an objective's defaults must not undo (a classifier from scratch keeps
    GPT-2's embeddings un-normed)."""
    pairs = []
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            pairs.append((name.replace("-", "_"), value if eq else (argv[i + 1] if i + 1 < len(argv) else "")))
    files = _flag_value(argv, "config") if with_file else []
    if files:
        pairs += read_config_file(files[0])
    names = {name for name, _ in pairs}
    for name, value in pairs:
        if name == "arch":
            names |= set(ARCHES.get(value, ()))
    return names


# ----------------------------------------------------------------------------- --help
SECTION_TITLES = {
    "model": "model (ModelConfig); --preset tiny|small|base sets n_layer, n_head, n_embd and seq_len, "
             "--arch " + "|".join(ARCHES) + " an architecture's fields (its differences from the defaults "
             "below), then the flags win",
    "data": "data and tokenizer (DataConfig)",
    "obj": "objective options (ObjectiveConfig); each objective reads the ones it needs",
    "train": "training (TrainConfig)",
}


def _shown(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if value != "" else '""'


def arch_differences(name: str) -> str:
    """What `--arch name` sets that differs from ModelConfig's defaults: "norm_eps=1e-06 mlp=swiglu ..."."""
    default = ModelConfig()
    return " ".join(f"{k}={_shown(v)}" for k, v in ARCHES[name].items() if getattr(default, k) != v)


def help_text(width: int = 100) -> str:
    """Every flag, section by section: `--name default`, then its meaning, wrapped to `width`."""
    column = 31  # where meanings start; a longer flag puts its meaning on the next line
    lines = [*textwrap.wrap("--config FILE: settings from a TOML file, field = value at the top level or in "
                            "[model], [data], [obj] and [train] tables (preset = \"small\" too); flags on the "
                            "command line override the file", width)]
    for section in SECTIONS:
        lines += ["", *textwrap.wrap(SECTION_TITLES[section], width)]
        if section == "model":   # each --arch, as a flag with its meaning
            for name in ARCHES:
                meaning = textwrap.wrap(arch_differences(name), width - column)
                lines += [f"  --arch {name}".ljust(column) + meaning[0], *(" " * column + rest for rest in meaning[1:])]
        for f in fields(getattr(Config(), section)):
            shown = "auto" if "auto" in f.metadata and f.default == f.metadata["auto"] else _shown(f.default)
            flag = f"  --{f.name} {shown}"
            meaning = textwrap.wrap(f.metadata["help"], width - column)
            if len(flag) >= column - 1:
                lines.append(flag)
            else:
                flag, first = flag.ljust(column), meaning.pop(0)
                lines.append(flag + first)
            lines += [" " * column + rest for rest in meaning]
    return "\n".join(lines)
