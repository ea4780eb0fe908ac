"""Export a checkpoint as a Hugging Face transformers folder: what AutoModelFor*.from_pretrained
loads with no code of minilm's.

    python -m minilm.safetensors_io out/ exported/ --format hf
    import minilm; minilm.export("out", "exported", format="hf")
    transformers.AutoModelForCausalLM.from_pretrained("exported")    # or ...ForMaskedLM, ...ForSequenceClassification

The folder:
    config.json          the architecture (LlamaForCausalLM, ...), sizes, eps, ids (hf_format.to_hf_config)
    model.safetensors    the weights under transformers' names, fp32 (written by safetensors_io)
    tokenizer files      foreign_tokenizer.write_hf_tokenizer: ids equal to minilm's tokenizer's
    README.md            what the folder is and where it came from

Only a model that is exactly one of minilm.config.ARCHES (--arch llama|qwen3|gpt2|bert|roberta) with a
head that its objective declares (Objective.hf_heads) exports; anything else is a one-line error
that says what is missing and what would work. A folder is written only when new, empty or an
earlier export: never over a run folder or a checkpoint.
"""
from __future__ import annotations

import json
import os
import sys

import torch

from minilm.errors import UserError
from minilm.foreign_tokenizer import write_hf_tokenizer
from minilm.hf_format import (arch_of, minilm_rows, position_offset, renames_for, to_hf_config, to_hf_state)
from minilm.tokenizer import BOS_ID, EOS_ID, PAD_ID, tokenizer_from_bytes

# what an export writes (and what an earlier export may hold): the only files it replaces
EXPORT_FILES = {"config.json", "model.safetensors", "README.md", "tokenizer.model", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
                "generation_config.json", "vocab.txt"}


def check_folder(folder: str, source: str) -> None:
    """A one-line UserError unless writing the export into `folder` destroys nothing: a new or
    empty folder, or one holding only an earlier export's files (EXPORT_FILES)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"{folder} is a file; an export in Hugging Face's format is a folder: name a new one")
    if not os.path.isdir(folder):
        return
    if os.path.samefile(folder, source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))):
        raise UserError(f"{folder} holds the checkpoint being exported; name a new folder for the export")
    others = sorted(name for name in os.listdir(folder) if name not in EXPORT_FILES)
    if others:
        raise UserError(f"{folder} already holds {others[0]}, which is not an earlier export's file (a run folder?); "
                        "name a new folder for the export, or delete it yourself first")
    for name in os.listdir(folder):
        if not os.path.isfile(os.path.join(folder, name)) or os.path.islink(os.path.join(folder, name)):
            raise UserError(f"{os.path.join(folder, name)} is not a regular file; name a new folder for the export")


def write_tokenizer(tokenizer, folder: str) -> list[str]:
    """The tokenizer's files in `folder` (the names): what AutoTokenizer.from_pretrained loads
    (foreign_tokenizer.write_hf_tokenizer), and for minilm's own tokenizer its sentencepiece model
    too, which --init_from reads back (transformers reads tokenizer.json)."""
    from minilm.checkpoint import atomic_write_bytes
    paths = write_hf_tokenizer(tokenizer, folder)
    if getattr(tokenizer, "foreign_ids", None) is None:
        atomic_write_bytes(os.path.join(folder, "tokenizer.model"), tokenizer.model_bytes)
        paths = list(paths) + ["tokenizer.model"]
    return sorted(os.path.basename(path) for path in paths)


def hf_weights(weights: dict, model_cfg, arch: str, head, export_ids, pad_id) -> dict:
    """An objective's state_dict -> transformers' tensors: token rows in the foreign order (if any),
    then renamed (hf_format)."""
    vocab_rows = {"backbone.tok_emb.weight", *head.vocab_rows}
    weights = {name: (minilm_rows(t, export_ids) if export_ids is not None and name in vocab_rows
                      else t) for name, t in weights.items()}
    renames = renames_for(arch, model_cfg.n_layer, head)
    return to_hf_state(weights, renames, offset=position_offset(arch, pad_id or 0))


def auto_class(architecture: str) -> str:
    """transformers' Auto class that loads `architecture` (LlamaForCausalLM -> AutoModelForCausalLM)."""
    for ending, auto in (("ForSequenceClassification", "AutoModelForSequenceClassification"),
                         ("ForMaskedLM", "AutoModelForMaskedLM"), ("ForCausalLM", "AutoModelForCausalLM"),
                         ("LMHeadModel", "AutoModelForCausalLM")):
        if architecture.endswith(ending):
            return auto
    return "AutoModel"


def export_folder(checkpoint_path: str, folder: str, log=None) -> str:
    """Write `checkpoint_path`'s model (a checkpoint file or a run folder: its newest) into
    `folder` as transformers' config.json + model.safetensors + tokenizer files + README.md;
    returns folder."""
    from minilm.checkpoint import atomic_write_bytes, load_checkpoint_or_newest, tensor_to_bytes
    from minilm.config import Config
    from minilm.objectives import objective_class
    from minilm.safetensors_io import save_safetensors
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if not folder:
        raise UserError("name the folder to write the export to")
    if not os.path.exists(checkpoint_path):
        raise UserError(f"no checkpoint at {checkpoint_path}; pass a checkpoint file or a run folder")
    check_folder(folder, checkpoint_path)
    path, state = load_checkpoint_or_newest(checkpoint_path, log=log, flag="the export")
    cfg = Config.from_dict(state["config"])
    objective = state.get("objective") or cfg.train.objective
    if "+" in objective:
        raise UserError(f"{path} trains {objective}, several heads on one backbone; a Hugging Face class has one "
                        f"head: fine-tune one objective from it (--init_from {path} --objective NAME), then export")
    cls = objective_class(objective)
    arch = arch_of(cfg.model)
    head = cls.hf_head(arch, cfg.obj)
    if state.get("tokenizer") is None:
        raise UserError(f"{path} carries no tokenizer, so its export would not say which text its ids are")
    tokenizer = tokenizer_from_bytes(tensor_to_bytes(state["tokenizer"]))
    foreign_ids = getattr(tokenizer, "foreign_ids", None)
    # the exported ids: minilm's own, or the foreign tokenizer's (None for a special it lacks: GPT-2's pad)
    ids = list(range(cfg.model.vocab_size)) if foreign_ids is None else \
        [int(f) if f >= 0 else None for f in foreign_ids.tolist()]
    size = cfg.model.vocab_size if foreign_ids is None else int(tokenizer.foreign_vocab_size)
    specials = {"pad_token_id": ids[PAD_ID], "bos_token_id": ids[BOS_ID], "eos_token_id": ids[EOS_ID]}
    tensors = hf_weights(state["model"], cfg.model, arch, head, None if foreign_ids is None else tokenizer.export_ids,
                         specials["pad_token_id"])
    config = to_hf_config(cfg.model, arch, head.architecture, size, specials, cls.hf_config(cfg.obj))

    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {folder}: {err.strerror or err}") from None
    save_safetensors(tensors, os.path.join(folder, "model.safetensors"), {"format": "pt"})
    atomic_write_bytes(os.path.join(folder, "config.json"),
                       (json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))
    tokenizer_files = write_tokenizer(tokenizer, folder)
    step, name = int(state.get("step") or 0), os.path.basename(os.path.abspath(folder))
    readme = (f"# {head.architecture}, exported by minilm\n\n"
              f"The {objective} model of `{os.path.abspath(path)}` (step {step}), a {arch} model "
              f"({cfg.model.n_layer} layers, {cfg.model.n_embd} wide, {cfg.model.vocab_size} token ids), in the layout "
              "Hugging Face transformers loads:\n\n"
              f"    transformers.{auto_class(head.architecture)}.from_pretrained(\"{name}\")\n\n"
              "- config.json: the architecture and its sizes\n"
              "- model.safetensors: the weights, float32, under transformers' names\n"
              f"- {', '.join(tokenizer_files)}: the tokenizer it was trained with (AutoTokenizer gives minilm's ids)\n\n"
              "minilm reads it back with `python train.py --init_from THIS_FOLDER`.\n")
    atomic_write_bytes(os.path.join(folder, "README.md"), readme.encode("utf-8"))
    return folder
