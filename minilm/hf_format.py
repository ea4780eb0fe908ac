"""Hugging Face transformers' names for minilm's weights, and config.json both ways: plumbing for
hf_export.py and hf_import.py.

Llama, GPT-2, BERT and RoBERTa are switches of minilm's one Block and its embeddings (--arch:
minilm.config.ARCHES), so a checkpoint of one of them *is* that model: export and import rename
tensors and move a few of them into the layout transformers stores, never change the math. The
moves, all exact:

    split       minilm keeps q, k and v in one (3C, C) matrix (attn.qkv), and SwiGLU's gate and up in
                one (2F, C) matrix (mlp.up, gate first); transformers keeps them apart: the rows cut
                in equal blocks, in that order (Llama's q/k/v_proj and gate/up_proj, BERT's
                query/key/value). Within q, k and v both order heads the same way, (H, D).
    transpose   GPT-2's Conv1D stores its weight (in, out), nn.Linear's transposed.
    offset      RoBERTa numbers positions from pad_token_id + 1 (its position ids count non-padding
                tokens from there), so its table has pad_token_id + 1 rows before minilm's row 0:
                dropped at import, zeros at export.

A module's .weight and .bias go together (a name below is a module unless the state_dict has it
as a parameter), so the tables are the same with and without biases. The heads' names are
declared by each objective (Objective.hf_heads: the causal LM's lm_head, the masked LM's
transform, a classifier's pooler and score), so this file never names an objective.

Token rows: the token table, an untied output matrix and a masked LM's output bias have a row per
token id. A foreign tokenizer (RoBERTa's BPE, Llama's sentencepiece) reorders its ids so that
minilm's special ids keep their fixed slots (tokenizer.foreign_ids: minilm id i is foreign id
foreign_ids[i], -1 for a row the foreign vocabulary lacks): import takes rows[foreign_ids] (a new
row where -1), export gives each foreign id the row of the minilm id the tokenizer's export_ids names.
"""
from __future__ import annotations

import dataclasses
import json

import torch

from minilm.config import ARCHES, ModelConfig
from minilm.errors import UserError


# The fields that make a model one of ARCHES; the others (sizes, norm_eps, rope_base, dropout,
# tie_embeddings, intermediate_size) every HF config of these architectures states as it likes.
ARCH_FIELDS = ("norm_placement", "norm", "position", "mlp", "bias", "embed_norm", "n_segment", "qk_norm")

# config.json's model_type, and the prefix of the base model's names
MODEL_TYPES = {"llama": "llama", "qwen3": "qwen3", "gpt2": "gpt2", "bert": "bert", "roberta": "roberta"}
PREFIX = {"llama": "model.", "qwen3": "model.", "gpt2": "transformer.", "bert": "bert.", "roberta": "roberta."}


def arch_of(cfg: ModelConfig) -> str:
    """Which of ARCHES `cfg` is exactly, or a one-line UserError naming the field that differs and
    its value in the nearest arch."""
    if cfg.n_decoder_layer:
        raise UserError("an encoder-decoder has no counterpart among the architectures minilm exports "
                        f"({', '.join(ARCHES)})")
    if cfg.embedding_size not in (0, cfg.n_embd):
        raise UserError(f"factorized embeddings (--embedding_size {cfg.embedding_size}, ALBERT's) have no "
                        f"counterpart among {', '.join(ARCHES)}; train with --embedding_size 0 to export")
    if cfg.logit_softcap:   # a speedrun switch: no field in transformers' llama, qwen3, gpt2, bert or roberta
        raise UserError(f"this model's logit_softcap is {cfg.logit_softcap}, which none of {', '.join(ARCHES)} has; "
                        "train with --logit_softcap 0 to export")
    default = ModelConfig()
    differences = {arch: [(name, getattr(cfg, name), values.get(name, getattr(default, name))) for name in ARCH_FIELDS
                          if getattr(cfg, name) != values.get(name, getattr(default, name))]
                   for arch, values in ARCHES.items()}
    for arch, differ in differences.items():
        if not differ:
            return arch
    nearest = min(differences, key=lambda arch: len(differences[arch]))
    name, ours, theirs = differences[nearest][0]
    raise UserError(f"this model is none of {', '.join(ARCHES)} exactly: its {name} is {ours} where {nearest} "
                    f"(the nearest) has {theirs}; train with --arch {nearest} to have a model transformers can load")


# ----------------------------------------------------------------------------- the name tables
@dataclasses.dataclass(frozen=True)
class Rename:
    """minilm's module or parameter `ours` is transformers' `theirs` (one name, or several for a
    split), with `move` one of same | split | transpose | offset (module docstring)."""
    ours: str
    theirs: tuple
    move: str = "same"


def backbone_renames(arch: str, n_layer: int) -> list[Rename]:
    """The backbone's names (minilm's under "backbone.") in `arch`'s base model (under PREFIX)."""
    p, R = PREFIX[arch], Rename
    if arch in ("llama", "qwen3"):
        table = [R("tok_emb", ("embed_tokens",)), R("norm", ("norm",))]
        for i in range(n_layer):
            ours, theirs = f"blocks.{i}.", f"layers.{i}."
            table += [R(ours + "norm1", (theirs + "input_layernorm",)),
                      R(ours + "attn.qkv", tuple(theirs + f"self_attn.{x}_proj" for x in "qkv"), "split"),
                      R(ours + "attn.proj", (theirs + "self_attn.o_proj",)),
                      R(ours + "norm2", (theirs + "post_attention_layernorm",)),
                      R(ours + "mlp.up", (theirs + "mlp.gate_proj", theirs + "mlp.up_proj"), "split"),
                      R(ours + "mlp.down", (theirs + "mlp.down_proj",))]
            if arch == "qwen3":   # QK-norm's two (D,) weights, shared by the heads in both
                table += [R(ours + "attn.q_norm", (theirs + "self_attn.q_norm",)),
                          R(ours + "attn.k_norm", (theirs + "self_attn.k_norm",))]
    elif arch == "gpt2":
        table = [R("tok_emb", ("wte",)), R("pos_emb", ("wpe",)), R("norm", ("ln_f",))]
        for i in range(n_layer):
            ours, theirs = f"blocks.{i}.", f"h.{i}."
            table += [R(ours + "norm1", (theirs + "ln_1",)),
                      R(ours + "attn.qkv", (theirs + "attn.c_attn",), "transpose"),
                      R(ours + "attn.proj", (theirs + "attn.c_proj",), "transpose"),
                      R(ours + "norm2", (theirs + "ln_2",)),
                      R(ours + "mlp.up", (theirs + "mlp.c_fc",), "transpose"),
                      R(ours + "mlp.down", (theirs + "mlp.c_proj",), "transpose")]
    else:   # bert, roberta: post-norm blocks, no final norm
        table = [R("tok_emb", ("embeddings.word_embeddings",)),
                 R("pos_emb", ("embeddings.position_embeddings",), "offset" if arch == "roberta" else "same"),
                 R("seg_emb", ("embeddings.token_type_embeddings",)),
                 R("embed_norm", ("embeddings.LayerNorm",))]
        for i in range(n_layer):
            ours, theirs = f"blocks.{i}.", f"encoder.layer.{i}."
            table += [R(ours + "attn.qkv", tuple(theirs + f"attention.self.{x}" for x in ("query", "key", "value")),
                        "split"),
                      R(ours + "attn.proj", (theirs + "attention.output.dense",)),
                      R(ours + "norm1", (theirs + "attention.output.LayerNorm",)),
                      R(ours + "mlp.up", (theirs + "intermediate.dense",)),
                      R(ours + "mlp.down", (theirs + "output.dense",)),
                      R(ours + "norm2", (theirs + "output.LayerNorm",))]
    return [Rename("backbone." + r.ours, tuple(p + t for t in r.theirs), r.move) for r in table]


def renames_for(arch: str, n_layer: int, head) -> list[Rename]:
    """The backbone's renames and the head's (an objective's HFHead: names used as they are)."""
    return backbone_renames(arch, n_layer) + [Rename(ours, (theirs,)) for ours, theirs in head.names.items()]


def parameters(renames: list[Rename], has, which: str) -> list[tuple[str, tuple, str]]:
    """(our parameter, their parameters, move) for each rename whose parameter `has` (a test on
    names) finds: `which` = "ours" tests our names, "theirs" every one of theirs. A module's
    .weight and .bias both; a rename that names a parameter itself, only that."""
    out = []
    for r in renames:
        for suffix in ("", ".weight", ".bias"):
            ours, theirs = r.ours + suffix, tuple(t + suffix for t in r.theirs)
            found = has(ours) if which == "ours" else all(has(t) for t in theirs)
            if found:
                # only a weight is transposed (a Conv1D's bias is 1-D) or offset (the table's rows)
                move = r.move if suffix != ".bias" or r.move == "split" else "same"
                out.append((ours, theirs, move))
                if suffix == "":
                    break
    return out


def to_hf_state(weights: dict, renames: list[Rename], offset: int = 0) -> dict:
    """minilm's state_dict (token rows already in the exported order) -> transformers' names, fp32.
    Every tensor must have a rename: one left over is a head transformers has no place for."""
    out, used = {}, set()
    for ours, theirs, move in parameters(renames, weights.__contains__, "ours"):
        t = weights[ours].detach().float()
        used.add(ours)
        if move == "split":
            parts = t.chunk(len(theirs), dim=0)
        elif move == "transpose":
            parts = (t.t(),)
        elif move == "offset":   # RoBERTa's first rows: positions no token has
            parts = (torch.cat([torch.zeros(offset, t.shape[1]), t]),)
        else:
            parts = (t,)
        out.update({name: part.contiguous() for name, part in zip(theirs, parts)})
    left = sorted(set(weights) - used)
    if left:
        raise UserError(f"{left[0]} has no place in the Hugging Face model (its head has no counterpart there)")
    return out


def from_hf_state(tensors: dict, renames: list[Rename], offset: int = 0, where: str = "the folder") -> dict:
    """transformers' state_dict -> minilm's names (the moves undone). Tensors transformers stores
    that minilm has no place for (BERT's pooler under a masked LM, its next-sentence head) are
    left out; a missing base-model tensor is a one-line UserError."""
    out = {}
    for ours, theirs, move in parameters(renames, tensors.__contains__, "theirs"):
        parts = [tensors[name] for name in theirs]
        if move == "split":
            out[ours] = torch.cat(parts, dim=0)
        elif move == "transpose":
            out[ours] = parts[0].t().contiguous()
        elif move == "offset":
            out[ours] = parts[0][offset:]
        else:
            out[ours] = parts[0]
    for r in renames:   # the base model's tensors must all be there; a head's may be left to start afresh
        if r.ours.startswith("backbone.") and not r.ours.startswith("backbone.lm_head") and \
                not any(k == r.ours or k.startswith(r.ours + ".") for k in out):
            raise UserError(f"{where} lacks {r.theirs[0]}.weight, which the model needs; is it a complete "
                            "checkpoint of the architecture its config.json names?")
    return out


def normalize_hf_names(tensors: dict, arch: str) -> dict:
    """Names as transformers' current classes use them: a base model saved without its prefix
    (GPT-2's own files: "h.0.attn.c_attn.weight") gets it, and old LayerNorm names gamma/beta
    become weight/bias (BERT's original checkpoints)."""
    prefix = PREFIX[arch]
    bare = not any(name.startswith(prefix) for name in tensors)
    out = {}
    for name, t in tensors.items():
        if name.endswith(".gamma") or name.endswith(".beta"):
            name = name.rsplit(".", 1)[0] + (".weight" if name.endswith(".gamma") else ".bias")
        if bare and not name.startswith(("lm_head.", "cls.", "score.", "classifier.")):
            name = prefix + name
        out[name] = t
    return out


def position_offset(arch: str, pad_token_id) -> int:
    """Rows before minilm's position 0 in transformers' table: RoBERTa's pad_token_id + 1."""
    return int(pad_token_id) + 1 if arch == "roberta" else 0


# ----------------------------------------------------------------------------- token rows
def foreign_rows(t: torch.Tensor, foreign_ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Import: a tensor with a row per foreign id -> a row per minilm id, rows[foreign_ids]; a
    minilm id the foreign vocabulary lacks (-1) gets a new row, as minilm initializes one (normal
    std 0.02 for a matrix, 0 for a bias)."""
    out = t[foreign_ids.clamp(min=0)].clone()
    new = foreign_ids < 0
    if bool(new.any()):
        if out.dim() == 1:
            out[new] = 0
        else:
            out[new] = torch.randn(int(new.sum()), *out.shape[1:], generator=generator).to(out.dtype) * 0.02
    return out


def minilm_rows(t: torch.Tensor, export_ids: torch.Tensor) -> torch.Tensor:
    """Export: a row per minilm id -> a row per foreign id, foreign id f taking the row of minilm
    id export_ids[f]. Where one foreign special fills two of minilm's slots (RoBERTa's <s> is both
    bos and cls) the tokenizer chose the slot whose row minilm's data trains
    (foreign_tokenizer.export_ids); new rows are dropped."""
    if bool((export_ids < 0).any()):
        missing = int((export_ids < 0).nonzero()[0])
        raise UserError(f"the tokenizer maps no minilm id to its id {missing}; its rows cannot be written")
    return t[export_ids]


# ----------------------------------------------------------------------------- config.json
def to_hf_config(cfg: ModelConfig, arch: str, architecture: str, vocab_size: int, specials: dict,
                 extra: dict | None = None) -> dict:
    """config.json for `cfg` (one of ARCHES: arch_of) as transformers' `architecture`.
    vocab_size: the exported rows (the foreign vocabulary's size for a foreign tokenizer);
    specials: pad/bos/eos ids in the exported ids (None where the tokenizer has none)."""
    common = {"architectures": [architecture], "model_type": MODEL_TYPES[arch], "vocab_size": vocab_size,
              "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32", **specials}
    if arch in ("llama", "qwen3"):
        config = {"hidden_size": cfg.n_embd, "intermediate_size": cfg.mlp_hidden, "num_hidden_layers": cfg.n_layer,
                  "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_head, "head_dim": cfg.head_dim,
                  "hidden_act": "silu", "max_position_embeddings": cfg.seq_len, "rms_norm_eps": cfg.norm_eps,
                  "rope_theta": cfg.rope_base, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
                  "attention_bias": False, "mlp_bias": False, "attention_dropout": cfg.dropout}
        if arch == "qwen3":   # every layer attends to the whole window (Qwen3's sliding window off)
            del config["mlp_bias"]
            config.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer,
                          layer_types=["full_attention"] * cfg.n_layer)
    elif arch == "gpt2":
        config = {"n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.mlp_hidden,
                  "n_positions": cfg.seq_len, "n_ctx": cfg.seq_len, "layer_norm_epsilon": cfg.norm_eps,
                  "activation_function": "gelu_new", "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
                  "attn_pdrop": cfg.dropout, "scale_attn_weights": True}
    else:
        offset = position_offset(arch, specials.get("pad_token_id") or 0)
        config = {"hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
                  "intermediate_size": cfg.mlp_hidden, "hidden_act": "gelu", "layer_norm_eps": cfg.norm_eps,
                  "max_position_embeddings": cfg.seq_len + offset, "type_vocab_size": cfg.n_segment,
                  "position_embedding_type": "absolute", "hidden_dropout_prob": cfg.dropout,
                  "attention_probs_dropout_prob": cfg.dropout}
    return {**common, **config, **(extra or {})}


def read_config(path: str) -> dict:
    """config.json as a dict, or a one-line UserError."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    except ValueError as err:
        raise UserError(f"{path} is not JSON ({err})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object")
    return config


class ConfigReader:
    """config.json's fields, each checked as it is read: a missing or ill-typed one is a one-line
    UserError naming it."""

    def __init__(self, config: dict, path: str):
        self.config, self.path = config, path

    def get(self, key: str, kind=int, default=...):
        """config[key], checked to be of `kind`; `default` where it is missing or null (JSON's
        None: transformers' "use the default"), required when no default is given."""
        value = self.config.get(key)
        if value is None:
            if default is ...:
                raise UserError(f"{self.path} lacks {key!r}, which a {self.config.get('model_type')} config must have")
            return default
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) if kind is float else \
            (isinstance(value, int) and not isinstance(value, bool)) if kind is int else isinstance(value, kind)
        if not ok:
            raise UserError(f"{self.path}: {key} must be {kind.__name__}, got {value!r}")
        return float(value) if kind is float else value

    def expect(self, key: str, allowed: tuple, default=None, why: str = ""):
        """A field minilm supports only some values of (an activation, a bias switch)."""
        value = self.config.get(key, default)
        if value not in allowed:
            raise UserError(f"{self.path}: {key} is {value!r}; minilm's {self.config.get('model_type')} has "
                            f"{' or '.join(repr(a) for a in allowed)}{why}, so this model cannot be imported exactly")
        return value


def from_hf_config(config: dict, path: str) -> tuple[str, str, ModelConfig]:
    """config.json -> (arch, the architecture it names, minilm's ModelConfig). One-line UserErrors
    for an architecture minilm has no counterpart for (naming what is supported) and for settings
    minilm does not compute (grouped-query heads, RoPE scaling, relative positions)."""
    model_type = config.get("model_type")
    supported = ", ".join(MODEL_TYPES)
    arch = {t: a for a, t in MODEL_TYPES.items()}.get(model_type)
    if arch is None:
        raise UserError(f"{path}: model_type {model_type!r} has no counterpart in minilm; it imports {supported}")
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or len(architectures) != 1 or not isinstance(architectures[0], str):
        raise UserError(f"{path}: architectures must name one class (e.g. [\"LlamaForCausalLM\"]), "
                        f"got {architectures!r}")
    c = ConfigReader(config, path)
    fields = dict(ARCHES[arch])
    fields.update(vocab_size=c.get("vocab_size"), tie_embeddings=bool(c.get("tie_word_embeddings", bool,
                                                                           default=arch not in ("llama", "qwen3"))))
    if arch in ("llama", "qwen3"):
        heads = c.get("num_attention_heads")
        hidden = c.get("hidden_size")
        if c.get("num_key_value_heads", default=heads) != heads:
            raise UserError(f"{path}: num_key_value_heads {config['num_key_value_heads']} != num_attention_heads "
                            f"{heads} (grouped-query attention), which minilm's attention does not compute")
        if c.get("head_dim", default=hidden // heads) != hidden // heads:
            raise UserError(f"{path}: head_dim {config['head_dim']} is not hidden_size / num_attention_heads")
        c.expect("hidden_act", ("silu",), "silu")
        c.expect("attention_bias", (False,), False)
        c.expect("mlp_bias", (False,), False)
        if arch == "qwen3":
            c.expect("use_sliding_window", (False,), False, why=" (attention over the whole window)")
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) != "default":
            raise UserError(f"{path}: RoPE scaling {rope!r} is not computed by minilm's rotary embedding (plain RoPE)")
        theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        fields.update(n_embd=hidden, n_head=heads, n_layer=c.get("num_hidden_layers"),
                      intermediate_size=c.get("intermediate_size"), seq_len=c.get("max_position_embeddings"),
                      norm_eps=c.get("rms_norm_eps", float, 1e-6), rope_base=float(theta))
    elif arch == "gpt2":
        c.expect("activation_function", ("gelu_new", "gelu_pytorch_tanh"), "gelu_new")
        c.expect("scale_attn_weights", (True,), True)
        c.expect("scale_attn_by_inverse_layer_idx", (False,), False)
        hidden = c.get("n_embd")
        fields.update(n_embd=hidden, n_head=c.get("n_head"), n_layer=c.get("n_layer"),
                      intermediate_size=c.get("n_inner", default=None) or 4 * hidden,
                      seq_len=c.get("n_positions"), norm_eps=c.get("layer_norm_epsilon", float, 1e-5))
    else:
        c.expect("hidden_act", ("gelu",), "gelu")
        c.expect("position_embedding_type", ("absolute",), "absolute")
        offset = position_offset(arch, c.get("pad_token_id", default=1 if arch == "roberta" else 0) or 0)
        fields.update(n_embd=c.get("hidden_size"), n_head=c.get("num_attention_heads"),
                      n_layer=c.get("num_hidden_layers"), intermediate_size=c.get("intermediate_size"),
                      seq_len=c.get("max_position_embeddings") - offset, n_segment=c.get("type_vocab_size"),
                      norm_eps=c.get("layer_norm_eps", float, 1e-12))
    try:
        cfg = ModelConfig(**fields)
        cfg.validate()
    except UserError as err:
        raise UserError(f"{path} describes a model minilm cannot build: {err}") from None
    return arch, architectures[0], cfg
