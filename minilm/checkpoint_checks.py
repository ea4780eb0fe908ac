"""What a loaded checkpoint must hold before anything is built from it.

weights_only=True keeps a checkpoint's pickle from running code, but the plain data it yields is
still the file's word: a config saying 10000 layers beside the weights of two would make the
loader allocate gigabytes before load_state_dict noticed, and a step that is a string, a section
that is a list or weights that are NaN would end in a traceback, or in garbage, far from the file.
load_checkpoint (checkpoint.py) calls check_checkpoint on every checkpoint it loads (sample.py,
minilm.load, --init_from, --resume), in this order, each failure one line that names the file:

  1. plain types: the config's sections are tables of known fields, each of its type and range
     (config_from_saved), the objective a name minilm knows, "model" a table of tensors, the
     tokenizer a uint8 tensor, the step an integer, ...;
  2. what the config may ask: no more blocks than the file holds tensors, and rotary tables no
     larger than its weights, so that even building the model on the meta device stays cheap;
  3. the model the config describes, built on the meta device (shapes without memory): its
     tensor names and shapes must be exactly those stored, so the parameters it implies are the
     parameters the file holds;
  4. the tokenizer parses and has vocab_size ids; the weights are finite.
"""
from __future__ import annotations

import torch

from minilm.config import Config, config_from_saved
from minilm.errors import UserError

DAMAGED = "the file is damaged or was not written by minilm"

# entries besides config and model, the type each must have when present (None counts as absent)
ENTRY_TYPES: dict[str, tuple[type, ...]] = {
    "objective": (str,), "step": (int,), "lr_scale": (int, float), "best_value": (int, float),
    "optimizer": (dict,), "scaler": (dict,), "rng": (dict, list), "last_eval": (dict,), "data": (dict,),
    "parent": (dict,), "tokenizer": (torch.Tensor,), "evals_without_improvement": (int,),
}
TYPE_WORDS = {str: "a string", int: "an integer", float: "a number", dict: "a table", list: "a list",
              torch.Tensor: "a tensor"}

# model fields that are a dimension of some weight, so at most the number of weights stored
SIZE_FIELDS = ("vocab_size", "n_embd", "embedding_size", "intermediate_size", "n_segment")
# rotary tables (seq_len x head_dim numbers, model.py) up to this size pass whatever the weights
ROTARY_NUMBERS_ALWAYS_ALLOWED = 2 ** 24


def check_checkpoint(state: dict, path: str) -> None:
    """A one-line UserError naming `path` and the first thing wrong in the checkpoint `state`
    (the module docstring lists the checks, in order); nothing is allocated for the model."""
    check_entry_types(state, path)
    try:
        cfg = config_from_saved(state["config"])
    except UserError as err:
        raise UserError(f"{path} holds an invalid config ({err}); {DAMAGED}") from None
    name = state.get("objective") or cfg.train.objective
    weights = checked_weights(state["model"], path)
    tokenizer = checked_tokenizer(state.get("tokenizer"), cfg, path)
    check_config_is_in_proportion(cfg, weights, path)
    check_weights_fit_config(name, cfg, tokenizer, weights, path)
    check_weights_are_finite(weights, path)


def check_entry_types(state: dict, path: str) -> None:
    """The entries besides config and model (ENTRY_TYPES), and what the loaders read inside them:
    a step of 0 or more, the CPU random state of each rank, the tokenizer's bytes."""
    for key, kinds in ENTRY_TYPES.items():
        value = state.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise UserError(f"{path}: its {key!r} is {type(value).__name__} where {TYPE_WORDS[kinds[0]]} belongs; "
                            f"{DAMAGED}")
    if state.get("step") is not None and state["step"] < 0:
        raise UserError(f"{path}: its step is {state['step']}, below 0; {DAMAGED}")
    rngs = state.get("rng")
    for rng in ([rngs] if isinstance(rngs, dict) else rngs or []):
        if not (isinstance(rng, dict) and isinstance(rng.get("cpu"), torch.Tensor) and rng["cpu"].dtype == torch.uint8):
            raise UserError(f"{path}: its 'rng' holds no CPU random state (a uint8 tensor); {DAMAGED}")
    tokenizer = state.get("tokenizer")
    if tokenizer is not None and (tokenizer.dtype != torch.uint8 or tokenizer.dim() != 1):
        raise UserError(f"{path}: its tokenizer is a {tokenizer.dtype} tensor of {tokenizer.dim()} dimension(s), "
                        f"not the bytes of a sentencepiece model (uint8, one dimension); {DAMAGED}")


def checked_weights(weights, path: str) -> dict[str, torch.Tensor]:
    """state["model"]: a non-empty table of tensors by name."""
    if not isinstance(weights, dict) or not weights:
        raise UserError(f"{path}: its 'model' is {'empty' if isinstance(weights, dict) else type(weights).__name__}, "
                        f"not a table of weights; {DAMAGED}")
    for key, value in weights.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise UserError(f"{path}: its 'model' maps {key!r} to {type(value).__name__}, where names map to "
                            f"tensors; {DAMAGED}")
    return weights


def checked_tokenizer(data, cfg: Config, path: str):
    """The checkpoint's Tokenizer (None when it has none), whose size must be the model's vocab_size."""
    if data is None:
        return None
    from minilm.checkpoint import tensor_to_bytes
    from minilm.tokenizer import tokenizer_from_bytes
    try:
        tokenizer = tokenizer_from_bytes(tensor_to_bytes(data))
    except UserError as err:
        raise UserError(f"{path}: its tokenizer does not load ({err}); {DAMAGED}") from None
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise UserError(f"{path} is inconsistent: its tokenizer has {tokenizer.vocab_size} ids but its config says "
                        f"vocab_size {cfg.model.vocab_size}; {DAMAGED}")
    return tokenizer


def check_config_is_in_proportion(cfg: Config, weights: dict, path: str) -> None:
    """Bounds on what a config may ask, from what the file holds, before the model is built even
    on the meta device: building loops over the blocks, and a rotary model's seq_len sets tables
    (and a generation cache) that no weight accounts for."""
    m = cfg.model
    blocks = m.n_layer + m.n_decoder_layer
    if blocks > len(weights):   # every block holds several tensors
        raise UserError(f"{path}: its config asks for {blocks} blocks but the file holds {len(weights)} tensors; "
                        f"{DAMAGED}")
    stored = sum(t.numel() for t in weights.values())
    sizes = SIZE_FIELDS + (("seq_len",) if m.position == "learned" else ())   # a learned position table
    for name in sizes:   # each is a dimension of some weight matrix
        if getattr(m, name) > stored:
            raise UserError(f"{path}: its config's {name} {getattr(m, name)} exceeds the {stored:,} weights it holds "
                            f"in all; {DAMAGED}")
    if m.position == "rope" and m.seq_len * m.head_dim > max(stored, ROTARY_NUMBERS_ALWAYS_ALLOWED):
        raise UserError(f"{path}: its config's seq_len {m.seq_len} asks for rotary tables of {m.seq_len * m.head_dim:,} "
                        f"numbers, out of proportion with the {stored:,} weights it holds; {DAMAGED}")


def check_weights_fit_config(name: str, cfg: Config, tokenizer, weights: dict, path: str) -> None:
    """The model `cfg` describes, built on the meta device, has exactly the stored names and shapes."""
    from minilm.objectives import build_objective
    try:
        with torch.device("meta"):
            expected = {key: tuple(t.shape) for key, t in
                        build_objective(name, cfg.model, tokenizer, cfg.obj).state_dict().items()}
    except (UserError, RuntimeError, TypeError, ValueError, OverflowError) as err:   # sizes torch cannot hold
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: its config describes no model minilm can build ({reason}); {DAMAGED}") from None
    problem = first_difference(expected, {key: tuple(t.shape) for key, t in weights.items()})
    if problem:
        raise UserError(f"{path}: its weights do not fit the {name} model its config describes ({problem}); "
                        f"{DAMAGED}")


def first_difference(expected: dict, stored: dict) -> str | None:
    """The first name missing, extra or differently shaped between two {name: shape}, in words."""
    for key, shape in expected.items():
        if key not in stored:
            return f"{key} is missing"
        if stored[key] != shape:
            return f"{key} is {list(stored[key])}, the config implies {list(shape)}"
    extra = [key for key in stored if key not in expected]
    return f"{extra[0]} is not part of the model" if extra else None


def check_weights_are_finite(weights: dict, path: str) -> None:
    for key, t in weights.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(f"{path}: its weights hold NaN or infinite values ({key}), so the model would compute "
                            "nothing but NaN; use an earlier checkpoint of the run, or train again")
