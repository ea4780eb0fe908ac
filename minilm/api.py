"""The Python API, for notebooks: a checkpoint in, a model that generates, fills, scores and embeds.

    import minilm
    m = minilm.load("out")                       # a run folder (its newest checkpoint), a checkpoint
                                                 # file, or minilm.export's .safetensors file
    m.generate("Once upon a time", num_samples=2, seed=0)   # decoders, prefix LMs -> [str, str]
    m.fill("The dog chased the red <mask>.")     # masked LMs -> Filled(text, candidates)
    m.infill("The cat <extra_id_0> on the mat.") # encoder-decoders (t5) -> [str]
    m.score("The chef cooked the meal.")         # decoders: log p(token | tokens before);
                                                 # rtd: P(replaced) -> [(piece, value)]
    m.embed(["one text", "another"])             # encoders -> (N, C) float tensor
    m.classify("The match ended in a draw.")     # classifiers -> [(label, probability)], best first
    m.evaluate("test.tsv")                       # classifiers: accuracy, macro-F1, confusion matrix
    m.logits("The cat sat.")                     # models with an LM head -> (T, V) float tensor
    m.hidden("The cat sat.")                     # any model -> (n_layer + 1, T, C): every layer

What a checkpoint can do is what the objective it was trained with declares (Objective.capabilities;
a+b: the union of its parts': `served`); a method it cannot serve raises a one-line UserError naming
what it needs (the registered objectives that declare it) and what the checkpoint serves instead;
a wrong argument (a float for an int, bytes or None for a text) raises one naming the argument,
what was given and what fits ("argument checks" below). embed and classify
take batch_size texts per forward pass. sample.py is a thin command line over this module: its flags are these
methods' arguments, and the functions below take `flags=True` to word their errors as flags
(`--fill needs ...`) rather than as methods (`fill() needs ...`).

Framing: every method frames its text as training framed a new document, so the model reads it
as it read its training windows: after an <eos> (plain windows), or as [CLS] text [SEP] for a
model trained on sentence pairs (mlm+sop); t5's encoder reads text + <eos>.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Callable, NamedTuple

import torch

from minilm.errors import UserError
from minilm.model import CAUSAL
from minilm.tokenizer import CLS_ID, EOS_ID, MASK_ID, NUM_SENTINELS, PAD_ID, SENTINEL_IDS, SEP_ID, Tokenizer, tokenizer_from_bytes

MASK = "<mask>"
SENTINEL = re.compile(r"<extra_id_(\d+)>")
FILL_EXAMPLE = "The dog chased the red <mask>."
INFILL_EXAMPLE_TEXT = "The cat <extra_id_0> on the <extra_id_1>."
SCORE_EXAMPLE = "The chef cooked the meal."
CLASSIFY_EXAMPLE = "The match ended in a draw."
# The methods a checkpoint may serve, as its objective declares them (Objective.capabilities), in
# the order a hint offers them: the model's purpose (classify, infill, generate), then its heads
# (fill, score), then embed, which every encoder serves.
VERBS = ("classify", "infill", "generate", "fill", "score", "embed")
# a method and the command-line flag that asks for it: its own name, but --prompt for generate
FLAG_OF = {verb: verb for verb in VERBS} | {"generate": "prompt"}


def named(method: str, flags: bool) -> str:
    """How an error names what was asked for: `fill()`, or the command line's `--fill`."""
    return f"--{FLAG_OF[method]}" if flags else f"{method}()"


def example(method: str, text: str, flags: bool) -> str:
    """A call that works: `fill("text")`, or the command line's `--fill "text"`."""
    return f'--{FLAG_OF[method]} "{text}"' if flags else f'{method}("{text}")'


def stderr_note(message: str) -> None:
    print(message, file=sys.stderr)


# ----------------------------------------------------------------------------- argument checks
# A Python caller's wrong argument is a one-line UserError that names the argument, shows what
# was given and says what is expected (`max_new_tokens must be an integer >= 0, got 2.5 (float)`),
# never a TypeError from deep inside torch or sentencepiece.
def shown(value) -> str:
    """What was given, for an error: its repr (cut short), and its type unless it is None."""
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return text if value is None else f"{text} ({type(value).__name__})"


def rule_text(at_least=None, within: str | None = None) -> str:
    return f" >= {at_least}" if at_least is not None else f" in {within}" if within else ""


def check_number(name: str, value, **rule) -> None:
    """config.check_value's rule, worded for a keyword argument (`top_p must be ...`)."""
    from minilm.config import check_value
    try:
        check_value(name, value, **rule)
    except UserError as err:
        raise UserError(str(err).removeprefix("--")) from None


def check_int(name: str, value, **rule) -> None:
    """An int (not a bool: True is no count; not 2.0 either) within `rule` (check_number's)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError(f"{name} must be an integer{rule_text(**rule)}, got {shown(value)}")
    check_number(name, value, **rule)


def check_float(name: str, value, **rule) -> None:
    """A finite int or float (not a bool) within `rule` (check_number's)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise UserError(f"{name} must be a number{rule_text(**rule)}, got {shown(value)}")
    check_number(name, value, **rule)


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise UserError(f"{name} must be True or False, got {shown(value)}")


def check_text(name: str, value) -> None:
    """A str; bytes are named as such, with how to decode them."""
    if isinstance(value, (bytes, bytearray)):
        raise UserError(f'{name} must be a str, got {shown(value)}: decode it first, e.g. {name}.decode("utf-8")')
    if not isinstance(value, str):
        raise UserError(f"{name} must be a str, got {shown(value)}")


def check_texts(name: str, value) -> None:
    """One text (a str) or a non-empty list (or tuple) of texts, each with something in it."""
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{name} is empty ({value!r}); give some words")
        return
    if not isinstance(value, (list, tuple)):
        hint = ': decode it first, e.g. [text.decode("utf-8")]' if isinstance(value, (bytes, bytearray)) else ""
        raise UserError(f"{name} must be a str or a list of str, got {shown(value)}{hint}")
    if not value:
        raise UserError(f'{name} is an empty list; give at least one text, e.g. ["The cat sat on the mat."]')
    for i, text in enumerate(value):
        check_text(f"{name}[{i}]", text)
        if not text.strip():
            raise UserError(f"{name}[{i}] is empty ({text!r}); give every text some words")


def check_path(name: str, value, what: str = "a checkpoint file or a run folder") -> None:
    if not isinstance(value, (str, os.PathLike)):
        raise UserError(f"{name} must be {what} (a str or os.PathLike), got {shown(value)}")


def check_device(value) -> torch.device:
    """"auto", a device name or a torch.device -> the torch.device, available here."""
    from minilm.trainer import resolve_device
    if not isinstance(value, (str, torch.device)):
        raise UserError(f'device must be "auto", a name such as "cpu" or "cuda:1", or a torch.device, '
                        f"got {shown(value)}")
    try:
        device = resolve_device(str(value))
    except UserError as err:
        worded = str(err).replace("use --device cpu", 'use device="cpu"').replace("--device", "device")
        raise UserError(worded) from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device {str(value)!r} names GPU {device.index} but only {torch.cuda.device_count()} "
                        f"GPU(s) are visible; use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return device


def check_mode(mode) -> None:
    if not isinstance(mode, str):
        raise UserError(f'mode must be a string such as "R" (or "" for the default), got {shown(mode)}')


def check_sampling(temperature, top_k, top_p, num_samples, seed, use_cache) -> None:
    """generate's and infill's shared arguments."""
    check_float("temperature", temperature, at_least=0)
    check_int("top_k", top_k, at_least=0)
    check_float("top_p", top_p, within="(0, 1]")
    check_int("num_samples", num_samples, at_least=1)
    check_int("seed", seed, within="[0, 2**64)")
    check_bool("use_cache", use_cache)


# ----------------------------------------------------------------------------- loading
def load_for_inference(path: str, device, log: Callable[[str], None] = stderr_note, flag: str = "--ckpt"):
    """(objective with weights, in eval mode on `device`, tokenizer, config) from a checkpoint
    file, a run folder: its newest checkpoint that loads (a damaged newer one is skipped, with a
    note on `log`), or minilm's .safetensors export (state_of_export). Loaded with
    weights_only=True (minilm.checkpoint): a file holding anything but tensors and plain data is
    refused, never unpickled. flag: what named `path`, for the messages (sample.py's --ckpt, or
    the Python API's call)."""
    from minilm.checkpoint import load_checkpoint_or_newest, tensor_to_bytes
    from minilm.config import Config
    from minilm.objectives import build_objective
    if is_export(path):
        state = state_of_export(path)
    else:
        path, state = load_checkpoint_or_newest(path, log=log, flag=flag)
    cfg = Config.from_dict(state["config"])
    if state.get("tokenizer") is None:
        raise UserError(f"{path} carries no tokenizer; it was not written by train.py")
    tokenizer = tokenizer_from_bytes(tensor_to_bytes(state["tokenizer"]))
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise UserError(f"{path} is inconsistent: its tokenizer has {tokenizer.vocab_size} ids but its model "
                        f"has vocab_size {cfg.model.vocab_size}; retrain or use the matching checkpoint")
    objective = build_objective(state.get("objective", cfg.train.objective), cfg.model, tokenizer, cfg.obj)
    try:
        objective.load_state_dict(state["model"])
    except RuntimeError as err:
        raise UserError(f"{path}: the weights do not fit the model its config describes "
                        f"({str(err).splitlines()[0]})") from None
    return objective.to(device).eval(), tokenizer, cfg


def is_export(path: str) -> bool:
    """Whether `path` names minilm's own .safetensors export (minilm.export) rather than a checkpoint:
    a regular file named *.safetensors or starting with a safetensors header (a checkpoint is a zip)."""
    from minilm.safetensors_io import is_safetensors_file
    return os.path.isfile(path) and (path.endswith(".safetensors") or is_safetensors_file(path))


def state_of_export(path: str) -> dict:
    """An export (minilm/safetensors_io.py) read back as the checkpoint dict it was written from:
    config, objective, model (the state_dict, its aliases put back), tokenizer (uint8 bytes), step.
    It goes through the checks every checkpoint goes through (checkpoint_checks.check_checkpoint),
    so a crafted file is a one-line UserError before anything is built from it."""
    import base64
    import binascii
    import json
    from minilm.checkpoint import bytes_to_tensor
    from minilm.checkpoint_checks import check_checkpoint
    from minilm.safetensors_io import METADATA_VERSION, load_safetensors
    weights, metadata = load_safetensors(path)
    if "config" not in metadata:
        raise UserError(f"{path} is a safetensors file but not a minilm export (its metadata has no config); "
                        "minilm.load reads the files python -m minilm.safetensors_io CHECKPOINT OUT writes")
    if metadata.get("minilm_version", METADATA_VERSION) != METADATA_VERSION:
        raise UserError(f"{path} is a minilm export of format version {metadata['minilm_version']!r}; this minilm "
                        f"reads version {METADATA_VERSION}: load it with the minilm that wrote it")
    try:
        config = json.loads(metadata["config"])
        tokenizer = base64.b64decode(metadata["tokenizer"], validate=True) if "tokenizer" in metadata else None
        step = int(metadata.get("step", "0"))
    except (ValueError, RecursionError, binascii.Error):
        raise UserError(f"{path}: its metadata's config, tokenizer or step does not parse; the file is damaged "
                        "or was not written by minilm") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: its metadata's config is not a JSON object; the file is damaged or was not "
                        "written by minilm")
    state = {"config": config, "model": weights, "objective": metadata.get("objective") or None, "step": step,
             "tokenizer": None if tokenizer is None else bytes_to_tensor(tokenizer)}
    check_checkpoint(state, path)
    return state


def load(path: str, device="auto", log: Callable[[str], None] = stderr_note) -> "Model":
    """A Model from a checkpoint file, a run folder (its newest checkpoint that loads) or minilm's
    own .safetensors export (minilm.export: the same model, from the weights and the config and
    tokenizer in its metadata).
    device: "auto" (cuda, then mps, then cpu), a name ("cpu", "cuda:1") or a torch.device."""
    check_path("path", path)
    device = check_device(device)
    if not callable(log):
        raise UserError(f"log must be a function taking a str (print, say), got {shown(log)}")
    objective, tokenizer, cfg = load_for_inference(os.fspath(path), device, log, flag="minilm.load()")
    return Model(objective, tokenizer, cfg, os.fspath(path), device)


# ----------------------------------------------------------------------------- which method fits
# what each method needs, worded for an error, before the objectives that have it (needs())
NEEDED = {"generate": "a decoder checkpoint", "fill": "a masked-LM checkpoint",
          "infill": "an encoder-decoder checkpoint", "embed": "an encoder checkpoint",
          "classify": "a classifier checkpoint"}
# score's values, as an objective declares them (Objective.token_score): what scores so, for a hint
# and for needs()
SCORERS = {"log p": "a decoder", "P(replaced)": "a replaced-token detector"}
SCORER_CHECKPOINTS = {"log p": "a decoder", "P(replaced)": "a replaced-token detection checkpoint"}
FLAG_SCORE = "P(replaced)"   # sample.py's --score prints a detector's P(replaced), not a decoder's log p
# the text each method's hint shows (embed's is a list: see hint)
HINT_TEXT = {"classify": CLASSIFY_EXAMPLE, "infill": INFILL_EXAMPLE_TEXT, "generate": "Once upon a time",
             "fill": f"text with {MASK}", "score": SCORE_EXAMPLE}


def either(names: list[str]) -> str:
    """["a", "b", "c"] -> "a, b or c"."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def objectives_that(verb: str, token_score: str | None = None) -> list[str]:
    """The registered objectives that serve `verb` (with `token_score`, for score), by name."""
    from minilm.objectives import OBJECTIVES
    return [cls.name for cls in OBJECTIVES.values() if verb in cls.capabilities
            and (token_score is None or cls.token_score == token_score)]


def needs(verb: str, flags: bool = False) -> str:
    """What `verb` needs, worded for an error, with the registered objectives that have it:
    "a decoder checkpoint (--objective clm or prefix_lm)". score names each kind of scorer;
    sample.py's --score (flags) only the ones whose values it prints."""
    if verb == "score":
        kinds = [FLAG_SCORE] if flags else list(SCORER_CHECKPOINTS)
        return " or ".join(f"{SCORER_CHECKPOINTS[kind]} (--objective {either(names)})" for kind in kinds
                           if (names := objectives_that(verb, kind)))
    names = objectives_that(verb)
    return f"{NEEDED[verb]} (--objective {either(names)})" if names else NEEDED[verb]


def part_serving(objective, verb: str):
    """The objective whose methods do `verb`: the objective itself, or the first part of a
    multi-task objective (multitask.py: rtd+plm's rtd) that declares it."""
    parts = getattr(objective, "parts", None)
    if parts:
        return next((part for part in parts.values() if verb in part.capabilities), objective)
    return objective


def served(objective, flags: bool = False) -> list[str]:
    """The methods a checkpoint (a loaded objective, or an objective class) serves, in VERBS
    order. sample.py's --score (flags) is for detectors only (it prints P(replaced)); score()
    serves every scorer."""
    return [verb for verb in VERBS if verb in objective.capabilities
            and not (flags and verb == "score" and part_serving(objective, verb).token_score != FLAG_SCORE)]


def hint(objective, flags: bool) -> str:
    """What a checkpoint can do instead of what was asked, with an example of the first method
    it serves."""
    first, *others = served(objective, flags)
    if first == "embed":
        call = ('--embed "A man plays a guitar." "Someone plays music."' if flags
                else 'embed(["A man plays a guitar.", "Someone plays music."])')
        return f"it has no masked-LM head, detector or decoder: embed texts with {call}, or fine-tune it"
    text = f"use {example(first, HINT_TEXT[first], flags)} instead"
    if first == "score":
        text += f": it is {SCORERS.get(part_serving(objective, first).token_score, 'a token scorer')}"
    return text + (f" (it also serves {', '.join(named(m, flags) for m in others)})" if others else "")


def holds(where: str, kind: str, name: str) -> str:
    return f"{where} holds {'an' if kind[0] in 'aeiou' else 'a'} {kind} ({name})"


def method_that_fits(objective, flags: bool = False) -> str:
    """The hint for a checkpoint asked for something it cannot do: what it can do instead."""
    return hint(objective, flags)


def check_method_fits(method: str, objective, where: str, asked: str | None = None) -> None:
    """One-line UserError when `objective`'s checkpoint (`where`) cannot serve `method`, saying
    what the method needs and which method fits; the wording follows sample.py's flag checks.
    asked: the method called, when it is another than the verb it needs (evaluate needs classify)."""
    if method not in served(objective):
        raise UserError(f"{asked or method}() needs {needs(method)}; "
                        f"{holds(where, objective.model_kind, objective.name)}: {hint(objective, False)}")


# ----------------------------------------------------------------------------- generate (decoders)
def generate_texts(objective, tokenizer, prompt: str, *, max_new_tokens: int, temperature: float, top_k: int,
                   top_p: float, num_samples: int, seed: int, device, use_cache: bool = True,
                   warn: Callable[[str], None] | None = None, mode: str = "", flags: bool = False) -> list[str]:
    """num_samples continuations of `prompt`, each the prompt's text followed by what the model
    wrote, up to its first <eos>. Generation starts from <eos> (the model begins as it would
    begin a new document); a prefix LM reads the prompt in both directions, as in training. An
    encoder-decoder that declares generate (ul2) reads the prompt in its encoder, framed by its
    encoder_input with `mode`, and its decoder writes the continuation."""
    from minilm.generate import generate, generate_seq2seq
    part = part_serving(objective, "generate")
    if part.model_kind == "seq2seq":
        prompt_ids = tokenizer.encode(prompt)
        ids = part.encoder_input(prompt_ids, "generate", mode)
        check_fits_window(ids, part, "the prompt with its framing")
        max_new_tokens = decoder_window(part.backbone, max_new_tokens, warn, flags)
        generator = torch.Generator(device=device).manual_seed(seed)
        rows = generate_seq2seq(part.backbone, torch.tensor([ids], device=device), max_new_tokens,
                                num_samples=num_samples, temperature=temperature, top_k=top_k, top_p=top_p,
                                generator=generator, start_id=part.decoder_start_id, eos_id=EOS_ID,
                                use_cache=use_cache)[0]
        written = [row[:row.index(EOS_ID)] if EOS_ID in row else row for row in rows.tolist()]
        return [tokenizer.decode(prompt_ids + new) for new in written]
    if mode:
        raise UserError(f"{objective.name} has no modes: leave out mode (--mode)")
    prompt_ids = [EOS_ID] + tokenizer.encode(prompt)
    batch = torch.tensor([prompt_ids] * num_samples, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = generate(objective.backbone, batch, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   generator=generator, use_cache=use_cache, warn=warn,
                   prompt_is_prefix=part_serving(objective, "generate").prompt_is_prefix)
    texts = []
    for row in out.tolist():
        new = row[len(prompt_ids):]
        if EOS_ID in new:
            new = new[:new.index(EOS_ID)]
        texts.append(tokenizer.decode(prompt_ids[1:] + new))
    return texts


# ----------------------------------------------------------------------------- fill (masked LMs)
class Candidate(NamedTuple):
    text: str            # the token's text; a special id shows its name ("<sep>")
    probability: float
    token_id: int


class Filled(NamedTuple):
    text: str                          # the text with each <mask> replaced by its best candidate
    candidates: list[list[Candidate]]  # per <mask>, in text order: the top_k, most probable first


def check_finite(values: torch.Tensor, what: str) -> torch.Tensor:
    """`values`, or a one-line UserError when they hold NaN or inf: the weights are damaged, and
    the answer would be NaN passed off as a result (generate checks its logits the same way)."""
    if not torch.isfinite(values).all():
        raise UserError(f"the model produced NaN or infinite {what}: its weights are damaged (NaN or inf); "
                        "load an earlier checkpoint or retrain")
    return values


def check_fits_window(ids: list[int], objective, what: str) -> None:
    window = objective.backbone.cfg.seq_len
    if len(ids) > window:
        raise UserError(f"{what} is {len(ids)} tokens, longer than the model's context window ({window}); "
                        "shorten it")


@torch.no_grad()
def fill_mask(objective, tokenizer, text: str, top_k: int, device, flags: bool = False) -> tuple[list, list[int]]:
    """The top_k candidates for every <mask> in `text`, from one pass of the encoder.

    Returns ([[(token id, probability), ...] per mask, in text order], the input ids).
    A space right before <mask> goes into the mask: in training, a masked word's first piece
    ("▁cat") carries its space, so "the red <mask>" must read as "the red" + <mask>, not
    "the red" + "▁" + <mask>. Write "red<mask>" to ask for the rest of a word.
    Only the text "<mask>" becomes a mask (inserted by id); any other special name typed in the
    text ("<sep>", "<cls>", "<extra_id_0>") is encoded as plain text, like in the training data.
    """
    if MASK not in text:
        raise UserError(f"{named('fill', flags)} needs at least one {MASK} in the text, e.g. "
                        f"{example('fill', FILL_EXAMPLE, flags)}")
    # Frame the text as training showed texts: an encoder trained on plain windows saw a new
    # document after <eos>; one trained on sentence pairs (mlm+sop) saw [CLS] A [SEP].
    pairs = objective.data == "segment_pairs"
    text_ids = masked_text_ids(tokenizer, text)
    ids = [CLS_ID] + text_ids + [SEP_ID] if pairs else [EOS_ID] + text_ids
    check_fits_window(ids, objective, f"{named('fill', flags)} text")
    input_ids = torch.tensor([ids], device=device)
    logits = check_finite(part_serving(objective, "fill").predict(input_ids)[0], "logits")   # (T, V)
    where = (input_ids[0] == MASK_ID).nonzero().squeeze(1)
    probs, best = logits[where].float().softmax(dim=-1).topk(min(top_k, logits.shape[-1]), dim=-1)
    candidates = [list(zip(b.tolist(), p.tolist())) for b, p in zip(best, probs)]
    return candidates, ids


def masked_text_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """A text's ids with each <mask> as MASK_ID (the space before it goes into the mask: fill_mask)."""
    parts = text.split(MASK)
    ids = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        ids += tokenizer.encode(part if last or not part.endswith(" ") else part[:-1])
        if not last:
            ids.append(MASK_ID)
    return ids


def fill(objective, tokenizer, text: str, top_k: int, device, flags: bool = False) -> Filled:
    """fill_mask's answer as texts: each candidate's text (special ids by name: the text itself
    holds no special id but the masks, so a name in the output is a guess) and the filled text."""
    candidates, ids = fill_mask(objective, tokenizer, text, top_k, device, flags)
    show = lambda tokens: tokenizer.decode(tokens, specials=True)  # noqa: E731
    best = iter([c[0][0] for c in candidates])
    inner = ids[1:-1] if ids[-1] == SEP_ID else ids[1:]  # without fill_mask's framing
    filled = [next(best) if t == MASK_ID else t for t in inner]
    return Filled(show(filled), [[Candidate(show([token]), p, token) for token, p in cands]
                                 for cands in candidates])


# ----------------------------------------------------------------------------- score
@torch.no_grad()
def score_tokens(objective, tokenizer, text: str, device, flags: bool = False) -> list[tuple[int, float]]:
    """[(token id, value)] for every token of `text`, from one pass, the text framed after <eos>
    (whose own value is not returned):
      replaced-token detectors (rtd): the discriminator's probability that the token was replaced;
      decoders (clm): log p(token | <eos> and the tokens before it), in nats."""
    if not text.strip():
        raise UserError(f"{named('score', flags)} needs some text, e.g. {example('score', SCORE_EXAMPLE, flags)}")
    ids = [EOS_ID] + tokenizer.encode(text)
    check_fits_window(ids, objective, f"{named('score', flags)} text")
    input_ids = torch.tensor([ids], device=device)
    values = part_serving(objective, "score").token_scores(input_ids)[0]               # (T-1,)
    return list(zip(ids[1:], check_finite(values, "scores").tolist()))


# ----------------------------------------------------------------------------- embed (encoders)
BATCH_SIZE = 64   # texts per forward pass in embed and classify: bounds the memory a long list takes


def batches(rows: list, batch_size: int):
    """`rows` in consecutive slices of at most batch_size."""
    for start in range(0, len(rows), batch_size):
        yield rows[start:start + batch_size]


def padded(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (input_ids (N, T) right-padded with PAD_ID, lengths (N,))."""
    lengths = torch.tensor([len(row) for row in rows], device=device)                 # (N,)
    T = int(lengths.max())
    return torch.tensor([row + [PAD_ID] * (T - len(row)) for row in rows], device=device), lengths


@torch.no_grad()
def embed_texts(objective, tokenizer, texts: list[str], device, batch_size: int = BATCH_SIZE) -> torch.Tensor:
    """(N, C) float32: per text, the mean of the final hidden states (after the final norm) over
    its real positions, framing tokens included (<eos> first, or [CLS] ... [SEP] for a model
    trained on sentence pairs; t5: its encoder over text + <eos>). The texts go through the model
    batch_size at a time, each batch right-padded; a padding mask hides the pad keys and the mean
    skips the pad positions, so a text's embedding does not depend on the texts batched with it."""
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise UserError('embed() needs at least one text, e.g. embed(["The cat sat on the mat."])')
    if part_serving(objective, "embed").embeds_sentences:   # trained for it: its own framing and pooling
        return sentence_embeddings(part_serving(objective, "embed"), tokenizer, texts, device, batch_size)
    seq2seq = objective.model_kind == "seq2seq"
    pairs = objective.data == "segment_pairs"
    rows = []
    for text in texts:
        ids = tokenizer.encode(text)
        rows.append(ids + [EOS_ID] if seq2seq else [CLS_ID] + ids + [SEP_ID] if pairs else [EOS_ID] + ids)
    longest = max(rows, key=len)
    check_fits_window(longest, objective, f"embed() text {rows.index(longest) + 1}")
    vectors = [mean_hidden_states(objective, batch, device) for batch in batches(rows, batch_size)]
    return check_finite(torch.cat(vectors), "embeddings")


def mean_hidden_states(objective, rows: list[list[int]], device) -> torch.Tensor:
    """One batch of embed_texts: framed token rows -> (N, C) float32."""
    from minilm.model import padding_mask
    input_ids, lengths = padded(rows, device)                                            # (N, T), (N,)
    mask = padding_mask(lengths, input_ids.shape[1])                                    # (N, 1, 1, T)
    model = objective.backbone
    seq2seq = objective.model_kind == "seq2seq"
    hidden = model.encode(input_ids, mask) if seq2seq else model(input_ids, mask=mask)  # (N, T, C)
    real = mask[:, 0, 0, :, None].to(hidden.dtype)                                       # (N, T, 1)
    return ((hidden * real).sum(dim=1) / lengths[:, None].to(hidden.dtype)).float()


# ---- simcse: embeddings of a sentence-embedding checkpoint, and their cosine similarities
@torch.no_grad()
def sentence_embeddings(objective, tokenizer, texts: list[str], device, batch_size: int = BATCH_SIZE) -> torch.Tensor:
    """(N, C) float32 from an objective trained for sentence embeddings (simcse, simcse_sup):
    each text framed `[CLS] text [SEP]` as its training sentences were, pooled as it was trained
    (--simcse_pooling: [CLS] before the training-only MLP, or the mean over real tokens), batch_size
    texts at a time. Padding changes nothing, so a text's vector does not depend on its batch."""
    from minilm.data.sentences import frame_sentences
    rows = [tokenizer.encode(text) for text in texts]
    longest = max(range(len(rows)), key=lambda i: len(rows[i]))
    check_fits_window(rows[longest] + [CLS_ID, SEP_ID], objective, f"embed() text {longest + 1}")
    vectors = []
    for batch in batches(rows, batch_size):
        lengths = torch.tensor([len(row) for row in batch], device=device)                 # (N,)
        width = max(1, int(lengths.max()))
        ids = torch.tensor([row + [PAD_ID] * (width - len(row)) for row in batch], device=device)   # (N, W)
        input_ids, framed_lengths = frame_sentences(ids, lengths, ids.shape[1] + 2)      # (N, W + 2)
        vectors.append(objective.embed(input_ids, framed_lengths).float())
    return check_finite(torch.cat(vectors), "embeddings")


def cosine_similarities(vectors: torch.Tensor) -> torch.Tensor:
    """(N, C) -> (N, N) cosine similarity of every pair of rows."""
    if not isinstance(vectors, torch.Tensor) or vectors.dim() != 2:
        got = f"shape {tuple(vectors.shape)}" if isinstance(vectors, torch.Tensor) else shown(vectors)
        raise UserError(f"vectors must be an (N, C) tensor, e.g. embed()'s, got {got}")
    unit = torch.nn.functional.normalize(vectors.float(), dim=-1)
    return unit @ unit.T


# ----------------------------------------------------------------------------- infill (seq2seq)
def infill_parts(text: str, flags: bool = False) -> list[str]:
    """infill text -> [text, text, ...]: the plain text between its sentinels, one more part than
    sentinels. The sentinels must be <extra_id_0>, <extra_id_1>, ... in that order: span
    corruption always numbers a window's spans from 0 (minilm/objectives/t5.py), so the model has
    seen no other order. A space right before a sentinel goes into the span, as a hidden word's
    first piece ("▁sat") carries its space in training (fill_mask does the same for <mask>)."""
    name = named("infill", flags)
    numbers = [int(n) for n in SENTINEL.findall(text)]
    if not numbers:
        raise UserError(f"{name} needs at least one <extra_id_0> in the text, e.g. "
                        f"{example('infill', INFILL_EXAMPLE_TEXT, flags)}")
    for expected, number in enumerate(numbers):
        if number != expected:
            raise UserError(f"{name} sentinels must be numbered in order from <extra_id_0>: "
                            f"<extra_id_{number}> is where <extra_id_{expected}> should be")
    if len(numbers) > NUM_SENTINELS:
        raise UserError(f"{name} has {len(numbers)} sentinels; the tokenizer has {NUM_SENTINELS}")
    parts = SENTINEL.split(text)[0::2]   # split() also returns the captured numbers, at odd places
    return [part[:-1] if i < len(parts) - 1 and part.endswith(" ") else part for i, part in enumerate(parts)]


def infill_text_ids(tokenizer: Tokenizer, text: str, flags: bool = False) -> list[int]:
    """An infill text's ids: its plain text encoded, each sentinel by id."""
    parts = infill_parts(text, flags)
    ids = []
    for i, part in enumerate(parts):
        ids += tokenizer.encode(part)
        if i < len(parts) - 1:
            ids.append(SENTINEL_IDS[i])
    return ids


def infill_input_ids(tokenizer: Tokenizer, text: str, flags: bool = False) -> list[int]:
    """The encoder's input for an infill text, as T5 frames it: its ids, then eos (T5 appends eos
    to every input). An objective may frame it otherwise (Objective.encoder_input)."""
    return infill_text_ids(tokenizer, text, flags) + [EOS_ID]


def sentinel_spans(generated_ids: list[int]) -> dict[int, list[int]]:
    """A decoder's output `<extra_id_0> span0 <extra_id_1> span1 ... eos` -> {sentinel id: span ids}.

    Read up to the first eos (all of it when there is none). Tokens before the first sentinel
    belong to no span and are dropped; a sentinel given twice keeps its first span."""
    if EOS_ID in generated_ids:
        generated_ids = generated_ids[:generated_ids.index(EOS_ID)]
    sentinels = set(SENTINEL_IDS)
    spans: dict[int, list[int]] = {}
    current = None
    for token in generated_ids:
        if token in sentinels:
            current = [] if token not in spans else None
            if current is not None:
                spans[token] = current
        elif current is not None:
            current.append(token)
    return spans


def infill_text(tokenizer: Tokenizer, text: str, generated_ids: list[int]) -> str:
    """The infill text with each sentinel replaced by the span the decoder wrote for it (nothing
    for a sentinel it skipped). The ids are joined first and decoded once, so a span's leading
    space and a character split over pieces come out as one text."""
    parts, spans = infill_parts(text), sentinel_spans(list(generated_ids))
    ids = []
    for i, part in enumerate(parts):
        ids += tokenizer.encode(part)
        if i < len(parts) - 1:
            ids += spans.get(SENTINEL_IDS[i], [])
    return tokenizer.decode(ids)


def infill_decode(objective, tokenizer, text: str, *, max_new_tokens: int, temperature: float, top_k: int,
                  top_p: float, num_samples: int, seed: int, beam_size: int, length_penalty: float, device,
                  use_cache: bool = True, warn: Callable[[str], None] | None = None,
                  flags: bool = False, mode: str = "") -> tuple[list[str], list[float] | None]:
    """Encode the infill text once, decode it; ([filled text, ...], beam scores or None).

    beam_size > 1: the best min(num_samples, beam_size) fillings of a beam search, best first,
    with their scores (sum of log-probabilities / length ** length_penalty); temperature, top_k
    and top_p are unused. Otherwise num_samples sampled fillings, or the one greedy filling at
    temperature 0. max_new_tokens past the decoder's window is cut to it, with a note on `warn`.
    mode: the mode token an objective that has them opens its input with (ul2: R or X)."""
    from minilm.generate import beam_search, generate_seq2seq
    model = objective.backbone
    ids = part_serving(objective, "infill").encoder_input(infill_text_ids(tokenizer, text, flags), "infill", mode)
    if len(ids) > model.cfg.seq_len:
        raise UserError(f"{named('infill', flags)} text is {len(ids)} tokens with its eos, longer than the model's "
                        f"input window ({model.cfg.seq_len}); shorten it")
    max_new_tokens = decoder_window(model, max_new_tokens, warn, flags)
    input_ids = torch.tensor([ids], device=device)
    shared = dict(start_id=part_serving(objective, "infill").decoder_start_id, eos_id=EOS_ID, use_cache=use_cache)
    scores = None
    if beam_size > 1:
        tokens, beam_scores = beam_search(model, input_ids, max_new_tokens, beam_size=beam_size,
                                          length_penalty=length_penalty, **shared)
        count = min(num_samples, beam_size)
        found = beam_scores[0, :count].isfinite()   # -inf: no hypothesis (max_new_tokens 0 has one)
        rows, scores = tokens[0, :count][found], beam_scores[0, :count][found].tolist()
    else:
        count = 1 if temperature == 0 else num_samples   # greedy has one answer
        generator = torch.Generator(device=device).manual_seed(seed)
        rows = generate_seq2seq(model, input_ids, max_new_tokens, num_samples=count, temperature=temperature,
                                top_k=top_k, top_p=top_p, generator=generator, **shared)[0]
    return [infill_text(tokenizer, text, row) for row in rows.tolist()], scores


def decoder_window(model, max_new_tokens: int, warn, flags: bool) -> int:
    """max_new_tokens, cut to what an encoder-decoder's decoder can write (its window), with a note."""
    if max_new_tokens > model.decoder.cfg.seq_len:
        option = "--max_new_tokens " if flags else "max_new_tokens="
        if warn is not None:
            warn(f"note: the decoder writes at most {model.decoder.cfg.seq_len} tokens (its context window); "
                 f"{option}{max_new_tokens} is cut to that")
        return model.decoder.cfg.seq_len
    return max_new_tokens


# ----------------------------------------------------------------------------- classify (classifiers)
@torch.no_grad()
def classify_texts(objective, tokenizer, texts, device, flags: bool = False,
                   batch_size: int = BATCH_SIZE) -> list[list[tuple[str, float]]]:
    """Per text, [(label, probability)] over every label, most probable first. Each text is framed
    as in fine-tuning, [CLS] text [SEP], its first seq_len - 2 tokens kept (as LabelledSource
    truncates); the texts go through batch_size at a time, each batch right-padded, and the
    classifier's padding mask and pooling skip the padding, so a text's answer does not depend on
    the texts batched with it."""
    if isinstance(texts, str):
        texts = [texts]
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise UserError(f"{named('classify', flags)} needs some text, e.g. "
                        f"{example('classify', CLASSIFY_EXAMPLE, flags)}")
    names, answers = objective.label_names, []
    for logits in label_logits(objective, tokenizer, texts, device, batch_size):       # (N, n_labels) each
        probabilities = logits.softmax(dim=-1)
        ranked, order = probabilities.sort(dim=-1, descending=True)
        answers += [[(names[i], p) for i, p in zip(row_order, row_probs)]
                    for row_order, row_probs in zip(order.tolist(), ranked.tolist())]
    return answers


# ----------------------------------------------------------------------------- logits and hidden states
# For a user comparing minilm with another library, or probing what each layer holds: the raw
# numbers of one sequence, read as the objective's own forward reads it. A text is framed as the
# other methods frame it (input_ids_of); a list of ids is taken exactly as given.
def lm_head_of(objective) -> str | None:
    """Which LM head a checkpoint has, from what its objective declares: "seq2seq" (an
    encoder-decoder's decoder: infill or generate on model_kind seq2seq), "masked" (a masked LM's
    per-position predictions: fill), "next" (a decoder's next-token logits: generate, or score
    as log p), or None (a detector, a sentence embedder, a classifier: no head over the vocabulary)."""
    declared = objective.capabilities
    if objective.model_kind == "seq2seq" and declared & {"infill", "generate"}:
        return "seq2seq"
    if "fill" in declared:
        return "masked"
    if "generate" in declared or ("score" in declared and part_serving(objective, "score").token_score == "log p"):
        return "next"
    return None


def objectives_with_lm_head() -> list[str]:
    """The registered objectives that have an LM head (lm_head_of), by name, for a message."""
    from minilm.objectives import OBJECTIVES
    return [cls.name for cls in OBJECTIVES.values() if lm_head_of(cls) is not None]


def reads_causally(objective) -> bool:
    """Whether the backbone reads each position from the ones before it only: a decoder (a prefix
    LM too, here: a prefix of one token, which its training also draws) or a causal classifier."""
    return objective.model_kind in ("decoder", "prefix_decoder") or bool(getattr(objective, "causal", False))


def frames_with_cls(objective) -> bool:
    """Whether training framed a text as [CLS] text [SEP] (sentence pairs, a sentence embedder, a
    classifier) rather than after an <eos> (running text)."""
    return (objective.data == "segment_pairs" or "classify" in objective.capabilities
            or ("embed" in objective.capabilities and part_serving(objective, "embed").embeds_sentences))


def sentinel_text_ids(tokenizer: Tokenizer, text: str, name: str = "text") -> list[int]:
    """A text's ids with each <extra_id_N> as sentinel N's id (the space before one goes into its
    span, as infill_parts has it); any order, and a text without sentinels is plain text."""
    parts = SENTINEL.split(text)   # text, number, text, number, ..., text
    ids = []
    for i in range(0, len(parts), 2):
        last = i == len(parts) - 1
        ids += tokenizer.encode(parts[i] if last or not parts[i].endswith(" ") else parts[i][:-1])
        if not last:
            number = int(parts[i + 1])
            if number >= NUM_SENTINELS:
                raise UserError(f"{name} has <extra_id_{number}>, which is no sentinel: the tokenizer has "
                                f"<extra_id_0> .. <extra_id_{NUM_SENTINELS - 1}>")
            ids.append(SENTINEL_IDS[number])
    return ids


def input_ids_of(objective, tokenizer: Tokenizer, text: str, name: str = "text") -> list[int]:
    """The ids logits() and hidden() read for `text`, framed as training framed a text: an
    encoder-decoder's encoder input (sentinels by id, then <eos>: Objective.encoder_input); [CLS]
    text [SEP] (classifiers, sentence embedders, sentence pairs); else <eos> then the text. A
    masked LM's <mask> is MASK_ID, as in fill."""
    if objective.model_kind == "seq2seq":
        part = part_serving(objective, "infill")
        return part.encoder_input(sentinel_text_ids(tokenizer, text, name), "infill")
    ids = masked_text_ids(tokenizer, text) if "fill" in objective.capabilities else tokenizer.encode(text)
    return [CLS_ID] + ids + [SEP_ID] if frames_with_cls(objective) else [EOS_ID] + ids


def token_ids(name: str, value, vocab_size: int) -> list[int]:
    """A list (or tuple, or 1-D integer tensor) of token ids of this vocabulary -> list[int]; a
    one-line UserError naming the argument otherwise."""
    what = f"a str (a text) or a list of token ids in [0, {vocab_size})"
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise UserError(f"{name} must be {what}; got a {value.dtype} tensor of shape {tuple(value.shape)}: "
                            "give one sequence, e.g. ids[0] of a (1, T) batch")
        value = value.tolist()
    elif isinstance(value, (list, tuple)):
        for i, token in enumerate(value):
            if not isinstance(token, int) or isinstance(token, bool):
                raise UserError(f"{name}[{i}] must be a token id (an int), got {shown(token)}")
        value = list(value)
    else:
        hint = ': decode it first, e.g. text.decode("utf-8")' if isinstance(value, (bytes, bytearray)) else ""
        raise UserError(f"{name} must be {what}, got {shown(value)}{hint}")
    if not value:
        raise UserError(f"{name} is empty; give at least one token id (or a text)")
    for i, token in enumerate(value):
        if not 0 <= token < vocab_size:
            raise UserError(f"{name}[{i}] is {token}, not a token id of this model (its vocabulary is "
                            f"0 .. {vocab_size - 1})")
    return value


def ids_of(objective, tokenizer: Tokenizer, name: str, value) -> list[int]:
    """`value` (a text, framed: input_ids_of; or ids, as given) -> ids that fit the model's window."""
    if isinstance(value, str):
        ids = input_ids_of(objective, tokenizer, value, name)
    else:
        ids = token_ids(name, value, objective.backbone.cfg.vocab_size)
    check_fits_window(ids, objective, f"{name} with its framing" if isinstance(value, str) else name)
    return ids


@torch.no_grad()
def lm_logits(objective, ids: list[int], device, target: list[int] | None = None) -> torch.Tensor:
    """(T, V) fp32: the LM head's logits at every position of `ids`, computed as the objective's
    own forward computes them (lm_head_of says which head):
      next     a decoder: row t is the distribution of the token after position t (causal mask);
      masked   a masked LM: row t is its prediction of the token at position t (predict, dense);
      seq2seq  an encoder-decoder: the encoder reads `ids`, the decoder reads its start id then
               `target` (teacher forcing); row t is the distribution of target token t, and the
               last row the token after the target: (len(target) + 1, V)."""
    input_ids = torch.tensor([ids], device=device)
    head = lm_head_of(objective)
    if head == "seq2seq":
        part, model = part_serving(objective, "infill"), objective.backbone
        decoder_ids = torch.tensor([[part.decoder_start_id] + list(target or [])], device=device)
        logits = model.logits(model.decode(decoder_ids, model.encode(input_ids)))
    elif head == "masked":
        logits = part_serving(objective, "fill").predict(input_ids)
    else:
        logits = objective.backbone.logits(objective.backbone(input_ids))
    return check_finite(logits[0].float(), "logits")


@torch.no_grad()
def hidden_states(objective, ids: list[int], device) -> torch.Tensor:
    """(n_layer + 1, T, C) fp32: the embeddings' output, then every block's output, the last as the
    model hands it on (after the final norm, where it has one): what the objective's heads read.
    The mask is the objective's (causal for decoders and causal classifiers, none for encoders);
    an encoder-decoder gives its encoder's states. The blocks' outputs are read with forward
    hooks, so the pass is the model's own forward."""
    model = objective.backbone.encoder if objective.model_kind == "seq2seq" else objective.backbone
    input_ids = torch.tensor([ids], device=device)
    outputs = []
    hooks = [block.register_forward_hook(lambda module, args, output: outputs.append(output))
             for block in model.blocks]
    try:
        last = model(input_ids, mask=CAUSAL if reads_causally(objective) else None)   # (1, T, C)
    finally:
        for hook in hooks:
            hook.remove()
    layers = [model.embed(input_ids)] + outputs[:-1] + [last]
    return check_finite(torch.cat(layers).float(), "hidden states")


def label_logits(objective, tokenizer, texts: list[str], device, batch_size: int = BATCH_SIZE):
    """The classifier's logits, (N, n_labels) fp32 per batch of batch_size texts, each text framed
    as in fine-tuning, [CLS] text [SEP], its first seq_len - 2 tokens kept (as LabelledSource
    truncates); each batch right-padded, the padding masked and skipped by the pooling."""
    keep = objective.backbone.cfg.seq_len - 2
    rows = [[CLS_ID] + tokenizer.encode(text)[:keep] + [SEP_ID] for text in texts]
    for batch in batches(rows, batch_size):
        yield check_finite(objective.logits(*padded(batch, device)), "logits")


# ----------------------------------------------------------------------------- evaluate (classifiers)
# A classifier checkpoint scored on a labelled file without training: every row classified once,
# the (true, predicted) pairs counted into a confusion matrix, and from it what fine-tuning's
# evaluation reports (objectives/classify.py: confusion_metrics, format_confusion). The file is read
# by the row readers training uses (minilm/data/reading.py: .tsv/.csv with a header, .jsonl), and a
# row is skipped as training skips it (an empty text or label), counted, never silently.
class Evaluation(NamedTuple):
    path: str
    labels: list[str]                 # the model's label names, in id order
    confusion: torch.Tensor           # (n_labels, n_labels) int64, rows = true label, columns = predicted
    accuracy: float
    macro_f1: float                   # the mean F1 over the labels present in truth or predictions
    precision: dict[str, float | None]   # per label: right / predicted as it (None: never predicted)
    recall: dict[str, float | None]      # per label: right / its rows (None: no row of it)
    rows: int                         # the rows evaluated
    skipped: int                      # rows with an empty text or label

    def report(self) -> str:
        """What sample.py --evaluate prints: the counts, accuracy and macro-F1, per label its
        precision, recall and rows, then the confusion matrix (past FULL_MATRIX_LABELS labels, the
        summary format_confusion gives, which has the worst labels' precision and recall)."""
        from minilm.objectives.classify import FULL_MATRIX_LABELS, format_confusion
        skipped = f" ({self.skipped} skipped: an empty text or label)" if self.skipped else ""
        lines = [f"{self.rows} rows of {self.path}{skipped}", f"accuracy  {self.accuracy:.4f}",
                 f"macro-F1  {self.macro_f1:.4f}"]
        if len(self.labels) <= FULL_MATRIX_LABELS:
            width = max([len(name) for name in self.labels] + [5])
            show = lambda value: "-" if value is None else f"{value:.4f}"  # noqa: E731
            support = self.confusion.sum(1).tolist()
            lines.append(f"{'label'.ljust(width)}  precision  recall    rows")
            lines += [f"{name.ljust(width)}  {show(self.precision[name]):>9}  {show(self.recall[name]):>6}  {n:>6}"
                      for name, n in zip(self.labels, support)]
        lines.append("confusion matrix (rows: true label, columns: predicted):")
        lines.append(format_confusion(self.confusion, self.labels))
        return "\n".join(lines)


def labelled_rows(path: str, text_field: str, label_field: str, flags: bool) -> tuple[list[str], list[str], int]:
    """(texts, labels, rows skipped) of a labelled file, read as training reads one: a one-line
    UserError for a file that is missing, plain text or lacks a column, worded for the caller."""
    from minilm.data.reading import iter_rows
    named_file = "--evaluate" if flags else "evaluate()"
    columns = [(text_field, "--text_field" if flags else "text_field="),     # "pass --text_field NAME"
               (label_field, "--label_field" if flags else "label_field=")]
    if not os.path.exists(path) and not any(ch in path for ch in "*?["):
        raise UserError(f"{named_file}: {path} does not exist; give a labelled .tsv/.csv file (with a header) or "
                        ".jsonl file")
    texts, labels, skipped = [], [], 0
    try:
        for text, label in iter_rows(path, columns):
            label = (label or "").strip()   # as training reads a label (data/rows.py)
            if text is None or not text.strip() or not label:
                skipped += 1
                continue
            texts.append(text)
            labels.append(label)
    except UserError as err:
        message = str(err).replace("--data", named_file).replace("this objective reads", f"{named_file} reads")
        if not flags:   # the readers say "pass FLAG NAME": a keyword argument's is field="NAME"
            message = message.replace("_field= NAME", '_field="NAME"')
        raise UserError(message) from None
    return texts, labels, skipped


@torch.no_grad()
def evaluate_file(objective, tokenizer, path: str, *, text_field: str = "text", label_field: str = "label", device,
                  batch_size: int = BATCH_SIZE, flags: bool = False) -> Evaluation:
    """Classify every row of a labelled file once and count (true, predicted) pairs: an Evaluation.
    A label the model does not know is a one-line UserError naming it (its head has no output for
    it); a file with no row to evaluate is one too."""
    from minilm.objectives.classify import confusion_metrics
    texts, labels, skipped = labelled_rows(path, text_field, label_field, flags)
    names = list(objective.label_names)
    ids = {name: i for i, name in enumerate(names)}
    unknown: dict[str, int] = {}
    for label in labels:
        if label not in ids:
            unknown[label] = unknown.get(label, 0) + 1
    if unknown:
        shown_labels = ", ".join(f"{label!r} ({n} row{'s' if n > 1 else ''})" for label, n in list(unknown.items())[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise UserError(f"{path} has labels the model does not know: {shown_labels}{more}; it predicts "
                        f"{', '.join(names[:20])}{', ...' if len(names) > 20 else ''}: evaluate it on rows of those "
                        f"labels (or check {'--label_field' if flags else 'label_field'})")
    if not texts:
        raise UserError(f"{path} has no row to evaluate ({skipped} skipped: an empty text or label)")
    truth = torch.tensor([ids[label] for label in labels])
    predicted = torch.cat([logits.argmax(-1).cpu() for logits in
                           label_logits(objective, tokenizer, texts, device, batch_size)])
    K = len(names)
    confusion = torch.bincount(truth * K + predicted, minlength=K * K).view(K, K)
    right, rows_of, predicted_as = confusion.diagonal().tolist(), confusion.sum(1).tolist(), confusion.sum(0).tolist()
    metrics = confusion_metrics(confusion)
    return Evaluation(path=path, labels=names, confusion=confusion, accuracy=metrics["acc"],
                      macro_f1=metrics["macro_f1"],
                      precision={name: right[i] / predicted_as[i] if predicted_as[i] else None
                                 for i, name in enumerate(names)},
                      recall={name: right[i] / rows_of[i] if rows_of[i] else None for i, name in enumerate(names)},
                      rows=len(texts), skipped=skipped)


# ----------------------------------------------------------------------------- the model
class Model:
    """A loaded checkpoint (minilm.load), ready for inference. Attributes: objective (the
    nn.Module with its heads; .backbone the network), tokenizer, config, path, device, and
    name / kind (the objective's name and model_kind: decoder, prefix_decoder, encoder, seq2seq).

    Each method works where the objective declares it (Objective.capabilities) and raises a
    one-line UserError naming the method that fits otherwise:
      generate   decoders (clm) and prefix LMs (prefix_lm: the prompt is the prefix)
      fill       masked LMs (mlm, wwm, span, mlm+sop)
      infill     encoder-decoders (t5)
      score      decoders (clm): log-probabilities; replaced-token detectors (rtd, or rtd+plm's
                 rtd part): P(replaced)
      embed      encoders (every masked/denoising objective, rtd's discriminator, t5's encoder)
      classify   classifiers (--objective classify): label probabilities
      evaluate   classifiers: accuracy, macro-F1 and the confusion matrix on a labelled file
      logits     every checkpoint with an LM head (decoders, masked LMs, encoder-decoders): the
                 head's (T, V) logits of one sequence, as the objective's forward computes them
      hidden     every checkpoint: per-token hidden states of every layer, (n_layer + 1, T, C)
    input_ids(text) is the framing logits() and hidden() give a text.
    """

    def __init__(self, objective, tokenizer: Tokenizer, config, path: str, device):
        self.objective, self.tokenizer, self.config = objective, tokenizer, config
        self.path, self.device = path, torch.device(device)

    @property
    def name(self) -> str:
        return self.objective.name

    @property
    def kind(self) -> str:
        return self.objective.model_kind

    def __repr__(self) -> str:
        return f"minilm.Model({self.path!r}, objective={self.name!r}, kind={self.kind!r}, device={str(self.device)!r})"

    def _check(self, method: str) -> None:
        check_method_fits(method, self.objective, self.path)

    def generate(self, prompt: str = "", max_new_tokens: int = 100, temperature: float = 0.8, top_k: int = 0,
                 top_p: float = 0.95, num_samples: int = 1, seed: int = 0, use_cache: bool = True,
                 mode: str = "") -> list[str]:
        """num_samples texts: the prompt followed by the model's continuation, each cut at the
        first <eos> it writes. temperature 0 is greedy; top_k 0 is off. The same seed gives the
        same texts (and the same as `sample.py --seed`). A text past the context window is
        continued from its last seq_len tokens, with a note on stderr. max_new_tokens 0 gives the
        prompt itself. mode: the mode token of an objective that has them (ul2: S by default)."""
        self._check("generate")
        check_text("prompt", prompt)
        check_mode(mode)
        check_int("max_new_tokens", max_new_tokens, at_least=0)
        check_sampling(temperature, top_k, top_p, num_samples, seed, use_cache)
        return generate_texts(self.objective, self.tokenizer, prompt, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_k=top_k, top_p=top_p, num_samples=num_samples, seed=seed,
                              device=self.device, use_cache=use_cache, warn=lambda msg: stderr_note(f"note: {msg}"),
                              mode=mode)

    def fill(self, text: str, top_k: int = 5) -> Filled:
        """Every <mask> in `text` predicted at once, each from the text around it: Filled(text,
        candidates), text with each mask's best guess, candidates the top_k Candidate(text,
        probability, token_id) per mask, in text order, most probable first. A space right before
        <mask> goes into the mask (write "red<mask>" for the rest of a word)."""
        self._check("fill")
        check_text("text", text)
        check_int("top_k", top_k, at_least=1)
        return fill(self.objective, self.tokenizer, text, top_k, self.device)

    def infill(self, text: str, max_new_tokens: int = 100, temperature: float = 0.8, top_k: int = 0,
               top_p: float = 0.95, num_samples: int = 1, seed: int = 0, beam_size: int = 1,
               length_penalty: float = 1.0, use_cache: bool = True, mode: str = "") -> list[str]:
        """`text` with every sentinel (<extra_id_0>, <extra_id_1>, ... in order) replaced by the
        span the decoder writes for it. Sampling gives num_samples texts; temperature 0 the one
        greedy text; beam_size > 1 the best min(num_samples, beam_size) of a beam search, best
        first (ranked by sum of log-probabilities / length ** length_penalty, length_penalty in
        [-5, 5]). max_new_tokens 0 writes no span: the text without its sentinels, once. mode: the
        mode token of an objective that has them (ul2: R, short gaps, by default; X for long ones)."""
        from minilm.generate import LENGTH_PENALTY_RANGE
        self._check("infill")
        check_text("text", text)
        check_int("max_new_tokens", max_new_tokens, at_least=0)
        check_int("beam_size", beam_size, at_least=1)
        check_float("length_penalty", length_penalty, within=LENGTH_PENALTY_RANGE)
        check_sampling(temperature, top_k, top_p, num_samples, seed, use_cache)
        check_mode(mode)
        texts, _scores = infill_decode(
            self.objective, self.tokenizer, text, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, num_samples=num_samples, seed=seed, beam_size=beam_size, length_penalty=length_penalty,
            device=self.device, use_cache=use_cache, warn=stderr_note, mode=mode)
        return texts

    def score(self, text: str) -> list[tuple[str, float]]:
        """[(piece, value)] for every token of `text` (sentencepiece pieces, "▁" for a space):
          decoders (clm): value = log p(token | the tokens before it), natural log; the text is
            read as a new document (after <eos>), so the values sum to the text's log-likelihood;
          replaced-token detectors (rtd): value = the discriminator's probability that the token
            was replaced (what `sample.py --score` prints)."""
        self._check("score")
        check_text("text", text)
        return [(self.tokenizer.id_to_piece(token), value)
                for token, value in score_tokens(self.objective, self.tokenizer, text, self.device)]

    def embed(self, texts: list[str], batch_size: int = BATCH_SIZE) -> torch.Tensor:
        """(N, C) float32 on self.device. A sentence-embedding checkpoint (simcse, simcse_sup)
        pools as it was trained (sentence_embeddings); any other encoder gives, for each text, the
        mean of its final hidden states (after its final norm) over the text's positions, framing
        tokens included and padding excluded (embed_texts), a reasonable but untrained embedding.
        Either way a text's embedding does not depend on its batch: the texts go through the model
        batch_size at a time, which bounds the memory a long list takes. A single str is one text:
        (1, C). Compare them with minilm.api.cosine_similarities."""
        self._check("embed")
        check_texts("texts", texts)
        check_int("batch_size", batch_size, at_least=1)
        return embed_texts(self.objective, self.tokenizer, texts, self.device, batch_size)

    def classify(self, texts, batch_size: int = BATCH_SIZE):   # classify
        """Label probabilities, most probable first: a str gives [(label, probability), ...] over
        every label; a list of texts gives one such list per text, batch_size texts per forward
        pass. The texts are framed as in fine-tuning ([CLS] text [SEP]); a text past the context
        window keeps its first tokens."""
        self._check("classify")
        check_texts("texts", texts)
        check_int("batch_size", batch_size, at_least=1)
        answers = classify_texts(self.objective, self.tokenizer, texts, self.device, batch_size=batch_size)
        return answers[0] if isinstance(texts, str) else answers

    def evaluate(self, path: str, text_field: str = "text", label_field: str = "label",
                 batch_size: int = BATCH_SIZE) -> Evaluation:
        """A classifier scored on a labelled file (.tsv/.csv with a header, or .jsonl; the text in
        column text_field, the label in label_field, as train.py reads them), every row classified
        once (as classify() frames it): an Evaluation with accuracy, macro_f1, per-label precision
        and recall, and the confusion matrix; .report() is the text sample.py --evaluate prints. A
        row with an empty text or label is skipped and counted; a label the model does not know is
        a one-line UserError."""
        check_method_fits("classify", self.objective, self.path, asked="evaluate")
        check_path("path", path, "a labelled .tsv/.csv/.jsonl file")
        check_text("text_field", text_field)
        check_text("label_field", label_field)
        check_int("batch_size", batch_size, at_least=1)
        return evaluate_file(self.objective, self.tokenizer, os.fspath(path), text_field=text_field,
                             label_field=label_field, device=self.device, batch_size=batch_size)

    def input_ids(self, text: str) -> list[int]:
        """The ids logits() and hidden() read for `text`: framed as training framed a text (<eos>
        then the text; [CLS] text [SEP] for classifiers, sentence embedders and sentence pairs; an
        encoder-decoder's encoder input: the text, sentinels by id, then <eos>); a masked LM's
        <mask> becomes its id, as in fill."""
        check_text("text", text)
        return input_ids_of(self.objective, self.tokenizer, text)

    def logits(self, text_or_ids, target=None) -> torch.Tensor:
        """(T, V) float32 on self.device: the LM head's logits at every position, computed as the
        objective's forward computes them. A text is framed (input_ids(text) says how, so row t
        belongs to its id t); a list or 1-D tensor of ids is read exactly as given.
          decoders (clm, prefix_lm):  row t is the distribution of the token after position t,
                                      read causally (a prefix LM with a prefix of one token)
          masked LMs (mlm, ...):      row t is the prediction of the token at position t
          encoder-decoders (t5, ul2): the encoder reads text_or_ids; the decoder reads its start id
                                      then `target` (a text, sentinels by id, or ids; none by
                                      default): (len(target) + 1, V), row t the distribution of
                                      target token t (teacher forcing, as in training)
        A checkpoint with no head over the vocabulary (a detector, a sentence embedder, a
        classifier) raises a one-line UserError saying what it serves instead."""
        held = holds(self.path, self.kind, self.name)
        if lm_head_of(self.objective) is None:
            raise UserError(f"logits() needs a checkpoint with an LM head, a decoder, a masked LM or an "
                            f"encoder-decoder (--objective {either(objectives_with_lm_head())}); {held}: "
                            f"{hint(self.objective, False)}")
        ids = ids_of(self.objective, self.tokenizer, "text_or_ids", text_or_ids)
        target_ids = None
        if target is not None:
            if lm_head_of(self.objective) != "seq2seq":
                raise UserError(f"target is the text an encoder-decoder's decoder reads; {held}, which reads one "
                                "sequence: leave target out")
            target_ids = (sentinel_text_ids(self.tokenizer, target, "target") if isinstance(target, str)
                          else token_ids("target", target, self.objective.backbone.cfg.vocab_size))
            window = self.objective.backbone.decoder.cfg.seq_len
            if len(target_ids) + 1 > window:
                raise UserError(f"target is {len(target_ids)} tokens; with the decoder's start id that is longer than "
                                f"its context window ({window}); shorten it")
        return lm_logits(self.objective, ids, self.device, target_ids)

    def hidden(self, text_or_ids, layer: int | None = None) -> torch.Tensor:
        """Per-token hidden states, float32 on self.device: (n_layer + 1, T, C), the embeddings'
        output then each block's output, the last after the final norm as the model uses it (what
        the heads and embed() read); `layer` picks one, (T, C) (negative counts from the end: -1 is
        the last). A text is framed as in logits() (input_ids(text)); ids are read as given. The
        mask is the model's own: a decoder's position t sees positions up to t only. An
        encoder-decoder gives its encoder's states."""
        ids = ids_of(self.objective, self.tokenizer, "text_or_ids", text_or_ids)
        n = self.objective.backbone.cfg.n_layer
        if layer is not None:
            check_int("layer", layer, within=f"[-{n + 1}, {n}]")
        states = hidden_states(self.objective, ids, self.device)
        return states if layer is None else states[layer]
