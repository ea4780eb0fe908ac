"""Configuration: plain dataclasses, size presets, and command-line overrides by field name.

A run is described by one `Config`, made of four sections:

    ModelConfig      the network's shape (n_layer, n_head, n_embd, ...)
    DataConfig       where the text comes from and how it is tokenized
    ObjectiveConfig  options of the objectives (masking rates, span lengths, loss weights)
    TrainConfig      which objective, the optimizer, the schedule, logging and checkpoints

Every field of every section can be set from the command line as `--field value` (or
`--field=value`); field names are unique across sections, so no prefixes are needed. A preset
(`--preset tiny|small|base`) fills the model section first, then explicit flags win.
The resolved config is printed at start and stored, as a plain dict, in every checkpoint.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass, field, fields

from minilm.errors import UserError


@dataclass
class ModelConfig:
    # The defaults are the quick run of `python train.py`: a few minutes on a laptop CPU.
    vocab_size: int = 4096        # the tokenizer is trained to exactly this many ids
    seq_len: int = 128            # longest sequence the model sees (context window)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256             # model width; head size is n_embd // n_head
    intermediate_size: int = 0    # MLP hidden width; 0 means 4 * n_embd (GELU) or 8/3 * n_embd (SwiGLU)
    mlp: str = "gelu"             # "gelu" | "swiglu"
    norm: str = "rmsnorm"         # "rmsnorm" | "layernorm"
    position: str = "rope"        # "rope" | "learned"
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    bias: bool = False            # biases in linear layers and LayerNorm
    tie_embeddings: bool = True   # the LM head reuses the token embedding matrix
    n_segment: int = 0            # segment (token-type) embeddings; 0 = none, but objectives that
                                  # read sentence pairs (sop) need 2 (objectives/base.py, model settings)
    embed_norm: bool = False      # a norm on the summed embeddings before the first block (BERT, RoBERTa,
                                  # ModernBERT); the masked LMs turn it on for their encoder (objectives/mlm.py)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        if self.intermediate_size:
            return self.intermediate_size
        if self.mlp == "swiglu":  # keeps the parameter count of a 4x GELU MLP (LLaMA's 2/3 rule)
            return int(8 * self.n_embd / 3 + 63) // 64 * 64
        return 4 * self.n_embd

    def validate(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise UserError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                            f"try --n_embd {self.n_embd // self.n_head * self.n_head or self.n_head}")
        if self.position == "rope" and self.head_dim % 2 != 0:
            raise UserError(f"RoPE needs an even head size, got n_embd/n_head = {self.head_dim}; "
                            "change n_embd or n_head, or pass --position learned")
        for name, allowed in (("mlp", ("gelu", "swiglu")), ("norm", ("rmsnorm", "layernorm")),
                              ("position", ("rope", "learned"))):
            if getattr(self, name) not in allowed:
                raise UserError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("seq_len", "n_layer", "n_head", "n_embd", "vocab_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.n_segment < 0:
            raise UserError(f"--n_segment must be 0 (no segment embeddings) or more, got {self.n_segment}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")


# Size presets. "base" is the GPT-2 124M shape (with GPT-2's 1024 context and 50k-ish vocab
# it is 124M parameters; with the benchmarks' 8192-token vocab it is about 92M).
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=2, n_head=4, n_embd=128, seq_len=128),     # ~0.9M with a 4096 vocab (tests)
    "small": dict(n_layer=6, n_head=6, n_embd=384, seq_len=256),    # ~10.6M + embeddings (the bench config)
    "base": dict(n_layer=12, n_head=12, n_embd=768, seq_len=1024),  # GPT-2 small's shape
}


@dataclass
class DataConfig:
    data: str = ""                # text file, folder, glob or .jsonl; empty = the built-in corpus
    text_field: str = "text"      # the field holding the text in .jsonl rows
    character_coverage: float = 0.9995
    tokenizer_sample_lines: int = 2_000_000  # lines sentencepiece trains on (sampled from large corpora)
    val_fraction: float = 0.05    # share of documents held out for validation
    num_workers: int = 0          # processes for tokenizing in prepare; 0 = every core


@dataclass
class ObjectiveConfig:
    """Options of the objectives (masking rates, span laws, loss weights). Each objective reads
    the fields it needs and documents them in its own file."""
    objective_weights: str = ""   # for "a+b" objectives: comma-separated loss weights, e.g. "1,0.5"
    # causal LM (minilm/objectives/clm.py)
    predict_after_eos: bool = True    # predict a document's first token from the end of the one before;
                                      # false ignores those targets (<eos> itself is always a target)
    # masked-LM family (mlm, wwm, span; minilm/objectives/mlm.py, minilm/masking.py)
    mask_prob: float = 0.15           # share of eligible tokens to predict (mlm: each independently;
                                      # wwm: max(1, round(p*n)) tokens in whole words; span: exactly ceil(p*n))
    mask_replace_prob: float = 0.8    # of the chosen tokens: shown as <mask> ...
    random_replace_prob: float = 0.1  # ... shown as a random non-special token; the rest stay unchanged
    span_geometric_p: float = 0.2     # span: span length in words ~ Geometric(p), clipped, renormalized
    span_min_words: int = 1
    span_max_words: int = 10
    sentence_task: str = "sop"    # sentence-pair head: "sop" (ALBERT: order swapped?) or "nsp" (BERT: B random?)


@dataclass
class TrainConfig:
    objective: str = "clm"
    out_dir: str = "out"
    batch_size: int = 16          # sequences per micro-batch
    grad_accum: int = 1           # micro-batches per optimizer step
    max_steps: int = 600
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 100
    schedule: str = "cosine"      # "cosine" | "linear" | "constant" (after warmup)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0        # 0 disables clipping
    eval_every: int = 200
    eval_batches: int = 20
    log_every: int = 10
    ckpt_every: int = 500
    seed: int = 1337
    device: str = "auto"          # "auto" | "cpu" | "cuda" | "mps" | "cuda:1" ...
    dtype: str = "auto"           # "auto" | "fp32" | "bf16" | "fp16" (fp16 only on CUDA)
    compile: bool = False
    resume: str = ""              # "" = start fresh; "auto" (or bare --resume) = newest checkpoint in out_dir
                                  # that loads; or the path of a checkpoint file
    init_from: str = ""           # start a new run from a checkpoint's weights (continued pretraining):
                                  # its tokenizer, step 0, a fresh optimizer and schedule
    overwrite: bool = False       # allow a fresh run in an out_dir that already holds checkpoints
                                  # (they are deleted first)
    keep_checkpoints: int = 3     # newest checkpoints kept in out_dir (older ones are deleted)
    on_nan: str = "stop"          # non-finite loss: "stop" with a message, or "rollback" to the last
                                  # checkpoint with half the learning rate
    fsdp: bool = False            # shard parameters across torchrun processes (FSDP2) instead of DDP
    deterministic: bool = False   # torch.use_deterministic_algorithms (CUDA); CPU runs are already
    threads: int = 0              # torch CPU threads; 0 = torch's default


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

    def describe(self) -> str:
        lines = []
        for section in SECTIONS:
            obj = getattr(self, section)
            items = "  ".join(f"{f.name}={getattr(obj, f.name)}" for f in fields(obj))
            lines.append(f"[{section}] {items}")
        return "\n".join(lines)


SECTIONS = ("model", "data", "obj", "train")


def _field_index(cfg: Config) -> dict[str, tuple[object, dataclasses.Field]]:
    """flag name -> (section object, field). Names are unique across sections by design."""
    index = {}
    for section in SECTIONS:
        obj = getattr(cfg, section)
        for f in fields(obj):
            assert f.name not in index, f"duplicate config field {f.name}"
            index[f.name] = (obj, f)
    return index


def _convert(name: str, raw: str, current):
    kind = type(current)
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
        raise UserError(f"--{name} expects a {kind.__name__}, got {raw!r}") from None


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
        out[name] = _convert(name, value, defaults[name]) if defaults[name] is not None else value
    return out


def parse_overrides(argv: list[str], base: Config | None = None) -> Config:
    """A Config from `--preset` and `--field value` flags, applied on top of `base`.

    Raises UserError for an unknown flag (naming the closest valid one) or a bad value.
    """
    cfg = copy.deepcopy(base) if base is not None else Config()
    index = _field_index(cfg)
    pairs = _split_flags(argv, lambda n: n in index and isinstance(getattr(index[n][0], n), bool))
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
            obj, _ = index[name]
            setattr(obj, name, _convert(name, value, getattr(obj, name)))
    return cfg


def explicit_flags(argv: list[str]) -> set[str]:
    """Names of the flags given on a command line (to tell what a resumed run overrides)."""
    return {a[2:].partition("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
