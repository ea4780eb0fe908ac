"""Import a Hugging Face transformers folder (config.json + weights + tokenizer, downloaded with any
tool) as a minilm model: what `train.py --init_from FOLDER` starts from.

    imported = read_folder("roberta-base/")      # ImportedModel: model_cfg, objective, state_dict, tokenizer
    parent = parent_checkpoint(imported, "roberta-base/")   # shaped like a checkpoint, for provenance.py

config.json names the architecture (LlamaForCausalLM, GPT2LMHeadModel, BertForMaskedLM,
RobertaForMaskedLM, *ForSequenceClassification); its model_type is one of minilm.config.ARCHES,
whose switches make the very same model (hf_format.py maps names, never math). The objective is
the one whose head that class is (Objective.hf_heads: ...ForCausalLM -> clm, ...ForMaskedLM ->
mlm, ...ForSequenceClassification -> classify), and the run trains it unless --objective says
otherwise, as for any --init_from parent. Weights come from model.safetensors (sharded ones via
model.safetensors.index.json), read by minilm's own safetensors reader, or pytorch_model.bin
(torch.load with weights_only=True). The tokenizer's ids are reordered to keep minilm's special
ids (foreign_tokenizer.py), and the token rows with them (hf_format.foreign_rows).
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch

from minilm.config import ModelConfig
from minilm.errors import UserError
from minilm.foreign_tokenizer import load_foreign_tokenizer
from minilm.hf_format import (foreign_rows, from_hf_config, from_hf_state, normalize_hf_names, position_offset,
                              read_config, renames_for)
from minilm.tokenizer import Tokenizer


@dataclasses.dataclass
class ImportedModel:
    """A Hugging Face folder in minilm's terms."""
    model_cfg: ModelConfig
    objective: str           # the objective whose head the folder's class is
    options: dict            # that objective's options the folder fixes (a classifier's labels)
    state_dict: dict         # minilm names, rows in minilm's token ids
    tokenizer: object        # a minilm Tokenizer or ForeignTokenizer, or None when the folder has none
    arch: str                # one of minilm.config.ARCHES
    architecture: str        # the class config.json names
    unused: list             # the folder's tensors minilm has no place for (BERT's pooler under a masked LM)


def is_hf_folder(path: str) -> bool:
    """Whether `path` is a folder holding a config.json (a run folder never does)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def objective_for(arch: str, architecture: str, path: str):
    """The registered objective class whose head `architecture` is on `arch` (the first in registry
    order: mlm before wwm), or a one-line UserError listing the classes minilm imports."""
    from minilm.objectives import OBJECTIVES
    for cls in OBJECTIVES.values():
        head = cls.own_hf_heads().get(arch)
        if head is not None and head.architecture == architecture:
            return cls, head
    known = sorted({head.architecture for cls in OBJECTIVES.values() for name, head in cls.own_hf_heads().items()
                    if name == arch})
    raise UserError(f"{path}: {architecture} has no counterpart among minilm's heads; it imports {', '.join(known)}")


def read_weights(folder: str) -> dict:
    """The folder's tensors by name: model.safetensors, a sharded model.safetensors.index.json, or
    pytorch_model.bin."""
    from minilm.safetensors_io import load_safetensors
    single, index, pickle = (os.path.join(folder, name) for name in
                             ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"))
    if os.path.isfile(single):
        return load_safetensors(single)[0]
    if os.path.isfile(index):
        weight_map = read_config(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index} has no weight_map of tensor names to files")
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            if os.path.basename(shard) != shard:
                raise UserError(f"{index} names a shard outside its folder: {shard!r}")
            tensors.update(load_safetensors(os.path.join(folder, shard))[0])
        return tensors
    if os.path.isfile(pickle):
        try:
            state = torch.load(pickle, map_location="cpu", weights_only=True)
        except Exception as err:   # a crafted or damaged pickle: refused by weights_only
            raise UserError(f"{pickle} cannot be read as plain weights ({type(err).__name__}); "
                            "convert it to model.safetensors") from None
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise UserError(f"{pickle} is not a state_dict of tensors")
        return state
    raise UserError(f"{folder} has config.json but no weights: model.safetensors, model.safetensors.index.json "
                    "or pytorch_model.bin")


TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "merges.txt", "tokenizer.json", "vocab.txt")


def read_tokenizer(folder: str, vocab_size: int):
    """The folder's tokenizer, or None when it has no tokenizer files: minilm's own sentencepiece
    model (an export of minilm's: its ids are minilm's), else a public model's, its ids reordered
    to keep minilm's special slots (foreign_tokenizer.py). vocab_size: the model's token rows,
    which may be more than the tokenizer's pieces."""
    model = os.path.join(folder, "tokenizer.model")
    if os.path.isfile(model):
        try:
            return Tokenizer.load(model)
        except UserError:   # not minilm's layout: a public model's sentencepiece tokenizer
            pass
    if any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES):
        return load_foreign_tokenizer(folder, vocab_size)
    return None


def read_folder(folder: str) -> ImportedModel:
    """A Hugging Face folder -> ImportedModel (module docstring). One-line UserErrors for what
    minilm cannot import exactly."""
    folder = os.fspath(folder)
    if not is_hf_folder(folder):
        raise UserError(f"{folder} is not a Hugging Face model folder (no config.json in it)")
    config_path = os.path.join(folder, "config.json")
    config = read_config(config_path)
    arch, architecture, model_cfg = from_hf_config(config, config_path)
    cls, head = objective_for(arch, architecture, config_path)
    tensors = normalize_hf_names(read_weights(folder), arch)
    renames = renames_for(arch, model_cfg.n_layer, head)
    offset = position_offset(arch, config.get("pad_token_id", 1 if arch == "roberta" else 0) or 0)
    state = from_hf_state(tensors, renames, offset, where=folder)
    state = {name: t.float() for name, t in state.items()}
    used = {name for r in renames for prefix in r.theirs for name in tensors if name == prefix or
            name.startswith(prefix + ".")}
    unused = sorted(set(tensors) - used)
    if model_cfg.tie_embeddings:   # a tied output matrix is the token table; a stored copy is not a tensor of its own
        state.pop("backbone.lm_head.weight", None)
    tokenizer = read_tokenizer(folder, model_cfg.vocab_size)
    foreign_ids = getattr(tokenizer, "foreign_ids", None)
    if foreign_ids is not None:
        generator = torch.Generator().manual_seed(0)
        vocab_rows = {"backbone.tok_emb.weight", *head.vocab_rows}
        state = {name: foreign_rows(t, foreign_ids, generator) if name in vocab_rows else t
                 for name, t in state.items()}
        model_cfg = dataclasses.replace(model_cfg, vocab_size=len(foreign_ids))
    elif tokenizer is not None and tokenizer.vocab_size != model_cfg.vocab_size:
        raise UserError(f"{folder}: its tokenizer has {tokenizer.vocab_size} ids but config.json's vocab_size is "
                        f"{model_cfg.vocab_size}")
    rows = state["backbone.tok_emb.weight"].shape[0]
    if rows != model_cfg.vocab_size:
        raise UserError(f"{folder}: the token table has {rows} rows but the vocabulary {model_cfg.vocab_size} ids")
    return ImportedModel(model_cfg=model_cfg, objective=cls.name, options=cls.options_from_hf(arch, config),
                         state_dict=state, tokenizer=tokenizer, arch=arch, architecture=architecture, unused=unused)


def parent_checkpoint(imported: ImportedModel, folder: str) -> dict:
    """The ImportedModel shaped as the checkpoint dict an --init_from parent is (provenance.py:
    config, objective, model, tokenizer, step), so a folder and a minilm checkpoint follow one path."""
    from minilm.checkpoint import bytes_to_tensor
    from minilm.config import Config
    if imported.tokenizer is None:
        raise UserError(f"{folder} has no tokenizer files (tokenizer.model, vocab.json + merges.txt, vocab.txt or tokenizer.json), so "
                        "--init_from cannot tell which text its ids are: add the model's tokenizer files to it")
    cfg = Config(model=imported.model_cfg)
    cfg.train.objective = imported.objective
    for name, value in imported.options.items():
        setattr(cfg.obj, name, value)
    return {"config": cfg.to_dict(), "objective": imported.objective, "model": imported.state_dict,
            "tokenizer": bytes_to_tensor(imported.tokenizer.model_bytes), "step": 0,
            "hf": {"architecture": imported.architecture, "folder": os.path.abspath(folder)}}


def load_hf_module(folder: str, device="cpu"):
    """(the objective built from `folder` with its weights loaded, strictly; the ImportedModel):
    for a test or a script comparing minilm with the folder's transformers model."""
    from minilm.objectives import build_objective
    imported = read_folder(folder)
    parent = parent_checkpoint(imported, folder) if imported.tokenizer is not None else None
    from minilm.config import Config
    cfg = Config.from_dict(parent["config"]) if parent else Config(model=imported.model_cfg)
    if parent is None:
        cfg.train.objective = imported.objective
        for name, value in imported.options.items():
            setattr(cfg.obj, name, value)
    objective = build_objective(imported.objective, cfg.model, imported.tokenizer, cfg.obj)
    objective.load_state_dict(imported.state_dict, strict=True)
    return objective.to(device).eval(), imported
